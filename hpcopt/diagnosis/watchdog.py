"""The watchdog: a thread on every rank that names a stalled rank instead of waiting on it.

The Trainer marks its phases (start-up, step, evaluate, checkpoint, idle) and beats after every step.
When no step completes (and no phase begins) within the stall limit:

    run.stall_timeout_s > 0   that many seconds, in every phase
    run.stall_timeout_s = 0   steps: max(10 x the median of the last 64 step times, 60 s); start-up,
                              evaluation and checkpoints: max(600 s, 10 x the last such phase)

the ranks' watchdog threads write a report and (run.on_stall = "abort") end the job with exit 76.
The thread runs on a duplicate of the Trainer's world (its own messages never meet the training's),
sleeps 0.1 s between looks and holds the GIL for microseconds; every MPI call it makes is
non-blocking with a deadline (Iprobe, Isend, a matched-probe receive tested against a clock), so a rank
that cannot answer (SIGSTOPped, dead, or holding the GIL) is named unreachable, never waited on.

Who reports: rank 0 of that world, as soon as its own limit passes; rank r takes over when no request
from a lower rank reached it within TAKEOVER_S x r seconds of its own limit (rank 0 may be the stalled
one). The reporter asks every rank for its status (host, pid, step, phase, the flight recorder's last
calls and whether the last one was left, the main thread's Python stack from sys._current_frames),
waits ANSWER_S for the answers, writes <run dir>/stall-<time>.txt and one line to stderr, then
MPI.COMM_WORLD.Abort(76). The same thread tests the fingerprint companions while the main thread is
stuck, looks (rank 0, blocked a second in a collective) for ranks blocked in the same call with another
call or in calls the others have not reached, and reports a mismatch (fingerprint.py): the lowest rank
of the communicator asks its members what they called and ends the job with 77.

Needs MPI_THREAD_MULTIPLE (mpi4py's default); with less, each rank watches only itself: it reports its
own status and aborts (docs/diagnosis.md).
"""
from __future__ import annotations

import atexit
import os
import socket
import statistics
import sys
import threading
import time
import traceback
from collections import deque

from mpi4py import MPI

from . import ranges

from . import EXIT_MISMATCH, EXIT_STALL, fingerprint
from .recorder import RECORDER, describe_call, format_entries, short_path

PERIOD_S = 0.1          # between two looks
TAKEOVER_S = 2.0        # rank r reports itself when no request came within r x this after its own limit
ANSWER_S = 3.0          # how long the reporter waits for the ranks' answers
ORDER_S = 1.0           # rank 0 blocked this long in one collective: are the ranks in a cross-wait?
AUTO_MIN_S = 60.0       # the automatic limit for steps: max(10 x median step, this)
AUTO_PHASE_S = 600.0    # ... and for start-up, evaluation, checkpoints (max with 10 x the last one)
TAG_REQ, TAG_REPLY = 1, 2
PHASE_WORDS = {"start-up": "start-up", "step": "the training step", "evaluate": "evaluation",
               "checkpoint": "checkpoint writing", "idle": "no training (idle)"}

_HERE = os.path.dirname(os.path.abspath(__file__))
_LIVE: list = []        # running watchdogs (stopped at exit, before mpi4py finalizes MPI)


def _stop_all() -> None:
    for w in list(_LIVE):
        w.stop(free=False)


atexit.register(_stop_all)  # registered after mpi4py's MPI_Finalize hook: runs before it


def _who(ranks) -> str:
    rs = sorted(set(ranks))
    return f"rank {rs[0]}" if len(rs) == 1 else f"ranks {ranges(rs)}"


def stall_limit(user_s: float, phase: str, step_times, phase_times: dict) -> float:
    """The seconds without progress after which `phase` counts as stalled (module doc)."""
    if user_s > 0:
        return float(user_s)
    if phase == "step" and step_times:
        return max(10 * statistics.median(step_times), AUTO_MIN_S)
    return max(AUTO_PHASE_S, 10 * phase_times.get(phase, 0.0))


def position(st: dict):
    """Where a reachable rank is: ("collective", key, entry) inside a collective or with a non-blocking
    one posted last; ("elsewhere", where, None) otherwise."""
    e = st.get("open")
    if e is not None:
        return ("collective", (e["comm"], e["cseq"], e["op"], e["site"]), e)
    return ("elsewhere", st.get("where", "?"), None)


def summarize(statuses: dict, unreachable: list, hosts: list, answer_s: float = ANSWER_S) -> tuple[str, list, list]:
    """(the clause naming the ranks at fault and the ranks waiting, culprits, waiters).

    Culprits: ranks that did not answer; else ranks that are not inside a collective while others wait
    in one; else (every rank in a collective) the ranks whose collective differs from the most common
    one. Waiters: the ranks inside collectives, grouped by collective."""
    culprits: list = []
    parts = []
    for r in sorted(unreachable):
        host, pid = hosts[r] if r < len(hosts) else ("?", "?")
        parts.append(f"rank {r} ({host}, pid {pid}) did not answer within {answer_s:g} s (stopped, dead, or stuck "
                     f"holding the GIL)")
        culprits.append(r)
    inside = {r: position(st) for r, st in statuses.items() if position(st)[0] == "collective"}
    outside = {r: position(st) for r, st in statuses.items() if r not in inside}
    waiting = dict(inside)
    if inside or culprits:
        for r in sorted(outside):
            st = statuses[r]
            phase = PHASE_WORDS.get(st["phase"], st["phase"])
            parts.append(f"rank {r} ({st['host']}, pid {st['pid']}) has been in {phase} for {st['progress_s']:.0f} s, "
                         f"not in a collective, at {st['where']}")
            culprits.append(r)
    if not culprits and inside:  # everyone in a collective: the odd ones out
        counts: dict = {}
        for r, (_, key, _) in inside.items():
            counts.setdefault(key, []).append(r)
        main_key = max(counts, key=lambda k: (len(counts[k]), -min(counts[k])))
        for key, rs in sorted(counts.items(), key=lambda kv: min(kv[1])):
            if key == main_key:
                continue
            e = inside[rs[0]][2]
            parts.append(f"{_who(rs)} {'is' if len(rs) == 1 else 'are'} in {describe_call(e)} at {e['site']} "
                         f"(call #{e['cseq']} on {e['comm']}, step {e['step']})")
            culprits += rs
            for r in rs:
                waiting.pop(r)
    if not inside and not culprits:  # nobody inside a collective, nobody missing: a slow or hung computation
        groups: dict = {}
        for r, st in statuses.items():
            groups.setdefault(st["where"], []).append(r)
        for where, rs in sorted(groups.items(), key=lambda kv: min(kv[1])):
            st = statuses[rs[0]]
            parts.append(f"{_who(rs)} in {PHASE_WORDS.get(st['phase'], st['phase'])} at {where}, no rank inside "
                         f"a collective")
        return "; ".join(parts), [], []
    groups = {}
    for r, (_, key, e) in waiting.items():
        groups.setdefault(key, []).append(r)
    for key, rs in sorted(groups.items(), key=lambda kv: min(kv[1])):
        e = waiting[rs[0]][2]
        ago = statuses[rs[0]]["now"] - e["t0"]
        verb = "waits" if len(rs) == 1 else "wait"
        label = "for" if e["state"] == "posted" else "in"
        parts.append(f"{_who(rs)} {verb} {label} {describe_call(e)} at {e['site']} (call #{e['cseq']}, step "
                     f"{e['step']}, entered {ago:.0f} s ago)")
    return "; ".join(parts), sorted(culprits), sorted(waiting)


def deadlocked(pos: dict) -> bool:
    """Whether positions {rank: {"blocked": entry or None, "seqs": {label: n}, "members": {label: ranks}}}
    of EVERY rank are a certain deadlock: each rank blocked in a collective that some member of its
    communicator has not called yet (its count on that communicator is lower), so none can complete."""
    if not pos:
        return False
    for p in pos.values():
        b = p["blocked"]
        if b is None:
            return False
        members = p["members"].get(b["comm"])
        if members is None or any(m not in pos for m in members):
            return False
        if all(pos[m]["seqs"].get(b["comm"], 0) >= b["cseq"] for m in members):
            return False  # every member is there: it can complete
    return True


def same_call_differs(pos: dict):
    """(communicator, call number) where two ranks are blocked in the same call number of the same
    communicator with different calls (operation, bytes, datatype or call site), or None."""
    seen: dict = {}
    for r in sorted(pos):
        b = pos[r]["blocked"]
        if b is None:
            continue
        what = (b["op"], b["nbytes"], b["count"], b["dtype"], b["site"])
        other = seen.setdefault((b["comm"], b["cseq"]), what)
        if other != what:
            return b["comm"], b["cseq"]
    return None


def order_clause(pos: dict) -> str:
    groups: dict = {}
    for r, p in pos.items():
        b = p["blocked"]
        groups.setdefault((b["comm"], b["cseq"], b["op"], b["site"]), []).append(r)
    parts = []
    for key, rs in sorted(groups.items(), key=lambda kv: min(kv[1])):
        b, p = pos[rs[0]]["blocked"], pos[rs[0]]
        missing = [m for m in p["members"][b["comm"]] if pos[m]["seqs"].get(b["comm"], 0) < b["cseq"]]
        parts.append(f"{_who(rs)} {'waits' if len(rs) == 1 else 'wait'} in {describe_call(b)} at {b['site']} "
                     f"(call #{b['cseq']} on {b['comm']}, step {b['step']}), which {_who(missing)} "
                     f"{'has' if len(missing) == 1 else 'have'} not called")
    return "; ".join(parts)


def format_report(statuses: dict, unreachable: list, hosts: list, clause: str, step: int, limit: float,
                  how: str, reporter: int, out_dir: str | None) -> str:
    now = time.time()
    lines = ["hpcopt stall report",
             f"time: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now))}",
             f"run directory: {out_dir or '-'}",
             f"ranks: {len(hosts)}; reported by rank {reporter}; stall limit {limit:.0f} s ({how})",
             f"summary: stalled at step {step}: {clause}", ""]
    for r in range(len(hosts)):
        host, pid = hosts[r]
        if r in unreachable:
            lines += [f"== rank {r} ({host}, pid {pid}): UNREACHABLE: no answer within {ANSWER_S:g} s (stopped by a "
                      f"signal, dead, or its Python stuck holding the GIL)", ""]
            continue
        st = statuses.get(r)
        if st is None:
            continue
        phase = PHASE_WORDS.get(st["phase"], st["phase"])
        lines.append(f"== rank {r} ({host}, pid {pid}): step {st['step']}, in {phase}, last progress (a step done "
                     f"or a phase begun) {st['progress_s']:.1f} s ago")
        e = st.get("open")
        if e is not None:
            lines.append(f"   now: {'waiting for' if e['state'] == 'posted' else 'inside'} {describe_call(e)} at "
                         f"{e['site']}, entered {st['now'] - e['t0']:.1f} s ago (call #{e['cseq']} on {e['comm']})")
        else:
            last = st["entries"][-1] if st["entries"] else None
            left = (f"; its last MPI call {describe_call(last)} at {last['site']} was left "
                    f"{st['now'] - last['t1']:.1f} s ago" if last and last["t1"] else "")
            lines.append(f"   now: not inside a collective, at {st['where']}{left}")
        lines.append("   last MPI calls (oldest first):")
        lines += format_entries(st["entries"], st["now"], indent="     ") if st["entries"] else ["     (none)"]
        lines.append("   main thread's Python stack (most recent call last):")
        lines += ["     " + s for chunk in st["stack"] for s in chunk.rstrip().splitlines()]
        lines.append("")
    return "\n".join(lines) + "\n"


def write_status_file(code: int) -> None:
    """HPCOPT_STATUS_FILE (cli.write_status): the job's code, written by whichever rank ends the job."""
    path = os.environ.get("HPCOPT_STATUS_FILE")
    if path:
        try:
            with open(path, "w") as f:
                f.write(f"{code}\n")
        except OSError:
            pass


class NullWatchdog:
    """What a Trainer holds when no watchdog runs: the same calls, doing nothing."""

    def set_phase(self, phase: str) -> None:
        pass

    def beat(self, step: int) -> None:
        fingerprint.STATE.step = step

    def phase(self, name: str):
        return _Phase(self, name)

    def stop(self, free: bool = True) -> None:
        pass


class _Phase:
    def __init__(self, w, name):
        self.w, self.name = w, name

    def __enter__(self):
        self.prev = getattr(self.w, "current", "idle")
        self.w.set_phase(self.name)

    def __exit__(self, *exc):
        self.w.set_phase(self.prev)


class Watchdog(NullWatchdog):
    def __init__(self, world: MPI.Comm, out_dir: str | None, stall_timeout_s: float = 0.0, on_stall: str = "abort",
                 comms: dict | None = None, attach: bool = True):
        """Collective over `world` (a Dup and an allgather). comms: label -> the grid's Traced
        communicators (for a mismatch: who their members are)."""
        self.comm = world.Dup()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.host = socket.gethostname()
        self.hosts = self.comm.allgather((self.host, os.getpid()))
        self.multi = MPI.Query_thread() >= MPI.THREAD_MULTIPLE
        self.out_dir, self.user_s, self.on_stall = out_dir, float(stall_timeout_s), on_stall
        group = self.comm.Get_group()
        self.members: dict = {}
        for label, c in (comms or {}).items():
            if isinstance(c, fingerprint.Traced):
                g = c.Get_group()
                self.members[label] = (c, list(MPI.Group.Translate_ranks(g, list(range(c.Get_size())), group)))
                g.Free()
        group.Free()
        now = time.monotonic()
        self.current = "idle"
        self.phase_t = self.progress_t = self.last_beat = now
        self.step = 0
        self.step_times: deque = deque(maxlen=64)
        self.busy_s = 0.0              # seconds the thread spent looking (the cost it adds: bench dp)
        self.phase_times: dict = {}
        self.reported = None           # progress_t of the episode already reported (or handed to a reporter)
        self.detected = (None, 0.0)    # (progress_t, monotonic time the limit passed) of this episode
        self.heard_at = 0.0            # monotonic time of the last status request from a reporter
        self.sends: list = []          # our Isends not yet complete
        self._late: list = []          # receives of answers that came after their report
        self._collecting = False
        self.token = 0
        self.order_next, self.order_wait = 0.0, ORDER_S  # rank 0: when to look for a cross-wait next
        self.mismatch = None           # (Traced, (first, last call), monotonic time, suspect) found by this rank
        self.mismatch_done = threading.Event()
        self.main_ident = threading.main_thread().ident
        self._stop = threading.Event()
        self.attached = attach and out_dir is not None
        if self.attached:
            RECORDER.attach(out_dir, self.rank, self.host)
        self.thread = threading.Thread(target=self._run, name="hpcopt-watchdog", daemon=True)
        self.thread.start()
        _LIVE.append(self)
        self._prev_handler = fingerprint.STATE.handler
        fingerprint.STATE.handler = self.on_mismatch

    # -- the main thread's marks --------------------------------------------------------------------
    def set_phase(self, phase: str) -> None:
        now = time.monotonic()
        if self.current in ("evaluate", "checkpoint", "start-up"):
            self.phase_times[self.current] = now - self.phase_t
        self.current, self.phase_t, self.progress_t = phase, now, now
        self.last_beat = now

    def beat(self, step: int) -> None:
        """A step completed (the main thread, after every step)."""
        now = time.monotonic()
        if self.current == "step":
            self.step_times.append(now - self.last_beat)
        else:
            self.current, self.phase_t = "step", now
        self.last_beat = self.progress_t = now
        self.step = step
        fingerprint.STATE.step = step

    def stop(self, free: bool = True) -> None:
        if self in _LIVE:
            _LIVE.remove(self)
        self._stop.set()
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(5.0)
        if fingerprint.STATE.handler == self.on_mismatch:
            fingerprint.STATE.handler = self._prev_handler
        if self.attached:
            RECORDER.detach()
            self.attached = False
        if free and not MPI.Is_finalized() and self.comm != MPI.COMM_NULL:
            self.comm.Free()

    # -- the thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.wait(PERIOD_S):
                if MPI.Is_finalized():
                    return
                t0 = time.perf_counter()
                self._tick()
                self.busy_s += time.perf_counter() - t0
        except Exception:  # noqa: BLE001 - a bug here must not end the training: say it once, stop watching
            print(f"hpcopt: warning: the watchdog of rank {self.rank} stopped on an error:\n"
                  f"{traceback.format_exc()}", file=sys.stderr, flush=True)

    def _tick(self) -> None:
        if self.multi:
            self._serve()
            if fingerprint.STATE.enabled:
                fingerprint.poll_all()
        if self.mismatch is not None:
            self._handle_mismatch()
        if self.multi and self.rank == 0 and fingerprint.STATE.enabled and self.size > 1:
            self._check_order()
        self._check_stall()

    def _isend(self, obj, dest: int, tag: int) -> None:
        self.sends.append(self.comm.isend(obj, dest=dest, tag=tag))

    def _serve(self) -> None:
        """Answer the requests of other ranks' watchdogs; drop late answers to an earlier report."""
        self.sends = [r for r in self.sends if not r.Test()]
        while True:
            msg = self.comm.improbe(source=MPI.ANY_SOURCE, tag=TAG_REQ)
            if msg is None:
                break
            req = msg.recv()
            kind, token, src = req[0], req[1], req[2]
            if kind == "status":
                self.heard_at = time.monotonic()
                self._isend((token, self.rank, self.status()), src, TAG_REPLY)
            elif kind == "position":
                self._isend((token, self.rank, self.position()), src, TAG_REPLY)
            elif kind == "describe":
                label, seq = req[3], req[4]
                c = self.members.get(label, (None,))[0]
                answer = None if c is None else (c.describe_seq(seq), c.last_desc(), c.seq)
                self._isend((token, self.rank, answer), src, TAG_REPLY)
            elif kind == "hashes":
                label, lo, hi = req[3], req[4], req[5]
                c = self.members.get(label, (None,))[0]
                self._isend((token, self.rank, None if c is None else c.hashes(lo, hi)), src, TAG_REPLY)
        if not self._collecting:
            while True:  # answers that came too late for a report: read and drop them
                msg = self.comm.improbe(source=MPI.ANY_SOURCE, tag=TAG_REPLY)
                if msg is None:
                    break
                self._late.append(msg.irecv())
        self._late = [r for r in self._late if not r.test()[0]]

    def _ask(self, ranks: list, request: tuple, timeout: float = ANSWER_S) -> dict:
        """Send request to ranks; their answers within `timeout` seconds: {rank: answer}."""
        self.token += 1
        token = (self.rank, self.token)
        for r in ranks:
            self._isend((request[0], token, self.rank, *request[1:]), r, TAG_REQ)
        got: dict = {}
        recvs: list = []
        deadline = time.monotonic() + timeout
        self._collecting = True
        try:
            while len(got) < len(ranks) and time.monotonic() < deadline:
                self._serve()
                while True:
                    msg = self.comm.improbe(source=MPI.ANY_SOURCE, tag=TAG_REPLY)
                    if msg is None:
                        break
                    recvs.append(msg.irecv())
                still = []
                for req in recvs:
                    done, value = req.test()
                    if not done:
                        still.append(req)
                    elif value[0] == token:
                        got[value[1]] = value[2]
                recvs = still
                time.sleep(0.01)
        finally:
            self._collecting = False
        self._late += recvs
        return got

    def status(self) -> dict:
        """This rank, as the report shows it (called from the watchdog thread, any time)."""
        now, mono = time.time(), time.monotonic()
        frame = sys._current_frames().get(self.main_ident)
        frames = traceback.extract_stack(frame) if frame is not None else []
        while frames and os.path.dirname(frames[-1].filename) == _HERE:  # the Traced wrapper: not news
            frames.pop()
        stack = traceback.format_list(frames)
        where = f"{short_path(frames[-1].filename)}:{frames[-1].lineno} in {frames[-1].name}" if frames else "?"
        entries = RECORDER.entries()
        last = entries[-1] if entries else None
        open_ = last if last is not None and (last["state"] == "in" or (last["state"] == "posted" and last["cseq"])) \
            else None
        return dict(rank=self.rank, host=self.host, pid=os.getpid(), step=self.step, phase=self.current,
                    phase_s=mono - self.phase_t, progress_s=mono - self.progress_t, now=now, open=open_,
                    entries=entries[-16:], stack=stack, where=where)

    def position(self) -> dict:
        """The collective the main thread is blocked in (None: not in a blocking collective) and this
        rank's count of collectives on each of the grid's communicators."""
        entries = RECORDER.entries()
        last = entries[-1] if entries else None
        blocked = last if last is not None and last["state"] == "in" and last["cseq"] else None
        return dict(blocked=blocked, seqs={k: c.seq for k, (c, _) in self.members.items()},
                    members={k: m for k, (_, m) in self.members.items()})

    def _check_order(self) -> None:
        """Rank 0, blocked in a collective for ORDER_S: ask every rank where it is; all blocked in
        collectives none of which can complete (collectives called in different orders on different
        communicators: a skipped one, say) is a mismatch that no single fingerprint shows: exit 77."""
        if self.current == "idle":
            return
        mono = time.monotonic()
        mine = self.position()
        if mine["blocked"] is None:
            self.order_next, self.order_wait = 0.0, ORDER_S
            return
        if time.time() - mine["blocked"]["t0"] < ORDER_S or mono < self.order_next:
            return
        snaps = []
        for i in range(2):  # the same deadlock twice, 0.3 s apart: not a snapshot taken mid-change
            pos = self._ask(list(range(1, self.size)), ("position",), ORDER_S)  # tiny answers: 1 s is plenty
            pos[0] = self.position()
            if i == 0:
                odd = same_call_differs(pos)
                if odd is not None:   # blocked in the same call number with another call: a mismatch
                    label, seq = odd
                    self.mismatch = (self.members[label][0], (seq, seq), time.monotonic(), False)
                    self._report_mismatch()
                    return
            if len(pos) < self.size or not deadlocked(pos):
                self.order_wait = min(2 * self.order_wait, 30.0)
                self.order_next = time.monotonic() + self.order_wait
                return
            snaps.append({r: (p["blocked"]["n"], p["seqs"]) for r, p in pos.items()})
            time.sleep(0.3)
        if snaps[0] != snaps[1]:
            return
        print(f"hpcopt: collective mismatch at step {fingerprint.STATE.step}: the ranks called collectives in "
              f"different orders and wait on each other: {order_clause(pos)}; ending the job (exit 77)",
              file=sys.stderr, flush=True)
        write_status_file(EXIT_MISMATCH)
        MPI.COMM_WORLD.Abort(EXIT_MISMATCH)

    def limit(self) -> float:
        return stall_limit(self.user_s, self.current, self.step_times, self.phase_times)

    def _check_stall(self) -> None:
        if self.current == "idle" or self.reported == self.progress_t:
            return
        mono = time.monotonic()
        age = mono - self.progress_t
        if age < (self.user_s or AUTO_MIN_S):
            return
        limit = self.limit()
        if age < limit:
            return
        progress = self.progress_t
        if self.detected[0] != progress:
            self.detected = (progress, mono)
        if self.heard_at > progress:  # another rank reports this one
            self.reported = progress
            return
        if self.multi and self.rank > 0 and mono - self.detected[1] < TAKEOVER_S * self.rank:
            return
        self.reported = progress
        self._report_stall(limit)

    def _report_stall(self, limit: float) -> None:
        others = [r for r in range(self.size) if r != self.rank] if self.multi else []
        mine = self.status()  # now, as the others answer now
        statuses = self._ask(others, ("status",)) if others else {}
        statuses[self.rank] = mine
        unreachable = [r for r in others if r not in statuses]
        clause, _, _ = summarize(statuses, unreachable, self.hosts)
        step = max(st["step"] for st in statuses.values())
        how = "run.stall_timeout_s" if self.user_s > 0 else f"automatic, phase {self.current}"
        text = format_report(statuses, unreachable, self.hosts, clause, step, limit, how, self.rank, self.out_dir)
        if not self.multi:
            text += ("\n(MPI gives this process less than MPI_THREAD_MULTIPLE: the other ranks were not asked)\n")
        path = self._write_report(text)
        where = f"report {path}" if path else "report below (the run directory cannot be written)"
        action = "ending the job (exit 76)" if self.on_stall == "abort" else "waiting on (run.on_stall = \"report\")"
        print(f"hpcopt: stalled at step {step}: {clause}; {where}; {action}", file=sys.stderr, flush=True)
        if path is None:
            print(text, file=sys.stderr, flush=True)
        if self.on_stall == "abort":
            write_status_file(EXIT_STALL)
            MPI.COMM_WORLD.Abort(EXIT_STALL)

    def _write_report(self, text: str) -> str | None:
        if not self.out_dir:
            return None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        try:
            os.makedirs(self.out_dir, exist_ok=True)
            for i in range(100):
                path = os.path.join(self.out_dir, f"stall-{stamp}{'' if i == 0 else f'-{i}'}.txt")
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    continue
                with os.fdopen(fd, "w") as f:
                    f.write(text)
                return path
        except OSError:
            pass
        return None

    # -- fingerprint mismatches -----------------------------------------------------------------------
    def on_mismatch(self, comm, calls: tuple, suspect: bool = False) -> None:
        """fingerprint.Traced found the companion of its calls lo..hi mismatched (suspect: an MPI call of
        it raised; compare its fingerprints first). From the watchdog thread: handled at once. From the
        main thread: handed to the watchdog thread, and the main thread waits (it must not go on with
        wrongly reduced data) until the job ends, or (suspect) until the fingerprints were found equal."""
        if self.mismatch is None:
            if suspect:
                self.mismatch_done.clear()
            self.mismatch = (comm, calls, time.monotonic(), suspect)
        if threading.current_thread() is self.thread or not self.multi or not self.thread.is_alive():
            self._handle_mismatch()
            return
        self.mismatch_done.wait(30.0 if not suspect else ANSWER_S + 2 * TAKEOVER_S)
        if suspect and self.mismatch is None:
            return  # the same call everywhere: the MPI error is the MPI error
        self._report_mismatch()  # the watchdog thread did not end the job: do it from here

    def _handle_mismatch(self) -> None:
        comm, calls, t, suspect = self.mismatch
        label = comm.label
        members = self.members.get(label, (None, [self.rank]))[1]
        order = sorted(members)
        pos = order.index(self.rank) if self.rank in order else 0
        if self.multi and not suspect and pos > 0 and time.monotonic() - t < TAKEOVER_S * pos:
            return  # the lowest member reports; we take over if it has not ended the job by then
        self._report_mismatch()

    def _first_difference(self, label: str, others: list, lo: int, hi: int) -> int:
        """The first call of lo..hi whose fingerprint differs between the members (hi if none is known)."""
        comm = self.members[label][0]
        got = self._ask(others, ("hashes", label, lo, hi)) if others else {}
        got[self.rank] = comm.hashes(lo, hi)
        for seq in range(lo, hi + 1):
            if len({(h or {}).get(seq) for h in got.values()}) > 1:
                return seq
        return hi

    def _report_mismatch(self) -> None:
        comm, (lo, hi), _, suspect = self.mismatch
        label = comm.label
        members = self.members.get(label, (None, [self.rank]))[1]
        others = [r for r in members if r != self.rank] if self.multi else []
        seq = self._first_difference(label, others, lo, hi) if lo < hi else hi
        answers = self._ask(others, ("describe", label, seq)) if others else {}
        answers[self.rank] = (comm.describe_seq(seq), comm.last_desc(), comm.seq)
        groups: dict = {}
        for r, a in answers.items():
            d = a[0] if a is not None else None
            key = fingerprint.format_desc(d) if d is not None else (
                f"not yet call #{seq} (its last: #{a[2]} {fingerprint.format_desc(a[1])})" if a else "?")
            groups.setdefault(key, []).append(r)
        silent = [r for r in others if r not in answers]
        if suspect and len(groups) == 1 and not silent:
            self.mismatch = None   # the same call on every member: not a mismatch; the MPI error goes on
            self.mismatch_done.set()
            return
        parts = [f"{_who(rs)} called {key}" for key, rs in sorted(groups.items(), key=lambda kv: min(kv[1]))]
        if silent:
            parts.append(f"{_who(silent)} did not answer")
        if len(groups) == 1 and not silent and len(answers) > 1:
            parts.append("(the same call on every rank that answered: the data differ in a way the call hides, "
                         "e.g. a count vector)")
        step = fingerprint.STATE.step
        print(f"hpcopt: collective mismatch on {label}, call #{seq} (step {step}): {'; '.join(parts)}; ending the "
              f"job (exit 77)", file=sys.stderr, flush=True)
        write_status_file(EXIT_MISMATCH)
        MPI.COMM_WORLD.Abort(EXIT_MISMATCH)
