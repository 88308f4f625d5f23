"""Checkpoints as HDF5 files of GLOBAL arrays (DESIGN §7, docs/checkpoint-format.md).

    /params/<layer>/<name>            global shape, one dataset per parameter tensor
    /optim/<state>/<layer>/<name>     the same for every optimizer state array (Adam's m, v, ...)
    root attrs: format_version, step, epoch, seed, config, world, hpcopt_version, ...
    every dataset: attr `checksum` = [s1, s2], position-weighted Fletcher sums of its uint32 words
    (kernels.cpu.checksum_parts): layout-independent, so each rank sums the part it wrote.

All ranks write one file together through h5py's `mpio` driver, each rank only its rows of each
dataset (data-parallel replicas split the rows, so every byte is written once). The file is written
as `<name>.tmp`, closed, fsynced and renamed, and the directory fsynced: a file under its final name
is always complete. Files hold global arrays, so a checkpoint loads into any layout. Where h5py has
no MPI support the pieces are gathered to rank 0, which writes the same format serially.
"""
from __future__ import annotations

import glob
import os
import re
import sys
import time
from dataclasses import dataclass, field

import h5py
import numpy as np
from mpi4py import MPI

from . import __version__
from .errors import DataError
from .kernels.cpu import CHECKSUM_MOD, checksum_parts

FORMAT_VERSION = 1
_NAME = re.compile(r"step_(\d{8})\.h5$")


def file_name(step: int) -> str:
    return f"step_{step:08d}.h5"


def _words(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    if a.nbytes % 4:
        raise ValueError(f"checkpoint arrays must be a whole number of 32-bit words (got {a.dtype})")
    return a.reshape(-1).view(np.uint32)


def checksum(a: np.ndarray, first_element: int = 0) -> np.ndarray:
    """[s1, s2] of an array, or of a slice whose first element has global flat index first_element."""
    words_per_element = max(1, a.dtype.itemsize // 4)
    s1, s2 = checksum_parts(_words(a), first_element * words_per_element)
    return np.array([s1, s2], dtype=np.uint64)


@dataclass
class Piece:
    """This rank's block of one dataset of global `shape`: `data` = global[start[0]:..., start[1]:..., ...]
    (an int start: a block of whole rows from that row)."""
    name: str                  # e.g. "params/dense0/weight"
    shape: tuple[int, ...]
    data: np.ndarray           # may hold no rows: every rank lists every dataset
    start: int | tuple[int, ...] = 0

    @property
    def corner(self) -> tuple[int, ...]:
        """The global index of data's first element, one entry per dimension."""
        start = (self.start,) if isinstance(self.start, (int, np.integer)) else tuple(self.start)
        return tuple(int(s) for s in start) + (0,) * (len(self.shape) - len(start))

    @property
    def index(self) -> tuple[slice, ...]:
        """Where data goes in the global array."""
        return tuple(slice(c, c + n) for c, n in zip(self.corner, self.data.shape))


@dataclass(frozen=True)
class Block:
    """Where one tensor of a rank's buffers sits in the global array, and who writes it:
    buffer[lo:hi] holds global[index] (reshaped); `replicas` ranks hold the same block and rank
    `replica` among them writes its share of the block's rows, so every byte is written once."""
    key: str                     # "dense0.weight"
    index: tuple[slice, ...]     # this block of the global tensor (one slice per leading dimension)
    lo: int                      # [lo, hi): the block in this rank's flat buffer (params, or a state array)
    hi: int
    replicas: int = 1
    replica: int = 0
    writer: bool = True          # False: this rank holds the block but another writes it (a parameter server)


def block_shape(global_shape: tuple[int, ...], index: tuple[slice, ...]) -> tuple[int, ...]:
    return tuple(len(range(*s.indices(n))) for s, n in zip(index, global_shape)) + tuple(global_shape[len(index):])


def dataset_name(prefix: str, key: str) -> str:
    """"params", "dense0.weight" -> "params/dense0/weight"."""
    return f"{prefix}/{key.replace('.', '/')}"


def piece(prefix: str, key: str, global_shape: tuple[int, ...], block: Block | None, buf: np.ndarray,
          dtype=None) -> Piece:
    """THE layout function, for every layout (replicas, ZeRO shards, tensor blocks, pipeline stages,
    a parameter server): this rank's Piece of dataset prefix/key out of its buffer `buf`. block=None:
    this rank holds none of the tensor (it still lists the dataset: creation is collective)."""
    name = dataset_name(prefix, key)
    if block is None or not block.writer:
        return Piece(name, global_shape, np.empty((0,) + tuple(global_shape[1:]), dtype or buf.dtype))
    local = buf[block.lo:block.hi].reshape(block_shape(global_shape, block.index))
    lo, hi = rows_of(local.shape[0], block.replica, block.replicas)
    corner = [s.indices(n)[0] for s, n in zip(block.index, global_shape)]
    corner[0] += lo
    return Piece(name, global_shape, local[lo:hi], tuple(corner))


def restore_block(global_array: np.ndarray, block: Block, buf: np.ndarray) -> None:
    """The way back: buf[lo:hi] := this rank's block of a global array read from a checkpoint."""
    buf[block.lo:block.hi] = global_array[block.index].reshape(-1)


def rows_of(n_rows: int, rank: int, nranks: int) -> tuple[int, int]:
    """The contiguous share [lo, hi) of n_rows that rank writes when nranks hold the same tensor."""
    return n_rows * rank // nranks, n_rows * (rank + 1) // nranks


def piece_checksum(p: Piece) -> np.ndarray:
    """The [s1, s2] part of p's dataset checksum that p's block contributes (zero if empty).

    A block of whole rows is contiguous in the global array: one pass. A block cut in a later dimension
    (a tensor-parallel column block) is summed as its contiguous runs, each at its global position."""
    if p.data.size == 0:
        return np.zeros(2, np.uint64)
    shape, corner, bshape = p.shape, p.corner, p.data.shape
    cut = max([d for d in range(len(shape)) if bshape[d] != shape[d]] + [0])  # the last partial dimension
    strides = [int(np.prod(shape[d + 1:], dtype=np.int64)) for d in range(len(shape))]
    total = np.zeros(2, np.uint64)
    for idx in np.ndindex(*bshape[:cut]):  # one contiguous run per index over the dimensions before `cut`
        first = sum((corner[d] + i) * strides[d] for d, i in enumerate(idx)) + corner[cut] * strides[cut]
        total += checksum(p.data[idx], first)
    return total % np.uint64(CHECKSUM_MOD)


def parallel_hdf5() -> bool:
    """Whether h5py was built against parallel HDF5 (its `mpio` driver exists)."""
    return bool(h5py.get_config().mpi)


def write_parallel(path: str, comm: MPI.Comm, pieces: list[Piece], attrs: dict) -> float:
    """All ranks of comm write one checkpoint file together, atomically. Returns seconds taken.

    Every rank passes the same dataset names in the same order (creation is collective), each with
    the rows it owns. Checksums: each rank sums its rows' parts, one Allreduce completes them.
    """
    t0 = time.perf_counter()
    tmp = path + ".tmp"
    attrs = dict(attrs, format_version=FORMAT_VERSION, hpcopt_version=__version__, written_at=time.time(),
                 checksum_algorithm="fletcher-position-31", datasets=[p.name for p in pieces])
    parts = np.zeros((len(pieces), 2), dtype=np.uint64)
    for i, p in enumerate(pieces):
        parts[i] = piece_checksum(p)
    totals = np.zeros_like(parts)
    comm.Allreduce(parts, totals, op=MPI.SUM)
    totals %= np.uint64(CHECKSUM_MOD)
    if parallel_hdf5() and comm.Get_size() > 1:
        f = h5py.File(tmp, "w", driver="mpio", comm=comm, libver="latest")
        _fill(f, pieces, totals, attrs)
    else:
        if comm.Get_size() > 1:  # no parallel HDF5: gather every piece to rank 0
            if comm.Get_rank() == 0:
                print("hpcopt: warning: h5py has no MPI support; checkpoint gathered to rank 0 and "
                      "written serially (see README: parallel HDF5)", file=sys.stderr, flush=True)
            gathered = comm.gather(pieces, root=0)
        else:
            gathered = [pieces]
        if comm.Get_rank() == 0:
            merged = [Piece(p.name, p.shape, np.empty(p.shape, p.data.dtype)) for p in pieces]
            for rank_pieces in gathered:
                for m, p in zip(merged, rank_pieces):
                    m.data[p.index] = p.data
            _fill(h5py.File(tmp, "w", libver="latest"), merged, totals, attrs)
    if comm.Get_rank() == 0:
        with open(tmp, "rb+") as fh:  # closed by HDF5; make it durable before it gets its final name
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    comm.Barrier()
    return time.perf_counter() - t0


def _fill(f: h5py.File, pieces: list[Piece], checksums: np.ndarray, attrs: dict) -> None:
    with f:
        for k, v in attrs.items():
            f.attrs[k] = v
        for p, c in zip(pieces, checksums):
            ds = f.create_dataset(p.name, shape=p.shape, dtype=p.data.dtype, fill_time="never")
            if p.data.size:
                ds[p.index] = p.data
            ds.attrs["checksum"] = c


@dataclass
class Checkpoint:
    """What a checkpoint holds, as global arrays keyed `layer.name`."""
    params: dict[str, np.ndarray]
    optim: dict[str, dict[str, np.ndarray]]     # state name -> key -> array
    attrs: dict = field(default_factory=dict)   # step, epoch, seed, config, world, ...
    window: MPI.Win | None = None               # the node-shared memory the arrays live in, if any

    def release(self) -> None:
        """Free the node-shared memory (collective over the node's ranks); the arrays become invalid."""
        if self.window is not None:
            self.params, self.optim = {}, {}
            self.window.Free()
            self.window = None


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _datasets(f: h5py.File) -> list[str]:
    names: list[str] = []
    f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
    return names


def read(path: str, comm: MPI.Comm = MPI.COMM_SELF) -> Checkpoint:
    """Read and verify a checkpoint into global arrays on every rank of comm (collective).

    The ranks of a node share ONE copy: the arrays live in an MPI shared-memory window, each rank of
    the node reads its share of every dataset's rows into it and checks their part of the checksum.
    So each node reads the file's bytes once, and no rank copies what another read. Call
    `release()` when done (collective over the node). Raises DataError (one line naming the file and
    dataset) on every rank alike when the file is unreadable, incomplete or corrupt.
    """
    from .comm import agree

    attrs, datasets = agree(comm, _read_layout, path)
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    offsets, total = [], 0
    for _, shape, dtype, _ in datasets:
        offsets.append(total)
        total += -(-int(np.prod(shape, dtype=np.int64)) * dtype.itemsize // 64) * 64  # 64-byte aligned
    window = None
    if node.Get_size() > 1:
        window = MPI.Win.Allocate_shared(total if node.Get_rank() == 0 else 0, 1, comm=node)
        base = np.frombuffer(window.Shared_query(0)[0], dtype=np.uint8, count=total)
        window.Fence()
    else:
        base = np.empty(total, dtype=np.uint8)
    arrays = [base[o:o + int(np.prod(shape, dtype=np.int64)) * dt.itemsize].view(dt).reshape(shape)
              for o, (_, shape, dt, _) in zip(offsets, datasets)]
    try:
        parts = agree(comm, _read_rows, path, datasets, arrays, node.Get_rank(), node.Get_size())
    except DataError:
        if window is not None:
            window.Free()
        node.Free()
        raise
    if window is not None:
        window.Fence()  # every rank's rows are in place and visible to the node
    totals = np.zeros_like(parts)
    node.Allreduce(parts, totals, op=MPI.SUM)
    node.Free()
    totals %= np.uint64(CHECKSUM_MOD)
    bad = [i for i, (t, d) in enumerate(zip(totals, datasets)) if not np.array_equal(t, d[3])]
    first_bad = comm.allreduce(bad[0] if bad else len(datasets), op=MPI.MIN)  # any node's copy
    if first_bad < len(datasets):
        if window is not None:
            window.Free()
        err = DataError(f"{path}: checksum mismatch in dataset /{datasets[first_bad][0]}")
        err.all_ranks = True
        raise err
    params: dict[str, np.ndarray] = {}
    optim: dict[str, dict[str, np.ndarray]] = {}
    for (name, *_), a in zip(datasets, arrays):
        parts_ = name.split("/")
        if parts_[0] == "params":
            params[".".join(parts_[1:])] = a
        elif parts_[0] == "optim":
            optim.setdefault(parts_[1], {})[".".join(parts_[2:])] = a
    return Checkpoint(params, optim, attrs, window)


def _open(path: str) -> h5py.File:
    if not os.path.exists(path):
        raise DataError(f"{path}: no such checkpoint")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path}: not a readable HDF5 file ({_short(e)})") from None


def _read_layout(path: str):
    """Root attributes and [(name, shape, dtype, stored checksum)] of every dataset; checks structure."""
    with _open(path) as f:
        try:
            attrs = {k: _plain(v) for k, v in f.attrs.items()}
            for req in ("format_version", "step", "config", "world", "datasets"):
                if req not in attrs:
                    raise DataError(f"{path}: missing root attribute '{req}'")
            if int(attrs["format_version"]) > FORMAT_VERSION:
                raise DataError(f"{path}: format_version {attrs['format_version']} is newer than this "
                                f"hpcopt reads ({FORMAT_VERSION})")
            names = _datasets(f)
            for name in attrs["datasets"]:  # the manifest: every dataset the writer wrote
                if name not in names:
                    raise DataError(f"{path}: missing dataset /{name}")
            if not any(n.startswith("params/") for n in names):
                raise DataError(f"{path}: no /params datasets")
            out = []
            for name in names:
                ds = f[name]
                if "checksum" not in ds.attrs:
                    raise DataError(f"{path}: dataset /{name} has no checksum")
                if ds.ndim == 0:
                    raise DataError(f"{path}: dataset /{name} is a scalar, not an array")
                out.append((name, ds.shape, ds.dtype, np.asarray(ds.attrs["checksum"], dtype=np.uint64)))
            return attrs, out
        except (OSError, KeyError, ValueError) as e:
            raise DataError(f"{path}: corrupt checkpoint ({_short(e)})") from None


def _read_rows(path: str, datasets, arrays, rank: int, nranks: int) -> np.ndarray:
    """Read this rank's share of every dataset's rows into `arrays`; their checksum parts."""
    parts = np.zeros((len(datasets), 2), np.uint64)
    with _open(path) as f:
        for i, ((name, shape, _, _), a) in enumerate(zip(datasets, arrays)):
            lo, hi = rows_of(shape[0], rank, nranks)
            if hi == lo:
                continue
            try:
                f[name].read_direct(a, np.s_[lo:hi], np.s_[lo:hi])
            except (OSError, ValueError) as e:
                raise DataError(f"{path}: dataset /{name} is unreadable ({_short(e)})") from None
            parts[i] = checksum(a[lo:hi], lo * int(np.prod(shape[1:], dtype=np.int64)))
    return parts


def check_complete(path: str, ckpt: Checkpoint, param_keys: list[str], state_names: list[str]) -> None:
    """Every parameter and optimizer state the model needs is in the file."""
    for key in param_keys:
        if key not in ckpt.params:
            raise DataError(f"{path}: missing dataset /params/{key.replace('.', '/')}")
        for s in state_names:
            if key not in ckpt.optim.get(s, {}):
                raise DataError(f"{path}: missing dataset /optim/{s}/{key.replace('.', '/')}")


def _plain(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def _short(e: Exception) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the committed checkpoints of a run directory, oldest first."""
    out = []
    for p in glob.glob(os.path.join(run_dir, "checkpoints", "step_*.h5")):
        m = _NAME.search(p)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def prune(run_dir: str, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints (called after a new one is committed)."""
    for _, p in list_checkpoints(run_dir)[:-keep]:
        os.remove(p)


def export_npz(path: str, out: str) -> list[str]:
    """The global parameters, one array per `layer.name` key."""
    ckpt = read(path)
    tmp = out + ".tmp.npz"
    np.savez(tmp, **ckpt.params)
    os.replace(tmp, out)
    return sorted(ckpt.params)
