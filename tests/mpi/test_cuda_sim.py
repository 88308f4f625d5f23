"""backend.device = "cuda": the optimizer runs as numba.cuda kernels over device mirrors of the flat
buffers. Without a GPU this runs in Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1, set before numba
loads, so in the launched processes only)."""
import os
import shutil
import subprocess

import numpy as np
import pytest

from hpcopt import checkpoint
from tests.conftest import REPO, mpirun_cmd, run_env

pytestmark = [pytest.mark.mpi, pytest.mark.slow]


def train(out, device, digits, extra=()):
    cmd = mpirun_cmd(2, ["-m", "hpcopt", "train", os.path.join(REPO, "jobs/digits_mlp.toml"),
                         f"data.path={digits}", "model.layers=[64, 8, 10]", "run.steps=6", "run.log_every=2",
                         "checkpoint.every_steps=3", f"backend.device={device}", f"run.out_dir={out}",
                         "--quiet", *extra], export=("NUMBA_ENABLE_CUDASIM",))
    p = subprocess.run(cmd, env=dict(run_env(), NUMBA_ENABLE_CUDASIM="1"), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    return checkpoint.read(str(out / "checkpoints/step_00000006.h5"))


def test_cuda_optimizer_equals_cpu_and_resumes(tmp_path, digits):
    cpu, gpu = train(tmp_path / "cpu", "cpu", digits), train(tmp_path / "cuda", "cuda", digits)
    for k in cpu.params:  # the same float32 arithmetic in another kernel: rounding-level at most
        np.testing.assert_allclose(gpu.params[k], cpu.params[k], rtol=1e-6, atol=1e-7, err_msg=k)
    for s in cpu.optim:
        for k in cpu.optim[s]:
            np.testing.assert_allclose(gpu.optim[s][k], cpu.optim[s][k], rtol=1e-6, atol=1e-7, err_msg=(s, k))
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "cuda/checkpoints/step_00000003.h5", resumed / "checkpoints")
    again = train(resumed, "cuda", digits, ["--resume", "auto"])
    for k in gpu.params:  # state went host -> device on resume: the same run continues bitwise
        assert np.array_equal(again.params[k], gpu.params[k]), k
