"""The slurm/ batch scripts on a real single-node Slurm (2 ranks of the digits MLP per job).

train.sbatch completes under `srun --mpi=pmix` and under `mpirun`; requeue.sbatch, signalled mid-run,
checkpoints, requeues itself and finishes with parameters bitwise equal to an uninterrupted run; a job
killed without warning and submitted again resumes from its last periodic checkpoint; chain.sh's
second job continues what its first left. Signal delivery is never timed: the tests poll the run
directory with generous timeouts.
"""
from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import REPO, ckpt_export
from tests.slurm.cluster import TERMINAL_STATES, unavailable_reason

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
if unavailable_reason():  # known without installing anything: one line for the whole module
    pytest.skip(unavailable_reason(), allow_module_level=True)

JOB = os.path.join(REPO, "jobs", "digits_mlp.toml")
TRAIN = os.path.join(REPO, "slurm", "train.sbatch")
REQUEUE = os.path.join(REPO, "slurm", "requeue.sbatch")
RANKS = 2
JOB_TIMEOUT = 300        # s: a job (with one requeue) ends well before this on 2 cores
SHORT_STEPS = 40
# The long job: long enough (tens of seconds) that a signal sent after the first logged step lands mid-run.
LONG_STEPS, LOG_EVERY, CKPT_EVERY = 4000, 50, 500
LONG = (f"run.log_every={LOG_EVERY}", "run.eval_every=0", f"checkpoint.every_steps={CKPT_EVERY}")
OVERSUBSCRIBED = (os.cpu_count() or 1) < RANKS


def job_env(launcher: str) -> dict:
    """What the jobs see besides the test's environment: the launcher, this venv's hpcopt, MPI as root."""
    env = dict(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONUNBUFFERED="1",
               HPCOPT_LAUNCHER=launcher, HPCOPT_CMD=f"{sys.executable} -m hpcopt",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if OVERSUBSCRIBED:
        env.update(HPCOPT_LAUNCHER_ARGS="--oversubscribe" if launcher == "mpirun" else "--overcommit",
                   HPCOPT_MPIRUN_MAP="--bind-to none")
    return env


def sbatch_opts(tmp_path) -> list[str]:
    opts = [f"--ntasks={RANKS}", f"--ntasks-per-node={RANKS}", "--cpus-per-task=1", "--time=00:10:00",
            f"--output={tmp_path}/job-%j.out", "--job-name=hpcopt-test"]
    return opts + (["--overcommit"] if OVERSUBSCRIBED else [])


def job_args(digits: str, run_dir, steps: int, extra=()) -> list[str]:
    return [JOB, f"data.path={digits}", f"run.out_dir={run_dir}", f"run.steps={steps}", "--quiet", *extra]


def submit(slurm, script: str, tmp_path, run_dir, digits: str, steps: int, launcher: str = "srun",
           extra=(), env=None) -> tuple[str, str]:
    """sbatch SCRIPT for the digits job on RANKS ranks; returns (job id, its output file)."""
    job = slurm.sbatch(script, job_args(digits, run_dir, steps, extra), env or job_env(launcher),
                       sbatch_opts(tmp_path), cwd=REPO)
    return job, os.path.join(str(tmp_path), f"job-{job}.out")


def long_job(slurm, script, tmp_path, run_dir, digits, launcher="srun"):
    return submit(slurm, script, tmp_path, run_dir, digits, LONG_STEPS, launcher, LONG)


def read(path: str) -> str:
    return open(path, errors="replace").read() if os.path.exists(path) else f"({path} does not exist)"


def metrics(run_dir) -> list[dict]:
    path = os.path.join(str(run_dir), "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip().endswith("}")]


def logged_steps(run_dir, **match) -> list[dict]:
    """The per-step records (not events) whose fields equal `match`."""
    return [r for r in metrics(run_dir) if "event" not in r and all(r.get(k) == v for k, v in match.items())]


def checkpoint_steps(run_dir) -> list[int]:
    names = glob.glob(os.path.join(str(run_dir), "checkpoints", "step_*.h5"))
    return sorted(int(re.search(r"step_(\d+)\.h5$", n).group(1)) for n in names)


def wait_for(what: str, predicate, timeout: float, slurm, job: str, out: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if slurm.state(job)["JobState"] in TERMINAL_STATES:
            break
        time.sleep(0.2)
    pytest.fail(f"job {job}: no {what} (state {slurm.state(job)})\n{read(out)}\n{slurm.logs()}")


def assert_completed(slurm, job: str, out: str, restarts: int = 0) -> None:
    s = slurm.wait_end(job, JOB_TIMEOUT)
    detail = f"job {job}: {s}\n--- job output\n{read(out)}\n{slurm.logs()}"
    assert s["JobState"] == "COMPLETED" and s["ExitCode"] == "0:0", detail
    assert s["Restarts"] == str(restarts), detail


def export(run_dir, step: int) -> dict[str, np.ndarray]:
    ckpt = os.path.join(str(run_dir), "checkpoints", f"step_{step:08d}.h5")
    npz = os.path.join(str(run_dir), f"final-{step}.npz")
    return ckpt_export(ckpt, npz)


def assert_bitwise_equal(got: dict, ref: dict) -> None:
    """Same data, same reduction order, resumed from an exact checkpoint: equal to the last bit."""
    assert got.keys() == ref.keys()
    for k in ref:
        assert np.array_equal(got[k], ref[k]), f"{k}: max |diff| {np.max(np.abs(got[k] - ref[k]))}"


def kill_hard(slurm, job: str) -> None:
    """SIGKILL every process of the job, the ranks first: a crash or an OOM kill, with no grace at all.

    (`scancel --signal=KILL JOBID` is a cancel: Slurm sends TERM first, and hpcopt would checkpoint.)
    """
    r = slurm.cmd(["scontrol", "listpids", job])
    assert r.returncode == 0, r.stderr
    pids = [int(line.split()[0]) for line in r.stdout.splitlines()[1:] if line.strip()]

    def is_rank(pid: int) -> bool:  # a python process (not the batch shell, srun or mpirun)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return os.path.basename(f.read().split(b"\0")[0]).startswith(b"python")
        except OSError:
            return False

    ranks = [p for p in pids if is_rank(p)]
    assert ranks, r.stdout
    for pid in ranks + [p for p in pids if p not in ranks]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def reference(slurm, digits, tmp_path_factory):
    """The long job through train.sbatch, uninterrupted: its final parameters."""
    tmp = tmp_path_factory.mktemp("reference")
    job, out = long_job(slurm, TRAIN, tmp, tmp / "run", digits)
    assert_completed(slurm, job, out)
    return export(tmp / "run", LONG_STEPS)


@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_train_sbatch_runs_to_completion(slurm, digits, tmp_path, launcher):
    run_dir = tmp_path / "run"
    env = job_env(launcher)
    venv_python = os.path.join(REPO, ".venv", "bin", "python")
    if launcher == "srun" and os.path.realpath(sys.executable) == os.path.realpath(venv_python):
        del env["HPCOPT_CMD"]  # the script's default: the repository's .venv
    job, out = submit(slurm, TRAIN, tmp_path, run_dir, digits, SHORT_STEPS, launcher, ("run.log_every=10",), env)
    assert_completed(slurm, job, out)
    text = read(out)
    assert f"{RANKS} rank(s) x 1 thread(s)" in text and f"{launcher} " in text, text
    rows = logged_steps(run_dir)
    assert rows and rows[-1]["step"] == SHORT_STEPS, text
    assert all(str(r.get("slurm_job_id")) == job for r in rows), rows[-1]
    start = [r for r in metrics(run_dir) if r.get("event") == "start"]
    assert start and start[0].get("world") == RANKS, start
    assert checkpoint_steps(run_dir)[-1] == SHORT_STEPS


def signal_and_requeue(slurm, job: str, out: str, run_dir, sig: str) -> str:
    """Once the job logs a step, signal its batch shell; it must checkpoint (75), requeue and complete.
    Returns the job's output."""
    wait_for("logged step", lambda: logged_steps(run_dir), JOB_TIMEOUT, slurm, job, out)
    r = slurm.cmd(["scancel", f"--signal={sig}", "--batch", job])
    assert r.returncode == 0, r.stderr
    assert_completed(slurm, job, out, restarts=1)
    text = read(out)
    assert "hpcopt exited with 75" in text and "requeueing job" in text, text
    return text


def test_requeue_on_signal_resumes_bitwise(slurm, digits, tmp_path, reference, timings):
    run_dir = tmp_path / "run"
    job, out = long_job(slurm, REQUEUE, tmp_path, run_dir, digits)
    text = signal_and_requeue(slurm, job, out, run_dir, "USR1")
    assert "start 2 (SLURM_RESTART_COUNT=1)" in text, text
    first = logged_steps(run_dir, slurm_restart_count=0)
    second = logged_steps(run_dir, slurm_restart_count=1)
    assert first and second, metrics(run_dir)[-3:]
    assert second[0]["step"] > first[-1]["step"], "the second start did not resume where the first stopped"
    assert second[-1]["step"] == LONG_STEPS
    events = metrics(run_dir)
    signal_ckpt = [e for e in events if e.get("event") == "checkpoint" and "signal_to_commit_s" in e]
    assert signal_ckpt and signal_ckpt[0]["reason"].startswith("signal"), events
    assert_bitwise_equal(export(run_dir, LONG_STEPS), reference)

    firsts = [e for e in events if e.get("event") == "first_step"]
    timings.append(f"signal -> committed checkpoint: {signal_ckpt[0]['signal_to_commit_s']:.2f} s "
                   f"(step {signal_ckpt[0]['step']})")
    timings.append("hpcopt start -> first step: "
                   + ", ".join(f"{e['start_to_first_step_s']:.2f} s (restart {e.get('slurm_restart_count')})"
                               for e in firsts if "start_to_first_step_s" in e))
    stamp = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)"
    t_exit = re.search(r"hpcopt exited with 75 at " + stamp, text)
    t_start = re.search(r"start 2 \(SLURM_RESTART_COUNT=1\) on \S+ at " + stamp, text)
    if t_exit and t_start:
        seconds = [time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) for m in (t_exit, t_start)]
        timings.append(f"exit 75 -> requeued job starts again: {seconds[1] - seconds[0]:.0f} s (cred_expire=10)")


def test_requeue_under_mpirun_on_term_resumes_bitwise(slurm, digits, tmp_path, reference):
    """HPCOPT_LAUNCHER=mpirun and a TERM to the batch shell (what a preemption hook may send): the script
    passes it to mpirun as USR1 (mpirun would turn a TERM into a kill and exit 1), hpcopt checkpoints and
    exits 75, the job requeues and resumes on the same trajectory (issue 12)."""
    run_dir = tmp_path / "run"
    job, out = long_job(slurm, REQUEUE, tmp_path, run_dir, digits, launcher="mpirun")
    text = signal_and_requeue(slurm, job, out, run_dir, "TERM")
    assert "TERM at" in text and "(as USR1)" in text, text
    assert logged_steps(run_dir, slurm_restart_count=1)[-1]["step"] == LONG_STEPS
    assert_bitwise_equal(export(run_dir, LONG_STEPS), reference)


def test_hard_kill_then_resubmit_resumes_from_periodic_checkpoint(slurm, digits, tmp_path, reference):
    run_dir = tmp_path / "run"
    job, out = long_job(slurm, REQUEUE, tmp_path, run_dir, digits)
    wait_for("periodic checkpoint", lambda: checkpoint_steps(run_dir), JOB_TIMEOUT, slurm, job, out)
    kill_hard(slurm, job)
    s = slurm.wait_end(job, JOB_TIMEOUT)
    assert s["JobState"] != "COMPLETED", f"job {job} finished before the kill landed: {s}\n{read(out)}"
    saved = checkpoint_steps(run_dir)
    assert saved and saved[-1] < LONG_STEPS and saved[-1] % CKPT_EVERY == 0, saved

    job2, out2 = long_job(slurm, REQUEUE, tmp_path, run_dir, digits)
    assert_completed(slurm, job2, out2)
    starts = [e for e in metrics(run_dir) if e.get("event") == "start" and str(e.get("slurm_job_id")) == job2]
    assert starts and starts[0]["step"] == saved[-1], starts
    rows = logged_steps(run_dir, slurm_job_id=starts[0]["slurm_job_id"])
    assert rows and saved[-1] < rows[0]["step"] <= saved[-1] + LOG_EVERY, rows[:1]
    assert rows[-1]["step"] == LONG_STEPS
    assert_bitwise_equal(export(run_dir, LONG_STEPS), reference)


def test_chain_continues_the_run_in_the_next_job(slurm, digits, tmp_path, reference):
    run_dir = tmp_path / "run"
    chain = [os.path.join(REPO, "slurm", "chain.sh"), "2", *sbatch_opts(tmp_path), "--",
             *job_args(digits, run_dir, LONG_STEPS, LONG)]
    # mpirun here: the USR1 forwarding of train.sbatch through mpirun
    p = subprocess.run(chain, capture_output=True, text=True, cwd=REPO, env=slurm.env(job_env("mpirun")),
                       timeout=60)
    assert p.returncode == 0, p.stderr
    first, second = p.stdout.split()
    slurm.jobs += [first, second]
    out1, out2 = (os.path.join(str(tmp_path), f"job-{j}.out") for j in (first, second))
    assert slurm.state(second).get("Dependency", "").startswith(f"afterany:{first}"), slurm.state(second)
    wait_for("logged step", lambda: logged_steps(run_dir), JOB_TIMEOUT, slurm, first, out1)
    r = slurm.cmd(["scancel", "--signal=USR1", "--batch", first])  # what --signal=B:USR1@grace sends
    assert r.returncode == 0, r.stderr
    s = slurm.wait_end(first, JOB_TIMEOUT)
    assert s["ExitCode"] == "75:0", f"{s}\n{read(out1)}"
    assert_completed(slurm, second, out2)
    starts = [e for e in metrics(run_dir) if e.get("event") == "start"]
    assert [str(e.get("slurm_job_id")) for e in starts] == [first, second] and starts[1]["step"] > 0, starts
    assert_bitwise_equal(export(run_dir, LONG_STEPS), reference)


def test_requeue_runs_a_sweep_to_the_end(slurm, digits, tmp_path):
    """`requeue.sbatch sweep SWEEP.toml`: USR1 mid-sweep checkpoints the trials in progress (75), the job
    requeues, the second start finishes them from their checkpoints and runs the rest; no trial that
    had finished runs again."""
    sweep_dir = tmp_path / "sweep"
    path = tmp_path / "s.toml"
    path.write_text(f'job = "{JOB}"\n[sweep]\nname = "s"\nout_dir = "{sweep_dir}"\nmethod = "grid"\n'
                    f'ranks_per_trial = 1\nbudget_steps = 1500\n[space]\n"optimizer.lr" = [0.001, 0.002, 0.003, 0.004]\n')
    job = slurm.sbatch(REQUEUE, ["sweep", str(path), f"data.path={digits}", "run.log_every=50", "run.eval_every=0",
                                 "--quiet"], job_env("srun"), sbatch_opts(tmp_path), cwd=REPO)
    out = os.path.join(str(tmp_path), f"job-{job}.out")
    wait_for("trial step", lambda: logged_steps(sweep_dir / "trial_0000"), JOB_TIMEOUT, slurm, job, out)
    r = slurm.cmd(["scancel", "--signal=USR1", "--batch", job])
    assert r.returncode == 0, r.stderr
    assert_completed(slurm, job, out, restarts=1)
    text = read(out)
    assert "hpcopt exited with 75" in text and "requeueing job" in text and " sweep " in text, text
    lines = [json.loads(x) for x in open(sweep_dir / "results.jsonl") if x.strip()]
    last = {r["trial"]: r for r in lines}
    assert sorted(last) == [0, 1, 2, 3] and all(r["status"] == "done" and r["steps"] == 1500 for r in last.values())
    cut = next(i for i, r in enumerate(lines) if r["status"] == "interrupted")
    done_before = {r["trial"] for r in lines[:cut] if r["status"] == "done"}
    assert not done_before & {r["trial"] for r in lines[cut:] if r["status"] == "running"}, lines
