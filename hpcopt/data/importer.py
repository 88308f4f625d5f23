"""A user's own arrays into an hpcopt data file (`hpcopt data import`), and the training split's target
statistics (`hpcopt data stats`, also written by `data import` and the generators) that
`data.normalize_targets` trains against.

Sources: FILE.npz (keys named by --x/--y), FILE.h5 (dataset paths), FILE.npy (the samples; --y names a
second .npy file). Integer targets of shape (N,) are class labels; float targets (or --task
regression) are regression targets of any per-sample shape. Every check is one line naming the file and
key, and nothing is written unless all of them pass (the output appears by an atomic rename).
"""
from __future__ import annotations

import os

import h5py
import numpy as np

from ..errors import ConfigError, DataError

CHUNK_BYTES = 1 << 20   # about 1 MiB of x per storage chunk (the block shuffle's unit)


def _load(src: str, key: str, what: str) -> np.ndarray:
    if src.endswith(".npy"):
        path = src if what == "x" else key
        if not os.path.exists(path):
            raise DataError(f"{path}: no such file (for .npy sources --y names the targets' .npy file)")
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise DataError(f"{path}: not a plain .npy array ({e})") from None
    if src.endswith(".npz"):
        with np.load(src, allow_pickle=False) as z:
            if key not in z.files:
                raise DataError(f"{src}: no array {key!r} (it has {', '.join(z.files) or 'none'})")
            return z[key]
    with h5py.File(src, "r") as f:
        if key not in f or not isinstance(f[key], h5py.Dataset):
            raise DataError(f"{src}: no dataset {key!r}")
        return f[key][()]


def import_arrays(src: str, out: str, x_key: str, y_key: str, test_fraction: float = 0.2, seed: int = 0,
                  task: str | None = None, compress: bool = False, name: str = "") -> dict:
    """Check and write; returns a summary dict. DataError / ConfigError with one line otherwise."""
    if not os.path.exists(src):
        raise DataError(f"{src}: no such file")
    if not src.endswith((".npz", ".npy", ".h5", ".hdf5")):
        raise ConfigError(f"{src}: import reads .npz, .npy or .h5 files")
    if os.path.exists(out):
        raise ConfigError(f"{out}: exists; choose another output file (nothing was changed)")
    if not 0 < test_fraction < 1:
        raise ConfigError(f"--test-fraction must be in (0, 1) (got {test_fraction})")
    try:
        x, y = _load(src, x_key, "x"), _load(src, y_key, "y")
    except OSError as e:
        raise DataError(f"{src}: cannot read ({e.strerror or e})") from None
    where_x = f"{src}: {x_key}" if not src.endswith(".npy") else src
    where_y = f"{src}: {y_key}" if not src.endswith(".npy") else y_key
    if x.ndim < 2:
        raise DataError(f"{where_x} has shape {list(x.shape)}: need (samples, features) or (samples, *shape)")
    if x.dtype.kind not in "fiub":
        raise DataError(f"{where_x} holds {x.dtype}, not numbers")
    if y.shape[:1] != x.shape[:1]:
        raise DataError(f"{where_y} has {y.shape[0] if y.ndim else 0} samples but {x_key} has {x.shape[0]}")
    if y.dtype.kind not in "fiub":
        raise DataError(f"{where_y} holds {y.dtype}, not numbers")
    task = task or ("classification" if y.dtype.kind in "iub" and y.ndim == 1 else "regression")
    n = x.shape[0]
    n_test = int(round(n * test_fraction))
    if n_test < 1 or n - n_test < 1:
        raise DataError(f"{where_x}: {n} samples cannot be split with --test-fraction {test_fraction}")
    xf = np.asarray(x, dtype=np.float32)
    if not np.isfinite(xf).all():
        bad = int(np.argwhere(~np.isfinite(xf.reshape(n, -1)))[0][0])
        raise DataError(f"{where_x} has a NaN or inf value (sample {bad})")
    if task == "classification":
        if y.ndim != 1:
            raise DataError(f"{where_y} has shape {list(y.shape)}: class labels are (samples,)")
        if y.dtype.kind == "f" and not (np.isfinite(y).all() and np.array_equal(y, np.round(y))):
            raise DataError(f"{where_y} holds non-integer values: not class labels (use --task regression)")
        labels = y.astype(np.int64)
        if labels.min() < 0:
            raise DataError(f"{where_y} has a negative label ({int(labels.min())})")
        classes = int(labels.max()) + 1
        if classes < 2:
            raise DataError(f"{where_y} has a single class")
        yf = labels
    else:
        yf = np.asarray(y, dtype=np.float32)
        if yf.ndim == 1:
            yf = yf[:, None]
        if not np.isfinite(yf).all():
            bad = int(np.argwhere(~np.isfinite(yf.reshape(n, -1)))[0][0])
            raise DataError(f"{where_y} has a NaN or inf target (sample {bad})")
        classes = 0
    perm = np.random.Generator(np.random.Philox(key=np.array([seed, 0], dtype=np.uint64))).permutation(n)
    test, train = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    tmp = f"{out}.tmp-{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs.update(name=name or os.path.splitext(os.path.basename(src))[0], task=task,
                           features=int(np.prod(x.shape[1:])), source=os.path.basename(src))
            if classes:
                f.attrs["classes"] = classes
            rows = max(1, min(n, CHUNK_BYTES // max(1, xf[0].nbytes)))
            for split, idx in (("train", train), ("test", test)):
                for part, a in (("x", xf[idx]), ("y", yf[idx])):
                    ds = f.create_dataset(f"{split}/{part}", data=a, chunks=(min(rows, len(idx)), *a.shape[1:]),
                                          compression="gzip" if compress else None)
                    ds.attrs["chunk_samples"] = ds.chunks[0]
            if task == "regression":
                write_stats(f, *target_stats(yf[train]))
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return dict(task=task, train=len(train), test=len(test), x_shape=list(x.shape[1:]),
                y_shape=list(yf.shape[1:]), classes=classes)


def target_stats(y: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(sum, sum of squares) per target value over the rows of y, float64, and the row count: sums, so
    ranks' shares add (one Allreduce)."""
    y2 = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    return y2.sum(0), np.square(y2).sum(0), len(y2)


def write_stats(f: h5py.File, s: np.ndarray, q: np.ndarray, n: int) -> None:
    """/stats/y_mean and /stats/y_std (shaped as a sample's target; std floored at 1e-12 of the mean's
    scale so a constant value does not divide by zero) from summed statistics of the training split."""
    shape = f["train/y"].shape[1:]
    mean = s / n
    var = np.maximum(q / n - mean * mean, 0.0)
    std = np.maximum(np.sqrt(var), 1e-12 * max(1.0, float(np.abs(mean).max(initial=0.0))))
    for k, v in (("y_mean", mean), ("y_std", std)):
        if f"stats/{k}" in f:
            del f[f"stats/{k}"]
        f.create_dataset(f"stats/{k}", data=v.reshape(shape).astype(np.float64))
    f["stats"].attrs["samples"] = n


def _local_sums(path: str, rank: int, size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """This rank's share of /train/y: (sum, sum of squares) per value, and the training split's size."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such data file")
    with h5py.File(path, "r") as f:
        if "train/y" not in f:
            raise DataError(f"{path}: missing dataset /train/y")
        y = f["train/y"]
        if y.dtype.kind != "f":
            raise DataError(f"{path}: /train/y holds class labels: target statistics are for regression data")
        n = y.shape[0]
        lo, hi = n * rank // size, n * (rank + 1) // size
        s = np.zeros(int(np.prod(y.shape[1:])))
        q = np.zeros_like(s)
        for start in range(lo, hi, 4096):
            ds, dq, _ = target_stats(y[start:min(hi, start + 4096)])
            s += ds
            q += dq
    return s, q, n


def _write_root(path: str, s: np.ndarray, q: np.ndarray, n: int, rank: int) -> None:
    if rank == 0:
        try:
            with h5py.File(path, "a") as f:
                write_stats(f, s, q, n)
        except OSError as e:
            raise DataError(f"{path}: cannot write /stats ({e.strerror or e})") from None


def compute_stats(path: str, comm) -> int:
    """`hpcopt data stats FILE` (any number of ranks): each rank sums its share of /train/y, one Allreduce,
    rank 0 writes /stats. Returns the number of training samples. Collective."""
    from mpi4py import MPI

    from ..comm import agree

    rank, size = comm.Get_rank(), comm.Get_size()
    s, q, n = agree(comm, _local_sums, path, rank, size)
    comm.Allreduce(MPI.IN_PLACE, s)
    comm.Allreduce(MPI.IN_PLACE, q)
    agree(comm, _write_root, path, s, q, n, rank)
    return n


def read_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) of a sample's target from /stats; DataError naming the command that makes them."""
    with h5py.File(path, "r") as f:
        if "stats/y_mean" not in f or "stats/y_std" not in f:
            raise DataError(f"{path}: no /stats/y_mean and /stats/y_std for data.normalize_targets "
                            f"(compute them with: hpcopt data stats {path})")
        return f["stats/y_mean"][()], f["stats/y_std"][()]
