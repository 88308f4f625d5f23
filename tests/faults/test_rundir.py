"""The run directory (issue 12): one run at a time (a lock taken with O_EXCL, stale locks cleared when
their holder is provably gone, others named), nothing of anybody else's overwritten, nothing changed
by a failed start or a finished run, names that are names, planted links never followed."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, ckpt_verify, hpcopt, run_env

JOB = os.path.join(REPO, "jobs", "digits_mlp.toml")
SMALL = ["model.layers=[64, 16, 10]", "optimizer.name=sgd", "optimizer.lr=0.1", "--quiet"]


def train(digits, out, *extra, n=None, timeout=120):
    return hpcopt("train", JOB, f"data.path={digits}", f"run.out_dir={out}", *SMALL, *extra, n=n, timeout=timeout)


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory, digits):
    """A finished run of 4 steps with checkpoints at 2 and 4, made once: tests that go on from it take a copy."""
    out = tmp_path_factory.mktemp("four") / "r"
    p = train(digits, out, "run.steps=4", "checkpoint.every_steps=2")
    assert p.returncode == 0, p.stderr
    return out


def start(digits, out, *extra):
    cmd = [sys.executable, "-m", "hpcopt", "train", JOB, f"data.path={digits}", f"run.out_dir={out}", *SMALL, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=run_env())


@pytest.mark.slow
def test_two_runs_on_one_directory_one_proceeds(tmp_path, digits):
    """10 tries, alternately fresh and --resume auto: two runs started together, exactly one proceeds and
    the other exits 2 naming the lock's holder; every checkpoint verifies; nothing hangs. (The suite's
    longest test: 26-48 s at 20 tries.)"""
    for i in range(10):
        out = tmp_path / f"t{i}"
        # long enough (about a second of steps) that the first cannot finish before the second starts
        extra = ["run.steps=400", "checkpoint.every_steps=100"] + (["--resume", "auto"] if i % 2 else [])
        a, b = start(digits, out, *extra), start(digits, out, *extra)
        results = [p.communicate(timeout=120) + (p.returncode,) for p in (a, b)]
        codes = sorted(r[2] for r in results)
        assert codes == [0, 2], (i, results)
        loser = [r for r in results if r[2] == 2][0]
        lines = loser[1].strip().splitlines()
        assert len(lines) == 1 and "in use by another run (host" in lines[0] and "pid" in lines[0], loser[1]
        steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl") if '"loss"' in line]
        assert steps == list(range(20, 401, 20)), (i, steps)  # one run's records, not two interleaved
        from hpcopt import checkpoint

        for _, path in checkpoint.list_checkpoints(str(out)):  # each verifies (manifest, then datasets)
            checkpoint.read(path).release()
        assert not os.path.exists(out / ".lock")


def test_a_lock_held_elsewhere_is_named_with_the_command_to_clear_it(tmp_path, digits):
    out = tmp_path / "r"
    out.mkdir()
    (out / ".lock").write_text(json.dumps(dict(host="node17", pid=4242, job="99", restart=0,
                                               started="2026-12-01 10:00:00")) + "\n")
    p = train(digits, out, "run.steps=2")
    assert p.returncode == 2, p.stderr
    line = p.stderr.strip()
    assert "host node17, pid 4242, Slurm job 99" in line and f"rm {out / '.lock'}" in line, line
    assert sorted(os.listdir(out)) == [".lock"]  # nothing else made


def test_a_stale_lock_of_a_dead_process_is_cleared(tmp_path, digits, four_steps):
    out = tmp_path / "r"
    shutil.copytree(four_steps, out)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    (out / ".lock").write_text(json.dumps(dict(host=socket.gethostname(), pid=dead.pid, job="", restart=0,
                                               started="then")) + "\n")
    p = train(digits, out, "run.steps=6", "--resume", "auto")
    assert p.returncode == 0 and "cleared the stale lock" in p.stderr, p.stderr
    assert not (out / ".lock").exists()


def test_a_killed_run_resumes_although_its_lock_remains(tmp_path, digits):
    out = tmp_path / "r"
    p = start(digits, out, "run.steps=100000", "checkpoint.every_steps=20")
    deadline = time.monotonic() + 60
    while not list((out / "checkpoints").glob("*.manifest")) if (out / "checkpoints").exists() else True:
        assert time.monotonic() < deadline and p.poll() is None, p.stderr
        time.sleep(0.1)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert (out / ".lock").exists()
    q = train(digits, out, "run.steps=40", "--resume", "auto", timeout=120)
    assert q.returncode == 0 and "cleared the stale lock" in q.stderr, q.stderr


@pytest.mark.parametrize("name", ["../../x", "/abs/path", "a/b", "..", ""])
def test_run_name_is_a_name_not_a_path(tmp_path, name):
    p = hpcopt("train", JOB, f"run.name={name!r}".replace("'", '"'), cwd=str(tmp_path))
    assert p.returncode == 2 and "run.name must be a name, not a path" in p.stderr, p.stderr
    assert os.listdir(tmp_path) == []


def test_an_existing_project_directory_is_not_taken_over(tmp_path, digits):
    proj = tmp_path / "myproject"
    proj.mkdir()
    (proj / "config.toml").write_text("[tool]\nmine = true\n")
    (proj / "analysis.py").write_text("print(1)\n")
    p = train(digits, proj, "run.steps=2")
    assert p.returncode == 2 and "holds a config.toml that hpcopt did not write" in p.stderr, p.stderr
    assert (proj / "config.toml").read_text() == "[tool]\nmine = true\n"
    assert sorted(os.listdir(proj)) == ["analysis.py", "config.toml"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    p = train(digits, other, "run.steps=2")
    assert p.returncode == 2 and "is not empty and not an hpcopt run directory" in p.stderr, p.stderr
    assert os.listdir(other) == ["notes.txt"]


def test_planted_links_are_never_followed(tmp_path, digits):
    """config.toml.tmp / step_N.h5.tmp links pointing at a victim file: the writes go through
    unpredictable O_EXCL names, so the victim stays as it was."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "r"
    (out / "checkpoints").mkdir(parents=True)
    for link in (out / "config.toml.tmp", out / "checkpoints" / "step_00000002.h5.tmp",
                 out / "checkpoints" / "step_00000002.h5.manifest.tmp"):
        link.symlink_to(victim)
    p = train(digits, out, "run.steps=2")
    assert p.returncode == 0, p.stderr
    assert victim.read_text() == "precious"
    ckpt_verify(out / "checkpoints" / "step_00000002.h5")


def test_a_failed_resume_changes_nothing(tmp_path, digits, four_steps):
    out = tmp_path / "r"
    shutil.copytree(four_steps, out)
    before = {f: (out / f).read_bytes() for f in ("config.toml", "metrics.jsonl")}
    ckpts = sorted(os.listdir(out / "checkpoints"))
    p = train(digits, out, "run.steps=8", "model.layers=[64, 32, 10]", "--resume", "auto")
    assert p.returncode == 2 and "model.layers" in p.stderr, p.stderr
    assert {f: (out / f).read_bytes() for f in before} == before
    assert sorted(os.listdir(out / "checkpoints")) == ckpts and not (out / ".lock").exists()


def test_resuming_a_finished_run_does_nothing(tmp_path, digits):
    out = tmp_path / "r"
    assert train(digits, out, "run.steps=4").returncode == 0
    snapshot = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    p = train(digits, out, "run.steps=4", "--resume", "auto")
    assert p.returncode == 0 and "nothing to do" in p.stdout and "finished at step 4" in p.stdout, p.stdout
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()} == snapshot


def test_toggling_amsgrad_on_resume_names_the_option(tmp_path, digits):
    out = tmp_path / "r"
    assert train(digits, out, "run.steps=4", "optimizer.name=adam", "optimizer.lr=0.001").returncode == 0
    p = train(digits, out, "run.steps=8", "optimizer.name=adam", "optimizer.lr=0.001", "optimizer.amsgrad=true",
              "--resume", "auto")
    assert p.returncode == 2 and "optimizer.amsgrad" in p.stderr and "missing dataset" not in p.stderr, p.stderr
    p = train(digits, out, "run.steps=8", "optimizer.name=adam", "optimizer.lr=0.001", "optimizer.amsgrad=true",
              "--resume", "auto", "--resume-force")
    assert p.returncode == 0 and "starts fresh" in p.stderr, p.stderr


def test_checkpoint_names_past_eight_digits_are_listed(tmp_path):
    from hpcopt import checkpoint

    d = tmp_path / "checkpoints"
    d.mkdir()
    for step in (99_999_999, 100_000_000, 123_456_789_0):
        (d / checkpoint.file_name(step)).write_bytes(b"")
    assert [s for s, _ in checkpoint.list_checkpoints(str(tmp_path))] == [99_999_999, 100_000_000, 1_234_567_890]


@pytest.mark.parametrize("override,message", [
    ("run.steps=99999999999999999999", "run.steps must be"),
    ("model.layers=[64, 1000000000000, 10]", "GiB per rank"),
    ("backend.device=cuda", "finds no usable GPU"),
])
def test_user_conditions_are_one_line(tmp_path, digits, override, message):
    p = train(digits, tmp_path / "r", override)
    assert p.returncode == 2 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / "r").exists()


def test_explicit_omp_num_threads_is_respected(tmp_path, digits):
    env = dict(run_env(), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "hpcopt", "train", JOB, f"data.path={digits}",
                        f"run.out_dir={tmp_path / 'r'}", "run.steps=2", *SMALL], capture_output=True, text=True,
                       env=env, timeout=120)
    assert p.returncode == 0 and "1 thread(s) per rank (OMP_NUM_THREADS)" in p.stdout, p.stdout + p.stderr


def test_out_dir_under_proc_is_one_line(tmp_path, digits):
    p = train(digits, "/proc/hpcopt-run", "run.steps=2")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
