"""A checkpoint FILE on its own, with no MPI: its name, its manifest (the commit point), and the checks
of its bytes and structure (checkpoint.py orchestrates them over the ranks).

Manifest: `step_N.h5.manifest`, JSON written and fsynced AFTER the data file has its final name and
renamed into place last: the commit point. It holds the file's size, its step and the SHA-256 of every
CHUNK_BYTES chunk of its bytes, and a SHA-256 of its own fields. A checkpoint with a manifest is
verified byte for byte BEFORE libhdf5 parses it (a flipped bit anywhere, root attributes included, is
a one-line error, never a crash or a hang inside libhdf5); the ranks hash the chunks between them.
A file without one (written before manifests, or a crash between the two renames) is verified the old
way, by a child process (`python -m hpcopt.ckptfile FILE`) with a time limit: a file that hangs or
crashes libhdf5 then costs the child, not the job.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import sys

import h5py
import numpy as np

from .errors import DataError
from .kernels.cpu import CHECKSUM_MOD, checksum_parts

FORMAT_VERSION = 1
MANIFEST_VERSION = 1
CHUNK_BYTES = 64 << 20            # one SHA-256 per 64 MiB of the file: ranks hash chunks in parallel
MANIFEST_MAX_BYTES = 1 << 22      # a manifest larger than this is not ours
NAME = re.compile(r"step_(\d{8,})\.h5$")


def file_name(step: int) -> str:
    return f"step_{step:08d}.h5"


def manifest_path(path: str) -> str:
    return path + ".manifest"


def temp_name(final: str) -> str:
    """An unpredictable name beside `final` for writing it (a pre-planted link cannot be guessed);
    hidden, so listings ignore it. Open it with O_EXCL (h5py mode "w-")."""
    d, base = os.path.split(final)
    return os.path.join(d, f".{base}.{secrets.token_hex(8)}.tmp")


def write_new(path: str, data: bytes) -> None:
    """Create `path` with `data`, durably, through an unpredictable temporary name: O_EXCL | O_NOFOLLOW,
    fsync, rename, fsync of the directory. Replaces an existing `path`; never follows a link."""
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the manifest ----------------------------------------------------------------------------------------
def chunk_digests(path: str, chunks) -> dict[int, str]:
    """SHA-256 (hex) of the given chunk indices of a file."""
    out = {}
    try:
        with open(path, "rb") as f:
            for i in chunks:
                f.seek(i * CHUNK_BYTES)
                out[i] = hashlib.sha256(f.read(CHUNK_BYTES)).hexdigest()
    except OSError as e:
        raise DataError(f"{path}: unreadable ({_short(e)})") from None
    return out


def n_chunks(size: int) -> int:
    return max(1, -(-size // CHUNK_BYTES))


def _self_digest(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def manifest_bytes(path: str, size: int, step: int, digests: list[str]) -> bytes:
    fields = dict(hpcopt_manifest=MANIFEST_VERSION, file=os.path.basename(path), size=size, step=step,
                  algorithm="sha256", chunk_bytes=CHUNK_BYTES, chunks=digests)
    return (json.dumps(dict(fields, self=_self_digest(fields)), indent=1) + "\n").encode()


def read_manifest(path: str) -> dict | None:
    """The manifest of checkpoint `path`, checked against itself and the file's size; None when there is
    none (a checkpoint of an earlier version). DataError when it is damaged or does not match."""
    mpath = manifest_path(path)
    if not os.path.lexists(mpath):
        return None
    try:
        if os.path.getsize(mpath) > MANIFEST_MAX_BYTES:
            raise ValueError("too large")
        with open(mpath, "rb") as f:
            m = json.loads(f.read().decode())
        fields = {k: v for k, v in m.items() if k != "self"}
        if m.get("self") != _self_digest(fields):
            raise ValueError("its own digest does not match")
        if (m["hpcopt_manifest"] > MANIFEST_VERSION or m["algorithm"] != "sha256" or m["chunk_bytes"] != CHUNK_BYTES
                or len(m["chunks"]) != n_chunks(m["size"])):
            raise ValueError("unknown format")
        int(m["step"])
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: corrupt manifest {os.path.basename(mpath)} ({_short(e)})") from None
    if m["file"] != os.path.basename(path):
        raise DataError(f"{path}: its manifest names another file ({m['file']})")
    if not os.path.exists(path):
        raise DataError(f"{path}: no such checkpoint")
    size = os.path.getsize(path)
    if size != m["size"]:
        raise DataError(f"{path}: {size} bytes, its manifest says {m['size']} (truncated or extended)")
    return m


def bad_chunks(path: str, m: dict, rank: int = 0, nranks: int = 1) -> list[int]:
    """The chunks, of those this rank hashes (i = rank mod nranks), whose digest differs from the manifest's."""
    mine = range(rank, len(m["chunks"]), nranks)
    got = chunk_digests(path, mine)
    return [i for i in mine if got[i] != m["chunks"][i]]


def verify_bytes(path: str) -> dict | None:
    """One process: the manifest and every byte of the file; None for a file without a manifest."""
    m = read_manifest(path)
    if m is not None:
        bad = bad_chunks(path, m)
        if bad:
            raise chunk_mismatch(path, m, bad[0])
    return m


def chunk_mismatch(path: str, m: dict, chunk: int) -> DataError:
    """The one-line error for a chunk whose bytes differ from the manifest's digest."""
    lo = chunk * CHUNK_BYTES
    return DataError(f"{path}: bytes {lo}..{min(lo + CHUNK_BYTES, m['size'])} differ from the manifest's digest "
                     f"(corrupt)")


def check_step(path: str, m: dict | None, attrs: dict) -> None:
    if m is not None and int(attrs["step"]) != int(m["step"]):
        raise DataError(f"{path}: step attribute {attrs['step']} but its manifest says {m['step']}")


# -- structure and per-dataset checksums (parsed by libhdf5: only after the bytes are verified) -----------
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


def rows_of(n_rows: int, rank: int, nranks: int) -> tuple[int, int]:
    """The contiguous share [lo, hi) of n_rows that rank writes when nranks hold the same tensor."""
    return n_rows * rank // nranks, n_rows * (rank + 1) // nranks


def _datasets(f: h5py.File) -> list[str]:
    names: list[str] = []
    f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
    return names


def _open(path: str) -> h5py.File:
    if not os.path.exists(path):
        raise DataError(f"{path}: no such checkpoint")
    try:
        return h5py.File(path, "r")
    except (OSError, RuntimeError, ValueError) as e:
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
        except (OSError, KeyError, ValueError, RuntimeError, TypeError, AttributeError) as e:
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
            except (OSError, ValueError, RuntimeError) as e:
                raise DataError(f"{path}: dataset /{name} is unreadable ({_short(e)})") from None
            parts[i] = checksum(a[lo:hi], lo * int(np.prod(shape[1:], dtype=np.int64)))
            check_finite(path, name, a[lo:hi])
    return parts


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


def verify_file(path: str) -> dict:
    """The whole check in one process, no MPI: the manifest's digests, then structure and every dataset's
    checksum. Returns the root attributes; DataError when anything is wrong."""
    m = verify_bytes(path)
    attrs, datasets = _read_layout(path)
    check_step(path, m, attrs)
    for name, shape, dtype, stored in datasets:
        a = np.empty(shape, dtype)
        parts = _read_rows(path, [(name, shape, dtype, stored)], [a], 0, 1)
        if not np.array_equal(parts[0] % np.uint64(CHECKSUM_MOD), stored):
            raise DataError(f"{path}: checksum mismatch in dataset /{name}")
        check_finite(path, name, a)
    return attrs


def check_finite(path: str, name: str, a: np.ndarray) -> None:
    """Parameters and optimizer state are never NaN/inf (a non-finite update is skipped): one that is
    came from damage the 31-bit checksum cannot see (a zero word flipped to 0x7FFFFFFF, say)."""
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise DataError(f"{path}: dataset /{name} holds NaN or inf (corrupt)")


def main(argv: list[str] | None = None) -> int:
    """The verifier child: `python -m hpcopt.ckptfile FILE` exits 0 when FILE verifies, else 3 with one
    line on stderr. It runs without MPI (the parent strips the launcher's environment)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        verify_file(argv[0])
    except DataError as e:
        print(str(e), file=sys.stderr)
        return 3
    except Exception as e:  # noqa: BLE001 - libhdf5 on damaged metadata raises anything: the file is bad
        print(f"{argv[0]}: corrupt checkpoint ({_short(e)})", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
