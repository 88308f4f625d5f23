"""Bit flips in a checkpoint (issue 12): every single-bit flip, at a random offset anywhere in the file
or concentrated in its HDF5 metadata and attribute text, is reported as corrupt before libhdf5 parses
the file (the manifest's SHA-256 per chunk, ckptfile.py); no command hangs or crashes on one; and
`--resume auto` with the flipped file as the newest falls back to the previous checkpoint and ends
bitwise equal to an undisturbed run. Seeds are printed, so a failure can be replayed."""
import json
import os
import shutil
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from tests.conftest import REPO, hpcopt, run_env

JOB = os.path.join(REPO, "jobs", "digits_mlp.toml")
SEED = int(os.environ.get("HPCOPT_FLIP_SEED", "20261202"))
SHORT = ["model.layers=[64, 32, 10]", "optimizer.name=adam", "--quiet"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits):
    """A finished 1-rank run with checkpoints at steps 5 and 10, and its step-15 continuation's params."""
    d = tmp_path_factory.mktemp("flips")
    out = d / "run"
    hpcopt("train", JOB, f"data.path={digits}", f"run.out_dir={out}", "run.steps=10", "checkpoint.every_steps=5",
           *SHORT, timeout=120, check=True)
    straight = d / "straight"
    hpcopt("train", JOB, f"data.path={digits}", f"run.out_dir={straight}", "run.steps=15", *SHORT,
           timeout=120, check=True)
    return d, out, read_params(straight / "checkpoints" / "step_00000015.h5")


@pytest.fixture(scope="module")
def undisturbed(run, digits):
    """The 2-rank fallback without a flipped file beside it: the run's step-10 checkpoint removed, resumed
    (from step 5) to step 15 on 2 ranks; its step-15 params (one run, whatever was flipped)."""
    d, out, _ = run
    rundir = d / "undisturbed"
    shutil.copytree(out, rundir)
    for f in (rundir / "checkpoints").glob("step_00000010.h5*"):
        f.unlink()
    hpcopt("train", JOB, f"data.path={digits}", f"run.out_dir={rundir}", "run.steps=15", *SHORT,
           "--resume", "auto", n=2, timeout=180, check=True)
    return read_params(rundir / "checkpoints" / "step_00000015.h5")


def read_params(path) -> dict:
    """A checkpoint's global parameters, read and verified in this process (as `ckpt export` does)."""
    from hpcopt import checkpoint

    return {k: np.array(a) for k, a in checkpoint.read(str(path)).params.items()}


def metadata_offsets(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Byte offsets outside every dataset's raw data (HDF5 superblock, object headers, B-trees, heaps,
    attributes), and the offsets of the attribute text (the stored config, the dataset list)."""
    size = os.path.getsize(path)
    meta = np.ones(size, bool)
    with h5py.File(path, "r") as f:
        def mark(name, obj):
            if isinstance(obj, h5py.Dataset):
                off = obj.id.get_offset()
                if off is not None:
                    meta[off:off + obj.id.get_storage_size()] = False
        f.visititems(mark)
        config = f.attrs["config"]
    raw = open(path, "rb").read()
    text = []
    for needle in (config.encode()[:40], b"params/dense", b"adam"):
        at = raw.find(needle)
        while at >= 0:
            text.extend(range(at, min(at + 200, size)))
            at = raw.find(needle, at + 1)
    return np.flatnonzero(meta), np.unique(np.array(text, dtype=np.int64))


def flip(src: str, dst: str, offset: int, bit: int) -> None:
    data = bytearray(open(src, "rb").read())
    data[offset] ^= 1 << bit
    open(dst, "wb").write(bytes(data))


FLIPS_SCRIPT = r"""
import json, os, shutil, sys, numpy as np
from hpcopt import checkpoint
from hpcopt.errors import DataError
src, work, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
raw = open(src, "rb").read()
shutil.copy(src + ".manifest", work + ".manifest")
missed = []
for offset, bit in spec:
    data = bytearray(raw); data[offset] ^= 1 << bit
    open(work, "wb").write(bytes(data))
    try:
        checkpoint.read(work).release()
        missed.append([offset, bit])
    except DataError:
        pass
print(json.dumps(dict(tested=len(spec), missed=missed)))
"""


def test_every_bit_flip_is_reported_before_parsing(run, tmp_path):
    """>= 500 flips at random offsets over the whole file and >= 200 in its metadata and attribute text,
    checked by the library's read path (the one `ckpt verify`, `export`, `ls` and resume use), in one
    child process with a time limit: a hang or a crash would fail it."""
    _, out, _ = run
    src = str(out / "checkpoints" / "step_00000010.h5")
    size = os.path.getsize(src)
    rng = np.random.default_rng(SEED)
    meta, text = metadata_offsets(src)
    spec = [(int(o), int(b)) for o, b in zip(rng.integers(0, size, 500), rng.integers(0, 8, 500))]
    spec += [(int(o), int(b)) for o, b in zip(rng.choice(meta, 150), rng.integers(0, 8, 150))]
    spec += [(int(o), int(b)) for o, b in zip(rng.choice(text, 100), rng.integers(0, 8, 100))]
    script = tmp_path / "flips.py"
    script.write_text(FLIPS_SCRIPT)
    print(f"bit flips: seed {SEED}, file {size} bytes, {len(meta)} metadata bytes, {len(text)} attribute-text bytes")
    p = subprocess.run([sys.executable, str(script), src, str(tmp_path / "step_00000010.h5"), json.dumps(spec)],
                       capture_output=True, text=True, timeout=600, env=run_env())
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result == dict(tested=750, missed=[]), result


@pytest.mark.parametrize("where", ["random", "metadata", "attributes"])
def test_ckpt_verify_reports_a_flip_in_5_s(run, tmp_path, where):
    _, out, _ = run
    src = str(out / "checkpoints" / "step_00000010.h5")
    meta, text = metadata_offsets(src)
    rng = np.random.default_rng([SEED, len(where)])
    pool = {"random": np.arange(os.path.getsize(src)), "metadata": meta, "attributes": text}[where]
    for i, offset in enumerate(rng.choice(pool, 2)):
        bad = str(tmp_path / "step_00000010.h5")
        flip(src, bad, int(offset), int(rng.integers(0, 8)))
        shutil.copy(src + ".manifest", bad + ".manifest")
        t0 = time.monotonic()
        p = hpcopt("ckpt", "verify", bad, timeout=30)
        took = time.monotonic() - t0
        assert p.returncode == 3 and len(p.stderr.strip().splitlines()) == 1, (offset, p.stderr)
        assert "corrupt" in p.stderr or "differ" in p.stderr, p.stderr
        assert took < 5, f"ckpt verify took {took:.1f} s (seed {SEED}, offset {offset})"
        if i == 0:  # the other commands that read it: no traceback, no hang (ls for one kind, export for another)
            cmd = (["ckpt", "export", bad, str(tmp_path / "x.npz")] if where == "metadata"
                   else ["ckpt", "ls", str(tmp_path)])
            p = hpcopt(*cmd, timeout=30)
            assert p.returncode in (0, 3) and "Traceback" not in p.stderr, (cmd, p.stderr)


@pytest.mark.parametrize("where,n", [("random", 1), ("metadata", 1), ("attributes", 1), ("random", 2),
                                     ("attributes", 2)])
def test_resume_auto_falls_back_past_a_flipped_newest_checkpoint(run, tmp_path, digits, request, where, n):
    d, out, want = run
    rundir = tmp_path / "run"
    shutil.copytree(out, rundir)
    newest = str(rundir / "checkpoints" / "step_00000010.h5")
    meta, text = metadata_offsets(newest)
    rng = np.random.default_rng([SEED, n, len(where)])
    pool = {"random": np.arange(os.path.getsize(newest)), "metadata": meta, "attributes": text}[where]
    offset = int(rng.choice(pool))
    flip(newest, newest, offset, int(rng.integers(0, 8)))
    p = hpcopt("train", JOB, f"data.path={digits}", f"run.out_dir={rundir}", "run.steps=15", *SHORT,
               "--resume", "auto", n=n if n > 1 else None, timeout=180)
    assert p.returncode == 0, (offset, p.stderr)
    assert "skipping" in p.stderr and "step_00000010.h5" in p.stderr and "step 5" in p.stderr, p.stderr
    got = read_params(rundir / "checkpoints" / "step_00000015.h5")
    if n > 1:  # the undisturbed run on 2 ranks: the same fallback to step 5, without a flipped file beside it
        assert n == 2
        want = request.getfixturevalue("undisturbed")
    for k in want:
        assert np.array_equal(got[k], want[k]), (k, offset)


def test_old_checkpoints_without_a_manifest_are_checked_in_a_child(tmp_path):
    """A file from before manifests: verified by `python -m hpcopt.ckptfile` in a child process, so a
    flip in its metadata is a one-line error even where libhdf5 would crash or hang on it."""
    src = os.path.join(REPO, "tests", "data", "v1", "data2-step20.h5")
    meta, _ = metadata_offsets(src)
    rng = np.random.default_rng(SEED)
    for offset in rng.choice(meta, 2):
        bad = str(tmp_path / "step_00000020.h5")
        flip(src, bad, int(offset), int(rng.integers(0, 8)))
        p = hpcopt("ckpt", "verify", bad, timeout=120)
        assert p.returncode in (0, 3) and "Traceback" not in p.stderr, (offset, p.stderr)
        assert len(p.stderr.strip().splitlines()) <= 1, p.stderr
