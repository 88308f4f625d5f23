"""The diagnosis parts one at a time (issue 17, docs/diagnosis.md): the flight recorder's ring, the crash
sentinel after a real SIGSEGV, buffer descriptions and fingerprints' inputs, the stall limit, the report's
judgement of who is at fault (synthetic answers), the cross-wait test. MPI runs: tests/mpi/test_diagnosis.py."""
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from hpcopt.diagnosis import recorder, watchdog
from hpcopt.diagnosis.recorder import Recorder, decode, describe_call, format_entries
from tests.conftest import REPO, run_env


def call(r: Recorder, op="Allreduce", comm="dp", cseq=1, count=10, dtype="float32", site="x.py:1", peer=-1, step=0):
    return r.enter(r.intern(op), r.intern(comm), cseq, count, count * 4, r.intern(dtype), r.intern(site), peer, step)


def test_the_ring_keeps_the_last_k_calls_in_order_with_their_state():
    r = Recorder(slots=8)
    for i in range(1, 21):
        n = call(r, cseq=i, step=i // 2)
        if i != 20:
            r.leave(n)
    es = r.entries()
    assert [e["cseq"] for e in es] == list(range(13, 21))
    assert [e["state"] for e in es] == ["done"] * 7 + ["in"]
    assert es[-1]["t1"] == 0.0 and es[0]["t1"] >= es[0]["t0"] > 0
    assert es[0]["op"] == "Allreduce" and es[0]["comm"] == "dp" and es[0]["site"] == "x.py:1"
    r.leave(1)  # a slot long reused: leaving it changes nothing
    assert r.entries() == es


def test_describe_and_format_a_call():
    r = Recorder(slots=4)
    n = r.enter(r.intern("Allreduce"), r.intern("dp"), 7, 1861642, 7446568, r.intern("float32"),
                r.intern("hpcopt/parallel/compress.py:95"), -1, 12)
    e = r.entries()[-1]
    assert describe_call(e) == "Allreduce(dp, 7.1 MB)"
    r.leave(n)
    call(r, op="Bcast", comm="world", peer=0)
    call(r, op="Send", comm="pp", peer=2)
    es = r.entries()
    assert describe_call(es[1]) == "Bcast(world, 40 B, root 0)" and describe_call(es[2]) == "Send(pp, 40 B, peer 2)"
    lines = format_entries(es, time.time())
    assert len(lines) == 4 and "dp#7" in lines[1]
    assert "[1861642 x float32] at hpcopt/parallel/compress.py:95" in lines[1]


def test_a_full_string_table_degrades_to_question_marks():
    r = Recorder(slots=4)
    for i in range(400):
        r.intern(f"some/rather/long/path/to/a/file_{i:04d}.py:{i}" * 4)
    call(r, site="a/site/that/does/not/fit.py:1" * 20)
    assert r.entries()[-1]["site"] == "?"


def test_decode_ignores_what_is_not_a_ring():
    assert decode(b"not a ring at all") == ("", [])


SEGV = """
import ctypes, sys, time
sys.path.insert(0, {root!r})
from hpcopt.diagnosis.recorder import RECORDER as r
r.attach({out!r}, 3, "node17")
n = r.enter(r.intern("Allreduce"), r.intern("dp"), 5, 3, 12, r.intern("int32"), r.intern("hpcopt/train.py:431"), -1, 9)
print(r.path, flush=True)
if {crash}:
    ctypes.string_at(0)
r.leave(n)
"""


@pytest.mark.parametrize("crash", [True, False])
def test_a_sigsegv_leaves_a_crash_file_and_a_clean_exit_nothing(tmp_path, crash):
    code = textwrap.dedent(SEGV.format(root=REPO, out=str(tmp_path), crash=crash))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=run_env(), timeout=60)
    assert p.returncode == (-11 if crash else 0), p.stderr
    ring = p.stdout.strip()
    assert ring and os.path.basename(ring).startswith("hpcopt-ring-")
    path = tmp_path / "hpcopt-crash-3.txt"
    deadline = time.time() + 10
    while time.time() < deadline and os.path.exists(ring):  # the sentinel removes it when it is done
        time.sleep(0.05)
    assert not os.path.exists(ring)
    if not crash:
        assert not path.exists()
        return
    text = path.read_text()
    assert text.startswith("hpcopt crash report: rank 3 host node17 pid ")
    assert "fatal signal" in text and "Segmentation fault" in text
    assert "Allreduce(dp, 12 B) [3 x int32] at hpcopt/train.py:431" in text and " 1 in " in text
    assert 'File "<string>", line 9' in text  # faulthandler's stack of the thread that crashed


def test_an_exception_writes_its_crash_file(tmp_path):
    r = Recorder(slots=4)
    call(r, op="Bcast", comm="world", peer=0)
    r.crash_path = str(tmp_path / "hpcopt-crash-0.txt")
    try:
        raise ValueError("boom")
    except ValueError as e:
        path = r.write_crash(e)
    text = open(path).read()
    assert "unhandled exception ValueError: boom" in text and "Bcast(world" in text and "Traceback" in text


def test_the_package_loads_nothing_heavy():
    code = ("import sys; import hpcopt.diagnosis, hpcopt.diagnosis.recorder; "
            "print(sorted(m for m in ('numpy', 'mpi4py.MPI') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_describe_buffers():
    from mpi4py import MPI

    from hpcopt.diagnosis.fingerprint import describe, format_desc

    a = np.zeros(6, np.float32)
    assert describe(a) == (6, "float32", 24)
    assert describe([a, MPI.FLOAT]) == (6, "float", 24)
    assert describe([a, (np.array([2, 4]), np.array([0, 2])), MPI.FLOAT]) == (6, "float", 24)
    assert describe([a, [1, 2], [0, 1], MPI.FLOAT]) == (3, "float", 12)
    assert describe(bytearray(5)) == (5, "B", 5)
    assert describe(object()) == (0, "?", 0)
    assert format_desc((3, 30, "Allreduce", 3, "int32", -1, "max", "hpcopt/train.py:431")) == \
        "Allreduce(3 x int32, max) at hpcopt/train.py:431, step 30"
    assert format_desc((3, 0, "bcast", 0, "object", 0, "", "a.py:1")) == "bcast(root 0) at a.py:1, step 0"


def test_a_traced_communicator_records_and_passes_calls_on():
    from mpi4py import MPI

    from hpcopt.diagnosis.fingerprint import Traced

    c = Traced(MPI.COMM_SELF.Dup(), "dp")
    assert isinstance(c, MPI.Intracomm) and c.shadow is None  # alone: nothing to compare with
    x = np.arange(4, dtype=np.float64)
    c.Allreduce(MPI.IN_PLACE, x, op=MPI.SUM)
    assert c.allreduce(2.5) == 2.5 and c.bcast("a", root=0) == "a"
    c.Iallreduce(MPI.IN_PLACE, x).Wait()
    d = c.Dup()
    assert type(d) is MPI.Intracomm
    d.Free()
    es = recorder.RECORDER.entries()[-4:]
    assert [e["op"] for e in es] == ["Allreduce", "allreduce", "bcast", "Iallreduce"]
    assert [e["state"] for e in es] == ["done", "done", "done", "posted"] and [e["cseq"] for e in es] == [1, 2, 3, 4]
    assert es[0]["site"].startswith("tests/unit/test_diagnosis.py:") and es[0]["nbytes"] == 32
    c.Free()
    assert c == MPI.COMM_NULL


def test_a_prepared_call_is_recorded_like_the_call_it_names():
    from mpi4py import MPI

    from hpcopt.diagnosis import fingerprint
    from hpcopt.diagnosis.fingerprint import Traced

    c = Traced(MPI.COMM_SELF.Dup(), "dp")
    x, y = np.arange(4, dtype=np.float32), np.zeros(6, np.float64)
    k = c.prepare("Iallreduce", MPI.IN_PLACE, x, MPI.SUM)
    j = c.prepare("Allreduce", MPI.IN_PLACE, x, MPI.MAX)
    for _ in range(3):
        c.start(k).Wait()
        line = sys._getframe().f_lineno - 1
    c.start(j)
    assert c.prepare("Allreduce", MPI.IN_PLACE, y, MPI.SUM, k=j) == j  # new buffers, same handle
    c.start(j)
    es = recorder.RECORDER.entries()[-5:]
    assert [(e["op"], e["state"], e["cseq"], e["count"], e["dtype"]) for e in es] == \
        [
            ("Iallreduce", "posted", 1, 4, "float32"), ("Iallreduce", "posted", 2, 4, "float32"),
            ("Iallreduce", "posted", 3, 4, "float32"), ("Allreduce", "done", 4, 4, "float32"),
            ("Allreduce", "done", 5, 6, "float64")]
    assert es[0]["site"] == f"tests/unit/test_diagnosis.py:{line}" and es[4]["t1"] >= es[4]["t0"] > 0
    with pytest.raises(ValueError, match="Bcast is not one of"):
        c.prepare("Bcast", x, None)
    with pytest.raises(ValueError, match="Allgather takes no reduction"):
        c.prepare("Allgather", x, x.copy(), MPI.SUM)
    # the compressed codecs' exchanges: Ialltoall, Allgather and Iallgather of 16-bit words / indices
    w, got = np.arange(4, dtype=np.uint16), np.zeros(4, np.uint16)
    a, g = c.prepare("Ialltoall", w, got), c.prepare("Allgather", w, got)
    c.start(a).Wait()
    assert np.array_equal(got, w)
    got[:] = 0
    c.start(g)
    assert np.array_equal(got, w)
    es = recorder.RECORDER.entries()[-2:]
    assert [(e["op"], e["state"], e["count"], e["dtype"]) for e in es] == \
        [("Ialltoall", "posted", 4, "uint16"), ("Allgather", "done", 4, "uint16")]
    fingerprint.bypass(True)   # the bench's "diagnosis off": MPI directly, nothing recorded
    try:
        n = recorder.RECORDER.n
        c.start(k).Wait()
        c.Allreduce(MPI.IN_PLACE, x)
        assert recorder.RECORDER.n == n and type(c) is not Traced
    finally:
        fingerprint.bypass(False)
    assert type(c) is Traced
    c.Free()


def test_stall_limit():
    assert watchdog.stall_limit(30, "checkpoint", [0.1], {}) == 30           # the user's value, everywhere
    assert watchdog.stall_limit(0, "step", [0.01] * 5, {}) == 60             # at least 60 s
    assert watchdog.stall_limit(0, "step", [9.0, 10.0, 11.0], {}) == 100     # 10 x the median step
    assert watchdog.stall_limit(0, "start-up", [], {}) == 600
    assert watchdog.stall_limit(0, "checkpoint", [], {"checkpoint": 100.0}) == 1000


def entry(op, comm, cseq, site, state="in", step=5, nbytes=12, t0=100.0):
    return dict(n=cseq, t0=t0, t1=0.0, count=3, nbytes=nbytes, cseq=cseq, step=step, op=op, comm=comm,
                dtype="int32", site=site, peer=-1, state=state)


def status(rank, open_=None, where="hpcopt/train.py:10 in fit", phase="step", progress=70.0):
    return dict(rank=rank, host="n1", pid=100 + rank, step=5, phase=phase, phase_s=80.0, progress_s=progress,
                now=170.0, open=open_, entries=[open_] if open_ else [], stack=["  File x\n"], where=where)


HOSTS = [("n1", 100 + r) for r in range(8)]


def test_summarize_names_the_unreachable_rank_and_the_waiting_ones():
    a = entry("Allreduce", "dp", 9, "hpcopt/parallel/compress.py:95", nbytes=7446568)
    st = {r: status(r, a) for r in (0, 1, 2, 4, 5, 6, 7)}
    clause, culprits, waiters = watchdog.summarize(st, [3], HOSTS)
    assert culprits == [3] and waiters == [0, 1, 2, 4, 5, 6, 7]
    assert clause.startswith("rank 3 (n1, pid 103) did not answer")
    assert "ranks 0-2,4-7 wait in Allreduce(dp, 7.1 MB) at hpcopt/parallel/compress.py:95" in clause
    text = watchdog.format_report(st, [3], HOSTS, clause, 5, 60, "automatic", 0, "/r")
    assert "== rank 3 (n1, pid 103): UNREACHABLE" in text and text.count("main thread's Python stack") == 7


def test_summarize_names_a_rank_outside_the_collective():
    a = entry("Allreduce", "world", 4, "hpcopt/checkpoint.py:141")
    st = {0: status(0, a), 1: status(1, a), 2: status(2, None, "tests/mpi/inject.py:76 in slow_write", "checkpoint",
                                                          412.0), 3: status(3, a)}
    clause, culprits, waiters = watchdog.summarize(st, [], HOSTS[:4])
    assert culprits == [2] and waiters == [0, 1, 3]
    assert clause.startswith("rank 2 (n1, pid 102) has been in checkpoint writing for 412 s, not in a collective, "
                             "at tests/mpi/inject.py:76 in slow_write; ranks 0-1,3 wait in Allreduce(world, 12 B)")


def test_summarize_names_the_odd_one_out_when_all_are_in_collectives():
    a = entry("Allreduce", "world", 34, "hpcopt/train.py:450")
    b = entry("Allreduce", "dp", 31, "hpcopt/parallel/compress.py:95", nbytes=104488)
    st = {0: status(0, a), 1: status(1, b), 2: status(2, a), 3: status(3, a)}
    clause, culprits, waiters = watchdog.summarize(st, [], HOSTS[:4])
    assert culprits == [1] and waiters == [0, 2, 3]
    assert clause.startswith("rank 1 is in Allreduce(dp, 102.0 kB) at hpcopt/parallel/compress.py:95 (call #31 on dp")
    assert "ranks 0,2-3 wait in Allreduce(world, 12 B)" in clause


def test_summarize_with_nobody_in_a_collective():
    st = {r: status(r) for r in range(2)}
    clause, culprits, waiters = watchdog.summarize(st, [], HOSTS[:2])
    assert culprits == [] and waiters == [] and "ranks 0-1 in the training step at hpcopt/train.py:10" in clause


def test_ranges():
    assert watchdog.ranges([7, 0, 1, 2, 4, 5]) == "0-2,4-5,7"
    assert watchdog.ranges([3]) == "3"


def test_deadlocked_only_when_no_blocked_collective_can_complete():
    members = {"world": [0, 1], "dp": [0, 1]}
    w = entry("Allreduce", "world", 34, "hpcopt/train.py:450")
    d = entry("Allreduce", "dp", 31, "hpcopt/parallel/compress.py:95")
    pos = {0: dict(blocked=w, seqs={"world": 34, "dp": 30}, members=members),
           1: dict(blocked=d, seqs={"world": 33, "dp": 31}, members=members)}
    assert watchdog.deadlocked(pos)
    assert watchdog.order_clause(pos) == (
        "rank 0 waits in Allreduce(world, 12 B) at hpcopt/train.py:450 (call #34 on world, step 5), which rank 1 has "
        "not called; rank 1 waits in Allreduce(dp, 12 B) at hpcopt/parallel/compress.py:95 (call #31 on dp, step 5), "
        "which rank 0 has not called")
    late = {**pos, 1: dict(blocked=w, seqs={"world": 34, "dp": 31}, members=members)}
    assert not watchdog.deadlocked(late)  # both in world #34: it completes
    computing = {**pos, 1: dict(blocked=None, seqs={"world": 33, "dp": 31}, members=members)}
    assert not watchdog.deadlocked(computing)  # rank 1 computes: it may yet come
    assert not watchdog.deadlocked({0: pos[0]})  # rank 1 did not answer: no verdict
