"""hpcopt sweep under mpirun: a trial in a sweep is the same run as alone (bitwise), groups share the
work, a killed sweep resumes without running a finished trial again, asha prunes, PBT is bitwise
repeatable whatever the groups (copies over MPI or in memory), optimizer.name = "auto" picks and wins."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from tests.conftest import REPO, ckpt_export, hpcopt, hpcopt_here, mpirun_cmd, run_env

JOB = os.path.join(REPO, "jobs", "digits_mlp.toml")
AUTO_JOB = os.path.join(REPO, "jobs", "digits_auto.toml")


def sweep_file(tmp_path, name: str, sweep: str, space: str) -> str:
    p = tmp_path / f"{name}.toml"
    p.write_text(f'job = "{JOB}"\n[sweep]\nname = "{name}"\nout_dir = "{tmp_path / name}"\n{sweep}\n[space]\n{space}')
    return str(p)


def records(sweep_dir) -> list[dict]:
    with open(os.path.join(sweep_dir, "results.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def final(sweep_dir) -> dict[int, dict]:
    out = {}
    for r in records(sweep_dir):
        out[r["trial"]] = r
    return out


def last_checkpoint(run_dir) -> str:
    d = os.path.join(run_dir, "checkpoints")
    return os.path.join(d, sorted(f for f in os.listdir(d) if f.endswith(".h5"))[-1])


def export(run_dir, tmp_path, tag) -> dict:
    return ckpt_export(last_checkpoint(run_dir), tmp_path / f"{tag}.npz")


def assert_same(a: dict, b: dict, what: str) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), f"{what}: {k} differs"


def alone(trial_dir, out, n, digits):
    """The trial's resolved config.toml trained alone with `hpcopt train` on n ranks (n=1: no mpirun)."""
    hpcopt("train", os.path.join(trial_dir, "config.toml"), f"run.out_dir={out}", f"data.path={digits}", "--quiet",
           n=n if n > 1 else None, check=True, timeout=120)


@pytest.mark.parametrize("method,rpt,space", [
    ("grid", 2, '"optimizer.name" = ["sgd", "adam"]\n"optimizer.lr" = [0.003, 0.03]\n'),
    ("random", 1, '"optimizer.name" = ["momentum", "rmsprop", "adam"]\n"optimizer.lr" = { log_uniform = [1e-3, 3e-2] }\n'
                  '"data.batch_size" = [32, 64]\n'),
])
def test_a_trial_in_a_sweep_is_the_same_run_as_alone(tmp_path, digits, method, rpt, space):
    """4 ranks in groups of 2 (grid) and of 1 (random): every trial's final parameters bitwise equal to
    `hpcopt train` of its config.toml on the same number of ranks (one thread per rank in both)."""
    path = sweep_file(tmp_path, method, f'method = "{method}"\ntrials = 4\nranks_per_trial = {rpt}\n'
                      f'budget_steps = 40', space)
    p = hpcopt("sweep", path, f"data.path={digits}", "--quiet", n=4, timeout=180, check=True)
    d = tmp_path / method
    res = final(d)
    assert sorted(res) == [0, 1, 2, 3] and all(r["status"] == "done" for r in res.values()), p.stdout
    assert {r["group"] for r in res.values()} == set(range(4 // rpt))        # every group trained
    assert os.path.exists(d / "best.toml") and "best trial" in p.stdout
    for t in (0, 3):
        td = d / f"trial_{t:04d}"
        alone(td, tmp_path / f"alone{t}", rpt, digits)
        assert_same(export(td, tmp_path, f"s{t}"), export(tmp_path / f"alone{t}", tmp_path, f"a{t}"), f"trial {t}")
    # best.toml runs as an ordinary job
    best = final(d)[min(res, key=lambda t: -res[t]["metric"])]
    text = (d / "best.toml").read_text()
    assert f'name = "{best["values"]["optimizer.name"]}"' in text


def wait_gone(marker: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if subprocess.run(["pgrep", "-f", marker], capture_output=True).returncode != 0:
            return
        time.sleep(0.1)
    subprocess.run(["pkill", "-9", "-f", marker])


def test_a_killed_sweep_resumes_and_runs_no_finished_trial_again(tmp_path, digits):
    path = sweep_file(tmp_path, "k", 'method = "random"\ntrials = 6\nranks_per_trial = 1\nbudget_steps = 300',
                      '"optimizer.name" = ["momentum", "adam"]\n"optimizer.lr" = { log_uniform = [1e-3, 3e-2] }\n')
    d = tmp_path / "k"
    cmd = mpirun_cmd(2, ["-m", "hpcopt", "sweep", path, f"data.path={digits}", "checkpoint.every_steps=50", "--quiet"])
    proc = subprocess.Popen(cmd, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    try:   # SIGKILL once a trial has finished and another has a checkpoint but has not finished
        while time.time() < deadline:
            time.sleep(0.05)
            if not os.path.exists(d / "results.jsonl"):
                continue
            res = final(d)
            done = [t for t, r in res.items() if r["status"] == "done"]
            running = [t for t, r in res.items() if r["status"] == "running"
                       and os.path.isdir(d / f"trial_{t:04d}" / "checkpoints")
                       and any(f.endswith(".h5") for f in os.listdir(d / f"trial_{t:04d}" / "checkpoints"))]
            if done and running:
                os.killpg(proc.pid, signal.SIGKILL)
                break
        else:
            pytest.fail("the sweep never had a finished and a checkpointed trial at once")
    finally:
        proc.wait(timeout=30)
    wait_gone(path)   # the ranks notice their mpirun is gone and exit
    before = final(d)
    finished_before = {t for t, r in before.items() if r["status"] == "done"}
    interrupted = {t for t, r in before.items() if r["status"] == "running"}
    n_lines = len(records(d))
    p = hpcopt("sweep", path, f"data.path={digits}", "checkpoint.every_steps=50", "--resume", "auto", n=2,
               timeout=180, check=True)
    after_lines = records(d)[n_lines:]
    assert not {r["trial"] for r in after_lines} & finished_before, "a finished trial ran again"
    res = final(d)
    assert sorted(res) == list(range(6)) and all(r["status"] == "done" for r in res.values()), p.stdout
    assert all(r["resumed"] for r in after_lines if r["trial"] in interrupted and r["status"] == "running")
    for t in sorted(interrupted)[:1]:   # an interrupted trial ends bitwise equal to an uninterrupted run
        td = d / f"trial_{t:04d}"
        starts = [json.loads(x) for x in open(td / "metrics.jsonl") if '"event": "start"' in x]
        assert starts[-1]["resumed_from"], "the interrupted trial did not resume from its checkpoint"
        alone(td, tmp_path / "alone", 1, digits)
        assert_same(export(td, tmp_path, "s"), export(tmp_path / "alone", tmp_path, "a"), f"trial {t}")


def test_a_signal_checkpoints_the_trials_and_exits_75(tmp_path, digits):
    path = sweep_file(tmp_path, "sig", 'method = "grid"\nranks_per_trial = 1\nbudget_steps = 3000',
                      '"optimizer.lr" = [0.001, 0.002]\n')
    d = tmp_path / "sig"
    cmd = mpirun_cmd(2, ["-m", "hpcopt", "sweep", path, f"data.path={digits}", "--quiet"])
    proc = subprocess.Popen(cmd, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not any(
            os.path.exists(d / f"trial_{t:04d}" / "metrics.jsonl") for t in range(2)):
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGUSR1)   # mpirun forwards SIGUSR1 to the ranks
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, out + err
    assert "continue with --resume auto" in out
    res = final(d)
    assert {r["status"] for r in res.values()} == {"interrupted"}
    p = hpcopt("sweep", path, f"data.path={digits}", "--resume", "auto", "--quiet", n=2, timeout=120, check=True)
    assert all(r["status"] == "done" and r["steps"] == 3000 for r in final(d).values()), p.stdout


def test_asha_prunes_and_spends_less_than_the_full_budget(tmp_path, digits):
    pytest.importorskip("optuna")
    path = sweep_file(tmp_path, "asha", 'method = "asha"\ntrials = 9\nranks_per_trial = 1\nbudget_steps = 270\n'
                      'min_steps = 10\nreduction_factor = 3',
                      '"optimizer.name" = ["sgd", "adam"]\n"optimizer.lr" = { log_uniform = [1e-4, 1e-1] }\n')
    hpcopt("sweep", path, f"data.path={digits}", "--quiet", n=2, timeout=180, check=True)
    res = final(tmp_path / "asha")
    statuses = [r["status"] for r in res.values()]
    assert len(res) == 9 and "pruned" in statuses and "done" in statuses
    assert sum(r["steps"] for r in res.values()) < 0.7 * 9 * 270
    assert all(r["intermediate"] for r in res.values())


def pbt_sweep(tmp_path, name):
    return sweep_file(tmp_path, name, 'method = "pbt"\ntrials = 4\nranks_per_trial = 1\nbudget_steps = 120\n'
                      'interval_steps = 30\nseed = 3', '"optimizer.lr" = { log_uniform = [1e-4, 3e-1] }\n')


def test_pbt_is_bitwise_repeatable_whatever_the_groups(tmp_path, digits):
    """The same population on 1 rank (every copy in memory) and on 2 ranks (half the copies as MPI
    messages between the groups): the same decisions and bitwise the same members."""
    hpcopt("sweep", pbt_sweep(tmp_path, "one"), f"data.path={digits}", "--quiet", timeout=120, check=True)
    hpcopt("sweep", pbt_sweep(tmp_path, "two"), f"data.path={digits}", "--quiet", n=2, timeout=120, check=True)
    a, b = records(tmp_path / "one"), records(tmp_path / "two")
    strip = lambda rs: [{k: r[k] for k in ("trial", "values", "status", "metric", "copied_from") if k in r} for r in rs]  # noqa: E731
    assert strip(a) == strip(b)
    copies = [r for r in a if r.get("copied_from") is not None]
    assert copies, "no member was ever copied"
    for m in range(4):
        assert_same(export(tmp_path / "one" / f"trial_{m:04d}", tmp_path, f"o{m}"),
                    export(tmp_path / "two" / f"trial_{m:04d}", tmp_path, f"t{m}"), f"member {m}")
    exploit = [json.loads(x) for m in range(4) for x in open(tmp_path / "two" / f"trial_{m:04d}" / "metrics.jsonl")
               if '"exploit"' in x]
    assert len(exploit) == len(copies)


def test_optimizer_auto_picks_says_why_and_wins(tmp_path, digits):
    """On the digits job: the race picks an optimizer, says which and why (stdout and metrics.jsonl), and
    the run ends at least as accurate as the job's default optimizer (adam) at the same total steps."""
    out = tmp_path / "auto"
    short = "run.epochs=10"   # 220 steps; measured: auto (rmsprop) 98.05%, the default (adam) 95.26%
    p = hpcopt("train", AUTO_JOB, f"run.out_dir={out}", f"data.path={digits}", short, "--quiet", n=2, timeout=300,
               check=True)
    assert "optimizer auto: chose" in p.stdout and "lowest test loss" in p.stdout
    events = [json.loads(x) for x in open(out / "metrics.jsonl")]
    auto = [e for e in events if e.get("event") == "auto"]
    assert len(auto) == 1 and len(auto[0]["table"]) == 24 and auto[0]["choice"] in p.stdout
    steps = [e for e in events if "test_acc" in e]
    base = tmp_path / "default"
    q = hpcopt("train", JOB, f"run.out_dir={base}", f"data.path={digits}", short, "--quiet", n=2, timeout=120,
               check=True)
    ref = [json.loads(x) for x in open(base / "metrics.jsonl") if "test_acc" in x]
    assert steps[-1]["step"] == ref[-1]["step"]
    assert steps[-1]["test_acc"] >= ref[-1]["test_acc"], (p.stdout, q.stdout)
    # resumed after the end: no second race, nothing to do
    r = hpcopt("train", AUTO_JOB, f"run.out_dir={out}", f"data.path={digits}", short, "--resume", "auto", n=2,
               timeout=120)
    assert r.returncode == 0 and "racing" not in r.stdout and "nothing to do" in r.stdout, r.stdout + r.stderr


def test_plot_draws_a_sweep(tmp_path, digits):
    pytest.importorskip("matplotlib")
    path = sweep_file(tmp_path, "pl", 'method = "random"\ntrials = 3\nbudget_steps = 40',
                      '"optimizer.lr" = { log_uniform = [1e-3, 3e-2] }\n')
    hpcopt("sweep", path, f"data.path={digits}", "--quiet", timeout=120, check=True)
    code, out, err = hpcopt_here("plot", str(tmp_path / "pl"), "-o", str(tmp_path / "pl.png"))
    assert code == 0, err
    assert (tmp_path / "pl.png").stat().st_size > 1000


def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(tmp_path, digits):
    """A combination the job rules refuse, and a trial stopped by a non-finite gradient: both recorded as
    failed with their one-line reason; the other trials finish and the best is chosen."""
    path = sweep_file(tmp_path, "f", 'method = "grid"\nranks_per_trial = 1\nbudget_steps = 30',
                      '"optimizer.name" = ["sgd", "adam"]\n"optimizer.nesterov" = [true, false]\n')
    p = hpcopt("sweep", path, f"data.path={digits}", "optimizer.on_nonfinite=stop", n=2, timeout=120, check=True)
    res = final(tmp_path / "f")
    assert [res[t]["status"] for t in range(4)] == ["failed", "done", "failed", "failed"], res
    assert "nesterov momentum needs optimizer.momentum > 0" in res[0]["reason"]   # sgd without momentum
    assert all("optimizer.nesterov applies only when optimizer.name" in res[t]["reason"] for t in (2, 3))
    assert "best trial 1" in p.stdout
    path = sweep_file(tmp_path, "nf", 'method = "grid"\nranks_per_trial = 1\nbudget_steps = 30',
                      '"optimizer.lr" = [0.001, 1e30]\n')
    hpcopt("sweep", path, f"data.path={digits}", "optimizer.on_nonfinite=stop", "optimizer.name=sgd",
           n=2, timeout=120, check=True)
    res = final(tmp_path / "nf")
    assert res[0]["status"] == "done" and res[1]["status"] == "failed", res
    assert "non-finite gradient" in res[1]["reason"]


def test_a_crash_on_one_rank_ends_the_whole_sweep_fast(tmp_path, digits):
    path = sweep_file(tmp_path, "c", 'method = "random"\ntrials = 4\nranks_per_trial = 1\nbudget_steps = 2000',
                      '"optimizer.lr" = { log_uniform = [1e-3, 1e-2] }\n')
    stamp = tmp_path / "t"
    t0 = time.time()
    p = subprocess.run(mpirun_cmd(4, [os.path.join(REPO, "tests/mpi/inject.py"), "raise-rank1", "20", str(stamp),
                                      "sweep", path, f"data.path={digits}", "--quiet"]),
                       capture_output=True, text=True, timeout=120, env=run_env())
    assert p.returncode != 0 and "injected failure on rank 1" in p.stderr, p.stderr
    assert time.time() - float(stamp.read_text()) < 10
    assert time.time() - t0 < 60
