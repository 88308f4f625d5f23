"""Signals at any moment (issue 12): SIGUSR1 / SIGTERM during start-up, mid-step, mid-write or after the
final save, to the ranks (through mpirun, which passes USR1 on) and to mpirun itself. The run ends with
75 and a committed checkpoint (0 when it had already finished), and a resume ends bitwise equal to the
uninterrupted run. mpirun answers its own SIGTERM with exit 1 whatever the ranks return: hpcopt's code
is then in HPCOPT_STATUS_FILE. Moments are drawn from a printed seed."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import REPO, hpcopt, mpirun_cmd, run_env

JOB = os.path.join(REPO, "jobs", "digits_mlp.toml")
SEED = int(os.environ.get("HPCOPT_SIGNAL_SEED", "1202"))
STEPS = 1200
ARGS = ["model.layers=[64, 32, 10]", "schedule.name=constant", "schedule.warmup_steps=0", "--quiet",
        f"run.steps={STEPS}", "checkpoint.every_steps=300"]


def params(out, step):
    d = out / "export"
    d.mkdir(exist_ok=True)
    npz = d / f"{step}.npz"
    hpcopt("ckpt", "export", str(out / "checkpoints" / f"step_{step:08d}.h5"), str(npz), check=True)
    return dict(np.load(npz))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits):
    out = tmp_path_factory.mktemp("sig") / "straight"
    hpcopt("train", JOB, f"data.path={digits}", f"run.out_dir={out}", *ARGS, n=2, timeout=180, check=True)
    return params(out, STEPS)


def interrupted(tmp_path, digits, sig, delay, status):
    out = tmp_path / "run"
    cmd = mpirun_cmd(2, ["-m", "hpcopt", "train", JOB, f"data.path={digits}", f"run.out_dir={out}", *ARGS],
                     export=("HPCOPT_STATUS_FILE",))
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(run_env(), HPCOPT_STATUS_FILE=str(status)))
    time.sleep(delay)
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=180)
    return out, p.returncode, stdout, stderr


MOMENTS = np.random.default_rng(SEED).uniform(1.0, 5.0, 6).round(2).tolist()


@pytest.mark.slow
@pytest.mark.parametrize("sig,delay", [(signal.SIGUSR1, d) for d in MOMENTS[:4]] +
                         [(signal.SIGTERM, d) for d in MOMENTS[4:]])
def test_signal_at_a_random_moment_then_resume_bitwise(tmp_path, digits, reference, sig, delay):
    status = tmp_path / "status"
    out, rc, stdout, stderr = interrupted(tmp_path, digits, sig, delay, status)
    code = int(status.read_text()) if status.exists() else None
    print(f"seed {SEED}: {sig.name} to mpirun after {delay} s: mpirun {rc}, hpcopt {code}")
    if sig == signal.SIGUSR1:
        assert rc == code, (rc, code, stderr)  # USR1 is passed on: mpirun returns hpcopt's code
    assert code in (0, 75), (rc, code, stderr)
    if code == 0:  # the signal came after the final save: nothing to resume
        assert "done:" in stdout, stdout
        assert np.array_equal(params(out, STEPS)["dense0.weight"], reference["dense0.weight"])
        return
    assert "stopped by signal" in stdout and "Traceback" not in stderr, stdout + stderr
    steps = [int(n[5:13]) for n in os.listdir(out / "checkpoints") if n.endswith(".h5.manifest")]
    assert steps, "no committed checkpoint"
    p = hpcopt("train", JOB, f"data.path={digits}", f"run.out_dir={out}", *ARGS, "--resume", "auto", n=2,
               timeout=180)
    assert p.returncode == 0, p.stderr
    got = params(out, STEPS)
    for k in reference:
        assert np.array_equal(got[k], reference[k]), (k, delay)


AFTER_SAVE = """
import os, signal, sys
from hpcopt import cli, train
original = train.Trainer.save
def save(self):
    path = original(self)
    if self.step_count == self.total_steps:
        os.kill(os.getpid(), signal.SIGTERM)  # right after the final checkpoint is committed
        os.kill(os.getpid(), signal.SIGUSR1)
    return path
train.Trainer.save = save
sys.exit(cli.main(sys.argv[1:]))
"""


def test_signal_after_the_final_save_ends_with_0(tmp_path, digits):
    script = tmp_path / "after.py"
    script.write_text(AFTER_SAVE)
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, str(script), "train", JOB, f"data.path={digits}", f"run.out_dir={out}",
                        "run.steps=20", "--quiet"], capture_output=True, text=True, timeout=120, env=run_env())
    assert p.returncode == 0 and "done: 20 steps" in p.stdout, (p.returncode, p.stdout, p.stderr)
    assert (out / "checkpoints" / "step_00000020.h5.manifest").exists()
