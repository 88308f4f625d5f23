"""ZeRO stage 1 (Rajbhandari et al. 2020): optimizer state sharded over the data-parallel ranks
(`parallel.zero = 1`).

Each dp rank owns one contiguous shard [lo, hi) of the flat buffer and keeps optimizer state for it
alone, so state memory per rank is 1/N. Shard boundaries fall on whole ROWS of tensors (a weight
(n_in, n_out) is cut only between rows), so each rank's share of every tensor is a row block: its
checkpoint blocks are row blocks of the global datasets, and a checkpoint written by any layout loads
into any other.

    per step:  backward -> each bucket Ireduce_scatter'ed as it completes (every rank receives the SUM
               of its shard's part of the bucket; the loss gradient is already scaled by 1 / global batch)
               -> apply_update over the shard: the squared norms of the shards summed over dp_comm
               -> clip, check -> optimizer step on 1/N of the parameters with 1/N of the state
               -> Allgatherv of the updated shards: every rank holds all parameters again

Optimizers whose update needs a norm over a whole layer (lars, lamb) are refused (config.EXCLUDES).
"""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

from .. import checkpoint, memory

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


class Shard:
    """This rank's shard of a replica's flat buffer: the views the update works on, and where its
    optimizer state sits in the global tensors."""

    def __init__(self, flat, comm: MPI.Comm, own_grad: bool = True):
        """own_grad=False: no gradient buffer of the shard's own (run.reproducible: every rank holds
        the whole summed gradient, and the update reads its shard's part of it)."""
        self.flat, self.comm = flat, comm
        N, r = comm.Get_size(), comm.Get_rank()
        self.bounds = shard_bounds(flat, N)
        self.lo, self.hi = self.bounds[r], self.bounds[r + 1]
        self.counts = np.diff(self.bounds).astype(np.int64)     # elements per rank
        self.displs = np.array(self.bounds[:-1], dtype=np.int64)
        self.grad = memory.zeros(self.hi - self.lo, flat.dtype) if own_grad else None  # (hi - lo,) summed
        self.params = flat.data[self.lo:self.hi]                 # (hi - lo,) a view

    def gather_params(self) -> None:
        """Every rank's updated shard into every rank's flat buffer (one Allgatherv)."""
        if self.comm.Get_size() > 1:
            self.comm.Allgatherv(MPI.IN_PLACE, [self.flat.data, (self.counts, self.displs),
                                                _MPI_TYPE[self.flat.dtype]])

    def segments(self) -> list[tuple[int, int]]:
        """Each tensor's part of the shard, relative to lo: they tile [0, hi - lo)."""
        out = []
        for k in self.flat.keys():
            _, _, a, b = row_block(self.flat, k, self.lo, self.hi)
            if b > a:
                out.append((a - self.lo, b - a))
        return out

    def blocks(self) -> dict[str, checkpoint.Block]:
        """Where each tensor's rows of the shard sit in a state array (indexed from 0 = lo)."""
        out = {}
        for k in self.flat.keys():
            r0, r1, a, b = row_block(self.flat, k, self.lo, self.hi)
            out[k] = checkpoint.Block(k, (slice(r0, r1),), a - self.lo, b - self.lo)
        return out


class ReduceScatter:
    """The exchange codec of ZeRO-1: each bucket reduce-scattered into the shard's gradient buffer;
    after an applied update, the updated shards gathered back into every rank's flat buffer."""

    name = "reduce_scatter"
    solo = True  # on one rank the buckets are still copied into the shard buffer

    def __init__(self, shard: Shard, buckets):
        self.shard = shard
        self.comm, self.N = shard.comm, shard.comm.Get_size()
        self.mpi_type = _MPI_TYPE[shard.flat.dtype]
        # bucket k: how many of its elements each rank receives, and where they land in shard.grad
        self.bucket_counts, self.bucket_dest = [], []
        for bk in buckets:
            counts = [max(0, min(bk.hi, hi) - max(bk.lo, lo)) for lo, hi in zip(shard.bounds, shard.bounds[1:])]
            a, b = max(bk.lo, shard.lo), min(bk.hi, shard.hi)
            self.bucket_counts.append(counts)
            self.bucket_dest.append(shard.grad[a - shard.lo:b - shard.lo] if b > a else shard.grad[:0])
        self.reqs: list[MPI.Request | None] = [None] * len(buckets)

    def start(self, k: int, send: np.ndarray, blocking: bool = False) -> None:
        if self.N == 1:
            self.bucket_dest[k][...] = send
        elif blocking:
            self.comm.Reduce_scatter(send, [self.bucket_dest[k], self.mpi_type], self.bucket_counts[k], op=MPI.SUM)
        else:
            self.reqs[k] = self.comm.Ireduce_scatter(send, [self.bucket_dest[k], self.mpi_type],
                                                     self.bucket_counts[k], op=MPI.SUM)

    def finish(self, k: int, g: np.ndarray) -> None:
        if self.reqs[k] is not None:
            self.reqs[k].Wait()
            self.reqs[k] = None

    def pending(self) -> list[MPI.Request]:
        return [r for r in self.reqs if r is not None]

    def on_skip(self) -> None:
        pass

    def after_update(self, applied: bool) -> None:
        """Every rank holds all parameters again (the same decision everywhere: the norm is global)."""
        if applied:
            self.shard.gather_params()

    def bytes_per_step(self) -> int:
        """Reduce-scatter + allgather: 2 (N-1)/N of the buffer, as a ring sends them."""
        f = self.shard.flat
        return int(2 * (self.N - 1) / self.N * f.size * f.dtype.itemsize)

    def extra_metrics(self) -> dict:
        return dict(state_elements=self.shard.hi - self.shard.lo)
