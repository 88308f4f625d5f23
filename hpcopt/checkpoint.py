"""Checkpoints as HDF5 files of GLOBAL arrays (DESIGN §7, docs/checkpoint-format.md).

    /params/<layer>/<name>            global shape, one dataset per parameter tensor
    /optim/<state>/<layer>/<name>     the same for every optimizer state array (Adam's m, v, ...)
    root attrs: format_version, step, epoch, seed, config, world, hpcopt_version, ...
    every dataset: attr `crc32` (zlib CRC-32 of its C-order bytes)

A file is written as `<name>.tmp`, flushed, fsynced and renamed: a file under its final name is
always complete. Files hold global arrays, so a checkpoint loads into any layout.
"""
from __future__ import annotations

import glob
import os
import re
import time
import zlib
from dataclasses import dataclass, field

import h5py
import numpy as np

from . import __version__
from .errors import DataError

FORMAT_VERSION = 1
_NAME = re.compile(r"step_(\d{8})\.h5$")


def file_name(step: int) -> str:
    return f"step_{step:08d}.h5"


def checksum(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a).view(np.uint8).reshape(-1)) & 0xFFFFFFFF


@dataclass
class Checkpoint:
    """What a checkpoint holds, as global arrays keyed `layer.name`."""
    params: dict[str, np.ndarray]
    optim: dict[str, dict[str, np.ndarray]]     # state name -> key -> array
    attrs: dict = field(default_factory=dict)   # step, epoch, seed, config, world, ...


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write(path: str, ckpt: Checkpoint) -> None:
    """Write a whole checkpoint from ONE process, atomically (tmp, fsync, rename, fsync dir)."""
    tmp = path + ".tmp"
    with h5py.File(tmp, "w") as f:
        attrs = dict(ckpt.attrs, format_version=FORMAT_VERSION, hpcopt_version=__version__,
                     written_at=time.time())
        for k, v in attrs.items():
            f.attrs[k] = v
        for key, a in ckpt.params.items():
            _put(f, "params/" + key.replace(".", "/"), a)
        for state, arrays in ckpt.optim.items():
            for key, a in arrays.items():
                _put(f, f"optim/{state}/" + key.replace(".", "/"), a)
    with open(tmp, "rb+") as fh:  # HDF5 closed and flushed the file; make it durable before renaming
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _put(f: h5py.File, name: str, a: np.ndarray) -> None:
    ds = f.create_dataset(name, data=a)
    ds.attrs["crc32"] = checksum(a)


def _datasets(f: h5py.File) -> list[str]:
    names: list[str] = []
    f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
    return names


def read(path: str, verify_checksums: bool = True) -> Checkpoint:
    """Read a checkpoint; raise DataError (one line, naming the file) if it is unreadable or corrupt."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such checkpoint")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path}: not a readable HDF5 file ({_short(e)})") from None
    try:
        with f:
            attrs = {k: _plain(v) for k, v in f.attrs.items()}
            for req in ("format_version", "step", "config", "world"):
                if req not in attrs:
                    raise DataError(f"{path}: missing root attribute '{req}'")
            if int(attrs["format_version"]) > FORMAT_VERSION:
                raise DataError(f"{path}: format_version {attrs['format_version']} is newer than this "
                                f"hpcopt reads ({FORMAT_VERSION})")
            if "params" not in f or not _datasets(f["params"]):
                raise DataError(f"{path}: no /params datasets")
            params: dict[str, np.ndarray] = {}
            optim: dict[str, dict[str, np.ndarray]] = {}
            for name in _datasets(f):
                ds = f[name]
                try:
                    a = ds[()]
                except OSError as e:
                    raise DataError(f"{path}: dataset /{name} is unreadable ({_short(e)})") from None
                if verify_checksums:
                    if "crc32" not in ds.attrs:
                        raise DataError(f"{path}: dataset /{name} has no checksum")
                    if checksum(a) != int(ds.attrs["crc32"]):
                        raise DataError(f"{path}: checksum mismatch in dataset /{name}")
                parts = name.split("/")
                if parts[0] == "params":
                    params[".".join(parts[1:])] = a
                elif parts[0] == "optim":
                    optim.setdefault(parts[1], {})[".".join(parts[2:])] = a
            return Checkpoint(params, optim, attrs)
    except DataError:
        raise
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"{path}: corrupt checkpoint ({_short(e)})") from None


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
