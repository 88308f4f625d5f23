"""Data files: `/train/x` (N, F) float32 (or (N, *shape): a sample's shape, e.g. a field (C, H, W)) and
`/train/y`, the same under `/test`; root attributes `name`, `features`, `task`, `classes`.
  classification (`task` absent or "classification"): y (N,) integer labels in [0, classes)
  regression (`task = "regression"`): y (N, *target shape) floats (a field, a vector, ...)
Made by `hpcopt data make NAME OUT.h5` (or `data import`)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import h5py
import numpy as np

from ..errors import ConfigError, DataError

SPLITS = ("train", "test")
_SCAN_ROWS = 1 << 16  # rows per chunk when scanning for NaN/inf


def _philox(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.Philox(key=np.array(key, dtype=np.uint64)))


def _write(out: str, name: str, splits: dict[str, tuple[np.ndarray, np.ndarray]], classes: int) -> None:
    tmp = out + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with h5py.File(tmp, "w") as f:
        f.attrs.update(name=name, classes=classes, features=splits["train"][0].shape[1])
        for split, (x, y) in splits.items():
            f.create_dataset(f"{split}/x", data=x.astype(np.float32))
            f.create_dataset(f"{split}/y", data=y.astype(np.int64))
    os.replace(tmp, out)


def make_digits(out: str, test_fraction: float = 0.2) -> None:
    """scikit-learn's bundled 8x8 digits (1797 images, shipped inside its wheel: no download), pixels
    scaled to [0, 1], a fixed train/test split (the same file on every machine)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ConfigError("data make digits needs scikit-learn (pip install 'hpcopt[data]')") from None
    d = load_digits()
    x, y = d.data.astype(np.float32) / 16.0, d.target.astype(np.int64)
    perm = _philox(0, 0).permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    _write(out, "digits", {"train": (x[train], y[train]), "test": (x[test], y[test])}, classes=10)


def make_synthetic(out: str, samples: int, features: int, classes: int, seed: int = 0,
                   test_samples: int | None = None, noise: float = 1.0) -> None:
    """Gaussian clusters, one per class, any size: written in chunks, so memory stays flat."""
    if samples < 1 or features < 1 or classes < 2:
        raise ConfigError(f"synthetic: need samples >= 1, features >= 1, classes >= 2 "
                          f"(got {samples}, {features}, {classes})")
    test_samples = max(1, samples // 5) if test_samples is None else test_samples
    centers = _philox(seed, 0).standard_normal((classes, features)).astype(np.float32) * 2.0
    tmp = out + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with h5py.File(tmp, "w") as f:
        f.attrs.update(name="synthetic", classes=classes, features=features)
        for s, (split, n) in enumerate((("train", samples), ("test", test_samples))):
            chunk_rows = max(1, min(n, (4 << 20) // (4 * features)))   # ~4 MiB of x per chunk
            xs = f.create_dataset(f"{split}/x", (n, features), np.float32, chunks=(chunk_rows, features))
            ys = f.create_dataset(f"{split}/y", (n,), np.int64, chunks=(chunk_rows,))
            xs.attrs["chunk_samples"] = chunk_rows   # the unit of data.shuffle = "block"
            for c, start in enumerate(range(0, n, chunk_rows)):
                stop = min(n, start + chunk_rows)
                rng = _philox(seed, ((1 + s) << 32) + c)  # key: (seed, split·chunk)
                y = rng.integers(0, classes, stop - start)
                x = centers[y] + noise * rng.standard_normal((stop - start, features), dtype=np.float32)
                xs[start:stop], ys[start:stop] = x, y
    os.replace(tmp, out)


@dataclass(frozen=True)
class DataInfo:
    path: str
    name: str
    features: int               # values per sample of x
    classes: int                # classification: labels are in [0, classes); 0 for regression
    sizes: dict                 # split -> number of samples
    task: str = "classification"
    x_shape: tuple = ()         # per-sample shape of x
    targets: int = 0            # regression: values per sample of y
    y_shape: tuple = ()         # regression: per-sample shape of y


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def inspect(path: str, check_values: bool = True, rank: int = 0, nranks: int = 1,
            nonzero_targets: bool = False) -> DataInfo:
    """Check a data file's layout (and, if check_values, this rank's 1/nranks share of its values;
    nonzero_targets: every regression target has a non-zero norm, as the rel_l2 loss divides by it).

    Raises DataError with one line naming the file and what is wrong.
    """
    if not os.path.exists(path):
        raise DataError(f"{path}: no such data file (make one with: hpcopt data make digits {path})")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise DataError(f"{path}: not an HDF5 file (or unreadable)") from None
    with f:
        task = _text(f.attrs.get("task", "classification"))
        if task not in ("classification", "regression"):
            raise DataError(f"{path}: root attribute 'task' must be \"classification\" or \"regression\" (got {task!r})")
        sizes = {}
        x_shape = y_shape = None
        for split in SPLITS:
            for part in ("x", "y"):
                if f"{split}/{part}" not in f:
                    raise DataError(f"{path}: missing dataset /{split}/{part}")
            x, y = f[f"{split}/x"], f[f"{split}/y"]
            if not isinstance(x, h5py.Dataset) or x.ndim < 2:
                raise DataError(f"{path}: /{split}/x must be (samples, features) or (samples, *shape), got shape "
                                f"{getattr(x, 'shape', '?')}")
            if x.dtype.kind != "f":
                raise DataError(f"{path}: /{split}/x must hold floats, got {x.dtype}")
            if not isinstance(y, h5py.Dataset):
                raise DataError(f"{path}: /{split}/y is not a dataset")
            if task == "classification":
                if y.ndim != 1:
                    raise DataError(f"{path}: /{split}/y must be 1-D (samples,) class labels, got shape {y.shape} "
                                    f"(float targets need the root attribute task = \"regression\")")
                if y.dtype.kind not in "iu":
                    raise DataError(f"{path}: /{split}/y must hold integer labels, got {y.dtype} (float targets "
                                    f"need the root attribute task = \"regression\")")
            else:
                if y.ndim < 2:
                    raise DataError(f"{path}: /{split}/y must be (samples, targets...) for regression, got shape "
                                    f"{y.shape}")
                if y.dtype.kind != "f":
                    raise DataError(f"{path}: /{split}/y must hold float targets for regression, got {y.dtype}")
            if x.shape[0] != y.shape[0]:
                raise DataError(f"{path}: /{split}/x has {x.shape[0]} samples but /{split}/y has {y.shape[0]}")
            if x.shape[0] == 0:
                raise DataError(f"{path}: /{split} has no samples")
            if x_shape is not None and x.shape[1:] != x_shape:
                raise DataError(f"{path}: /{split}/x has samples of shape {list(x.shape[1:])}, /train/x "
                                f"{list(x_shape)}")
            if y_shape is not None and y.shape[1:] != y_shape:
                raise DataError(f"{path}: /{split}/y has samples of shape {list(y.shape[1:])}, /train/y "
                                f"{list(y_shape)}")
            x_shape, y_shape = x.shape[1:], y.shape[1:]
            sizes[split] = x.shape[0]
        classes = 0
        if task == "classification":
            raw = f.attrs.get("classes", 0)
            try:
                classes = int(raw)
                if isinstance(raw, (bytes, str)) or classes != raw:
                    raise ValueError
            except (TypeError, ValueError):
                raise DataError(f"{path}: root attribute 'classes' must be an integer (got {raw!r})") from None
            if classes < 2:
                raise DataError(f"{path}: root attribute 'classes' must be >= 2 (got {classes})")
        if check_values:
            for split in SPLITS:
                _scan(path, split, f[f"{split}/x"], f[f"{split}/y"], classes, rank, nranks, nonzero_targets)
        return DataInfo(path, _text(f.attrs.get("name", "")), int(np.prod(x_shape)), classes, sizes, task,
                        tuple(int(v) for v in x_shape), int(np.prod(y_shape)) if task == "regression" else 0,
                        tuple(int(v) for v in y_shape) if task == "regression" else ())


def _scan(path, split, x, y, classes, rank, nranks, nonzero_targets=False) -> None:
    n = x.shape[0]
    lo, hi = n * rank // nranks, n * (rank + 1) // nranks
    rows = max(1, _SCAN_ROWS * 64 // max(64, int(np.prod(x.shape[1:]))))   # ~16 MiB of x per read
    for start in range(lo, hi, rows):
        stop = min(hi, start + rows)
        xb = x[start:stop]
        if not np.isfinite(xb).all():
            bad = start + int(np.argwhere(~np.isfinite(xb))[0][0])
            raise DataError(f"{path}: /{split}/x has a NaN or inf value (sample {bad})")
        yb = y[start:stop]
        if classes:
            if yb.size and (yb.min() < 0 or yb.max() >= classes):
                bad = start + int(np.argmax((yb < 0) | (yb >= classes)))
                raise DataError(f"{path}: /{split}/y label {int(y[bad])} at sample {bad} is outside [0, {classes})")
            continue
        if not np.isfinite(yb).all():
            bad = start + int(np.argwhere(~np.isfinite(yb))[0][0])
            raise DataError(f"{path}: /{split}/y has a NaN or inf target (sample {bad})")
        if nonzero_targets:
            norms = np.sqrt(np.sum(np.square(yb.reshape(len(yb), -1), dtype=np.float64), axis=1))
            if (norms == 0).any():
                bad = start + int(np.argmax(norms == 0))
                raise DataError(f"{path}: /{split}/y sample {bad} is all zeros: model.loss = \"rel_l2\" divides "
                                f"by the target's norm (use mse, l1 or huber)")
