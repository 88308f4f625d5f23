"""Traced communicators: every MPI call on a Grid's communicators is recorded (recorder.py), and every
collective carries a fingerprint that the ranks of its communicator compare (run.check_collectives).

`Traced(comm, label)` is an `MPI.Intracomm` on the same handle as comm (still an MPI.Comm: h5py's mpio
driver, MPI.Win and mpi4py's own calls take it) whose methods that hpcopt calls (the collectives, their
non-blocking forms, and the point-to-point calls of the pipeline) first record the call, then call
MPI. comm.make_grid wraps the grid's world, dp, pp and tp communicators. A reduction made again and
again with the same buffers from one place (a gradient bucket's exchange) is prepared once and started
each step (Traced.prepare, Traced.start): recorded and fingerprinted the same, a cheaper call.

The fingerprint of a collective: hash(its number on the communicator, the training step, operation,
element count, datatype, root, reduction, call site file:line), computed when the call is made and
kept with the call (`history`, the last K) and in the communicator's running DIGEST of all its calls.
The ranks compare them without any message per collective (a companion message per call cost 25 us
a call here, +10% on the digits step):

  * at each of the Trainer's checkpoint agreements (every ~20 ms of steps, train.AGREE_S), every
    communicator posts one NON-blocking companion on a duplicate of itself (the "shadow"): an
    Iallreduce of [d, -d] with MAX, d its digest; completed, it holds [max d, -min d], equal iff
    every member made the same calls since the last one. It is tested at the next agreement and by
    the watchdog thread (a main thread stuck in a collective does not test it). A mismatch: the
    members' fingerprints of those calls are compared (the watchdog asks them) to name the first
    call that differs, with both call sites; exit 77;
  * a collective that hangs: the watchdog of rank 0, blocked in one for a second, asks every rank
    where it is blocked: members blocked in the same call number of a communicator with another
    operation, count, datatype or site are a mismatch (exit 77); blocked in calls the others have not
    reached, a cross-wait (exit 77: watchdog.deadlocked);
  * an MPI call that raises (MPI found the mismatch itself, e.g. truncation): the members' fingerprints
    of that call are compared before the error is raised: a mismatch ends the job with 77, else the
    error goes on.
So a mismatch that hangs is named within ~1.5 s, one that completes (wrong data) at the next agreement,
before any checkpoint of that data. Point-to-point calls are recorded, not fingerprinted (a pair is
not a communicator-wide agreement).
"""
from __future__ import annotations

import os
import sys
import threading
import time
import weakref
import zlib
from collections import deque

import numpy as np
from mpi4py import MPI

from . import EXIT_MISMATCH
from .recorder import DONE, ERROR, IN, K, KMASK, POSTED, RECORDER, RING, short_path

MASK = (1 << 62) - 1
IN_PLACE = MPI.IN_PLACE


class State:
    """Process-wide settings: whether fingerprints are posted, the step they carry, who handles a mismatch."""

    def __init__(self):
        self.enabled = True   # run.check_collectives (the Trainer sets it)
        self.step = 0         # the training step (the watchdog's beat sets it): part of every fingerprint
        self.handler = None   # handler(comm, seq) on a mismatch (the active watchdog's); None: a local abort


STATE = State()
_SITES: dict = {}     # id(code) << 24 | line -> (site id, site hash, "file:line", code)  (point to point)
_KEYS: dict = {}      # (id(code), line, op, dtype) -> _new_key's tuple  (collectives)
_TYPES: dict = {}     # MPI datatype handle -> (name, size)
_DTYPES: dict = {}    # numpy dtype -> its name (dtype.name takes ~5 us in numpy 2)
_REGISTRY: list = []  # weakrefs to the Traced communicators that post companions (the watchdog polls them)
_REDOPS = {op.py2f(): name for op, name in ((MPI.SUM, "sum"), (MPI.MAX, "max"), (MPI.MIN, "min"),
                                              (MPI.PROD, "prod"), (MPI.LAND, "land"), (MPI.LOR, "lor"),
                                              (MPI.BAND, "band"), (MPI.BOR, "bor"), (MPI.MAXLOC, "maxloc"),
                                              (MPI.MINLOC, "minloc"), (MPI.REPLACE, "replace"))}
_intern = RECORDER.intern
_UNSET = object()     # a site's reduction before _note has seen one


def _site(frame) -> tuple:
    s = _SITES.get((id(frame.f_code) << 24) | frame.f_lineno)
    return s if s is not None else _new_site(frame)


def _new_site(frame) -> tuple:
    code = frame.f_code
    text = f"{short_path(code.co_filename)}:{frame.f_lineno}"
    s = _SITES[(id(code) << 24) | frame.f_lineno] = (_intern(text), zlib.crc32(text.encode()), text, code)
    return s  # (the code object is kept: its id stays its own)


def _new_key(frame, op: str, d, buf) -> tuple:
    """_KEYS[(id(code), line, op, dtype number or name)] = (op id, dtype id, site id, site hash, site text,
    op, dtype name, the code object (kept, so that its id stays its own))."""
    code = frame.f_code
    site = f"{short_path(code.co_filename)}:{frame.f_lineno}"
    name = d if isinstance(d, str) else ("object" if d is None else buf.dtype.name)
    k = (_intern(op), _intern(name), _intern(site), zlib.crc32(f"{op} {name} {site}".encode()), site, op, name,
         code)
    _KEYS[(id(code), frame.f_lineno, op, d)] = k
    return k


def _mpi_type(t) -> tuple[str, int]:
    h = t.py2f()
    v = _TYPES.get(h)
    if v is None:
        name = t.Get_name() or "derived"
        v = _TYPES[h] = (name[4:].lower() if name.startswith("MPI_") else name, t.Get_size())
    return v


def describe(buf) -> tuple[int, str, int]:  # noqa: C901 - the forms of an mpi4py buffer argument
    """(element count, datatype name, bytes) of an mpi4py buffer argument; (0, "?", 0) when unknown.
    A count vector ([data, (counts, displs), type]) counts its sum."""
    if isinstance(buf, np.ndarray):
        d = buf.dtype
        name = _DTYPES.get(d)
        if name is None:
            name = _DTYPES[d] = d.name
        return buf.size, name, buf.nbytes
    try:
        if isinstance(buf, (list, tuple)) and buf:
            data, typ = buf[0], buf[-1] if isinstance(buf[-1], MPI.Datatype) else None
            middle = buf[1:-1] if typ is not None else buf[1:]
            if typ is not None:
                name, size = _mpi_type(typ)
            else:
                name, size = data.dtype.name, data.dtype.itemsize
            if middle:
                c = middle[0]
                if isinstance(c, (tuple, list)) and c and not isinstance(c[0], (int, np.integer)):
                    c = c[0]  # (counts, displs)
                elif isinstance(c, (tuple, list)) and len(c) == 2 and len(middle) == 1 and typ is not None:
                    c = c[0]  # (count, displ)
                count = int(np.sum(c)) if not isinstance(c, (int, np.integer)) else int(c)
            else:
                count = data.nbytes // size if hasattr(data, "nbytes") else len(memoryview(data)) // size
            return count, name, count * size
        if buf is None:
            return 0, "", 0
        m = memoryview(buf)
        return m.nbytes // max(m.itemsize, 1), m.format, m.nbytes
    except Exception:  # noqa: BLE001 - describing must never break the call
        return 0, "?", 0


def format_desc(d) -> str:
    """Allreduce(3 x int32, max) at hpcopt/train.py:431, step 30."""
    if d is None:
        return "nothing (not reached)"
    seq, step, op, count, dtype, root, redop, site = d
    args = []
    if count or dtype not in ("", "object"):
        args.append(f"{count} x {dtype}" if dtype else str(count))
    if redop:
        args.append(redop)
    if root >= 0:
        args.append(f"root {root}")
    return f"{op}({', '.join(args)}) at {site}, step {step}"


class Traced(MPI.Intracomm):
    """An intracommunicator that records its calls and fingerprints its collectives (module doc)."""

    # Slots, no __dict__: MPI.Intracomm is a C type without one, and the __dict__ a subclass adds is one
    # that CPython 3.11 cannot specialise attribute access on (~90 ns a load, ~200 ns a store, measured;
    # 20 and 55 ns with slots). The hot path touches a few of them on every call.
    __slots__ = ("label", "label_id", "seq", "sites", "nranks", "shadow", "fp", "rows", "pending", "history",
                 "digest", "covered", "posted", "lock", "prepared")

    def __new__(cls, comm: MPI.Comm | None = None, label: str = "?"):
        self = super().__new__(cls, comm) if comm is not None else super().__new__(cls)
        self.label = label
        self.label_id = _intern(label)
        self.seq = 0                   # collectives called on it so far
        self.sites: dict = {}          # the caller's bytecode offset -> _site's tuple (the hot path's cache)
        self.nranks = comm.Get_size() if comm is not None else 0
        self.shadow = MPI.Intracomm(comm).Dup() if self.nranks > 1 else None  # the companions' communicator
        self.fp = np.zeros((K, 2), np.int64)
        self.rows = [self.fp[k] for k in range(K)]  # views made once
        self.pending: deque = deque()  # (request, slot, first call, last call) of companions not yet seen complete
        self.history: list = [None] * K   # slot -> (seq, step, its _site list, fingerprint)
        self.digest = 0                # running hash of every fingerprint
        self.covered = 0               # calls up to this one are in a posted companion
        self.posted = 0                # companions posted
        self.lock = threading.Lock()   # pending + fp, between the main thread and the watchdog's
        self.prepared: list = []       # prepare()'s calls: [site, MPI's method, its arguments, name, buffer, op, state]
        if self.shadow is not None:
            _REGISTRY.append(weakref.ref(self))
        if len(_ALL) >= 64:
            _ALL[:] = [r for r in _ALL if r() is not None]
        _ALL.append(weakref.ref(self))
        return self

    # -- recording and the companion ----------------------------------------------------------------
    def prepare(self, name: str, sendbuf, recvbuf, op=None, k: int | None = None) -> int:
        """A collective of _PREPARABLE (a reduction: op, default SUM; an Allgather or Alltoall: no op)
        that will be made again and again with these very arguments from one place in the code (a
        gradient bucket's exchange): its handle for start(k), which makes it, recorded and fingerprinted
        as the named call would be, but without looking up its call site and buffer on every call (its
        call site: where start(k) is first called). What MPI-4's persistent collectives (Allreduce_init,
        Start) do for MPI's own set-up; the MPI here is 3.1. k: re-prepare that handle (new buffers)."""
        if name not in _PREPARABLE:
            raise ValueError(f"prepare: {name} is not one of {', '.join(_PREPARABLE)}")
        if name in _REDUCTIONS:
            op = MPI.SUM if op is None else op
            args = (sendbuf, recvbuf, op)
        elif op is not None:
            raise ValueError(f"prepare: {name} takes no reduction (op)")
        else:
            args = (sendbuf, recvbuf)
        p = [None, getattr(MPI.Intracomm, name), args, name,
             recvbuf if sendbuf is IN_PLACE else sendbuf, op, POSTED if name[0] == "I" else DONE]
        if k is None:
            self.prepared.append(p)
            return len(self.prepared) - 1
        self.prepared[k] = p
        return k

    def _site(self, frame, op: str, buf, root: int) -> list:
        """(code, buffer, operation, root, the ring's static entry, _KEYS's entry, count, reduction,
        fingerprint base) of a call site seen for the first time (or with another buffer object:
        described again); the last two are filled by _note."""
        if type(buf) is np.ndarray:
            count, nbytes, d = buf.size, buf.nbytes, buf.dtype.num
        elif buf is None:
            count, nbytes, d = 0, 0, None
        else:
            count, d, nbytes = describe(buf)
        k = _KEYS.get((id(frame.f_code), frame.f_lineno, op, d))
        if k is None:
            k = _new_key(frame, op, d, buf)
        site = [frame.f_code, buf, op, root, RECORDER.static(count, nbytes, k[0], self.label_id, k[1], k[2], root),
                k, count, _UNSET, 0]
        if len(self.sites) < 4096:   # a bound: call sites of generated code must not grow it forever
            self.sites[frame.f_lasti] = site
        return site

    def _p2p(self, op: str, buf, peer: int, frame, state: int = IN) -> int:
        count, dtype, nbytes = describe(buf) if buf is not None else (0, "object", 0)
        return RECORDER.enter(_intern(op), self.label_id, 0, count, nbytes, _intern(dtype), _site(frame)[0], peer,
                              STATE.step, state)

    def _note(self, seq: int, step: int, site: list, root: int, redop) -> None:
        """Collective #seq's fingerprint: into the history and the digest (no message)."""
        if site[7] is not redop:   # the site's reduction seen for the first time (or another one)
            r = redop.py2f() if redop is not None else -1
            k = site[5]
            site[7], site[8] = redop, zlib.crc32(repr((root, _REDOPS.get(r, r))).encode(), k[3])
        h = (site[8] * 0x9E3779B97F4A7C15 + site[6] * 0xC2B2AE3D27D4EB4F + seq * 0x165667B19E3779F9
             + step * 0x27D4EB2F165667C5) & MASK
        self.history[seq % K] = (seq, step, site, h)
        self.digest = (self.digest * 0x100000001B3 + h) & MASK

    def post_digest(self) -> None:
        """At an agreement (every member of the communicator at the same point): the companion of the
        calls since the last one, [d, -d] with MAX on the shadow; checked when it completes."""
        bad = None
        with self.lock:
            if self.pending:
                bad = self._test()
            if len(self.pending) < K:
                lo, hi = self.covered + 1, self.seq
                d = (self.digest + hi) & MASK
                slot = self.posted % K
                self.posted += 1
                b = self.rows[slot]
                b[0] = d
                b[1] = -d
                self.pending.append((self.shadow.Iallreduce(IN_PLACE, b, op=MPI.MAX), slot, lo, hi))
                self.covered = hi
        if bad is not None:
            self._report(bad)

    def _test(self):
        """Test the companions in order (lock held): (lo, hi), the calls of a mismatched one, or None."""
        pending = self.pending
        while pending:
            req, k, lo, hi = pending[0]
            if not req.Test():
                return None
            pending.popleft()
            a, b = self.rows[k].tolist()
            if a + b != 0:
                return lo, hi
        return None

    def _fail(self, n: int) -> None:
        """The MPI call raised: a mismatch (different counts, say) is the likelier cause. With
        fingerprints on, the members' fingerprints of this call are compared first (the handler ends the
        job with 77 if they differ; returns if they agree, and the error goes on)."""
        RECORDER.leave(n, ERROR)
        if STATE.enabled and self.shadow is not None and STATE.handler is not None:
            STATE.handler(self, (self.seq, self.seq), True)

    def poll(self) -> None:
        """Test the companions if the main thread is not at it (the watchdog thread)."""
        if self.pending and self.lock.acquire(blocking=False):
            try:
                bad = self._test()
            finally:
                self.lock.release()
            if bad is not None:
                self._report(bad)

    def describe_seq(self, seq: int):
        """(seq, step, op, count, dtype, root, reduction, site) of collective #seq, if still known."""
        d = self.history[seq % K]
        if d is None or d[0] != seq:
            return None
        seq, step, site, _ = d
        key, redop = site[5], site[7]
        r = redop.py2f() if redop is not None and redop is not _UNSET else -1
        return (seq, step, key[5], site[6], key[6], site[3], _REDOPS.get(r, "user") if r >= 0 else "", key[4])

    def hashes(self, lo: int, hi: int) -> dict:
        """{seq: fingerprint} of the calls lo..hi still in the history."""
        out = {}
        for d in list(self.history):
            if d is not None and lo <= d[0] <= hi:
                out[d[0]] = d[3]
        return out

    def last_desc(self):
        return self.describe_seq(self.seq)

    def _report(self, calls: tuple) -> None:
        handler = STATE.handler
        if handler is not None:
            handler(self, calls, False)  # ends the job (does not return), or returns when another rank reports
        else:
            local_abort(self, calls)

    def drain(self, timeout: float = 1.0) -> None:
        """Wait (bounded) for the companions still in flight: before the shadow is freed."""
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:
            self.poll()
            time.sleep(0.001)
        self.pending.clear()

    def release_shadow(self) -> None:
        if self.shadow is not None:
            self.drain()
            self.shadow.Free()
            self.shadow = None

    def Free(self) -> None:
        self.release_shadow()
        MPI.Intracomm.Free(self)

    # new communicators made from this one are plain ones (mpi4py would make them of this class)
    def Dup(self, info=None):
        return MPI.Intracomm(self).Dup(info)

    def Split(self, color=0, key=0):
        return MPI.Intracomm(self).Split(color, key)

    def Split_type(self, split_type, key=0, info=MPI.INFO_NULL):
        return MPI.Intracomm(self).Split_type(split_type, key, info)

    def Create(self, group):
        return MPI.Intracomm(self).Create(group)

    def Clone(self):
        return MPI.Intracomm(self).Clone()

    # -- point to point (recorded only) ----------------------------------------------------------------
    def Send(self, buf, dest, tag=0):
        n = self._p2p("Send", buf, dest, sys._getframe(1))
        MPI.Intracomm.Send(self, buf, dest, tag)
        RECORDER.leave(n)

    def Recv(self, buf, source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=None):
        n = self._p2p("Recv", buf, source, sys._getframe(1))
        MPI.Intracomm.Recv(self, buf, source, tag, status)
        RECORDER.leave(n)

    def Isend(self, buf, dest, tag=0):
        n = self._p2p("Isend", buf, dest, sys._getframe(1), POSTED)
        return MPI.Intracomm.Isend(self, buf, dest, tag)

    def Irecv(self, buf, source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG):
        self._p2p("Irecv", buf, source, sys._getframe(1), POSTED)
        return MPI.Intracomm.Irecv(self, buf, source, tag)

    def Sendrecv(self, sendbuf, dest, sendtag=0, recvbuf=None, source=MPI.ANY_SOURCE, recvtag=MPI.ANY_TAG,
                 status=None):
        n = self._p2p("Sendrecv", sendbuf, dest, sys._getframe(1))
        MPI.Intracomm.Sendrecv(self, sendbuf, dest, sendtag, recvbuf, source, recvtag, status)
        RECORDER.leave(n)


# -- the collectives ---------------------------------------------------------------------------------
# The hot path. Between two collectives the kernels have run and the CPU's caches hold their code and
# data: each Python operation here costs several times what a micro-benchmark shows, a Python call 1-3 us
# and code that only this path runs (struct packing, say: 3-5 us) is fetched again each time (measured
# on the digits step). So each collective is made from one template, its recording inlined: one lookup
# of its call site by the caller's bytecode offset in this communicator's own table (checked against the
# caller's code object, the buffer object, the operation and the root: the same objects as last time at
# this site, which the exchanges make sure of by reusing their buffer views), two counters, and integer
# stores into the ring (recorder.py), the site's static fields written once, when first seen.
_CALL_HEAD = """
def {name}(self, {params}*, _base=MPI.Intracomm.{name}, _op="{name}"):
    frame = _getframe(1)
    buf = {buf}
    site = self.sites.get(frame.f_lasti)
    if site is None or site[0] is not frame.f_code or site[1] is not buf or site[2] is not _op or site[3] != {root}:
        site = self._site(frame, _op, buf, {root})
"""
_START_HEAD = """
def start(self, k):
    \"\"\"Make prepared call k (prepare()) and return what MPI returns (a request for a non-blocking one).\"\"\"
    p = self.prepared[k]
    site = p[0]
    if site is None:   # its first call: the call site is this caller's
        site = p[0] = self._site(_getframe(1), p[3], p[4], -1)
"""
_BODY = """
    self.seq = seq = self.seq + 1
    RECORDER.n = n = RECORDER.n + 1
    w, o = RECORDER.words, RING + ((n & KMASK) << 3)
    w[o + 1] = _time_ns()
    w[o + 2] = seq
    w[o + 3] = STATE.step
    w[o + 4] = site[4]
    w[o + 6] = IN
    w[o] = n
    if STATE.enabled and self.shadow is not None:
        self._note(seq, STATE.step, site, {root}, {redop})
    try:
        out = {call}
    except BaseException:
        self._fail(n)
        raise
    if RECORDER.n - n < K:
        {leave}
    return out
"""
_DONE = "w = RECORDER.words; w[o + 5] = _time_ns(); w[o + 6] = DONE"
_POSTED = "RECORDER.words[o + 6] = POSTED"   # posting's time is not worth a clock read
_SEND = "recvbuf if sendbuf is IN_PLACE else sendbuf"   # the buffer described: the send buffer, or in place
_COLLECTIVES = (
    # name, parameters, the buffer described, root, reduction, MPI's arguments
    ("Barrier", "", "None", "-1", "None", ""),
    ("Allreduce", "sendbuf, recvbuf, op=SUM", _SEND, "-1", "op", "sendbuf, recvbuf, op"),
    ("Reduce", "sendbuf, recvbuf, op=SUM, root=0", _SEND, "root", "op", "sendbuf, recvbuf, op, root"),
    ("Reduce_scatter", "sendbuf, recvbuf, recvcounts=None, op=SUM", _SEND, "-1", "op",
     "sendbuf, recvbuf, recvcounts, op"),
    ("Reduce_scatter_block", "sendbuf, recvbuf, op=SUM", _SEND, "-1", "op", "sendbuf, recvbuf, op"),
    ("Allgather", "sendbuf, recvbuf", _SEND, "-1", "None", "sendbuf, recvbuf"),
    ("Allgatherv", "sendbuf, recvbuf", "recvbuf", "-1", "None", "sendbuf, recvbuf"),  # its total: the same everywhere
    ("Alltoall", "sendbuf, recvbuf", _SEND, "-1", "None", "sendbuf, recvbuf"),
    ("Bcast", "buf, root=0", "buf", "root", "None", "buf, root"),
    # pickled objects: the count is not compared (pickles differ in size)
    ("allreduce", "sendobj, op=SUM", "None", "-1", "op", "sendobj, op"),
    ("allgather", "sendobj", "None", "-1", "None", "sendobj"),
    ("bcast", "obj, root=0", "None", "root", "None", "obj, root"),
    ("gather", "sendobj, root=0", "None", "root", "None", "sendobj, root"),
)
_REDUCTIONS = ("Allreduce", "Iallreduce", "Reduce_scatter_block", "Ireduce_scatter_block")
_PREPARABLE = _REDUCTIONS + ("Allgather", "Iallgather", "Alltoall", "Ialltoall")
_NONBLOCKING = ("Allreduce", "Reduce_scatter", "Reduce_scatter_block", "Allgather", "Allgatherv", "Alltoall", "Bcast")


def _make_collectives() -> None:
    """Traced.Allreduce, .Iallreduce, ... and Traced.start from _CALL_HEAD / _START_HEAD and _BODY; the
    non-blocking ones (I...) leave the ring's slot "posted" (their Wait is not traced: a rank stuck in
    it shows the call posted)."""
    env = dict(MPI=MPI, SUM=MPI.SUM, IN_PLACE=IN_PLACE, RECORDER=RECORDER, STATE=STATE, K=K, KMASK=KMASK,
               RING=RING, _getframe=sys._getframe, _time_ns=time.time_ns, IN=IN, DONE=DONE, POSTED=POSTED)
    specs = list(_COLLECTIVES) + [("I" + c[0].lower(),) + c[1:] for c in _COLLECTIVES if c[0] in _NONBLOCKING]
    sources = [(name, _CALL_HEAD.format(name=name, params=params + ", " if params else "", buf=buf, root=root)
                + _BODY.format(root=root, redop=redop, call=f"_base(self{', ' + args if args else ''})",
                               leave=_POSTED if name[0] == "I" else _DONE))
               for name, params, buf, root, redop, args in specs]
    start_leave = "w = RECORDER.words; w[o + 5] = _time_ns() if p[6] == DONE else 0; w[o + 6] = p[6]"
    sources.append(("start", _START_HEAD + _BODY.format(root=-1, redop="p[5]", call="p[1](self, *p[2])",
                                                        leave=start_leave)))
    for name, src in sources:
        ns: dict = {}
        # named after this file's directory: the watchdog leaves these frames out of the stacks it shows
        exec(compile(src, os.path.join(os.path.dirname(os.path.abspath(__file__)), "<traced collectives>"), "exec"),
             dict(env), ns)
        ns[name].__qualname__ = f"Traced.{name}"
        setattr(Traced, name, ns[name])


_make_collectives()
_CALLS = [k for k, v in vars(Traced).items() if callable(v) and not k.startswith("_") and hasattr(MPI.Intracomm, k)
          and k not in ("Dup", "Split", "Split_type", "Create", "Clone", "Free", "poll", "drain")]


def _forwarder(name: str):
    base = getattr(MPI.Intracomm, name)

    def call(self, *args, **kwargs):
        return base(self, *args, **kwargs)
    return call


class _Direct(Traced):
    """bypass(True): the same object calling MPI directly."""
    __slots__ = ()


class _Empty(Traced):
    """bypass("empty"): the same object calling MPI through a Python method that does nothing else."""
    __slots__ = ()


def _start_direct(self, k):
    p = self.prepared[k]
    return p[1](self, *p[2])


for _k in _CALLS:
    setattr(_Direct, _k, getattr(MPI.Intracomm, _k))
    setattr(_Empty, _k, _forwarder(_k))
_Direct.start = _Empty.start = _start_direct   # a prepared call: MPI through this one Python call
_ALL: list = []   # weakrefs to every Traced communicator made (bypass switches them; unhashable: no WeakSet)


def bypass(on) -> None:
    """For `hpcopt bench dp` only: every Traced communicator calls MPI directly (on=True; nothing
    recorded, no fingerprints), through a Python method that only calls MPI (on="empty": the least any
    recorder written in Python costs), or through its recording methods again (on=False). Measures the
    cost of tracing on the very same objects (a second strategy would sit elsewhere in memory). The
    objects' class is switched, none is modified: modifying a class would cost every later attribute
    access on its objects its specialisation (CPython 3.11 keys them by the class's version), a cost
    no real run pays."""
    cls = _Empty if on == "empty" else _Direct if on else Traced
    alive = []
    for ref in _ALL:
        c = ref()
        if c is not None:
            c.__class__ = cls
            alive.append(ref)
    _ALL[:] = alive


def traced() -> list[Traced]:
    """The live Traced communicators that post companions."""
    out, alive = [], []
    for ref in _REGISTRY:
        c = ref()
        if c is not None and c.shadow is not None:
            out.append(c)
            alive.append(ref)
    _REGISTRY[:] = alive
    return out


def poll_all() -> None:
    """The watchdog thread: test every communicator's companions (a main thread stuck in a collective
    that a mismatch made hang does not test them itself)."""
    for c in traced():
        c.poll()


def post_digests() -> None:
    """Every traced communicator's companion of its calls since the last one (the Trainer's agreement:
    every rank at the same point). Nothing when fingerprints are off."""
    if STATE.enabled:
        for c in traced():
            c.post_digest()


def local_abort(comm: Traced, calls: tuple) -> None:
    """A mismatch with no watchdog to ask the other ranks: what this rank knows, then exit 77."""
    me = MPI.COMM_WORLD.Get_rank()
    lo, hi = calls
    print(f"hpcopt: collective mismatch on {comm.label} (calls #{lo}-#{hi}): world rank {me} called "
          f"{format_desc(comm.describe_seq(hi))} last; another rank of the communicator made different "
          f"calls (their fingerprints differ)", file=sys.stderr, flush=True)
    MPI.COMM_WORLD.Abort(EXIT_MISMATCH)
