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

from tests.conftest import REPO, ckpt_verify, hpcopt, mpirun_cmd, run_env

JOB = os.path.join(REPO, "jobs", "digits_mlp.toml")
SEED = int(os.environ.get("HPCOPT_SIGNAL_SEED", "1202"))
STEPS = 1200
ARGS = ["model.layers=[64, 32, 10]", "schedule.name=constant", "schedule.warmup_steps=0", "--quiet",
        f"run.steps={STEPS}", "checkpoint.every_steps=300"]


def params(out, step):
    """The global parameters of a checkpoint, read and verified in this process (as `ckpt export` does)."""
    from hpcopt import checkpoint

    ck = checkpoint.read(str(out / "checkpoints" / f"step_{step:08d}.h5"))
    return {k: np.array(a) for k, a in ck.params.items()}


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


MOMENTS = np.random.default_rng(SEED).uniform(1.0, 5.0, 5).round(2).tolist()


@pytest.mark.slow
@pytest.mark.parametrize("sig,delay", [(signal.SIGUSR1, d) for d in MOMENTS[:3]] +
                         [(signal.SIGTERM, d) for d in MOMENTS[3:]])
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


MID_WRITE = """
import os, signal, sys
from hpcopt import checkpoint, cli
original = checkpoint._fill
def fill(f, pieces, checksums, attrs):
    if attrs["step"] == 10:
        os.kill(os.getpid(), signal.{sig})  # while the periodic checkpoint of step 10 is being written
    return original(f, pieces, checksums, attrs)
checkpoint._fill = fill
sys.exit(cli.main(sys.argv[1:]))
"""


MID_ARGS = ["model.layers=[64, 32, 10]", "run.steps=30", "checkpoint.every_steps=10", "--quiet"]


@pytest.fixture(scope="module")
def mid_write_reference(tmp_path_factory, digits):
    """The uninterrupted run of the mid-write tests (one for both signals): its step-30 params."""
    straight = tmp_path_factory.mktemp("mid") / "straight"
    hpcopt("train", JOB, f"data.path={digits}", f"run.out_dir={straight}", *MID_ARGS, timeout=120, check=True)
    return params(straight, 30)


@pytest.mark.parametrize("sig", ["SIGUSR1", "SIGTERM"])
def test_signal_mid_write_then_resume_bitwise(tmp_path, digits, mid_write_reference, sig):
    """A signal while a periodic checkpoint is being written: that write completes, the run stops at the
    next step boundary with a checkpoint of its own and 75, and a resume ends as the uninterrupted run."""
    script = tmp_path / "mid.py"
    script.write_text(MID_WRITE.replace("{sig}", sig))
    out, args = tmp_path / "run", MID_ARGS
    p = subprocess.run([sys.executable, str(script), "train", JOB, f"data.path={digits}", f"run.out_dir={out}",
                        *args], capture_output=True, text=True, timeout=120, env=run_env())
    assert p.returncode == 75 and "stopped by signal" in p.stdout, (p.returncode, p.stdout, p.stderr)
    ckpt_verify(out / "checkpoints" / "step_00000010.h5")
    p = hpcopt("train", JOB, f"data.path={digits}", f"run.out_dir={out}", *args, "--resume", "auto", timeout=120)
    assert p.returncode == 0, p.stderr
    a, b = params(out, 30), mid_write_reference
    for k in b:
        assert np.array_equal(a[k], b[k]), k
