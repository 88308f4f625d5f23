"""Checkpoints as HDF5 files of GLOBAL arrays (DESIGN §7, docs/checkpoint-format.md).

    /params/<layer>/<name>            global shape, one dataset per parameter tensor
    /optim/<state>/<layer>/<name>     the same for every optimizer state array (Adam's m, v, ...)
    root attrs: format_version, step, epoch, seed, config, world, hpcopt_version, ...
    every dataset: attr `checksum` = [s1, s2], position-weighted Fletcher sums of its uint32 words
    (kernels.cpu.checksum_parts): layout-independent, so each rank sums the part it wrote.

All ranks write one file together through h5py's `mpio` driver, each rank only its rows of each
dataset (data-parallel replicas split the rows, so every byte is written once). The file is written
under an unpredictable hidden name (O_EXCL), closed, fsynced and renamed, then its manifest (the SHA-256
of every chunk of its bytes, ckptfile.py) is written and renamed beside it: the commit point. A reader
checks the bytes against the manifest BEFORE libhdf5 parses anything, and any failure to write is one
line on every rank with the previous checkpoints intact. Files hold global arrays, so a checkpoint loads
into any layout. Where h5py has no MPI support the pieces are gathered to rank 0, which writes the same
format serially.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

import h5py
import numpy as np
from mpi4py import MPI

from . import __version__, ckptfile
from .ckptfile import (FORMAT_VERSION, _read_layout, _read_rows, _short, checksum, file_name,  # noqa: F401
                       fsync_dir, manifest_path, rows_of)
from .errors import DataError
from .kernels.cpu import CHECKSUM_MOD


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
    the rows it owns. Checksums: each rank sums its rows' parts, one Allreduce completes them. A failure
    (a full disk, an unwritable directory) raises one DataError on every rank, leaves nothing under a
    final name and the previous checkpoints as they were.
    """
    t0 = time.perf_counter()
    rank = comm.Get_rank()
    tmp = comm.bcast(ckptfile.temp_name(path) if rank == 0 else None)
    attrs = dict(attrs, format_version=FORMAT_VERSION, hpcopt_version=__version__, written_at=time.time(),
                 checksum_algorithm="fletcher-position-31", datasets=[p.name for p in pieces])
    parts = np.zeros((len(pieces), 2), dtype=np.uint64)
    for i, p in enumerate(pieces):
        parts[i] = piece_checksum(p)
    totals = np.zeros_like(parts)
    comm.Allreduce(parts, totals, op=MPI.SUM)
    totals %= np.uint64(CHECKSUM_MOD)
    failure = comm.bcast(_lacks_space(path, pieces, attrs) if rank == 0 else None)
    if failure:  # refused before libhdf5 runs into the full disk (HDF5 1.10 may crash on ENOSPC)
        _agree_written(comm, path, tmp, failure)
    try:
        if parallel_hdf5() and comm.Get_size() > 1:
            _fill(h5py.File(tmp, "w-", driver="mpio", comm=comm, libver="latest"), pieces, totals, attrs)
        else:
            if comm.Get_size() > 1:  # no parallel HDF5: gather every piece to rank 0
                if rank == 0:
                    print("hpcopt: warning: h5py has no MPI support; checkpoint gathered to rank 0 and "
                          "written serially (see README: parallel HDF5)", file=sys.stderr, flush=True)
                gathered = comm.gather(pieces, root=0)
            else:
                gathered = [pieces]
            if rank == 0:
                merged = [Piece(p.name, p.shape, np.empty(p.shape, p.data.dtype)) for p in pieces]
                for rank_pieces in gathered:
                    for m, p in zip(merged, rank_pieces):
                        m.data[p.index] = p.data
                _fill(h5py.File(tmp, "w-", libver="latest"), merged, totals, attrs)
        if rank == 0:
            with open(tmp, "rb+") as fh:  # closed by HDF5; make it durable before it gets its final name
                os.fsync(fh.fileno())
    except (OSError, RuntimeError, ValueError) as e:
        failure = _io_reason(e)
    _agree_written(comm, path, tmp, failure)
    # the manifest: the ranks hash the file's chunks between them, rank 0 commits
    size = comm.bcast(os.path.getsize(tmp) if rank == 0 else None)
    mine = ckptfile.chunk_digests(tmp, range(rank, ckptfile.n_chunks(size), comm.Get_size()))
    gathered = comm.gather(mine, root=0)
    failure = None
    if rank == 0:
        digests = {i: d for part in gathered for i, d in part.items()}
        try:
            os.replace(tmp, path)
            fsync_dir(os.path.dirname(os.path.abspath(path)))
            ckptfile.write_new(manifest_path(path), ckptfile.manifest_bytes(
                path, size, int(attrs["step"]), [digests[i] for i in range(len(digests))]))
        except OSError as e:
            failure = _io_reason(e)
            if os.path.exists(path) and not os.path.exists(manifest_path(path)):
                os.remove(path)  # uncommitted: nothing stays under a final name
    _agree_written(comm, path, tmp, failure)
    return time.perf_counter() - t0


def _lacks_space(path: str, pieces: list[Piece], attrs: dict) -> str | None:
    """Whether the checkpoint's file system has room for it: its arrays' bytes, 4 KiB of HDF5 metadata
    per dataset and the attributes, with 5% to spare. Quotas are not seen here (a write refused by one
    still fails with its own message)."""
    need = sum(int(np.prod(p.shape, dtype=np.int64)) * p.data.dtype.itemsize for p in pieces)
    need = int(1.05 * (need + 4096 * len(pieces) + len(str(attrs)))) + (1 << 20)
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return None
    free = st.f_bavail * st.f_frsize
    if free < need:
        return f"no space left on the device: it needs {need / 2**20:,.1f} MiB, {free / 2**20:,.1f} MiB are free"
    return None


def _io_reason(e: Exception) -> str:
    """The operating system's words for a failed write (h5py buries errno inside a long message)."""
    import errno as _errno
    import re

    code = getattr(e, "errno", None)
    if not isinstance(code, int):
        m = re.search(r"errno = (\d+)", str(e))
        code = int(m.group(1)) if m else None
    if code in (_errno.ENOSPC, _errno.EDQUOT, _errno.EROFS, _errno.EACCES, _errno.EIO):
        return os.strerror(code)
    return _short(e)


def _agree_written(comm: MPI.Comm, path: str, tmp: str, failure: str | None) -> None:
    """Every rank learns whether any failed; on failure the temporary file goes and all raise alike."""
    failures = [f for f in comm.allgather(failure) if f]
    if failures:
        if comm.Get_rank() == 0 and os.path.lexists(tmp):
            os.remove(tmp)
        err = DataError(f"{path}: cannot write the checkpoint ({failures[0]}); earlier checkpoints are intact")
        err.all_ranks = True
        raise err


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
    attrs: dict = field(default_factory=dict)   # step, epoch, seed, config, world, model, ...
    buffers: dict[str, np.ndarray] = field(default_factory=dict)   # batch norm's running statistics
    window: MPI.Win | None = None               # the node-shared memory the arrays live in, if any

    def release(self) -> None:
        """Free the node-shared memory (collective over the node's ranks); the arrays become invalid."""
        if self.window is not None:
            self.params, self.optim, self.buffers = {}, {}, {}
            self.window.Free()
            self.window = None


def read(path: str, comm: MPI.Comm = MPI.COMM_SELF) -> Checkpoint:
    """Read and verify a checkpoint into global arrays on every rank of comm (collective).

    The ranks of a node share ONE copy: the arrays live in an MPI shared-memory window, each rank of
    the node reads its share of every dataset's rows into it and checks their part of the checksum.
    So each node reads the file's bytes once, and no rank copies what another read. Call
    `release()` when done (collective over the node). Raises DataError (one line naming the file and
    dataset) on every rank alike when the file is unreadable, incomplete or corrupt.
    """
    from .comm import agree

    manifest = verified_bytes(path, comm)  # before libhdf5 parses a byte of it
    attrs, datasets = agree(comm, _read_layout, path)
    agree(comm, ckptfile.check_step, path, manifest, attrs)
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
    buffers: dict[str, np.ndarray] = {}
    for (name, *_), a in zip(datasets, arrays):
        parts_ = name.split("/")
        if parts_[0] == "params":
            params[".".join(parts_[1:])] = a
        elif parts_[0] == "optim":
            optim.setdefault(parts_[1], {})[".".join(parts_[2:])] = a
        elif parts_[0] == "buffers":
            buffers[".".join(parts_[1:])] = a
    return Checkpoint(params, optim, attrs, buffers=buffers, window=window)


def verified_bytes(path: str, comm: MPI.Comm) -> dict | None:
    """Collective: the file's bytes against its manifest, chunks hashed by the ranks in turn; a file
    without a manifest (an earlier version's) is checked by a child process with a time limit. Returns
    the manifest (None for an old file); DataError on every rank when anything does not match."""
    from .comm import agree

    rank, nranks = comm.Get_rank(), comm.Get_size()
    m = agree(comm, ckptfile.read_manifest, path)
    if m is None:
        reason = comm.bcast(verify_in_child(path) if rank == 0 else None)
        if reason:
            err = DataError(reason)
            err.all_ranks = True
            raise err
        return None
    bad = sorted(i for part in comm.allgather(agree(comm, ckptfile.bad_chunks, path, m, rank, nranks)) for i in part)
    if bad:
        err = ckptfile.chunk_mismatch(path, m, bad[0])
        err.all_ranks = True
        raise err
    return m


# the launcher's variables: a child that saw them would try to join the MPI job
_LAUNCHER_ENV = ("OMPI_", "PMIX_", "PMI_", "PRTE_", "OPAL_", "HYDRA_", "MPI_LOCAL", "SLURM_STEP_", "SLURM_PROCID")


def verify_in_child(path: str) -> str | None:
    """Verify a checkpoint without a manifest in a child process (`python -m hpcopt.ckptfile`), so that a
    file whose damaged metadata hangs or crashes libhdf5 costs the child, not the job. None if it
    verifies, else the one-line reason."""
    if not os.path.exists(path):
        return f"{path}: no such checkpoint"
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_ENV)}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    limit = 60 + os.path.getsize(path) / 50e6  # parsing and checksums at >= 50 MB/s, plus start-up
    try:
        p = subprocess.run([sys.executable, "-m", "hpcopt.ckptfile", path], capture_output=True, text=True,
                           timeout=limit, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"{path}: not verified within {limit:.0f} s (damaged HDF5 metadata?)"
    if p.returncode == 0:
        return None
    lines = p.stderr.strip().splitlines()
    if p.returncode == 3 and lines:
        return lines[-1]
    return f"{path}: the verifier crashed (exit {p.returncode}; damaged HDF5 metadata?)"


def check_complete(path: str, ckpt: Checkpoint, param_keys: list[str], state_names: list[str]) -> None:
    """Every parameter and optimizer state the model needs is in the file."""
    for key in param_keys:
        if key not in ckpt.params:
            raise DataError(f"{path}: missing dataset /params/{key.replace('.', '/')}")
        for s in state_names:
            if key not in ckpt.optim.get(s, {}):
                raise DataError(f"{path}: missing dataset /optim/{s}/{key.replace('.', '/')}")


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the checkpoints of a run directory, oldest first (any number of step digits)."""
    out = []
    for p in glob.glob(os.path.join(run_dir, "checkpoints", "step_*.h5")):
        m = ckptfile.NAME.search(p)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def prune(run_dir: str, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints (called after a new one is committed): the manifest
    first, so a half-removed checkpoint is never taken for a committed one."""
    for _, p in list_checkpoints(run_dir)[:-keep]:
        for f in (manifest_path(p), p):
            if os.path.lexists(f):
                os.remove(f)


def export_npz(path: str, out: str) -> list[str]:
    """The global parameters, one array per `layer.name` key, and the buffers (batch norm's
    `layer.running_mean` / `layer.running_var`)."""
    ckpt = read(path)
    tmp = out + ".tmp.npz"
    arrays = {**ckpt.params, **ckpt.buffers}
    np.savez(tmp, **arrays)
    os.replace(tmp, out)
    return sorted(arrays)
