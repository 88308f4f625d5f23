"""Data parallel: each dp rank computes gradients on its slice of the global batch and the replicas sum
them. The loss gradient is already scaled by 1 / global batch, so the sum IS the mean: averaging costs
no extra pass.

Buckets and overlap (`parallel.bucket_mb`, `parallel.overlap`): the flat gradient buffer holds the
tensors in BACKWARD order (DESIGN §3), so it is cut into contiguous buckets from offset 0, whole layers
each, closed once they reach bucket_mb. Backward calls `on_layer_done(i)` when layer i's gradients are
final; when that completes a bucket, its non-blocking exchange starts at once, while backward goes on
with the layers below. The optimizer needs the global gradient norm (clipping, the non-finite check)
before it may touch any parameter, so it waits for every bucket, then clips and updates.
The exchange itself is a codec (`parallel.compression`, compress.py): Iallreduce, fp16/bf16 on the
wire, or top-k with error feedback. With `parallel.zero = 1` the buckets are reduce-scattered instead
(zero.py).

    per step:  forward -> backward: layer L-1 ... layer 0, bucket b starts when its last layer is done
               -> wait for every bucket -> global norm, clip, check -> optimizer -> metrics
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from ..errors import ConfigError
from . import compress
from .base import StepResult, Strategy


@dataclass(frozen=True)
class Bucket:
    lo: int           # [lo, hi): a contiguous slice of the flat gradient buffer
    hi: int
    ready_layer: int  # the bucket is complete when backward has finished this layer (its lowest index)

    @property
    def size(self) -> int:
        return self.hi - self.lo


def grad_buckets(flat, layer_index: dict[str, int], bucket_bytes: float) -> list[Bucket]:
    """Cut the flat buffer (backward order) into buckets of whole layers, each at least bucket_bytes
    (except the last). layer_index: layer name -> its index in the model (its position in forward)."""
    groups: list[list[int]] = []  # [layer index, lo, hi] of each layer, in buffer order
    for s in flat.specs:
        i, off = layer_index[s.layer], flat.offsets[s.key]
        if groups and groups[-1][0] == i:
            groups[-1][2] = off + s.size
        else:
            groups.append([i, off, off + s.size])
    buckets, lo, ready = [], 0, None
    for k, (i, _, hi) in enumerate(groups):
        ready = i if ready is None else min(ready, i)
        if (hi - lo) * flat.dtype.itemsize >= bucket_bytes or k == len(groups) - 1:
            buckets.append(Bucket(lo, hi, ready))
            lo, ready = hi, None
    return buckets


def data_parallel(cfg, grid, global_batch: int) -> "DataParallel":
    """parallel.strategy = "data": full replicas, or ZeRO-1 sharded optimizer state with parallel.zero = 1."""
    if cfg.parallel.zero:
        from .zero import ZeroDataParallel

        return ZeroDataParallel(cfg, grid, global_batch)
    return DataParallel(cfg, grid, global_batch)


class BucketedExchange:
    """The bucketed, overlapped gradient exchange over `grid.dp_comm`, for any layout whose flat buffer
    holds whole layers in backward order: full replicas (DataParallel) and the partitions of a pipeline
    or tensor-parallel layout (TensorParallel, PipelineParallel) alike. Needs self.cfg, self.grid,
    self.flat, self.dtype; call setup_buckets once, pass `on_layer_done` to the backward whose
    gradients are final (the last micro-batch's), then call sync_grads."""

    def setup_buckets(self, layer_names: list[str], first_layer: int, compression: str = "none") -> None:
        """layer_names[j]: the name of the layer with model index first_layer + j (forward order)."""
        p = self.cfg.parallel
        comm = self.grid.dp_comm
        index = {name: first_layer + j for j, name in enumerate(layer_names)}
        self.first_layer = first_layer
        self.buckets = grad_buckets(self.flat, index, p.bucket_mb * 2**20)
        self.bucket_of_layer = {b.ready_layer: k for k, b in enumerate(self.buckets)}
        self.overlap = p.overlap and comm.Get_size() > 1
        self.started = 0                   # buckets started this step (they start in order)
        self.sync_s = self.wait_s = 0.0    # seconds in start/finish calls, and in finish alone
        self.steps_timed = 0
        self.logged_bytes = 0              # bytes sent since extra_metrics was last called
        self.logged_steps = 0
        if compression != "none" and self.dtype != np.float32:
            raise ConfigError(f"{self.cfg.source}: parallel.compression = \"{compression}\" needs "
                              f"model.dtype = \"float32\"")
        self.codec = compress.build(compression if comm.Get_size() > 1 else "none", comm,
                                    [b.size for b in self.buckets], p.topk_density, self.dtype)

    def start_bucket(self, k: int, blocking: bool = False) -> None:
        b = self.buckets[k]
        self.codec.start(k, self.flat.grad[b.lo:b.hi], blocking)

    def finish_bucket(self, k: int) -> None:
        b = self.buckets[k]
        self.codec.finish(k, self.flat.grad[b.lo:b.hi])

    def pending_requests(self) -> list[MPI.Request]:
        return self.codec.pending()

    def bytes_per_step(self) -> int:
        return self.codec.bytes_per_step()

    def layer_done_hook(self):
        """What to pass to the backward whose gradients are final: on_layer_done, or None."""
        return self.on_layer_done if self.overlap else None

    def on_layer_done(self, i: int) -> None:
        """Backward hook: layer i's gradients are final; start every bucket that is now complete."""
        k = self.bucket_of_layer.get(i)
        if k is None or i == self.first_layer:  # nothing computes after it: sync_grads takes its bucket
            return
        t0 = time.perf_counter()
        while self.started <= k:
            self.start_bucket(self.started)
            self.started += 1
        pending = self.pending_requests()
        if pending:
            MPI.Request.Testall(pending)  # MPI progresses non-blocking collectives inside its calls
        self.sync_s += time.perf_counter() - t0

    def sync_grads(self) -> None:
        """Start what backward did not start, then wait for every bucket: flat.grad holds the sum."""
        if self.grid.dp_comm.Get_size() == 1:
            return
        t0 = time.perf_counter()
        while self.started < len(self.buckets):  # nothing left to overlap them with: blocking
            self.start_bucket(self.started, blocking=True)
            self.started += 1
        t1 = time.perf_counter()
        for k in range(len(self.buckets)):
            self.finish_bucket(k)
        t2 = time.perf_counter()
        self.started = 0
        self.sync_s += t2 - t0
        self.wait_s += t2 - t1
        self.steps_timed += 1
        self.logged_bytes += self.bytes_per_step()
        self.logged_steps += 1


class DataParallel(BucketedExchange, Strategy):
    name = "data"

    def __init__(self, cfg, grid, global_batch: int):
        super().__init__(cfg, grid, global_batch)
        self.setup_buckets([layer.name for layer in self.model.layers], 0, cfg.parallel.compression)

    # -- one step ----------------------------------------------------------------------------------
    def step(self, x: np.ndarray, labels: np.ndarray, t: int, lr: float) -> StepResult:
        self.started = 0
        loss_sum = self.model.loss_and_grad(x, labels, self.global_batch, self.layer_done_hook())
        self.sync_grads()
        norm, finite = self.clip_and_update(t, lr)  # every replica holds the whole summed gradient
        if not finite:
            self.codec.on_skip()
        return StepResult(loss_sum, norm, finite)

    def extra_metrics(self) -> dict:
        """bytes_sent: what this rank sent per step since the last record (ring algorithm, compress.py)."""
        out = dict(bytes_sent=self.logged_bytes // max(self.logged_steps, 1))
        self.logged_bytes = self.logged_steps = 0
        return out
