"""ZeRO stage 1 (Rajbhandari et al. 2020): optimizer state sharded over the data-parallel ranks
(`parallel.zero = 1`).

Each dp rank owns one contiguous shard [lo, hi) of the flat buffer and keeps optimizer state for it
alone, so state memory per rank is 1/N. Shard boundaries fall on whole ROWS of tensors (a weight
(n_in, n_out) is cut only between rows), so each rank's share of every tensor is a row block: its
checkpoint `Piece`s are row blocks of the global datasets, as the format wants, and a checkpoint written
by any layout loads into any other.

    per step:  backward -> each bucket Ireduce_scatter'ed as it completes (every rank receives the SUM
               of its shard's part of the bucket; the loss gradient is already scaled by 1 / global batch)
               -> global norm: squared norms of the shards summed over dp_comm -> clip, check
               -> optimizer step on the shard (1/N of the parameters, 1/N of the state)
               -> Allgatherv of the updated shards: every rank holds all parameters again

Optimizers whose update needs a norm over a whole layer (lars, lamb) are refused: a shard cuts layers.
"""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

from .. import checkpoint, memory, optim
from ..errors import ConfigError
from ..nn import MLP
from ..optim.clip import clip_and_check
from .base import StepResult
from .data import DataParallel

_MPI_TYPE = {np.dtype(np.float32): MPI.FLOAT, np.dtype(np.float64): MPI.DOUBLE}


def shard_bounds(flat, nranks: int) -> list[int]:
    """N+1 offsets into the flat buffer: rank r owns [b[r], b[r+1]). Each inner boundary is the row
    boundary nearest to r * n / N, so every tensor's share on a rank is a block of whole rows."""
    bounds = [0]
    for r in range(1, nranks):
        target = flat.size * r // nranks
        for s in flat.specs:
            off = flat.offsets[s.key]
            if off <= target < off + s.size:
                row = s.size // s.shape[0]
                cut = off + int(round((target - off) / row)) * row
                break
        else:
            cut = flat.size
        bounds.append(max(cut, bounds[-1]))
    bounds.append(flat.size)
    return bounds


def row_block(flat, key: str, lo: int, hi: int) -> tuple[int, int, int, int]:
    """The rows [r0, r1) of tensor `key` inside the flat range [lo, hi), and that range's flat [a, b)."""
    s = flat.spec(key)
    off, row = flat.offsets[key], s.size // s.shape[0]
    a, b = max(lo, off), min(hi, off + s.size)
    if b <= a:
        return 0, 0, off, off
    assert (a - off) % row == 0 and (b - off) % row == 0, "shard boundary inside a row"
    return (a - off) // row, (b - off) // row, a, b


class ZeroDataParallel(DataParallel):
    name = "data"

    def __init__(self, cfg, grid, global_batch: int):
        # Not DataParallel.__init__: that would allocate the full optimizer state this layout avoids.
        self.cfg, self.grid, self.global_batch = cfg, grid, global_batch
        o, p = cfg.optimizer, cfg.parallel
        if o.name in ("lars", "lamb"):
            raise ConfigError(f"{cfg.source}: optimizer.name = \"{o.name}\" needs whole-layer norms, which "
                              f"parallel.zero = 1 shards apart; use parallel.zero = 0")
        if p.compression != "none":
            raise ConfigError(f"{cfg.source}: parallel.compression = \"{p.compression}\" is not available with "
                              f"parallel.zero = 1 (use one or the other)")
        if cfg.backend.device != "cpu":
            raise ConfigError(f"{cfg.source}: parallel.zero = 1 runs the optimizer on the host "
                              f"(backend.device = \"cpu\")")
        m = cfg.model
        self.model = MLP(m.layers, m.activation, m.loss, m.dtype, seed=cfg.run.seed, init=m.init)
        self.flat = f = self.model.flat
        self.device = "cpu"
        comm = grid.dp_comm
        N, r = comm.Get_size(), comm.Get_rank()
        self.bounds = shard_bounds(f, N)
        self.lo, self.hi = self.bounds[r], self.bounds[r + 1]
        self.counts = np.diff(self.bounds).astype(np.int64)     # elements per rank
        self.displs = np.array(self.bounds[:-1], dtype=np.int64)
        segments = []  # each tensor's part of the shard, relative to lo: they tile [0, hi - lo)
        for k in f.keys():
            _, _, a, b = row_block(f, k, self.lo, self.hi)
            if b > a:
                segments.append((a - self.lo, b - a))
        self.opt = optim.build(o, segments, device="cpu", source=cfg.source)
        self.opt_state = self.opt.init_state(self.hi - self.lo)        # (hi - lo,) per state array
        self.grad_shard = memory.zeros(self.hi - self.lo, f.dtype)   # (hi - lo,) summed gradients
        self.setup_buckets([layer.name for layer in self.model.layers], 0)
        # bucket k: how many of its elements each rank receives, and where they land in grad_shard
        self.bucket_counts, self.bucket_dest = [], []
        for bk in self.buckets:
            counts = [max(0, min(bk.hi, hi) - max(bk.lo, lo)) for lo, hi in zip(self.bounds, self.bounds[1:])]
            a, b = max(bk.lo, self.lo), min(bk.hi, self.hi)
            self.bucket_counts.append(counts)
            self.bucket_dest.append(self.grad_shard[a - self.lo:b - self.lo] if b > a else self.grad_shard[:0])
        self.reqs: list[MPI.Request | None] = [None] * len(self.buckets)
        self.mpi_type = _MPI_TYPE[f.dtype]
        self.codec = None

    # -- the exchange: reduce-scatter per bucket -------------------------------------------------
    def start_bucket(self, k: int, blocking: bool = False) -> None:
        b = self.buckets[k]
        send, comm = self.flat.grad[b.lo:b.hi], self.grid.dp_comm
        if comm.Get_size() == 1:
            self.bucket_dest[k][...] = send
        elif blocking:
            comm.Reduce_scatter(send, [self.bucket_dest[k], self.mpi_type], self.bucket_counts[k], op=MPI.SUM)
        else:
            self.reqs[k] = comm.Ireduce_scatter(send, [self.bucket_dest[k], self.mpi_type],
                                                self.bucket_counts[k], op=MPI.SUM)

    def finish_bucket(self, k: int) -> None:
        if self.reqs[k] is not None:
            self.reqs[k].Wait()
            self.reqs[k] = None

    def pending_requests(self) -> list[MPI.Request]:
        return [r for r in self.reqs if r is not None]

    def sync_grads(self) -> None:
        if self.grid.dp_comm.Get_size() == 1:  # still copy the buckets into the shard buffer
            for k in range(len(self.buckets)):
                self.start_bucket(k)
            return
        super().sync_grads()

    def step(self, x: np.ndarray, labels: np.ndarray, t: int, lr: float) -> StepResult:
        self.started = 0
        loss_sum = self.model.loss_and_grad(x, labels, self.global_batch, self.layer_done_hook())
        self.sync_grads()
        o, comm = self.cfg.optimizer, self.grid.dp_comm
        total = None if comm.Get_size() == 1 else (lambda v: comm.allreduce(v, op=MPI.SUM))
        norm, finite = clip_and_check(self.grad_shard, o.clip_norm, o.clip_value, total)
        if finite:  # the same decision on every rank: the norm is global
            self.opt.step(self.flat.data[self.lo:self.hi], self.grad_shard, self.opt_state, t, lr)
            if comm.Get_size() > 1:
                comm.Allgatherv(MPI.IN_PLACE, [self.flat.data, (self.counts, self.displs), self.mpi_type])
        return StepResult(loss_sum, norm, finite)

    def bytes_per_step(self) -> int:
        """Reduce-scatter + allgather: 2 (N-1)/N of the buffer, as a ring sends them."""
        N = self.grid.dp_comm.Get_size()
        return int(2 * (N - 1) / N * self.flat.size * self.flat.dtype.itemsize)

    def extra_metrics(self) -> dict:
        return dict(super().extra_metrics(), state_elements=self.hi - self.lo)

    # -- checkpoints: every rank writes the row blocks of its shard ------------------------------
    def checkpoint_pieces(self) -> list[checkpoint.Piece]:
        f = self.flat
        pieces = []
        for prefix, buf, base in [("params", f.data, 0)] + [(f"optim/{s}", a, self.lo)
                                                             for s, a in sorted(self.opt_state.items())]:
            for k in f.keys():
                s = f.spec(k)
                r0, r1, a, b = row_block(f, k, self.lo, self.hi)
                rows = buf[a - base:b - base].reshape((r1 - r0,) + s.shape[1:])
                pieces.append(checkpoint.Piece(f"{prefix}/{k.replace('.', '/')}", s.shape, rows, r0))
        return pieces

    def restore(self, path: str, ckpt: checkpoint.Checkpoint) -> list[str]:
        f = self.flat
        if not self.restore_params(path, ckpt):
            return [f"{path}: optimizer state of {ckpt.attrs.get('optimizer')} not loaded into "
                    f"{self.opt.name}: it starts fresh"]
        for s, a in self.opt_state.items():
            for k in f.keys():
                _, _, lo, hi = row_block(f, k, self.lo, self.hi)
                off = f.offsets[k]
                a[lo - self.lo:hi - self.lo] = ckpt.optim[s][k].reshape(-1)[lo - off:hi - off]
        return []

    def host_state(self) -> dict[str, np.ndarray]:
        return self.opt_state

