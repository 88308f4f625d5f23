"""Checkpoints written before the strategies were composed from parts (tests/data/v1, written by the
code of commit 4dbd95a: the digits MLP [64, 16, 16, 10] at step 20 in four layouts) still load, and a
run resumed from each continues EXACTLY as that code continued it: the parameters at step 30 equal
the ones it exported (tests/data/v1/*-step30.npz), bit for bit on the machine type that wrote them and
to float32 rounding on a CPU whose BLAS kernels round differently."""
import os
import shutil

import numpy as np
import pytest

from tests.conftest import REPO, ckpt_export, hpcopt

JOB = os.path.join(REPO, "jobs", "digits_mlp.toml")
V1 = os.path.join(REPO, "tests", "data", "v1")

LAYOUTS = {
    "data2": (2, []),
    "zero2": (2, ["parallel.zero=1", "optimizer.name=momentum", "optimizer.lr=0.01"]),
    "hybrid": (4, ["parallel.strategy=hybrid", "parallel.pp=2", "parallel.tp=2", "parallel.micro_batches=2"]),
    "local": (2, ["parallel.strategy=local_sgd", "parallel.average_every=4", "optimizer.name=sgd"]),
}


def test_old_checkpoints_verify():
    """Through the command for one, through the library call it makes for the others (each without a
    manifest: verified in a child process, then read)."""
    from hpcopt import checkpoint

    p = hpcopt("ckpt", "verify", os.path.join(V1, "hybrid-step20.h5"), check=True)
    assert "ok (step 20" in p.stdout, p.stdout
    for name in LAYOUTS:
        ck = checkpoint.read(os.path.join(V1, f"{name}-step20.h5"))
        assert ck.attrs["step"] == 20 and len(ck.params) == 6, name


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_old_checkpoint_resumes_bitwise_as_before(tmp_path, digits, name):
    n, extra = LAYOUTS[name]
    out = tmp_path / name
    (out / "checkpoints").mkdir(parents=True)
    shutil.copy(os.path.join(V1, f"{name}-step20.h5"), out / "checkpoints" / "step_00000020.h5")
    hpcopt("train", JOB, f"data.path={digits}", f"run.out_dir={out}", "model.layers=[64, 16, 16, 10]",
           "run.steps=30", "--quiet", "--resume", "auto", *extra, n=n, timeout=180, check=True)
    ckpt, npz = out / "checkpoints" / "step_00000030.h5", tmp_path / "got.npz"
    if name == "hybrid":  # through a process of its own for one layout, in this process for the others
        hpcopt("ckpt", "export", str(ckpt), str(npz), check=True)
        got = dict(np.load(npz))
    else:
        got = ckpt_export(ckpt, npz)
    want = np.load(os.path.join(V1, f"{name}-step30.npz"))
    assert sorted(got) == sorted(want)
    for k in want:
        if np.array_equal(got[k], want[k]):
            continue
        # Bitwise on the machine type that wrote the fixtures; elsewhere OpenBLAS picks other GEMM kernels
        # for the CPU (seen: SkylakeX vs the fixtures' machine, ~1e-7 relative after 10 Adam steps). A
        # wrong tensor, optimizer state or data position moves the parameters by >= 1e-4: far outside this.
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7, err_msg=f"{name}, {k}")
