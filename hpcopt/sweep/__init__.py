"""`hpcopt sweep SWEEP.toml [key=value ...] [--resume auto]`: many training configurations at once on
groups of ranks, and the best chosen (docs/sweep.md). spec: the sweep file; search: where values come
from; runner: groups, coordinator, results; pbt: population-based training."""
from __future__ import annotations

DESCRIPTION = ("Run the trials of SWEEP.toml (a base job and a search space) on groups of ranks of this MPI job: "
               "grid, random, tpe, asha or pbt; results in runs/<name>/results.jsonl, the winner in best.toml. "
               "key=value sets a key of the base job (section.key) or of [sweep] (sweep.key). On SIGUSR1/SIGTERM "
               "the trials in progress checkpoint and the sweep exits with 75; --resume auto continues it.")


def add_arguments(p) -> None:
    p.add_argument("sweep", help="sweep file (TOML)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.add_argument("--resume", choices=["auto"], help="continue the sweep in its directory: finished trials are "
                   "kept, interrupted ones resume from their checkpoints, the search continues")
    p.add_argument("--quiet", action="store_true", help="no leaderboard table")


def run(args) -> int:
    from .. import signals

    stop = signals.PROCESS
    stop.install()
    from mpi4py import MPI

    from .. import comm
    from . import spec as sweep_spec

    world = MPI.COMM_WORLD
    spec = comm.agree(world, sweep_spec.load, args.sweep, args.overrides, world.Get_size())
    threads, _ = comm.threads_per_rank(spec.job_doc.get("backend", {}).get("threads", 0), comm.ranks_on_node(world))
    comm.pin_threads(threads)
    import numba

    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    from .runner import run_sweep

    code = run_sweep(spec, world, args.resume, stop, quiet=args.quiet)
    stop.ignore_from_now()
    return code   # cli.main writes it to HPCOPT_STATUS_FILE
