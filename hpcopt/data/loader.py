"""Deterministic sharded loader (DESIGN §6).

The epoch permutation depends only on (seed, epoch); global batch b of an epoch is the same set of
samples whatever the dp size; dp rank r reads only its contiguous slice [r*B/dp, (r+1)*B/dp) of it,
straight from the HDF5 file. So N ranks reproduce one process, and a run resumed on another rank
count sees the same data. The last partial batch of an epoch is dropped (every step has B samples).

Data larger than memory: nothing is held but the batch being read. `shuffle = "global"` (default)
draws any row for any batch, so each batch reads rows scattered over the file; `shuffle = "block"`
shuffles the order of the file's chunks, then the rows within each window of `window` consecutive
chunks (of that order): a batch then reads from a few chunks of one window, and the order is still a
function of (seed, epoch) only. The block loader reads whole chunks (one contiguous read each, once per
epoch) and keeps at most two windows of them in memory (plus, with read-ahead, the chunks of the next
two windows, read on a thread of their own), serving the batches of a window from there.
`read_ahead`: the next step's rows are read on a background thread while the current step computes
(h5py serialises HDF5 calls; numpy's BLAS releases the GIL).

Measured (4 KiB rows, 256-row batches, page cache warm): h5py's fancy-index read of 256 scattered rows
takes ~20 ms; the same batch from cached chunks ~1 ms, each 4 MiB chunk read once.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import h5py
import numpy as np

DEFAULT_CHUNK = 1024   # rows per block for a contiguous (unchunked) dataset
# block shuffle with read_ahead: windows read ahead of the one being trained on, on a thread of their own
# (docs/data.md: measured with the page cache dropped); memory then holds up to 2 + 2 windows of chunks.
PREFETCH_WINDOWS = 2


def _philox(seed: int, epoch: int, stream: int = 0, sub: int = 0) -> np.random.Generator:
    """The stream (stream, sub) of key (seed, epoch): its counter starts at 2^128·(stream + 2^64·sub),
    so streams never overlap (stream 0, sub 0 is the plain keyed generator)."""
    counter = np.array([0, 0, stream, sub], dtype=np.uint64)
    return np.random.Generator(np.random.Philox(key=np.array([seed, epoch], dtype=np.uint64), counter=counter))


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return _philox(seed, epoch).permutation(n)


def block_permutation(seed: int, epoch: int, n: int, chunk: int, window: int) -> np.ndarray:
    """A permutation of range(n) that keeps rows near each other: the chunks [k·chunk, (k+1)·chunk) in
    a random order, then each run of `window` chunks (in that order) shuffled row by row. Keyed by
    (seed, epoch) only (streams apart from the global shuffle's by a third key word)."""
    chunks = -(-n // chunk)
    order = _philox(seed, epoch, 1).permutation(chunks)
    out = np.empty(n, dtype=np.int64)
    pos = 0
    for w in range(0, chunks, window):
        rows = np.concatenate([np.arange(c * chunk, min(n, (c + 1) * chunk)) for c in order[w:w + window]])
        out[pos:pos + len(rows)] = rows[_philox(seed, epoch, 2, w).permutation(len(rows))]
        pos += len(rows)
    return out


def chunk_rows(ds: h5py.Dataset) -> int:
    """Rows per storage chunk of a dataset (its `chunk_samples` attribute, its HDF5 chunks, else DEFAULT_CHUNK)."""
    if "chunk_samples" in ds.attrs:
        return max(1, int(ds.attrs["chunk_samples"]))
    return ds.chunks[0] if ds.chunks else DEFAULT_CHUNK


class ShardedLoader:
    def __init__(self, path: str, split: str, global_batch: int, dp_rank: int, dp_size: int,
                 seed: int, dtype=np.float32, shuffle: str = "global", window: int = 8, read_ahead: bool = False,
                 target_scale: tuple[np.ndarray, np.ndarray] | None = None, arrays=None):
        """arrays: (x, y, chunk rows) of the split already in memory (data.shared.NodeData), read
        instead of the file: the same values, so the same batches."""
        if arrays is None:
            self.file = h5py.File(path, "r")
            self.x, self.y = self.file[f"{split}/x"], self.file[f"{split}/y"]
            chunk = chunk_rows(self.x)
        else:
            self.file = None
            self.x, self.y, chunk = arrays
        self.n = self.x.shape[0]
        # labels as int64; regression targets in the model's dtype
        self.y_dtype = np.dtype(np.int64) if self.y.dtype.kind in "iu" else np.dtype(dtype)
        self.global_batch = global_batch
        self.local_batch = global_batch // dp_size
        self.dp_rank, self.seed, self.dtype = dp_rank, seed, np.dtype(dtype)
        self.steps_per_epoch = self.n // global_batch
        self.shuffle, self.window, self.chunk = shuffle, window, chunk
        self._perm_epoch, self._perm = -1, None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="hpcopt-read-ahead") if read_ahead else None
        self._next: tuple[int, object] | None = None   # (step, future of its batch)
        self._chunks: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()   # block mode: chunk -> rows
        self._window_steps = max(1, window * self.chunk // max(global_batch, 1))   # batches per window
        self._ahead: dict[int, object] = {}              # chunk -> future of its read, windows ahead
        self._ahead_pool = (ThreadPoolExecutor(1, thread_name_prefix="hpcopt-windows-ahead")
                            if read_ahead and shuffle == "block" else None)
        self.target_scale = target_scale                # regression targets read as (y - mean) / std
        self._raw = shuffle == "block" and self._raw_layout()
        self._fd = os.open(path, os.O_RDONLY) if self._raw else -1

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            if self.shuffle == "block":
                self._perm = block_permutation(self.seed, epoch, self.n, self.chunk, self.window)
            else:
                self._perm = epoch_permutation(self.seed, epoch, self.n)
            self._perm_epoch = epoch
        return self._perm

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of a 0-based global step."""
        return divmod(step, self.steps_per_epoch)

    def rows(self, step: int) -> np.ndarray:
        """The sample indices of this rank's slice of global batch `step`."""
        epoch, b = self.position(step)
        start = b * self.global_batch + self.dp_rank * self.local_batch
        return self.permutation(epoch)[start:start + self.local_batch]

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's slice of global batch `step`: x (B/dp, ...) in the model dtype, labels (B/dp,) int64
        or targets (B/dp, ...) in the model dtype. With read_ahead, step + 1's rows are read meanwhile."""
        if self._pool is None:
            return self.read(self.rows(step))
        # batch reads run on one reader thread, in order (the chunk cache is its alone); whole chunks of the
        # windows ahead are read on a second thread, so a slow disk delays a later window, not the next batch
        pending, self._next = self._next, None
        if pending is not None and pending[0] == step:
            out = pending[1].result()
        else:
            out = self._pool.submit(self.read, self.rows(step)).result()
        self._next = (step + 1, self._pool.submit(self.read, self.rows(step + 1)))
        if self.shuffle == "block":
            for w in range(1, PREFETCH_WINDOWS + 1):
                for c in np.unique(self.rows(step + w * self._window_steps) // self.chunk):
                    c = int(c)
                    if c not in self._chunks and c not in self._ahead:
                        self._ahead[c] = self._ahead_pool.submit(self._read_chunk, c)
            while len(self._ahead) > PREFETCH_WINDOWS * self.window:   # never asked for (a jump): drop
                self._ahead.pop(next(iter(self._ahead)))
        return out

    def _read_chunk(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows of chunk c from the file: x in the model dtype, y; one contiguous read each."""
        lo, hi = c * self.chunk, min(self.n, (c + 1) * self.chunk)
        x = self._read_raw(lo, hi) if self._raw else None
        if x is None:
            x = self.x[lo:hi]
        return x.astype(self.dtype, copy=False), self.y[lo:hi].astype(self.y_dtype, copy=False)

    def _chunk(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows of chunk c, from memory, from the read-ahead thread, or read now; at most two windows of
        chunks are kept (a batch spans at most two windows)."""
        if c in self._chunks:
            self._chunks.move_to_end(c)
            return self._chunks[c]
        ahead = self._ahead.pop(c, None)
        rows = ahead.result() if ahead is not None else self._read_chunk(c)
        self._chunks[c] = rows
        while len(self._chunks) > 2 * self.window:
            self._chunks.popitem(last=False)
        return rows

    def _raw_layout(self) -> bool:
        """Whether x's rows can be read with plain pread (no filters, native byte order, HDF5 chunks of
        whole rows matching the loader's chunk, or contiguous): h5py holds the GIL through a read, so a
        read-ahead thread waiting on the disk inside HDF5 would stop the training thread with it;
        os.preadv releases the GIL (measured, 4 GiB with the page cache dropped: the h5py path fed 75
        steps/s of the warm 157)."""
        ds = self.x
        if self.file is None or ds.compression or ds.dtype.byteorder not in "=|<" or ds.dtype.kind != "f":
            return False
        if ds.chunks is None:
            return ds.id.get_offset() is not None
        return ds.chunks[0] == self.chunk and tuple(ds.chunks[1:]) == tuple(ds.shape[1:])

    def _read_raw(self, lo: int, hi: int) -> np.ndarray | None:
        """Rows [lo, hi) of x with one pread (GIL released); None where HDF5 has not stored them."""
        ds, row = self.x, self.x.dtype.itemsize * int(np.prod(self.x.shape[1:], dtype=np.int64))
        if ds.chunks is None:
            offset = ds.id.get_offset() + lo * row
        else:
            info = ds.id.get_chunk_info_by_coord((lo,) + (0,) * (ds.ndim - 1))
            if info.byte_offset is None or info.filter_mask:
                return None
            offset = info.byte_offset
        out = np.empty((hi - lo, *ds.shape[1:]), dtype=ds.dtype)
        view, done = memoryview(out).cast("B"), 0
        while done < len(view):
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n <= 0:
                return None
            done += n
        return out

    def read(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows idx (in that order). Block shuffle: from whole chunks; global: HDF5 wants increasing
        indices, so read sorted, then put back in order."""
        x = np.empty((len(idx), *self.x.shape[1:]), dtype=self.dtype)
        y = np.empty((len(idx), *self.y.shape[1:]), dtype=self.y_dtype)
        if self.shuffle == "block":
            chunk_of = idx // self.chunk
            for c in np.unique(chunk_of):
                sel = np.flatnonzero(chunk_of == c)
                cx, cy = self._chunk(int(c))
                x[sel] = cx[idx[sel] - c * self.chunk]
                y[sel] = cy[idx[sel] - c * self.chunk]
        else:
            order = np.argsort(idx, kind="stable")
            sorted_idx = idx[order]
            x[order] = self.x[sorted_idx]
            y[order] = self.y[sorted_idx]
        if self.target_scale is not None:
            mean, std = self.target_scale
            y -= mean.astype(y.dtype)
            y /= std.astype(y.dtype)
        return x, y

    def slice(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Contiguous rows [lo, hi) (evaluation)."""
        return self.x[lo:hi].astype(self.dtype, copy=False), self.y[lo:hi].astype(self.y_dtype, copy=False)

    def close(self) -> None:
        for pool in (self._pool, self._ahead_pool):
            if pool is not None:
                pool.shutdown(wait=True)
        self._pool = self._ahead_pool = None
        self._ahead = {}
        if self.file is not None:
            self.file.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
