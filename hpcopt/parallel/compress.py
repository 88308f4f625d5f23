"""Gradient exchange per bucket, plain or compressed for the wire (`parallel.compression`).

Every codec sums one bucket of the flat gradient buffer over `comm`, in two calls that every rank makes
for every bucket in the same order: `start(b, g)` posts non-blocking MPI operations as soon as the
bucket's gradients are final, `finish(b, g)` waits and leaves the SUM over the ranks in `g`. The loss
gradient is already scaled by 1 / global batch, so the sum is the mean: no averaging pass.

    none   Iallreduce(SUM) in place, float32 on the wire.
    fp16   cast to IEEE half, bf16: to bfloat16 (round to nearest even, the top 16 bits of a float32).
           MPI has no 16-bit sum, so the reduction is done by hand, bandwidth-optimally: Ialltoall sends
           chunk j of the bucket to rank j, which sums the N chunks IN FLOAT32 on arrival (rank order),
           casts its sum back to 16 bits, and Allgather hands every rank every summed chunk. Every rank
           decodes the same 16-bit words, so replicas stay bitwise identical.
    topk   top-k by magnitude with error feedback (Stich et al. 2018; Lin et al. 2018, "Deep Gradient
           Compression"): each rank adds its residual to the gradient, sends the k largest entries
           (values float32, indices int32) with Iallgather, and keeps the rest as next step's residual.
           Every rank scatter-adds all ranks' entries in rank order: the same sum everywhere.
           k = ceil(topk_density * bucket length), at least 1.

`bytes_per_step()` is what this rank sends per step with a bandwidth-optimal algorithm (ring):
    none 2(N-1)/N * 4n     fp16/bf16 2(N-1)/N * 2n     topk (N-1) * 8k        (n, k summed over buckets)
"""
from __future__ import annotations

import math

import numpy as np
from mpi4py import MPI
from numba import njit

from ..names import CODECS  # noqa: F401  (parallel.compression's values, one list)

_K = dict(cache=True, error_model="numpy")


# -- bfloat16 as uint16 words (numpy has no bfloat16) ----------------------------------------------
@njit(**_K)
def bf16_encode(src, dst):
    """src float32 (n,) -> dst uint16 (n,): round to nearest even; NaN stays a quiet NaN."""
    u = src.view(np.uint32)
    for i in range(src.size):
        x = u[i]
        if (x & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):  # NaN: keep it NaN (and quiet)
            dst[i] = np.uint16((x >> np.uint32(16)) | np.uint32(0x40))
        else:
            x = x + np.uint32(0x7FFF) + ((x >> np.uint32(16)) & np.uint32(1))
            dst[i] = np.uint16(x >> np.uint32(16))


@njit(**_K)
def bf16_decode(src, dst):
    """src uint16 (n,) -> dst float32 (n,), exact."""
    u = dst.view(np.uint32)
    for i in range(src.size):
        u[i] = np.uint32(src[i]) << np.uint32(16)


@njit(**_K)
def bf16_sum_rows(rows, out):
    """rows uint16 (N, c) -> out float32 (c,): the column sums in float32, rows added in order."""
    N, c = rows.shape
    u = np.empty(1, np.uint32)
    f = u.view(np.float32)
    for j in range(c):
        acc = np.float32(0.0)
        for r in range(N):
            u[0] = np.uint32(rows[r, j]) << np.uint32(16)
            acc += f[0]
        out[j] = acc


@njit(**_K)
def scatter_add(g, idx, vals):
    """g[idx[i]] += vals[i] for every i, in order (duplicate indices add up)."""
    for i in range(idx.size):
        g[idx[i]] += vals[i]


# -- codecs ----------------------------------------------------------------------------------------
class Dense:
    """No compression: one Iallreduce per bucket, in place."""

    name = "none"

    def __init__(self, comm: MPI.Comm, sizes: list[int], dtype=np.float32):
        self.comm, self.sizes = comm, list(sizes)
        self.N = comm.Get_size()
        self.itemsize = np.dtype(dtype).itemsize
        self.reqs: list[MPI.Request | None] = [None] * len(sizes)
        # a traced communicator's prepared calls (fingerprint.Traced.prepare): bucket b's gradients and
        # the handles of its (Iallreduce, Allreduce)
        self.prepared = hasattr(comm, "prepare")
        self.bufs: list = [None] * len(sizes)
        self.handles: list = [None] * len(sizes)

    def start(self, b: int, g: np.ndarray, blocking: bool = False) -> None:
        """blocking: nothing is left to overlap with (the last bucket, or overlap off): a blocking
        Allreduce, whose tuned algorithms beat the non-blocking ones (measured: 5.3 vs 8.4 ms, 7 MB, 2 ranks)."""
        if self.prepared:
            if self.bufs[b] is not g:   # first use of this bucket, or new gradient buffers
                self.bufs[b] = g
                h = self.handles[b] or (None, None)
                self.handles[b] = (self.comm.prepare("Iallreduce", MPI.IN_PLACE, g, MPI.SUM, h[0]),
                                   self.comm.prepare("Allreduce", MPI.IN_PLACE, g, MPI.SUM, h[1]))
            if blocking:
                self.comm.start(self.handles[b][1])
            else:
                self.reqs[b] = self.comm.start(self.handles[b][0])
        elif blocking:
            self.comm.Allreduce(MPI.IN_PLACE, g, op=MPI.SUM)
        else:
            self.reqs[b] = self.comm.Iallreduce(MPI.IN_PLACE, g, op=MPI.SUM)

    def finish(self, b: int, g: np.ndarray) -> None:
        if self.reqs[b] is not None:
            self.reqs[b].Wait()
            self.reqs[b] = None

    def pending(self) -> list[MPI.Request]:
        return [r for r in self.reqs if r is not None]

    def on_skip(self) -> None:
        """The step was skipped (non-finite sum on every rank): drop any carried state."""

    def bytes_per_step(self) -> int:
        return int(2 * (self.N - 1) / self.N * self.itemsize * sum(self.sizes))


class Cast16(Dense):
    """fp16 / bf16 on the wire; the sum in float32 (Alltoall, local sum, Allgather)."""

    def __init__(self, comm: MPI.Comm, sizes: list[int], kind: str):
        super().__init__(comm, sizes)
        self.name = kind
        N = self.N
        self.chunks = [-(-n // N) for n in sizes]  # c: each rank sums c elements of every bucket
        # 16-bit words on the wire as uint16 (MPI has no half type); fp16 views them as np.float16
        self.send = [np.zeros(N * c, np.uint16) for c in self.chunks]    # (N*c,) this rank's bucket, padded
        self.recv = [np.zeros(N * c, np.uint16) for c in self.chunks]    # (N, c) chunk b of every rank
        self.mine16 = [np.zeros(c, np.uint16) for c in self.chunks]      # (c,) this rank's summed chunk
        self.all16 = [np.zeros(N * c, np.uint16) for c in self.chunks]   # (N*c,) every summed chunk
        self.acc = np.zeros(max(self.chunks, default=0), np.float32)   # float32 sum of one chunk
        if self.prepared:   # the same buffers every step: prepared calls (see Dense)
            self.h_alltoall = [comm.prepare("Ialltoall", a, b) for a, b in zip(self.send, self.recv)]
            self.h_allgather = [comm.prepare("Allgather", a, b) for a, b in zip(self.mine16, self.all16)]

    def encode(self, src: np.ndarray, dst: np.ndarray) -> None:
        """float32 -> 16-bit words (dst uint16)."""
        if self.name == "fp16":
            np.copyto(dst.view(np.float16), src, casting="same_kind")
        else:
            bf16_encode(src, dst)

    def decode(self, src: np.ndarray, dst: np.ndarray) -> None:
        """16-bit words (src uint16) -> float32."""
        if self.name == "fp16":
            np.copyto(dst, src.view(np.float16))
        else:
            bf16_decode(src, dst)

    def start(self, b: int, g: np.ndarray, blocking: bool = False) -> None:
        n = g.size
        self.encode(g, self.send[b][:n])
        if self.prepared:
            self.reqs[b] = self.comm.start(self.h_alltoall[b])
        else:
            self.reqs[b] = self.comm.Ialltoall(self.send[b], self.recv[b])

    def finish(self, b: int, g: np.ndarray) -> None:
        self.reqs[b].Wait()
        self.reqs[b] = None
        c, N = self.chunks[b], self.N
        rows, acc = self.recv[b].reshape(N, c), self.acc[:c]
        if self.name == "fp16":
            halves = rows.view(np.float16)
            np.copyto(acc, halves[0])
            for r in range(1, N):
                np.add(acc, halves[r], out=acc)
        else:
            bf16_sum_rows(rows, acc)
        self.encode(acc, self.mine16[b])
        if self.prepared:
            self.comm.start(self.h_allgather[b])
        else:
            self.comm.Allgather(self.mine16[b], self.all16[b])
        self.decode(self.all16[b][:g.size], g)

    def bytes_per_step(self) -> int:
        return int(2 * (self.N - 1) / self.N * 2 * self.N * sum(self.chunks))


class TopK(Dense):
    """Top-k sparsification with error feedback; the k entries of every rank exchanged with Iallgather."""

    name = "topk"

    def __init__(self, comm: MPI.Comm, sizes: list[int], density: float):
        super().__init__(comm, sizes)
        N = self.N
        self.k = [min(n, max(1, math.ceil(density * n))) for n in sizes]
        self.residual = [np.zeros(n, np.float32) for n in sizes]        # (n_b,) what was not sent yet
        self.vals = [np.zeros(k, np.float32) for k in self.k]           # (k,) this rank's entries
        self.idx = [np.zeros(k, np.int32) for k in self.k]              # (k,) their bucket positions
        self.all_vals = [np.zeros(N * k, np.float32) for k in self.k]   # (N*k,) every rank's entries
        self.all_idx = [np.zeros(N * k, np.int32) for k in self.k]
        self.reqs2: list[MPI.Request | None] = [None] * len(sizes)
        if self.prepared:   # the same buffers every step: prepared calls (see Dense)
            self.h_vals = [comm.prepare("Iallgather", a, b) for a, b in zip(self.vals, self.all_vals)]
            self.h_idx = [comm.prepare("Iallgather", a, b) for a, b in zip(self.idx, self.all_idx)]

    def start(self, b: int, g: np.ndarray, blocking: bool = False) -> None:
        r, k = self.residual[b], self.k[b]
        r += g  # error feedback: what earlier steps left out comes back in
        top = np.argpartition(np.abs(r), r.size - k)[r.size - k:] if k < r.size else np.arange(r.size)
        self.idx[b][:] = top
        self.vals[b][:] = r[top]
        r[top] = 0.0
        if self.prepared:
            self.reqs[b] = self.comm.start(self.h_vals[b])
            self.reqs2[b] = self.comm.start(self.h_idx[b])
        else:
            self.reqs[b] = self.comm.Iallgather(self.vals[b], self.all_vals[b])
            self.reqs2[b] = self.comm.Iallgather(self.idx[b], self.all_idx[b])

    def finish(self, b: int, g: np.ndarray) -> None:
        MPI.Request.Waitall([self.reqs[b], self.reqs2[b]])
        self.reqs[b] = self.reqs2[b] = None
        g[...] = 0.0
        scatter_add(g, self.all_idx[b], self.all_vals[b])

    def pending(self) -> list[MPI.Request]:
        return [r for r in self.reqs + self.reqs2 if r is not None]

    def on_skip(self) -> None:
        for r in self.residual:  # a NaN/inf kept in the residual would poison every later step
            r[...] = 0.0

    def bytes_per_step(self) -> int:
        return int((self.N - 1) * 8 * sum(self.k))


def build(name: str, comm: MPI.Comm, sizes: list[int], density: float = 0.01, dtype=np.float32) -> Dense:
    """The codec `parallel.compression = name` for buckets of `sizes` elements over comm."""
    if name != "none" and np.dtype(dtype) != np.float32:
        raise ValueError(f"compression {name} needs float32 gradients")
    if name == "none":
        return Dense(comm, sizes, dtype)
    if name in ("fp16", "bf16"):
        return Cast16(comm, sizes, name)
    if name == "topk":
        return TopK(comm, sizes, density)
    raise ValueError(f"unknown compression {name!r} (one of {', '.join(CODECS)})")
