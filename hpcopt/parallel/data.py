"""The data-parallel gradient exchange: buckets of the flat gradient buffer summed over `dp_comm`,
each started during backward as soon as its layers are done. Used by every layout that has dp
replicas: full replicas (`data`), and the partitions of `pipeline`, `tensor` and `hybrid`. The loss
gradient is already scaled by 1 / global batch, so the sum IS the mean: averaging costs no extra pass.

Buckets and overlap (`parallel.bucket_mb`, `parallel.overlap`): the flat gradient buffer holds the
tensors in BACKWARD order (DESIGN §3), so it is cut into contiguous buckets from offset 0, whole layers
each, closed once they reach bucket_mb. Backward calls `on_layer_done(i)` when layer i's gradients are
final; when that completes a bucket, its non-blocking exchange starts at once, while backward goes on
with the layers below. The update needs the global gradient norm (clipping, the non-finite check)
before it may touch any parameter, so `reduce` waits for every bucket first.
What a bucket's exchange is belongs to its codec: Iallreduce, fp16/bf16 on the wire or top-k with
error feedback (`parallel.compression`, compress.py), or a reduce-scatter into this rank's ZeRO-1
shard (`parallel.zero = 1`, zero.py).

    per step:  forward -> backward: layer L-1 ... layer 0, bucket b starts when its last layer is done
               -> reduce: wait for every bucket -> apply_update (update.py) -> after_update
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from .strategy import Exchange


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


class BucketedExchange(Exchange):
    """Sums (or reduce-scatters) a partition's gradient buckets over `comm`, overlapped with backward.

    codec: start(k, grads, blocking) / finish(k, grads) / pending() / on_skip() / bytes_per_step(), as
    compress.py's codecs; a codec with `solo = True` still runs on a world of one (ZeRO's copy into
    its shard), the others are skipped there."""

    def __init__(self, flat, comm: MPI.Comm, unit_of: dict[str, int], first_layer: int, bucket_mb: float,
                 overlap: bool, make_codec):
        """unit_of[name]: the model index of the unit holding layer `name` (Stage.unit_of); first_layer:
        the stage's first unit; make_codec(buckets): the codec for these buckets."""
        super().__init__()
        self.flat, self.comm = flat, comm
        self.first_layer = first_layer
        self.buckets = grad_buckets(flat, unit_of, bucket_mb * 2**20)
        self._views = [flat.grad[b.lo:b.hi] for b in self.buckets]   # flat.grad is allocated once
        self.bucket_of_layer = {b.ready_layer: k for k, b in enumerate(self.buckets)}
        self.overlap = overlap and comm.Get_size() > 1
        self.codec = make_codec(self.buckets)
        self.started = 0                   # buckets started this step (they start in order)
        self.sync_s = self.wait_s = 0.0    # seconds in start/finish calls, and in finish alone
        self.steps_timed = 0
        self.logged_bytes = 0              # bytes sent since extra_metrics was last called
        self.logged_steps = 0

    def _grads(self, k: int) -> np.ndarray:
        """Bucket k's view of the gradient buffer (made once: the same object every step, which the flight
        recorder's call-site cache recognises without describing the buffer again)."""
        return self._views[k]

    def layer_done_hook(self):
        """What to pass to the backward whose gradients are final: on_layer_done, or None."""
        self.started = 0
        return self.on_layer_done if self.overlap else None

    def on_layer_done(self, i: int) -> None:
        """Backward hook: layer i's gradients are final; start every bucket that is now complete."""
        k = self.bucket_of_layer.get(i)
        if k is None or i == self.first_layer:  # nothing computes after it: reduce takes its bucket
            return
        t0 = time.perf_counter()
        while self.started <= k:
            self.codec.start(self.started, self._grads(self.started))
            self.started += 1
        pending = self.codec.pending()
        if pending:
            MPI.Request.Testall(pending)  # MPI progresses non-blocking collectives inside its calls
        self.sync_s += time.perf_counter() - t0

    def reduce(self) -> None:
        """Start what backward did not start, then wait for every bucket: the update's gradient is ready."""
        if self.comm.Get_size() == 1:
            if getattr(self.codec, "solo", False):
                for k in range(len(self.buckets)):
                    self.codec.start(k, self._grads(k))
            return
        t0 = time.perf_counter()
        while self.started < len(self.buckets):  # nothing left to overlap them with: blocking
            self.codec.start(self.started, self._grads(self.started), True)
            self.started += 1
        t1 = time.perf_counter()
        for k in range(len(self.buckets)):
            self.codec.finish(k, self._grads(k))
        t2 = time.perf_counter()
        self.started = 0
        self.sync_s += t2 - t0
        self.wait_s += t2 - t1
        self.steps_timed += 1
        self.logged_bytes += self.codec.bytes_per_step()
        self.logged_steps += 1

    def after_update(self, t: int, applied: bool) -> None:
        if not applied:
            self.codec.on_skip()
        after = getattr(self.codec, "after_update", None)
        if after is not None:
            after(applied)

    def extra_metrics(self) -> dict:
        """bytes_sent: what this rank sent per step since the last record (ring algorithm, compress.py)."""
        out = dict(bytes_sent=self.logged_bytes // max(self.logged_steps, 1))
        self.logged_bytes = self.logged_steps = 0
        out.update(getattr(self.codec, "extra_metrics", dict)())
        return out
