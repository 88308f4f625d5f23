"""Deterministic sharded loader (DESIGN §6).

The epoch permutation depends only on (seed, epoch); global batch b of an epoch is the same set of
samples whatever the dp size; dp rank r reads only its contiguous slice [r*B/dp, (r+1)*B/dp) of it,
straight from the HDF5 file. So N ranks reproduce one process, and a run resumed on another rank
count sees the same data. The last partial batch of an epoch is dropped (every step has B samples).
"""
from __future__ import annotations

import h5py
import numpy as np


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    rng = np.random.Generator(np.random.Philox(key=np.array([seed, epoch], dtype=np.uint64)))
    return rng.permutation(n)


class ShardedLoader:
    def __init__(self, path: str, split: str, global_batch: int, dp_rank: int, dp_size: int,
                 seed: int, dtype=np.float32):
        self.file = h5py.File(path, "r")
        self.x, self.y = self.file[f"{split}/x"], self.file[f"{split}/y"]
        self.n = self.x.shape[0]
        # labels as int64; regression targets in the model's dtype
        self.y_dtype = np.dtype(np.int64) if self.y.dtype.kind in "iu" else np.dtype(dtype)
        self.global_batch = global_batch
        self.local_batch = global_batch // dp_size
        self.dp_rank, self.seed, self.dtype = dp_rank, seed, np.dtype(dtype)
        self.steps_per_epoch = self.n // global_batch
        self._perm_epoch, self._perm = -1, None

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of a 0-based global step."""
        return divmod(step, self.steps_per_epoch)

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's slice of global batch `step`: x (B/dp, ...) in the model dtype, labels (B/dp,) int64
        or targets (B/dp, ...) in the model dtype."""
        epoch, b = self.position(step)
        if epoch != self._perm_epoch:
            self._perm, self._perm_epoch = epoch_permutation(self.seed, epoch, self.n), epoch
        start = b * self.global_batch + self.dp_rank * self.local_batch
        return self.read(self._perm[start:start + self.local_batch])

    def read(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows idx (in that order). HDF5 wants increasing indices: read sorted, then put back in order."""
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        x = np.empty((len(idx), *self.x.shape[1:]), dtype=self.dtype)
        y = np.empty((len(idx), *self.y.shape[1:]), dtype=self.y_dtype)
        x[order] = self.x[sorted_idx]
        y[order] = self.y[sorted_idx]
        return x, y

    def slice(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Contiguous rows [lo, hi) (evaluation)."""
        return self.x[lo:hi].astype(self.dtype, copy=False), self.y[lo:hi].astype(self.y_dtype, copy=False)

    def close(self) -> None:
        self.file.close()
