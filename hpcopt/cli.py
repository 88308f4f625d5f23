"""`hpcopt` subcommands (DESIGN §7). User errors: one line on stderr, exit 2 (config) or 3 (data).

Heavy modules (numpy, numba, h5py) are imported inside the commands, after the thread count per
rank is set: BLAS reads it when numpy is first imported.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .diagnosis import EXIT_MISMATCH, EXIT_STALL  # noqa: F401  (train's exit codes, docs/diagnosis.md)
from .errors import ConfigError, HpcoptError

PDE_PROBLEMS = ("darcy2d", "heat2d", "burgers1d")  # hpcopt/data/pde.py PROBLEMS (kept numpy-free here)
EXIT_RESUME = 75  # `train` checkpointed on SIGUSR1/SIGTERM and wants to be resumed (EX_TEMPFAIL)


def _train(args) -> int:
    from .signals import PROCESS as stop

    stop.install()  # already, when started as `python -m hpcopt` or `hpcopt`: see main()

    from mpi4py import MPI

    from . import comm, config

    world = MPI.COMM_WORLD
    cfg = comm.agree(world, config.load, args.job, args.overrides)
    threads, thread_source = comm.threads_per_rank(cfg.backend.threads, comm.ranks_on_node(world))
    comm.pin_threads(threads)

    import numba

    from .train import Trainer

    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    shape = (cfg.parallel.dp, cfg.parallel.pp, cfg.parallel.tp)
    comm.agree(world, comm.grid_shape, world.Get_size(), *shape, cfg.source)  # one message, not one per rank
    out_dir = config.resolve_out_dir(cfg)
    resume = args.resume
    if cfg.optimizer.name == "auto":  # race the zoo on groups of ranks first (hpcopt/sweep/auto.py)
        from .sweep import auto

        cfg, resume, raced = auto.resolve(cfg, world, out_dir, args.resume, stop)
        if not raced:
            stop.ignore_from_now()
            write_status(EXIT_RESUME)
            return EXIT_RESUME
    grid = comm.make_grid(world, *shape, cfg.source)
    trainer = Trainer(cfg, grid, out_dir, quiet=args.quiet, resume=resume, resume_force=args.resume_force,
                      signals=stop)
    try:
        comm.root_print(f"hpcopt: training {cfg.source} on {grid.describe()}, {threads} thread(s) per rank "
                        f"({thread_source}), {trainer.total_steps} steps of {trainer.global_batch} samples, "
                        f"optimizer {cfg.optimizer.name}, strategy {trainer.strategy.name}, run directory {out_dir}")
        summary = trainer.fit()
        stop.ignore_from_now()  # the run has ended: a signal from here on must not turn 0 or 75 into 138
        comm.root_print(summary.line())
    finally:
        trainer.release()
    code = EXIT_RESUME if summary.stopped_by else 0
    write_status(code)
    return code


def write_status(code: int) -> None:
    """HPCOPT_STATUS_FILE: rank 0 writes its exit code there. mpirun exits 1 when it is itself sent
    SIGTERM, whatever the ranks return; a batch script reads the file to tell "checkpointed, resume
    me" (75) from a failure (docs/slurm.md)."""
    path = os.environ.get("HPCOPT_STATUS_FILE")
    if path and _world_rank() == 0:
        try:
            with open(path, "w") as f:
                f.write(f"{code}\n")
        except OSError as e:
            print(f"hpcopt: warning: cannot write HPCOPT_STATUS_FILE {path} ({e.strerror or e})", file=sys.stderr)


def _data_make(args) -> int:
    if args.name in PDE_PROBLEMS:
        return _data_make_pde(args)
    from .data import make_digits, make_synthetic
    from .errors import DataError

    try:
        if args.name == "digits":
            make_digits(args.out)
        else:
            samples = 10000 if args.samples is None else args.samples
            make_synthetic(args.out, samples, args.features, args.classes, seed=args.seed)
    except OSError as e:
        raise DataError(f"{args.out}: cannot write ({e.strerror or e})") from None
    from .data import inspect

    info = inspect(args.out)
    print(f"wrote {args.out}: {info.name}, {info.sizes['train']} train + {info.sizes['test']} test samples, "
          f"{info.features} features, {info.classes} classes")
    return 0


def _data_make_pde(args) -> int:
    """PDE input/solution pairs, written by all ranks of the job together (docs/data.md)."""
    from .comm import root_print
    from .data import pde

    if args.samples is None:
        args.samples = 1000
    info = pde.run_from_args(args, args.name)  # collective; a failure raises alike on every rank
    n = info.sizes["train"] + info.sizes["test"]
    root_print(f"wrote {info.path}: {info.problem}, {info.sizes['train']} train + {info.sizes['test']} test "
               f"samples, x {info.input_shape}, y {info.target_shape}, {info.seconds:.1f} s on {info.ranks} "
               f"rank(s) ({n / info.seconds:.1f} samples/s)")
    return 0


def _data_import(args) -> int:
    from .data.importer import import_arrays

    r = import_arrays(args.src, args.out, args.x, args.y, args.test_fraction, args.seed, args.task, args.compress)
    what = f"{r['classes']} classes" if r["task"] == "classification" else f"targets of shape {r['y_shape']}"
    print(f"wrote {args.out}: {r['task']}, {r['train']} train + {r['test']} test samples of shape {r['x_shape']}, "
          f"{what}")
    return 0


def _data_stats(args) -> int:
    from mpi4py import MPI

    from .data.importer import compute_stats

    comm = MPI.COMM_WORLD
    n = compute_stats(args.path, comm)
    if comm.Get_rank() == 0:
        print(f"wrote /stats/y_mean and /stats/y_std of {args.path} ({n} training samples, {comm.Get_size()} ranks)")
    return 0


def _ckpt_ls(args) -> int:
    import time

    from . import checkpoint
    from .errors import DataError

    if not os.path.isdir(args.run_dir):
        raise ConfigError(f"{args.run_dir}: no such run directory")
    rows = checkpoint.list_checkpoints(args.run_dir)
    if not rows:
        print(f"{args.run_dir}: no checkpoints")
        return 0
    print(f"{'step':>10}  {'written':19}  {'size':>10}  {'world (dp,pp,tp)':16}  status")
    for step, path in rows:
        size = os.path.getsize(path)
        try:
            ck = checkpoint.read(path)
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ck.attrs.get("written_at", 0)))
            world, status = str(tuple(ck.attrs["world"])), "ok"
        except DataError as e:
            when, world, status = "?", "?", f"CORRUPT: {str(e).split(': ', 1)[-1]}"
        print(f"{step:>10}  {when:19}  {size / 2**20:>8.1f}MB  {world:16}  {status}")
    return 0


def _ckpt_verify(args) -> int:
    from . import checkpoint

    ck = checkpoint.read(args.ckpt)
    n = sum(a.size for a in ck.params.values())
    print(f"{args.ckpt}: ok (step {ck.attrs['step']}, {len(ck.params)} parameter tensors, {n:,} parameters, "
          f"optimizer state {', '.join(sorted(ck.optim)) or 'none'})")
    return 0


def _ckpt_export(args) -> int:
    from . import checkpoint

    from .errors import DataError

    try:
        keys = checkpoint.export_npz(args.ckpt, args.out)
    except OSError as e:
        raise DataError(f"{args.out}: cannot write ({e.strerror or e})") from None
    print(f"wrote {args.out}: {', '.join(keys)}")
    return 0


def _schedule(args) -> int:
    from .parallel import schedule

    return schedule.run(args)


def _bench(args) -> int:
    from .bench import run_suite

    return run_suite(args)


def pde_options(pg) -> None:
    """The PDE generators' options of `hpcopt data make`; defaults of the problem parameters:
    hpcopt/data/pde.py DEFAULTS, its choices there as CHOICES."""
    pg.add_argument("--grid", type=int, default=64, help="grid points per side")
    pg.add_argument("--test-fraction", type=float, default=0.2, help="share of test samples")
    pg.add_argument("--chunk-samples", type=int, default=64, help="samples per HDF5 chunk")
    pg.add_argument("--compression", type=int, default=None, metavar="LEVEL", help="gzip level 0-9 (default: none)")
    pg.add_argument("--buffer-mb", type=float, default=256, metavar="MIB",
                    help="with --compression or serial HDF5: samples a rank holds between collective writes")
    pg.add_argument("--coefficient", choices=["threshold", "lognormal"], help="darcy2d: 12/3 or exp(GRF)")
    pg.add_argument("--solver", choices=["auto", "cholesky", "pcg"], help="darcy2d: linear solver")
    pg.add_argument("--alpha", type=float, help="random field smoothness")
    pg.add_argument("--tau", type=float, help="random field inverse length scale")
    pg.add_argument("--sigma", type=float, help="random field amplitude")
    pg.add_argument("--kappa", type=float, help="heat2d: diffusivity")
    pg.add_argument("--nu", type=float, help="burgers1d: viscosity")
    pg.add_argument("--T", type=float, dest="T", help="heat2d, burgers1d: final time")
    pg.add_argument("--steps", type=int, help="heat2d: Crank-Nicolson steps")
    pg.add_argument("--cfl", type=float, help="burgers1d: CFL number")
    pg.add_argument("--scheme", choices=["muscl", "rusanov"], help="burgers1d: flux reconstruction")
    pg.add_argument("--refine", type=int, help="solve on a grid REFINE times finer")
    pg.add_argument("--modes", type=int, help="random field modes per axis")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hpcopt", description="Train neural networks in parallel with MPI, "
                                "Numba kernels and parallel HDF5.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a job (under mpirun/srun, or alone)",
                       description="Train the job described by JOB.toml. Every config key can be "
                       "overridden as section.key=value (e.g. optimizer.lr=0.01). On SIGUSR1 or SIGTERM "
                       "it checkpoints at the next step boundary and exits with 75. A rank that stalls (no "
                       "step within run.stall_timeout_s) ends the job with 76 and a report naming it; ranks "
                       "that call different collectives end it with 77 (docs/diagnosis.md).")
    t.add_argument("job", help="job config (TOML)")
    t.add_argument("overrides", nargs="*", metavar="section.key=value")
    t.add_argument("--resume", metavar="auto|PATH", help="continue from the newest valid checkpoint "
                   "of the run directory (auto) or from PATH")
    t.add_argument("--resume-force", action="store_true", help="resume even if the checkpoint's model "
                   "or optimizer differs from the job's")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(fn=_train)

    d = sub.add_parser("data", help="make, import and describe data sets").add_subparsers(dest="data_cmd", required=True)
    m = d.add_parser("make", help="write a bundled data set as HDF5",
                     description="digits: scikit-learn's 8x8 digits; synthetic: Gaussian clusters of any size; "
                     "darcy2d, heat2d, burgers1d: PDE input/solution pairs for surrogate models, generated "
                     "by all ranks of an mpirun job into one file (docs/data.md).")
    m.add_argument("name", choices=["digits", "synthetic", *PDE_PROBLEMS])
    m.add_argument("out", help="output file (.h5)")
    m.add_argument("--samples", type=int, default=None, help="synthetic: training samples (default 10000); "
                   "PDE problems: all samples, train + test (default 1000)")
    m.add_argument("--features", type=int, default=64, help="synthetic: features per sample")
    m.add_argument("--classes", type=int, default=10, help="synthetic: classes")
    m.add_argument("--seed", type=int, default=0, help="synthetic, PDE problems: seed")
    pg = m.add_argument_group("PDE problems (defaults: hpcopt/data/pde.py DEFAULTS)")
    pde_options(pg)
    m.set_defaults(fn=_data_make)
    im = d.add_parser("import", help="write your own arrays (.npz, .npy, .h5) as an hpcopt data file",
                      description="Integer labels (N,) make a classification file; float targets (any shape) a "
                                  "regression file with the training split's target statistics.")
    im.add_argument("src", help="FILE.npz, FILE.npy (x; --y names the targets' .npy) or FILE.h5")
    im.add_argument("out", help="output file (.h5); must not exist")
    im.add_argument("--x", required=True, help="key (npz), dataset path (h5) of the samples")
    im.add_argument("--y", required=True, help="key (npz), dataset path (h5) or .npy file of the targets")
    im.add_argument("--test-fraction", type=float, default=0.2, help="share of samples held out (default 0.2)")
    im.add_argument("--seed", type=int, default=0, help="keys the train/test split")
    im.add_argument("--task", choices=["classification", "regression"], help="default: from the targets' dtype")
    im.add_argument("--compress", action="store_true", help="gzip the datasets")
    im.set_defaults(fn=_data_import)
    st = d.add_parser("stats", help="compute the training targets' mean and std into the file (any ranks)")
    st.add_argument("path")
    st.set_defaults(fn=_data_stats)

    c = sub.add_parser("ckpt", help="inspect checkpoints").add_subparsers(dest="ckpt_cmd", required=True)
    ls = c.add_parser("ls", help="list a run's checkpoints with step, time, size, layout, status")
    ls.add_argument("run_dir")
    ls.set_defaults(fn=_ckpt_ls)
    v = c.add_parser("verify", help="check one checkpoint's structure and checksums")
    v.add_argument("ckpt")
    v.set_defaults(fn=_ckpt_verify)
    e = c.add_parser("export", help="write the global parameters and buffers as .npz, one array per layer.name")
    e.add_argument("ckpt")
    e.add_argument("out")
    e.set_defaults(fn=_ckpt_export)

    sc = sub.add_parser("schedule", help="dry run: print a pipeline schedule's actions, timeline and bubble",
                        description="Print each stage's action list (with its sends and receives), a timeline "
                        "and the peak activations and bubble per stage of a pipeline schedule, without an MPI "
                        "job (parallel.schedule, parallel.pp, parallel.micro_batches).")
    from .names import PIPELINE_SCHEDULES  # numpy-free: nothing heavy loads before a command runs

    sc.add_argument("--pp", type=int, default=4, help="stages P")
    sc.add_argument("--micro-batches", type=int, default=8, help="micro-batches M per step")
    sc.add_argument("--schedule", choices=PIPELINE_SCHEDULES, default="1f1b")
    sc.add_argument("--forward-cost", type=float, default=1.0, help="time units of one forward on one stage")
    sc.add_argument("--backward-cost", type=float, default=2.0, help="time units of one backward")
    sc.set_defaults(fn=_schedule)

    from .bench import add_parser as add_bench_parser

    add_bench_parser(sub).set_defaults(fn=_bench)
    for name, (modname, helptext) in COMMANDS.items():  # modules numpy-free at import; heavy work in run()
        mod = importlib.import_module(modname)
        cp = sub.add_parser(name, help=helptext, description=getattr(mod, "DESCRIPTION", helptext))
        mod.add_arguments(cp)
        cp.set_defaults(fn=mod.run)
    return p


# Commands that live in a module of their own: name -> (module, help). Each module has
# add_arguments(parser) and run(args) -> exit code, and imports nothing heavy at the top.
COMMANDS = {
    "plot": ("hpcopt.plot", "pictures of runs and sweeps: loss and test metric against step and wall time "
             "(needs matplotlib: pip install 'hpcopt[plot]')"),
    "sweep": ("hpcopt.sweep", "train many configurations at once on groups of ranks and pick the best (grid, "
              "random, tpe, asha, pbt)"),
    "doctor": ("hpcopt.doctor", "check the installation and the launch (MPI, parallel HDF5, binding, versions "
               "on every rank); run it under mpirun/srun like a job"),
}


def keep_freed_memory() -> bool:
    """glibc: keep freed blocks of up to 32 MiB in the heap (and up to 256 MiB of free heap top) instead
    of returning them to the OS. Training allocates and frees the same activation-sized arrays every
    step; returned to the OS, each comes back as fresh pages whose first touch faults: ~1 ms per 4 MB
    array (measured: the residual CNN of `bench step --model cnn` forward + backward 79-81 ms -> 71-74 ms).
    What PyTorch's caching allocator does for its tensors. No effect (False) elsewhere than glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 256 << 20))
    except (OSError, AttributeError):
        return False


def main(argv: list[str] | None = None) -> int:
    # Started alone (not by mpirun or srun), this process is an MPI singleton, for which Open MPI starts a
    # helper daemon (orted) that only MPI_Comm_spawn needs, and hpcopt never spawns: ~0.15 s of every such
    # start-up. Launched processes do not read this; a value already set is kept.
    os.environ.setdefault("OMPI_MCA_ess_singleton_isolated", "1")
    from .signals import install_if_training

    install_if_training(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command in ("train", "sweep") and not any(e.startswith("-") for e in extra):
        args.overrides += extra  # overrides written after an option, e.g. `train job.toml --quiet a.b=1`
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command in ("train", "sweep", "bench"):
        keep_freed_memory()
    try:
        code = args.fn(args)
        if args.command == "sweep":
            write_status(code)
        return code
    except HpcoptError as e:
        if args.command in ("train", "sweep"):
            write_status(e.exit_code)
        size = sys.modules["mpi4py.MPI"].COMM_WORLD.Get_size() if "mpi4py.MPI" in sys.modules else 1
        if size > 1 and not getattr(e, "all_ranks", False):
            from .comm import abort_on_exception  # raised on this rank alone: the others must not wait

            abort_on_exception(e, e.exit_code)
        if _world_rank() == 0:
            print(f"hpcopt: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`hpcopt schedule | head`): nothing left to say
        sys.stderr.close()
        return 141
    except BaseException as e:  # a bug or a failure on one rank: end the whole job, never hang
        if isinstance(e, SystemExit):
            raise
        from .comm import abort_on_exception

        abort_on_exception(e)
        return 1


def _world_rank() -> int:
    if "mpi4py.MPI" in sys.modules:
        return sys.modules["mpi4py.MPI"].COMM_WORLD.Get_rank()
    return 0


if __name__ == "__main__":
    sys.exit(main())
