"""A full disk and a read-only checkpoint directory (issue 12), on a small tmpfs mounted for the test
(root only: elsewhere the test says why it cannot run). A full disk during a checkpoint write is one
line and exit 3 with the previous checkpoint intact and nothing under a final name; after space is
freed, --resume auto continues exactly. A read-only checkpoints/ is refused at start-up."""
import os
import subprocess

import numpy as np
import pytest

from tests.conftest import REPO, ckpt_export, ckpt_verify, hpcopt

JOB = os.path.join(REPO, "jobs", "digits_mlp.toml")
# 301,066 parameters with Adam: about 3.6 MB per checkpoint; the 6 MB disk holds one, not two
BIG = ["model.layers=[64, 512, 512, 10]", "optimizer.name=adam", "optimizer.lr=0.001", "--quiet"]


def mount_tmpfs(path, size: str, ro: bool = False) -> None:
    os.makedirs(path, exist_ok=True)
    opts = f"size={size}" + (",ro" if ro else "")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount rights): {p.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mount_tmpfs(mnt, "6m")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_during_a_checkpoint_then_resume_exactly(small_disk, tmp_path, digits):
    out = small_disk / "run"
    p = hpcopt("train", JOB, f"data.path={digits}", f"run.out_dir={out}", "run.steps=6", "checkpoint.every_steps=2",
               *BIG, timeout=180)
    assert p.returncode == 3, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot write the checkpoint" in lines[0] and "no space left" in lines[0].lower(), p.stderr
    names = sorted(os.listdir(out / "checkpoints"))
    assert names == ["step_00000002.h5", "step_00000002.h5.manifest"], names  # no stray file, no .tmp
    ckpt_verify(out / "checkpoints" / "step_00000002.h5")
    assert not (out / ".lock").exists()
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    p = hpcopt("train", JOB, f"data.path={digits}", f"run.out_dir={out}", "run.steps=6", "checkpoint.every_steps=2",
               *BIG, "--resume", "auto", timeout=180)
    assert p.returncode == 0 and "resuming from" in p.stderr and "step 2" in p.stderr, p.stderr
    straight = tmp_path / "straight"
    hpcopt("train", JOB, f"data.path={digits}", f"run.out_dir={straight}", "run.steps=6", *BIG, timeout=180,
           check=True)
    a, b = (ckpt_export(d / "checkpoints" / "step_00000006.h5", tmp_path / name)
            for d, name in ((out, "a.npz"), (straight, "b.npz")))
    for k in b:
        assert np.array_equal(a[k], b[k]), k


def test_read_only_checkpoint_directory_is_refused_at_start(tmp_path, digits):
    out = tmp_path / "run"
    mount_tmpfs(out / "checkpoints", "1m", ro=True)
    try:
        p = hpcopt("train", JOB, f"data.path={digits}", f"run.out_dir={out}", "run.steps=2", *BIG, timeout=120)
        assert p.returncode == 2, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and "checkpoints cannot be written there" in lines[0], p.stderr
        assert sorted(os.listdir(out)) == ["checkpoints"]  # nothing written: no config, no metrics, no lock
    finally:
        subprocess.run(["umount", "-l", str(out / "checkpoints")], capture_output=True)


def test_classes_attribute_of_the_wrong_type_is_a_data_error(tmp_path):
    import h5py

    path = tmp_path / "bad.h5"
    x = np.zeros((40, 64), np.float32)
    y = np.arange(40) % 10
    with h5py.File(path, "w") as f:
        f.attrs.update(name="bad", classes="ten", features=64)
        for split in ("train", "test"):
            f[f"{split}/x"], f[f"{split}/y"] = x, y
    p = hpcopt("train", JOB, f"data.path={path}", f"run.out_dir={tmp_path / 'r'}", "run.steps=2")
    assert p.returncode == 3 and "root attribute 'classes' must be an integer" in p.stderr, p.stderr
