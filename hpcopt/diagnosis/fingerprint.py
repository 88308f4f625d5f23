"""Traced communicators: every MPI call on a Grid's communicators is recorded (recorder.py), and every
collective carries a fingerprint that the ranks of its communicator compare (run.check_collectives).

`Traced(comm, label)` is an `MPI.Intracomm` on the same handle as comm (still an MPI.Comm: h5py's mpio
driver, MPI.Win and mpi4py's own calls take it) whose methods that hpcopt calls (the collectives, their
non-blocking forms, and the point-to-point calls of the pipeline) first record the call, then call
MPI. comm.make_grid wraps the grid's world, dp, pp and tp communicators.

The fingerprint of a collective: hash(its number on the communicator, the training step, operation,
element count, datatype, root, reduction, call site file:line). Before the real collective, the rank
posts a NON-blocking companion: an Iallreduce of [fp, -fp] with MAX on a duplicate of the communicator
(the "shadow"). Completed, it holds [max fp, -min fp]: equal fingerprints on every rank iff
max == min. Nothing waits for it: it is tested after the real call, at the next call on the
communicator, and by the watchdog thread while the main thread is stuck in a collective that the
mismatch made hang. The companion cannot hang: it is posted before the real collective on every rank
that gets there. A mismatch ends the job with both call sites (the watchdog asks the other ranks what
they called, exit 77). Point-to-point calls are recorded, not fingerprinted (a pair is not a
communicator-wide agreement).
"""
from __future__ import annotations

import sys
import threading
import time
import weakref
import zlib
from collections import deque

import numpy as np
from mpi4py import MPI

from . import EXIT_MISMATCH
from .recorder import DONE, ENTER, ERROR, HEADER, IN, K, LEAVE, LEAVE_OFF, POSTED, RECORDER, SLOT, STATIC, short_path

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
_PACK_ENTER, _PACK_LEAVE, _PACK_STATIC, _SIZE = ENTER.pack_into, LEAVE.pack_into, STATIC.pack, SLOT.size
_TYPES: dict = {}     # MPI datatype handle -> (name, size)
_DTYPES: dict = {}    # numpy dtype -> its name (dtype.name takes ~5 us in numpy 2)
_REGISTRY: list = []  # weakrefs to the Traced communicators that post companions (the watchdog polls them)
_REDOPS = {op.py2f(): name for op, name in ((MPI.SUM, "sum"), (MPI.MAX, "max"), (MPI.MIN, "min"),
                                              (MPI.PROD, "prod"), (MPI.LAND, "land"), (MPI.LOR, "lor"),
                                              (MPI.BAND, "band"), (MPI.BOR, "bor"), (MPI.MAXLOC, "maxloc"),
                                              (MPI.MINLOC, "minloc"), (MPI.REPLACE, "replace"))}
_intern = RECORDER.intern


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
    {(root, reduction): hash}, op, dtype name, the code object (kept, so that its id stays its own))."""
    code = frame.f_code
    site = f"{short_path(code.co_filename)}:{frame.f_lineno}"
    name = d if isinstance(d, str) else ("object" if d is None else buf.dtype.name)
    k = (_intern(op), _intern(name), _intern(site), zlib.crc32(f"{op} {name} {site}".encode()), site, {}, op, name,
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
        self.pending: deque = deque()  # (request, slot, seq) of companions not yet seen complete
        self.history: list = [None] * K   # slot -> (seq, step, op, count, dtype, root, reduction, site)
        self.lock = threading.Lock()   # pending + fp, between the main thread and the watchdog's
        self.bad: int | None = None    # the number of the first collective found mismatched
        if self.shadow is not None:
            _REGISTRY.append(weakref.ref(self))
        return self

    # -- recording and the companion ----------------------------------------------------------------
    # The hot path. Between two collectives the kernels have run and the interpreter's caches are cold:
    # each Python operation here costs several times what a micro-benchmark shows (measured: 1-5 us a
    # step for each of them on the digits step), so a call is: one lookup of its call site by the
    # caller's bytecode offset in this communicator's own table (checked against the caller's code
    # object, the buffer object, the operation and the root: the same objects as last time at this
    # site, which the exchanges make sure of by reusing their buffer views), two counters, and one
    # struct.pack_into of the event number, the clock, the call and step numbers and the site's block
    # of static fields (packed once, when the site is first seen).
    def _enter(self, op: str, buf, root: int, redop, frame, state: int = IN, _time=time.time) -> int:
        site = self.sites.get(frame.f_lasti)
        if site is None or site[0] is not frame.f_code or site[1] is not buf or site[2] is not op or site[3] != root:
            site = self._site(frame, op, buf, root)
        self.seq = seq = self.seq + 1
        rec = RECORDER
        rec.n = n = rec.n + 1
        st = STATE
        _PACK_ENTER(rec.mm, HEADER + (n % K) * _SIZE, n, _time(), seq, st.step, site[4], 0.0, state)
        if self.shadow is not None and st.enabled:
            self._post(seq, st.step, site[5], site[6], root, redop)
        return n

    def _site(self, frame, op: str, buf, root: int) -> tuple:
        """(code, buffer, operation, root, the ring's static block, _KEYS's entry, count) of a call site
        seen for the first time (or with another buffer object: described again)."""
        if type(buf) is np.ndarray:
            count, nbytes, d = buf.size, buf.nbytes, buf.dtype.num
        elif buf is None:
            count, nbytes, d = 0, 0, None
        else:
            count, d, nbytes = describe(buf)
        k = _KEYS.get((id(frame.f_code), frame.f_lineno, op, d))
        if k is None:
            k = _new_key(frame, op, d, buf)
        site = (frame.f_code, buf, op, root, _PACK_STATIC(count, nbytes, k[0], self.label_id, k[1], k[2], root, 0),
                k, count)
        if len(self.sites) < 4096:   # a bound: call sites of generated code must not grow it forever
            self.sites[frame.f_lasti] = site
        return site

    def _p2p(self, op: str, buf, peer: int, frame, state: int = IN) -> int:
        count, dtype, nbytes = describe(buf) if buf is not None else (0, "object", 0)
        return RECORDER.enter(_intern(op), self.label_id, 0, count, nbytes, _intern(dtype), _site(frame)[0], peer,
                              STATE.step, state)

    def _post(self, seq: int, step: int, key: tuple, count: int, root: int, redop) -> None:
        """Post the companion of collective #seq (key: _KEYS's entry of its site, operation, datatype)."""
        bad = None
        with self.lock:
            if self.pending:
                bad = self._test()
            if len(self.pending) < K:  # else the others are K collectives behind: unchecked (a stall)
                r = redop.py2f() if redop is not None else -1
                base = key[5].get((root, r))
                if base is None:
                    base = key[5][(root, r)] = zlib.crc32(repr((root, _REDOPS.get(r, r))).encode(), key[3])
                h = (base * 0x9E3779B97F4A7C15 + count * 0xC2B2AE3D27D4EB4F + seq * 0x165667B19E3779F9
                     + step * 0x27D4EB2F165667C5) & MASK
                slot = seq % K
                b = self.rows[slot]
                b[0] = h
                b[1] = -h
                self.history[slot] = (seq, step, key, count, root, r)
                self.pending.append((self.shadow.Iallreduce(IN_PLACE, b, op=MPI.MAX), slot, seq))
        if bad is not None:
            self._report(bad)

    def _test(self) -> int | None:
        """Test the companions in order (lock held); the number of a mismatched collective, or None."""
        pending = self.pending
        while pending:
            req, k, seq = pending[0]
            if not req.Test():
                return None
            pending.popleft()
            a, b = self.rows[k].tolist()
            if a + b != 0:
                if self.bad is None:
                    self.bad = seq
                return seq
        return None

    def _leave(self, n: int, state: int = DONE, _time=time.time) -> None:
        rec = RECORDER
        if rec.n - n < rec.K:
            _PACK_LEAVE(rec.mm, HEADER + LEAVE_OFF + (n % rec.K) * _SIZE, _time(), state)
        if self.pending:
            with self.lock:
                bad = self._test()
            if bad is not None:
                self._report(bad)

    def _fail(self, n: int) -> None:
        """The MPI call raised: a mismatch (different counts, say) is the likelier cause; say that instead."""
        RECORDER.leave(n, ERROR)
        deadline = time.monotonic() + 2.0
        while self.pending and time.monotonic() < deadline:
            with self.lock:
                bad = self._test()
            if bad is not None:
                self._report(bad)
            time.sleep(0.001)

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
        seq, step, key, count, root, r = d
        return (seq, step, key[6], count, key[7], root, _REDOPS.get(r, "user") if r >= 0 else "", key[4])

    def last_desc(self):
        return self.describe_seq(self.seq)

    def _report(self, seq: int) -> None:
        handler = STATE.handler
        if handler is not None:
            handler(self, seq)  # ends the job (does not return), or returns when another rank reports
        else:
            local_abort(self, seq)

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

    # -- collectives ---------------------------------------------------------------------------------
    def Barrier(self):
        n = self._enter("Barrier", None, -1, None, sys._getframe(1))
        try:
            MPI.Intracomm.Barrier(self)
        except BaseException:
            self._fail(n)
            raise
        self._leave(n)

    def Allreduce(self, sendbuf, recvbuf, op=MPI.SUM):
        n = self._enter("Allreduce", recvbuf if sendbuf is IN_PLACE else sendbuf, -1, op, sys._getframe(1))
        try:
            MPI.Intracomm.Allreduce(self, sendbuf, recvbuf, op)
        except BaseException:
            self._fail(n)
            raise
        self._leave(n)

    def Iallreduce(self, sendbuf, recvbuf, op=MPI.SUM):
        n = self._enter("Iallreduce", recvbuf if sendbuf is IN_PLACE else sendbuf, -1, op, sys._getframe(1))
        try:
            req = MPI.Intracomm.Iallreduce(self, sendbuf, recvbuf, op)
        except BaseException:
            self._fail(n)
            raise
        self._leave(n, POSTED)
        return req

    def Reduce(self, sendbuf, recvbuf, op=MPI.SUM, root=0):
        n = self._enter("Reduce", recvbuf if sendbuf is IN_PLACE else sendbuf, root, op, sys._getframe(1))
        try:
            MPI.Intracomm.Reduce(self, sendbuf, recvbuf, op, root)
        except BaseException:
            self._fail(n)
            raise
        self._leave(n)

    def Reduce_scatter(self, sendbuf, recvbuf, recvcounts=None, op=MPI.SUM):
        n = self._enter("Reduce_scatter", recvbuf if sendbuf is IN_PLACE else sendbuf, -1, op, sys._getframe(1))
        try:
            MPI.Intracomm.Reduce_scatter(self, sendbuf, recvbuf, recvcounts, op)
        except BaseException:
            self._fail(n)
            raise
        self._leave(n)

    def Ireduce_scatter(self, sendbuf, recvbuf, recvcounts=None, op=MPI.SUM):
        n = self._enter("Ireduce_scatter", recvbuf if sendbuf is IN_PLACE else sendbuf, -1, op, sys._getframe(1))
        try:
            req = MPI.Intracomm.Ireduce_scatter(self, sendbuf, recvbuf, recvcounts, op)
        except BaseException:
            self._fail(n)
            raise
        self._leave(n, POSTED)
        return req

    def Reduce_scatter_block(self, sendbuf, recvbuf, op=MPI.SUM):
        n = self._enter("Reduce_scatter_block", recvbuf if sendbuf is IN_PLACE else sendbuf, -1, op,
                        sys._getframe(1))
        try:
            MPI.Intracomm.Reduce_scatter_block(self, sendbuf, recvbuf, op)
        except BaseException:
            self._fail(n)
            raise
        self._leave(n)

    def Ireduce_scatter_block(self, sendbuf, recvbuf, op=MPI.SUM):
        n = self._enter("Ireduce_scatter_block", recvbuf if sendbuf is IN_PLACE else sendbuf, -1, op,
                        sys._getframe(1))
        try:
            req = MPI.Intracomm.Ireduce_scatter_block(self, sendbuf, recvbuf, op)
        except BaseException:
            self._fail(n)
            raise
        self._leave(n, POSTED)
        return req

    def Allgather(self, sendbuf, recvbuf):
        n = self._enter("Allgather", recvbuf if sendbuf is IN_PLACE else sendbuf, -1, None, sys._getframe(1))
        try:
            MPI.Intracomm.Allgather(self, sendbuf, recvbuf)
        except BaseException:
            self._fail(n)
            raise
        self._leave(n)

    def Iallgather(self, sendbuf, recvbuf):
        n = self._enter("Iallgather", recvbuf if sendbuf is IN_PLACE else sendbuf, -1, None, sys._getframe(1))
        try:
            req = MPI.Intracomm.Iallgather(self, sendbuf, recvbuf)
        except BaseException:
            self._fail(n)
            raise
        self._leave(n, POSTED)
        return req

    def Allgatherv(self, sendbuf, recvbuf):
        n = self._enter("Allgatherv", recvbuf, -1, None, sys._getframe(1))  # the total is the same everywhere
        try:
            MPI.Intracomm.Allgatherv(self, sendbuf, recvbuf)
        except BaseException:
            self._fail(n)
            raise
        self._leave(n)

    def Iallgatherv(self, sendbuf, recvbuf):
        n = self._enter("Iallgatherv", recvbuf, -1, None, sys._getframe(1))
        try:
            req = MPI.Intracomm.Iallgatherv(self, sendbuf, recvbuf)
        except BaseException:
            self._fail(n)
            raise
        self._leave(n, POSTED)
        return req

    def Alltoall(self, sendbuf, recvbuf):
        n = self._enter("Alltoall", recvbuf if sendbuf is IN_PLACE else sendbuf, -1, None, sys._getframe(1))
        try:
            MPI.Intracomm.Alltoall(self, sendbuf, recvbuf)
        except BaseException:
            self._fail(n)
            raise
        self._leave(n)

    def Ialltoall(self, sendbuf, recvbuf):
        n = self._enter("Ialltoall", recvbuf if sendbuf is IN_PLACE else sendbuf, -1, None, sys._getframe(1))
        try:
            req = MPI.Intracomm.Ialltoall(self, sendbuf, recvbuf)
        except BaseException:
            self._fail(n)
            raise
        self._leave(n, POSTED)
        return req

    def Bcast(self, buf, root=0):
        n = self._enter("Bcast", buf, root, None, sys._getframe(1))
        try:
            MPI.Intracomm.Bcast(self, buf, root)
        except BaseException:
            self._fail(n)
            raise
        self._leave(n)

    def Ibcast(self, buf, root=0):
        n = self._enter("Ibcast", buf, root, None, sys._getframe(1))
        try:
            req = MPI.Intracomm.Ibcast(self, buf, root)
        except BaseException:
            self._fail(n)
            raise
        self._leave(n, POSTED)
        return req

    # pickled objects: the count is not compared (pickles differ in size)
    def allreduce(self, sendobj, op=MPI.SUM):
        n = self._enter("allreduce", None, -1, op, sys._getframe(1))
        try:
            out = MPI.Intracomm.allreduce(self, sendobj, op)
        except BaseException:
            self._fail(n)
            raise
        self._leave(n)
        return out

    def allgather(self, sendobj):
        n = self._enter("allgather", None, -1, None, sys._getframe(1))
        try:
            out = MPI.Intracomm.allgather(self, sendobj)
        except BaseException:
            self._fail(n)
            raise
        self._leave(n)
        return out

    def bcast(self, obj, root=0):
        n = self._enter("bcast", None, root, None, sys._getframe(1))
        try:
            out = MPI.Intracomm.bcast(self, obj, root)
        except BaseException:
            self._fail(n)
            raise
        self._leave(n)
        return out

    def gather(self, sendobj, root=0):
        n = self._enter("gather", None, root, None, sys._getframe(1))
        try:
            out = MPI.Intracomm.gather(self, sendobj, root)
        except BaseException:
            self._fail(n)
            raise
        self._leave(n)
        return out

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


_CALLS = [k for k, v in vars(Traced).items() if callable(v) and not k.startswith("_") and hasattr(MPI.Intracomm, k)
          and k not in ("Dup", "Split", "Split_type", "Create", "Clone", "Free", "poll", "drain")]
_OWN = {k: vars(Traced)[k] for k in _CALLS}


def _forwarder(name: str):
    base = getattr(MPI.Intracomm, name)

    def call(self, *args, **kwargs):
        return base(self, *args, **kwargs)
    return call


_EMPTY = {k: _forwarder(k) for k in _CALLS}


def bypass(on) -> None:
    """For `hpcopt bench dp` only: every Traced communicator calls MPI directly (on=True; nothing
    recorded, no fingerprints), through a Python method that only calls MPI (on="empty": the least any
    recorder written in Python costs), or through its recording methods again (on=False). Measures the
    cost of tracing on the very same objects (a second strategy would sit elsewhere in memory)."""
    for k in _CALLS:
        setattr(Traced, k, _EMPTY[k] if on == "empty" else getattr(MPI.Intracomm, k) if on else _OWN[k])


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


def local_abort(comm: Traced, seq: int) -> None:
    """A mismatch with no watchdog to ask the other ranks: what this rank knows, then exit 77."""
    me = MPI.COMM_WORLD.Get_rank()
    print(f"hpcopt: collective mismatch on {comm.label} (call #{seq}): world rank {me} called "
          f"{format_desc(comm.describe_seq(seq))}; another rank of the communicator called a different "
          f"collective (their fingerprints differ)", file=sys.stderr, flush=True)
    MPI.COMM_WORLD.Abort(EXIT_MISMATCH)
