"""A data file held once per node: the splits in one MPI shared-memory window that every rank of the
node reads from (the checkpoint reader does the same for checkpoints: checkpoint.read).

For a sweep (hpcopt/sweep): the trials of all groups on a node train from one copy, read from the
file once per node, instead of each trial reading the file again. The arrays are what ShardedLoader
reads from h5py otherwise (the same values, in the file's dtype), so a trial's batches are the same
bytes either way.
"""
from __future__ import annotations

import h5py
import numpy as np
from mpi4py import MPI

from .datasets import SPLITS, DataInfo, inspect
from .loader import chunk_rows


class NodeData:
    """The splits of `path` in node-shared memory; built collectively over `comm` (every rank).
    `arrays[split] = (x, y, chunk rows)`; `info` is the file's DataInfo (values checked once, each
    rank of comm a share). Call `release()` (collective over comm) when no loader uses it any more."""

    def __init__(self, path: str, comm: MPI.Comm, nonzero_targets: bool = False):
        from ..comm import agree

        self.path = path
        self.info: DataInfo = agree(comm, inspect, path, True, comm.Get_rank(), comm.Get_size(), nonzero_targets)
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        with h5py.File(path, "r") as f:
            layout = [(f"{s}/{p}", f[f"{s}/{p}"].shape, f[f"{s}/{p}"].dtype) for s in SPLITS for p in ("x", "y")]
            chunks = {s: chunk_rows(f[f"{s}/x"]) for s in SPLITS}
        offsets, total = [], 0
        for _, shape, dt in layout:
            offsets.append(total)
            total += -(-int(np.prod(shape, dtype=np.int64)) * dt.itemsize // 64) * 64   # 64-byte aligned
        self.window = MPI.Win.Allocate_shared(total if node.Get_rank() == 0 else 0, 1, comm=node)
        base = np.frombuffer(self.window.Shared_query(0)[0], dtype=np.uint8, count=total)
        views = {name: base[o:o + int(np.prod(shape, dtype=np.int64)) * dt.itemsize].view(dt).reshape(shape)
                 for o, (name, shape, dt) in zip(offsets, layout)}
        self.window.Fence()
        r, n = node.Get_rank(), node.Get_size()
        with h5py.File(path, "r") as f:   # each rank of the node reads its share of every dataset's rows
            for name, shape, _ in layout:
                lo, hi = shape[0] * r // n, shape[0] * (r + 1) // n
                if hi > lo:
                    f[name].read_direct(views[name], np.s_[lo:hi], np.s_[lo:hi])
        self.window.Fence()
        node.Free()
        self.arrays = {s: (views[f"{s}/x"], views[f"{s}/y"], chunks[s]) for s in SPLITS}
        self.bytes = sum(v.nbytes for v in views.values())

    def release(self) -> None:
        if self.window is not None:
            self.arrays = {}
            self.window.Free()
            self.window = None
