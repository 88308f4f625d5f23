"""A stalled or mismatched rank is named, not waited on (issue 17, docs/diagnosis.md): 4-rank digits runs
under mpirun with a rank SIGSTOPped, asleep in checkpoint writing, calling a collective with another
count or skipping one, raising, or dying of SIGSEGV. Each ends within its bound with its exit code (76
stall, 77 mismatch) and names the rank; on_stall = "report" waits and finishes bitwise equal."""
import glob
import os
import re
import signal
import subprocess
import time

import numpy as np
import pytest

from tests.conftest import REPO, ckpt_export, mpirun_cmd, run, run_env

JOB = os.path.join(REPO, "jobs", "digits_mlp.toml")
INJECT = os.path.join(REPO, "tests", "mpi", "inject.py")
LIMIT = 6  # run.stall_timeout_s of these runs
BASE = ["model.layers=[64, 32, 10]", "schedule.name=constant", "schedule.warmup_steps=0", "--quiet",
        f"run.stall_timeout_s={LIMIT}"]


def launch(out, digits, *args, inject=None, n=4):
    prog = [INJECT, *inject] if inject else ["-m", "hpcopt"]
    cmd = mpirun_cmd(n, [*prog, "train", JOB, f"data.path={digits}", f"run.out_dir={out}", *BASE, *args])
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=run_env())


def finish(p, timeout):
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        pytest.fail(f"still running after {timeout} s:\n{out}\n{err}")
    return p.returncode, out, err


def rank_pids(mpirun_pid: int, n: int, timeout: float = 60) -> dict:
    """{rank: pid} of the ranks mpirun started (from each child's OMPI_COMM_WORLD_RANK)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        pids = {}
        try:
            children = open(f"/proc/{mpirun_pid}/task/{mpirun_pid}/children").read().split()
        except OSError:
            children = []
        for c in children:
            try:
                env = open(f"/proc/{c}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            for kv in env:
                if kv.startswith(b"OMPI_COMM_WORLD_RANK="):
                    pids[int(kv.split(b"=")[1])] = int(c)
        if len(pids) == n:
            return pids
        time.sleep(0.1)
    pytest.fail(f"mpirun {mpirun_pid} did not start {n} ranks")


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(f"no {what} within {timeout} s")


def training(out):
    try:
        return "first_step" in open(os.path.join(out, "metrics.jsonl")).read()
    except OSError:
        return False


def stamp_time(path) -> float:
    return float(open(path).read())


def end_stopped(pid):
    for sig in (signal.SIGCONT, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("victim", [2, 0])
def test_sigstopped_rank_is_named_unreachable_and_the_job_ends_76(tmp_path, digits, victim):
    out = tmp_path / "run"
    p = launch(out, digits, "run.steps=1000000")
    pids = rank_pids(p.pid, 4)
    try:
        wait_for(lambda: training(out), 90, "first step")
        os.kill(pids[victim], signal.SIGSTOP)
        t0 = time.time()
        rc, stdout, stderr = finish(p, LIMIT + 30)
        took = time.time() - t0
    finally:
        end_stopped(pids[victim])
    assert rc == 76, stderr
    assert took <= LIMIT + 10, took
    line = [s for s in stderr.splitlines() if s.startswith("hpcopt: stalled at step")]
    assert len(line) == 1, stderr
    assert f"rank {victim} (" in line[0] and "did not answer" in line[0], line[0]
    others = "ranks 1-3" if victim == 0 else "ranks 0-1,3"
    assert others in line[0] or "wait" in line[0], line[0]
    reports = glob.glob(str(out / "stall-*.txt"))
    assert len(reports) == 1, os.listdir(out)
    text = open(reports[0]).read()
    assert f"== rank {victim} (" in text and "UNREACHABLE" in text, text
    assert f"pid {pids[victim]}" in text
    for r in set(range(4)) - {victim}:  # the others answered: their position, calls and stack
        assert f"== rank {r} (" in text and "main thread's Python stack" in text
    assert "Allreduce(" in text


def test_rank_asleep_in_checkpoint_writing_is_named(tmp_path, digits):
    out = tmp_path / "run"
    p = launch(out, digits, "run.steps=1000000", "checkpoint.every_steps=60",
               inject=["sleep-in-write", "60", str(tmp_path / "t")])
    rc, stdout, stderr = finish(p, 120)
    took = time.time() - stamp_time(tmp_path / "t")
    assert rc == 76, stderr
    assert took <= LIMIT + 10, took
    line = next(s for s in stderr.splitlines() if s.startswith("hpcopt: stalled at step 60"))
    assert "rank 2 (" in line and "checkpoint writing" in line and "not in a collective" in line, line
    assert "inject.py" in line and "wait in" in line, line
    assert len(glob.glob(str(out / "stall-*.txt"))) == 1


def test_on_stall_report_waits_and_finishes_bitwise(tmp_path, digits):
    steps = ["run.steps=1500", "checkpoint.every_steps=0"]
    ref = tmp_path / "ref"
    rc, _, stderr = finish(launch(ref, digits, *steps), 180)
    assert rc == 0, stderr
    out = tmp_path / "run"
    p = launch(out, digits, *steps, "run.on_stall=report")
    pids = rank_pids(p.pid, 4)
    try:
        wait_for(lambda: training(out), 90, "first step")
        os.kill(pids[1], signal.SIGSTOP)
        wait_for(lambda: glob.glob(str(out / "stall-*.txt")), LIMIT + 10, "stall report")
        time.sleep(0.5)
        os.kill(pids[1], signal.SIGCONT)
        rc, stdout, stderr = finish(p, 180)
    finally:
        end_stopped(pids[1])
    assert rc == 0, stderr
    assert "waiting on" in stderr and "rank 1 (" in stderr, stderr
    assert "done: 1500 steps" in stdout
    final = "checkpoints/step_00001500.h5"
    a, b = ckpt_export(ref / final, tmp_path / "a.npz"), ckpt_export(out / final, tmp_path / "b.npz")
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    # a run that ends cleanly leaves no crash file and no flight-recorder file
    assert not glob.glob(str(out / "hpcopt-crash-*")), os.listdir(out)
    from hpcopt.diagnosis.recorder import SHM

    wait_for(lambda: not any(glob.glob(os.path.join(SHM, f"hpcopt-ring-{pid}-*")) for pid in pids.values()), 5,
             "removal of the ring files")


@pytest.mark.parametrize("mode,expect", [("count-rank1", "inject.py:"), ("skip-rank1", "different orders")])
def test_mismatch_stops_within_5_s_with_both_call_sites(tmp_path, digits, mode, expect):
    out = tmp_path / "run"
    p = launch(out, digits, "run.steps=1000000", "run.check_collectives=true", inject=[mode, "40", str(tmp_path / "t")])
    rc, stdout, stderr = finish(p, 120)
    took = time.time() - stamp_time(tmp_path / "t")
    assert rc == 77, stderr
    assert took <= 5, took
    line = next(s for s in stderr.splitlines() if s.startswith("hpcopt: collective mismatch"))
    assert "hpcopt/train.py:" in line and expect in line and "rank 1 " in line, line
    assert "ranks 0,2-3" in line, line
    if mode == "skip-rank1":  # the other call site: where rank 1 went instead
        assert "hpcopt/parallel/compress.py:" in line, line


SILENT = """
import time
import numpy as np
from mpi4py import MPI
from hpcopt import comm as hcomm
from hpcopt.diagnosis import fingerprint
from hpcopt.diagnosis.watchdog import Watchdog
grid = hcomm.make_grid(MPI.COMM_WORLD, "auto", 1, 1, "test")
watch = Watchdog(grid.world, None, 0.0, "abort", grid.traced(), attach=False)
watch.set_phase("step")
a = np.ones(4, np.float32)
for step in range(1, 4):
    watch.beat(step)
    if step == 2 and grid.world.Get_rank() == 1:
        grid.dp_comm.Allreduce(MPI.IN_PLACE, a)   # the same count from another line: it completes
    else:
        grid.dp_comm.Allreduce(MPI.IN_PLACE, a)
    fingerprint.post_digests()                    # the Trainer's agreement
    grid.world.Allreduce(MPI.IN_PLACE, np.zeros(4, np.int32), op=MPI.MAX)
time.sleep(5)
print("no mismatch found", flush=True)
"""


SILENT_PREPARED = SILENT.replace("""        grid.dp_comm.Allreduce(MPI.IN_PLACE, a)   # the same count from another line: it completes
    else:
        grid.dp_comm.Allreduce(MPI.IN_PLACE, a)""", """        grid.dp_comm.start(other)                 # a prepared call (its site: its first start)
    else:
        grid.dp_comm.start(mine)""").replace("for step in", """mine = grid.dp_comm.prepare("Allreduce", MPI.IN_PLACE, a, MPI.SUM)
other = grid.dp_comm.prepare("Allreduce", MPI.IN_PLACE, a, MPI.SUM)
for step in""")


@pytest.mark.parametrize("script", ["call", "prepared"])
def test_a_mismatch_that_completes_is_found_at_the_next_agreement(script):
    """Rank 1 reaches call #2 on dp from another line of code with the same count: MPI completes it (wrong
    data, no hang). The digests compared at the next agreement differ; the members' fingerprints name
    call #2 and both call sites; exit 77."""
    p = run(["-c", SILENT if script == "call" else SILENT_PREPARED], n=2, timeout=60)
    assert p.returncode == 77, p.stdout + p.stderr
    line = next(s for s in p.stderr.splitlines() if s.startswith("hpcopt: collective mismatch"))
    mine, other = (17, 15) if script == "call" else (19, 17)
    assert "on dp, call #2" in line and f"rank 0 called Allreduce(4 x float32, sum) at <string>:{mine}" in line \
        and f"rank 1 called Allreduce(4 x float32, sum) at <string>:{other}" in line, line


def test_without_fingerprints_the_watchdog_catches_a_skipped_collective(tmp_path, digits):
    out = tmp_path / "run"
    p = launch(out, digits, "run.steps=1000000", "run.check_collectives=false",
               inject=["skip-rank1", "40", str(tmp_path / "t")])
    rc, stdout, stderr = finish(p, 120)
    took = time.time() - stamp_time(tmp_path / "t")
    assert rc == 76, stderr
    assert took <= LIMIT + 10, took
    line = next(s for s in stderr.splitlines() if s.startswith("hpcopt: stalled at step"))
    assert "rank 1 is in Allreduce(dp" in line and "ranks 0,2-3 wait in Allreduce(world" in line, line


@pytest.mark.parametrize("mode,cause", [("raise-rank1", "RuntimeError: injected failure on rank 1"),
                                        ("segv-rank1", "Segmentation fault")])
def test_a_crashing_rank_leaves_its_flight_recorder(tmp_path, digits, mode, cause):
    out = tmp_path / "run"
    p = launch(out, digits, "run.steps=1000000", "run.check_collectives=true", inject=[mode, "40", str(tmp_path / "t")])
    rc, stdout, stderr = finish(p, 120)
    took = time.time() - stamp_time(tmp_path / "t")
    assert rc != 0 and took <= 10, (rc, took, stderr)
    crash = out / "hpcopt-crash-1.txt"
    wait_for(crash.exists, 5, "hpcopt-crash-1.txt")  # after a SIGSEGV: written by the sentinel
    text = crash.read_text()
    assert cause in text, text
    assert re.search(r"last (6[0-4]|[1-5][0-9]) MPI calls of this rank", text), text
    assert "Allreduce(dp, " in text and "Allreduce(world, 16 B)" in text, text
    assert "hpcopt/train.py:" in text
    if mode == "segv-rank1":
        assert "inject.py" in text and "faulty_step" in text  # faulthandler's stack of the main thread
    time.sleep(0.5)
    assert sorted(os.path.basename(f) for f in glob.glob(str(out / "hpcopt-crash-*"))) == ["hpcopt-crash-1.txt"]
