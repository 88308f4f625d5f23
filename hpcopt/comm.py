"""MPI world, the (dp, pp, tp) process grid (DESIGN §5), abort-on-error and rank-0 helpers.

World ranks form a (dp, pp, tp) grid with tp varying fastest:
    world_rank = (dp_rank * pp + pp_rank) * tp + tp_rank
Data-parallel replicas are the ranks with equal (pp, tp) coordinates.
"""
from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass

from mpi4py import MPI

from . import errors
from .errors import ConfigError, HpcoptError
from .threads import pin_threads, threads_per_rank  # noqa: F401  (re-exported for the CLI)


@dataclass
class Grid:
    world: MPI.Comm
    dp: int
    pp: int
    tp: int
    dp_rank: int
    pp_rank: int
    tp_rank: int
    dp_comm: MPI.Comm
    pp_comm: MPI.Comm
    tp_comm: MPI.Comm

    @property
    def rank(self) -> int:
        return self.world.Get_rank()

    @property
    def size(self) -> int:
        return self.world.Get_size()

    @property
    def is_root(self) -> bool:
        return self.world.Get_rank() == 0

    def describe(self) -> str:
        return f"world={self.size} (dp={self.dp}, pp={self.pp}, tp={self.tp})"

    def free(self) -> None:
        """Free the dp/pp/tp communicators make_grid created (a sweep makes one grid per trial), and the
        fingerprint shadow of its world wrapper (the world itself belongs to the caller)."""
        for c in (self.dp_comm, self.pp_comm, self.tp_comm):
            if c != MPI.COMM_NULL:
                c.Free()
        release = getattr(self.world, "release_shadow", None)
        if release is not None:
            release()

    def traced(self) -> dict:
        """label -> communicator, for the watchdog (diagnosis/watchdog.py)."""
        return {getattr(c, "label", k): c for k, c in (("world", self.world), ("dp", self.dp_comm),
                                                       ("pp", self.pp_comm), ("tp", self.tp_comm))}


def grid_shape(world_size: int, dp: int | str, pp: int, tp: int, source: str = "config") -> tuple[int, int, int]:
    """Resolve `dp = "auto"` and check that dp * pp * tp equals the world size."""
    if world_size % (pp * tp) != 0:
        raise ConfigError(f"{source}: parallel.pp * parallel.tp = {pp * tp} does not divide the "
                          f"{world_size} ranks of this job")
    if dp == "auto":
        dp = world_size // (pp * tp)
    if dp * pp * tp != world_size:
        raise ConfigError(f"{source}: parallel.dp * pp * tp = {dp}*{pp}*{tp} = {dp * pp * tp} "
                          f"but the job has {world_size} ranks")
    return int(dp), pp, tp


def make_grid(world: MPI.Comm, dp: int | str = "auto", pp: int = 1, tp: int = 1, source: str = "config",
              traced: bool = True) -> Grid:
    """Split `world` into the dp/pp/tp communicators. Collective over `world`.

    traced: every communicator of the grid (the world too, under the label "world", or "group" for a
    sweep's group) is a diagnosis.fingerprint.Traced on the same handle: its calls go to the flight
    recorder and its collectives carry fingerprints (docs/diagnosis.md)."""
    dp, pp, tp = grid_shape(world.Get_size(), dp, pp, tp, source)
    if traced:
        from .diagnosis.fingerprint import Traced

        whole = MPI.Comm.Compare(world, MPI.COMM_WORLD) in (MPI.IDENT, MPI.CONGRUENT)
        world = Traced(world, "world" if whole else "group")
    rank = world.Get_rank()
    tp_rank, pp_rank, dp_rank = rank % tp, (rank // tp) % pp, rank // (tp * pp)
    tp_comm = world.Split(color=dp_rank * pp + pp_rank, key=tp_rank)
    pp_comm = world.Split(color=dp_rank * tp + tp_rank, key=pp_rank)
    dp_comm = world.Split(color=pp_rank * tp + tp_rank, key=dp_rank)
    if traced:
        tp_comm, pp_comm, dp_comm = Traced(tp_comm, "tp"), Traced(pp_comm, "pp"), Traced(dp_comm, "dp")
    return Grid(world, dp, pp, tp, dp_rank, pp_rank, tp_rank, dp_comm, pp_comm, tp_comm)


def ranks_on_node(world: MPI.Comm) -> int:
    """How many ranks of this job share this node (collective over `world`)."""
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    n = node.Get_size()
    node.Free()
    return n


def agree(world: MPI.Comm, fn, *args, **kwargs):
    """Run fn on every rank; if it raises a user error on ANY rank, raise it on EVERY rank.

    For the start-up phase (config, data and checkpoint checks) where ranks may disagree (one rank
    cannot read its file, say): all ranks leave together with the same message and exit code instead
    of some waiting forever in the next collective. fn must not itself call collectives.
    """
    err: HpcoptError | None = None
    result = None
    try:
        result = fn(*args, **kwargs)
    except HpcoptError as e:
        err = e
    msg = (type(err).__name__, str(err)) if err else None
    messages = world.allgather(msg)
    failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
    if failed:
        rank, (cls_name, text) = failed[0]
        cls = getattr(errors, cls_name, HpcoptError)
        same_everywhere = all(m == failed[0][1] for m in messages)
        err = cls(text if same_everywhere else f"rank {rank}: {text}")
        err.all_ranks = True  # every rank raises it: each may exit on its own, no abort needed
        raise err
    return result


def abort_on_exception(exc: BaseException, code: int = 1) -> None:
    """Print the traceback and end the whole MPI job: a failure on one rank must never hang the others.
    A bug (not a user error) during or after training also leaves <run dir>/hpcopt-crash-<rank>.txt:
    the traceback and the flight recorder's last MPI calls (docs/diagnosis.md)."""
    world = MPI.COMM_WORLD
    if isinstance(exc, HpcoptError):
        print(f"hpcopt: error on rank {world.Get_rank()}: {exc}", file=sys.stderr, flush=True)
    else:
        from .diagnosis.recorder import RECORDER

        print(f"hpcopt: unhandled exception on rank {world.Get_rank()}:", file=sys.stderr)
        traceback.print_exception(exc, file=sys.stderr)
        crash = RECORDER.write_crash(exc)
        if crash:
            print(f"hpcopt: crash report {crash}", file=sys.stderr)
        sys.stderr.flush()
    if world.Get_size() > 1:
        world.Abort(code)
    sys.exit(code)


def root_print(*args, **kwargs) -> None:
    """print() on world rank 0 only (output, never communication)."""
    if MPI.COMM_WORLD.Get_rank() == 0:
        print(*args, **kwargs, flush=True)
