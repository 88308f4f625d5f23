"""Data-parallel training of the MLP 784-1024-1024-10 (batch 256 per rank, Adam) vs PyTorch
DistributedDataParallel, and hpcopt's gradient sync vs a bare mpi4py Allreduce of the same bytes.

Run alone (`hpcopt bench dp`) it launches itself twice with mpirun: `-n 1` and `-n --ranks`, the same
threads per rank both times (the cores divided by --ranks), so the 1 -> N scaling efficiency is weak
scaling at fixed resources per rank. Inside each launch, every rank measures, in the same processes:
  hpcopt     the Strategy of `parallel.strategy = "data"` (buckets of --bucket-mb, overlap on), stepped
             directly on an in-memory batch: forward, backward with bucketed Iallreduce, norm, Adam;
             and again with one Allreduce after backward (overlap off, one bucket)
  DDP        torch.nn.parallel.DistributedDataParallel over a gloo process group (rank and world from
             mpirun's environment, a localhost port), the same model, batch, threads and
             torch.optim.Adam(fused=True)
  sync       hpcopt's gradient exchange alone (`exchange.reduce`, one bucket) vs `comm.Allreduce` of the
             same buffer, timed in pairs of one call each (overhead: the median of the per-pair ratios)
  diagnosis  what the stall watchdog + flight recorder, and the collective fingerprints, cost a step
             (docs/diagnosis.md): the digits job (a Trainer of jobs/digits_mlp.toml on a synthetic set of
             the digits' shape, stepped as fit() steps it) and --layers (the strategy's step plus the
             Trainer's checkpoint agreement), with its communicators calling MPI directly (off),
             through a Python method that only calls MPI (empty: what any recorder written in Python
             costs at least), traced with the watchdog running (recorder) and with fingerprints too;
             one step of each in turn (the communicators' class switched, fingerprint.bypass); the
             ratio is the median of the per-repeat ratios. The gradient buckets' exchange is a
             prepared call (Traced.prepare/start); "off" and "empty" make it through one Python call
             too, the only way a prepared call is made
Figures are medians over --repeats; the machine is shared, so medians and ratios matter more than
absolute numbers.
"""
from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time

import numpy as np

LAYERS = "784,1024,1024,10"


def add_arguments(p) -> None:
    p.add_argument("--layers", default=LAYERS, help=f"MLP widths (default {LAYERS})")
    p.add_argument("--batch", type=int, default=256, help="samples per rank per step")
    p.add_argument("--ranks", type=int, default=2, help="ranks of the parallel launch")
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--bucket-mb", type=float, default=2.0, help="parallel.bucket_mb for the overlapped run")


def _launched_alone() -> bool:
    return not any(v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "SLURM_STEP_ID"))


def run(args) -> list[dict]:
    if not _launched_alone():
        rows = _measure(args)
        # torch's gloo worker threads outlive destroy_process_group() (and the model's deletion); one
        # that takes the GIL while the interpreter finalizes ends in std::terminate, SIGABRT (about one
        # launch in 100-150 here). So a launch reports (rank 0), finalizes MPI and ends before that
        # finalization, with torch or without.
        from mpi4py import MPI

        from . import report

        if MPI.COMM_WORLD.Get_rank() == 0:
            report("dp", rows, args.json)
        sys.stdout.flush()
        sys.stderr.flush()
        MPI.Finalize()
        os._exit(0)
    threads = max(1, len(os.sched_getaffinity(0)) // args.ranks)  # ranks share the cores, as in training
    got = {}
    for n in (1, args.ranks):
        cmd = ["mpirun", "-n", str(n), "--oversubscribe", "--bind-to", "none"]
        if os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
        cmd += [sys.executable, "-m", "hpcopt", "bench", "dp", "--json", "--threads", str(threads),
                "--layers", args.layers, "--batch", str(args.batch), "--steps", str(args.steps),
                "--repeats", str(args.repeats), "--bucket-mb", str(args.bucket_mb)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"bench dp under mpirun -n {n} failed:\n{out.stderr}")
        got[n] = [json.loads(line)["raw"] for line in out.stdout.splitlines() if line.startswith("{")][0]
    return _rows(got[1], got[args.ranks], args, threads)


def _rows(one: dict, par: dict, args, threads: int) -> list[dict]:
    n = par["world"]
    model = f"MLP {args.layers} batch {args.batch}/rank adam"
    rows = [dict(name=f"{model}, {n} ranks, global", unit="samples/s", hpcopt=par["hpcopt_sps"],
                 peer_name=f"torch {par['torch']} DDP gloo", peer=par["ddp_sps"],
                 ratio=par["hpcopt_sps"] / par["ddp_sps"] if par["ddp_sps"] else None, limit=None, target=1.2,
                 threads=threads),
            dict(name=f"{model}, {n} ranks, one Allreduce after backward", unit="samples/s",
                 hpcopt=par["hpcopt_sps_no_overlap"], peer_name=f"torch {par['torch']} DDP gloo",
                 peer=par["ddp_sps"], ratio=par["hpcopt_sps_no_overlap"] / par["ddp_sps"] if par["ddp_sps"] else None,
                 limit=None, threads=threads),
            dict(name=f"gradient sync {par['grad_mb']:.1f} MB, {n} ranks", unit="ms", hpcopt=par["sync_ms"],
                 peer_name="mpi4py Allreduce, same buffer", peer=par["bare_ms"], ratio=par["bare_ms"] / par["sync_ms"],
                 limit=None, overhead=par["sync_overhead"], target_overhead=1.1),
            dict(name=f"sync exposed per step, buckets of {args.bucket_mb:g} MB + overlap", unit="ms",
                 hpcopt=par["exposed_ms"], peer_name="one Allreduce after backward", peer=par["sync_step_ms"],
                 ratio=par["sync_step_ms"] / par["exposed_ms"] if par["exposed_ms"] else None, limit=None,
                 hidden=1 - par["exposed_ms"] / par["sync_step_ms"] if par["sync_step_ms"] else None),
            dict(name=f"scaling efficiency 1 -> {n} ranks (weak, {threads} thread/rank)", unit="fraction",
                 hpcopt=par["hpcopt_sps"] / (n * one["hpcopt_sps"]), peer_name="torch DDP gloo",
                 peer=par["ddp_sps"] / (n * one["ddp_sps"]) if one["ddp_sps"] else None,
                 ratio=(par["hpcopt_sps"] / one["hpcopt_sps"]) / (par["ddp_sps"] / one["ddp_sps"])
                 if one["ddp_sps"] else None, limit=1.0, one_rank_sps=one["hpcopt_sps"],
                 one_rank_ddp_sps=one["ddp_sps"]),
            dict(name=f"scaling efficiency 1 -> {n} ranks, no gradient exchange (compute only)", unit="fraction",
                 hpcopt=par["compute_only_sps"] / (n * one["compute_only_sps"]), peer_name=None, peer=None,
                 ratio=None, limit=1.0)]
    for key, label in (("digits", "the digits job (jobs/digits_mlp.toml, its Trainer's step)"), ("mlp", model)):
        d = par.get(f"diag_{key}")
        if not d:
            continue
        rows += [dict(name=f"an empty Python override of each MPI call (the floor of a recorder in Python), {label}, "
                           f"{n} ranks", unit="ms/step", hpcopt=d["empty_ms"], peer_name="the same step, diagnosis off",
                      peer=d["off_ms"], ratio=1 / d["empty_ratio"], limit=None, overhead=d["empty_ratio"] - 1),
                 dict(name=f"watchdog + flight recorder, {label}, {n} ranks", unit="ms/step", hpcopt=d["rec_ms"],
                      peer_name="the same step, diagnosis off", peer=d["off_ms"], ratio=1 / d["rec_ratio"],
                      limit=None, overhead=d["rec_ratio"] - 1, target_overhead=0.01, watchdog_thread=d["thread"]),
                 dict(name=f"collective fingerprints, {label}, {n} ranks", unit="ms/step", hpcopt=d["fp_ms"],
                      peer_name="the same step, recorder only", peer=d["rec_ms"], ratio=1 / d["fp_ratio"],
                      limit=None, overhead=d["fp_ratio"] - 1, target_overhead=0.03,
                      overhead_vs_off=d["all_ratio"] - 1)]
    return rows


def _timed(step, comm, steps: int, repeats: int) -> list[float]:
    step()
    step()  # warm-up: kernels compiled, buffers touched, connections made
    times = []
    for _ in range(repeats):
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        comm.Barrier()
        times.append((time.perf_counter() - t0) / steps)
    return times


def _sync_vs_bare(s, comm, steps: int, repeats: int) -> dict:
    """hpcopt's gradient exchange (`exchange.reduce`) vs `comm.Allreduce` of the same bytes IN THE SAME
    BUFFER (flat.grad), so that the ratio is hpcopt's own cost and not where the memory lies (page size
    and placement move a 7 MB Allreduce by 10-40% here). Timed in PAIRS: every pair times one call of
    each, back to back after a barrier (which goes first alternates), so the machine's drifting load
    hits both alike. The overhead is the median of the per-pair ratios; the times are medians."""
    from mpi4py import MPI

    grad = s.flat.grad
    snapshot = grad.copy()

    def ours():
        s.exchange.reduce()

    def theirs():
        comm.Allreduce(MPI.IN_PLACE, grad, op=MPI.SUM)

    def once(fn) -> float:
        comm.Barrier()
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    for fn in (ours, theirs):  # warm-up
        fn()
    t_ours, t_theirs = [], []
    for i in range(steps * repeats):
        if i % steps == 0:  # repeated in-place sums double the values: start again from the gradient
            grad[...] = snapshot
        if i % 2 == 0:
            t_ours.append(once(ours))
            t_theirs.append(once(theirs))
        else:
            t_theirs.append(once(theirs))
            t_ours.append(once(ours))
    med = statistics.median
    return dict(sync_ms=1e3 * med(t_ours), bare_ms=1e3 * med(t_theirs),
                sync_overhead=med(a / b for a, b in zip(t_ours, t_theirs)))


def _strategy(widths, batch, world, bucket_mb: float, overlap: bool, traced: bool = False, grid_out=None):
    """The data-parallel strategy, on a plain grid (traced=False: what the peers are compared with) or
    one whose communicators record and fingerprint their calls (as `hpcopt train` runs)."""
    from .. import comm as hcomm
    from .. import parallel
    from ..config import from_doc

    cfg = from_doc(dict(model=dict(layers=widths), optimizer=dict(name="adam", lr=1e-3),
                        data=dict(batch_size=batch * world.Get_size()),
                        parallel=dict(bucket_mb=bucket_mb, overlap=overlap)), "bench dp")
    grid = hcomm.make_grid(world, "auto", 1, 1, cfg.source, traced=traced)
    if grid_out is not None:
        grid_out.append(grid)
    return parallel.build(cfg, grid, batch * world.Get_size())


def _diagnosis_cost(world, widths, batch: int, bucket_mb: float, steps: int, repeats: int, job: bool = False) -> dict:
    """Step time off / through an empty override / with the watchdog + recorder / with fingerprints too
    (module doc: diagnosis), each step made as `hpcopt train` makes it. job=True: the digits job itself,
    a Trainer of jobs/digits_mlp.toml (a synthetic dataset of the digits' shape) stepped as fit() steps
    it (loader, strategy, watchdog beat, checkpoint agreement); else the strategy over a traced grid plus
    the Trainer's checkpoint agreement (a 4-int Allreduce, made every step: these steps are longer than
    train.AGREE_S). One object stepped in every variant: "off" has its communicators call MPI directly
    (fingerprint.bypass switches their class), so that no difference of memory placement between two
    objects (5-10% on the digits step here) passes for a cost."""
    from mpi4py import MPI

    from ..diagnosis import fingerprint
    from ..diagnosis.watchdog import Watchdog

    state = fingerprint.STATE
    trainer = tmp = watch = None
    if job:
        trainer, tmp = _digits_trainer(world)
        watch = trainer.watch

        def step(t: int) -> None:
            trainer.step()
            watch.beat(trainer.step_count)
            trainer.checkpoint_due()
        trainer.restart_agreements()
    else:
        rng = np.random.default_rng(world.Get_rank())
        x = rng.random((batch, widths[0]), dtype=np.float32)
        y = rng.integers(0, widths[-1], batch)
        grids: list = []
        s = _strategy(widths, batch, world, bucket_mb, True, traced=True, grid_out=grids)
        grid = grids[0]
        watch = Watchdog(grid.world, None, 0.0, "report", grid.traced(), attach=False)
        flags = np.zeros(4, np.int32)

        def step(t: int) -> None:
            s.step(x, y, t, 1e-3)
            watch.beat(t)
            fingerprint.post_digests()   # the Trainer's checkpoint agreement (with fingerprints on: companions)
            grid.world.Allreduce(MPI.IN_PLACE, flags, op=MPI.MAX)
    watch.set_phase("step")
    t = [0]
    times: dict = {v: [] for v in ("off", "empty", "rec", "fp")}
    clock = time.perf_counter
    busy0, wall0 = watch.busy_s, clock()
    try:
        for rep in range(repeats + 1):  # the first round warms up
            spent = dict.fromkeys(times, 0.0)
            world.Barrier()
            for i in range(steps):  # one step of each, in turn: the machine's load drifts alike for all
                order = list(times)[i % 4:] + list(times)[:i % 4]
                for v in order:
                    fingerprint.bypass(True if v == "off" else "empty" if v == "empty" else False)
                    state.enabled = v == "fp"
                    t0 = clock()
                    t[0] += 1
                    step(t[0])
                    spent[v] += clock() - t0
            if rep:
                for v in times:
                    times[v].append(spent[v] / steps)
        thread = (watch.busy_s - busy0) / (clock() - wall0)  # the watchdog thread's share of the time
    finally:
        fingerprint.bypass(False)
        state.enabled = True
        if trainer is not None:
            trainer.release()
            world.Barrier()
            if world.Get_rank() == 0:
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
        else:
            watch.stop()
            grid.free()
    med = statistics.median
    # the thread runs in all of them (it is cheap to leave on): its share is added to the recorder's ratio
    return dict(off_ms=1e3 * med(times["off"]), rec_ms=1e3 * med(times["rec"]), fp_ms=1e3 * med(times["fp"]),
                empty_ms=1e3 * med(times["empty"]),
                empty_ratio=med(a / b for a, b in zip(times["empty"], times["off"])),
                thread=thread, rec_ratio=thread + med(a / b for a, b in zip(times["rec"], times["off"])),
                fp_ratio=med(a / b for a, b in zip(times["fp"], times["rec"])),
                all_ratio=med(a / b for a, b in zip(times["fp"], times["off"])))


def _digits_trainer(world):
    """A Trainer of jobs/digits_mlp.toml on `world` (as `hpcopt train` builds it), its data a synthetic
    set of the digits' shape (1,437 + 360 samples of 64 features, 10 classes) in a temporary directory."""
    import tempfile

    from .. import comm as hcomm
    from .. import config
    from ..data.datasets import make_synthetic
    from ..train import Trainer

    tmp = None
    if world.Get_rank() == 0:
        tmp = tempfile.mkdtemp(prefix="hpcopt-bench-")
        make_synthetic(os.path.join(tmp, "digits.h5"), 1437, 64, 10, test_samples=360)
    tmp = world.bcast(tmp)
    job = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "jobs",
                       "digits_mlp.toml")
    cfg = config.load(job, [f"data.path={os.path.join(tmp, 'digits.h5')}", f"run.out_dir={os.path.join(tmp, 'run')}",
                            "run.steps=100000000", "checkpoint.keep=1"])
    grid = hcomm.make_grid(world, "auto", 1, 1, cfg.source)
    trainer = Trainer(cfg, grid, os.path.join(tmp, "run"), quiet=True)
    return trainer, tmp


def _measure(args) -> list[dict]:
    import numba
    from mpi4py import MPI

    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    widths = [int(w) for w in args.layers.split(",")]
    rng = np.random.default_rng(rank)
    x = rng.random((args.batch, widths[0]), dtype=np.float32)
    y = rng.integers(0, widths[-1], args.batch)
    med = statistics.median
    raw = dict(world=size, threads=args.threads)

    # hpcopt: overlapped buckets, then one Allreduce after backward
    for key, bucket_mb, overlap in (("", args.bucket_mb, True), ("_no_overlap", 1e6, False)):
        s = _strategy(widths, args.batch, world, bucket_mb, overlap)
        t = [0]

        def step():
            t[0] += 1
            s.step(x, y, t[0], 1e-3)

        step()
        step()
        ex = s.exchange
        ex.sync_s = ex.wait_s = 0.0
        ex.steps_timed = 0
        times = _timed(step, world, args.steps, args.repeats)
        per = max(ex.steps_timed, 1)
        raw[f"hpcopt_sps{key}"] = size * args.batch / med(times)
        raw[f"step_ms{key}"] = 1e3 * med(times)
        raw[f"sync_in_step_ms{key}"] = 1e3 * ex.sync_s / per   # start + wait, inside the step
        raw[f"wait_ms{key}"] = 1e3 * ex.wait_s / per           # waiting after backward
        raw["buckets" + key] = len(ex.buckets)
        if not overlap:
            raw["grad_mb"] = s.flat.grad.nbytes / 2**20
            if size > 1:  # the exchange alone vs a bare Allreduce of the same bytes
                raw.update(_sync_vs_bare(s, world, args.steps, args.repeats))
    # the same steps with no exchange at all, every rank at once: what sharing the machine costs
    alone = _strategy(widths, args.batch, MPI.COMM_SELF, 1e6, False)
    t_alone = [0]

    def step_alone():
        t_alone[0] += 1
        alone.step(x, y, t_alone[0], 1e-3)

    raw["compute_only_sps"] = size * args.batch / med(_timed(step_alone, world, args.steps, args.repeats))
    raw["exposed_ms"] = raw["sync_in_step_ms"]           # with overlap: what the step still spends on sync
    raw["sync_step_ms"] = raw["sync_in_step_ms_no_overlap"]

    # what diagnosis costs a step (run.check_collectives, the watchdog), on the digits MLP and this one
    if size > 1:
        raw["diag_digits"] = _diagnosis_cost(world, [64, 128, 128, 10], 32, args.bucket_mb, 10 * args.steps,
                                             args.repeats, job=True)
        raw["diag_mlp"] = _diagnosis_cost(world, widths, args.batch, args.bucket_mb, args.steps, args.repeats)

    # PyTorch DDP over gloo, in the same processes
    raw["ddp_sps"] = raw["torch"] = None
    try:
        import torch
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP

        from .step import torch_mlp
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(args.threads)
        port = None
        if rank == 0:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
        port = world.bcast(port)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
        torch.manual_seed(0)
        model = DDP(torch_mlp(torch, widths))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
        loss_fn = torch.nn.CrossEntropyLoss()
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)

        def ddp_step():
            opt.zero_grad(set_to_none=False)
            loss_fn(model(xt), yt).backward()
            opt.step()

        raw["ddp_sps"] = size * args.batch / med(_timed(ddp_step, world, args.steps, args.repeats))
        raw["torch"] = torch.__version__
        dist.destroy_process_group()
    if size == 1:
        raw.update(sync_ms=None, bare_ms=None, sync_overhead=None)
    return [dict(name="raw", unit="-", hpcopt=None, peer_name=None, peer=None, ratio=None, limit=None, raw=raw)]
