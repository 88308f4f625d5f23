"""The flight recorder: the last K (64) MPI calls of this rank, and the crash files made from them.

Every call on a traced communicator (fingerprint.Traced) writes one slot of a ring, eight int64 words:

    n (event number), t0 (time.time_ns() at entry), the call's number on its communicator, the training
    step, the index of its call site's STATIC entry, t1 (time.time_ns() on leaving a blocking call; a
    non-blocking one's posting is not timed) and the state (in, done, posted, error)

where a static entry (count, bytes, ids of the operation, communicator, datatype and call site, root or
peer: the same for every call of a call site) is written once, when the site is first seen, into a
table after the ring (the strings are in a third table). A call is a few integer stores into a
memoryview of the ring: no struct packing, no string formatting. (Measured on the digits step:
struct.pack_into of the whole slot cost 3-5 us a call there, ten times its cost in a tight loop, as
code that nothing else in the step runs is not in the CPU's caches; integer stores into a memoryview
are half that.) A reader on another thread may see one slot half written (the stores are not one
operation under the GIL); the watchdog reads the ring when the main thread is stuck, not mid-call.
The ring lives in an mmap: anonymous at first, and during training (attach) a file in /dev/shm, so that what a
rank did last is readable even after the process is gone:

  * a Python exception that ends the job (comm.abort_on_exception) writes <run dir>/hpcopt-crash-<rank>.txt
    at once: the traceback and the ring's calls, oldest first;
  * a fatal signal (SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT) cannot run Python code: faulthandler,
    enabled on the ring file (opened for appending), writes every thread's Python stack behind the ring,
    and a small sentinel process (one per rank, started once, in a session of its own so that mpirun's
    kill does not reach it) that holds the other end of a pipe to the rank sees the pipe close, finds
    the stacks there and writes hpcopt-crash-<rank>.txt from the ring and the stacks. A rank that exits
    or is killed without a fatal signal leaves nothing: the sentinel deletes the ring file. After a
    SIGSEGV the crash file has the calls and the Python stacks; it has no local variables, no C stack and
    nothing that happened inside the call that crashed.

No numpy, no MPI here: the sentinel imports this module alone (python -I -S).
"""
from __future__ import annotations

import mmap
import os
import socket
import struct
import sys
import threading
import time
import traceback

K = 64                       # calls kept (a power of two)
KMASK = K - 1
SLOT = struct.Struct("<8q")  # n, t0 ns, cseq, step, static index, t1 ns, state, pad: slot n at word RING + 8 (n % K)
STATIC = struct.Struct("<8q")  # count, nbytes, op, comm, dtype, site, peer, pad
STATICS = 1024               # static entries (call site x communicator x buffer); the last one is reused
HEADER = 512                 # magic, layout, then a line of text (rank, host, pid, run directory)
RING = HEADER >> 3           # the ring's first int64 word (Recorder.words)
TABLE = 64 * 1024            # the strings: op, communicator, datatype, call site names
MAGIC = b"HPCOPT-RING-3\n"
LAYOUT = struct.Struct("<iiiiiq")  # K, slot size, statics offset, table offset, table bytes used, pid
LAYOUT_OFF = 16
INFO_OFF = 64
IN, DONE, POSTED, ERROR = 0, 1, 2, 3
STATES = ("in", "done", "posted", "error")
CRASH_NAME = "hpcopt-crash-{rank}.txt"
P2P = frozenset(("Send", "Recv", "Isend", "Irecv", "Sendrecv", "send", "recv", "isend", "irecv"))
SHM = "/dev/shm"
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo / site dir


def human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 2**20:
        return f"{n / 1024:.1f} kB"
    if n < 2**30:
        return f"{n / 2**20:.1f} MB"
    return f"{n / 2**30:.2f} GB"


def short_path(filename: str) -> str:
    """hpcopt/parallel/compress.py for a file of this checkout, else the last two path components."""
    if filename.startswith(_ROOT + os.sep):
        return filename[len(_ROOT) + 1:]
    parts = filename.replace("\\", "/").rsplit("/", 2)
    return "/".join(parts[-2:])


class Recorder:
    def __init__(self, slots: int = K):
        assert slots & (slots - 1) == 0, "the ring's length is a power of two"
        self.K = slots
        self.mask = slots - 1
        self.statics_off = HEADER + slots * SLOT.size
        self.table_off = self.statics_off + STATICS * STATIC.size
        self.size = self.table_off + TABLE
        self.mm = mmap.mmap(-1, self.size)
        self.words = memoryview(self.mm).cast("q")  # the ring's slot k is words[RING + 8k ...]
        self.mm[:len(MAGIC)] = MAGIC
        self.n = 0
        self.ids: dict[str, int] = {}
        self.names: list[str] = []
        self.table_used = 0
        self.statics: dict[tuple, int] = {}
        self._write_layout()
        self.path: str | None = None          # the ring file, once attached
        self.fault_file = None                # the ring file opened for appending: faulthandler's output
        self.sentinel = None
        self.crash_path: str | None = None    # <run dir>/hpcopt-crash-<rank>.txt of the current (or last) run
        self.rank = 0
        self.attached = 0                     # attach() calls not yet undone by detach()
        self._faulthandler_was = False
        self._lock = threading.Lock()         # intern() and static() from two threads

    # -- the hot path ------------------------------------------------------------------------------
    def intern(self, s: str) -> int:
        i = self.ids.get(s)
        if i is not None:
            return i
        with self._lock:
            i = self.ids.get(s)
            if i is not None:
                return i
            raw = s.encode("utf-8", "replace")[:400]
            rec = struct.pack("<H", len(raw)) + raw
            if self.table_used + len(rec) > TABLE:
                return -1
            off = self.table_off + self.table_used
            self.mm[off:off + len(rec)] = rec
            self.table_used += len(rec)
            self.names.append(s)
            i = len(self.names) - 1
            self.ids[s] = i
            self._write_layout()
            return i

    def static(self, count: int, nbytes: int, op: int, comm: int, dtype: int, site: int, peer: int) -> int:
        """The index of the static entry with these fields (written when first seen). When the table is
        full, the last entry is rewritten for each new one (its older calls then show the newest's)."""
        key = (count, nbytes, op, comm, dtype, site, peer)
        i = self.statics.get(key)
        if i is not None:
            return i
        with self._lock:
            i = self.statics.get(key)
            if i is None:
                i = len(self.statics)
                if i < STATICS - 1:
                    self.statics[key] = i
                else:
                    i = STATICS - 1
            STATIC.pack_into(self.mm, self.statics_off + i * STATIC.size, *key, 0)
            return i

    def enter(self, op: int, comm: int, cseq: int, count: int, nbytes: int, dtype: int, site: int, peer: int,
              step: int, state: int = IN) -> int:
        """A call begins (or, state=POSTED, a non-blocking one was posted). Returns its event number.
        (fingerprint.Traced writes its collectives' slots itself, the same way, its static index kept.)"""
        return self.enter_static(self.static(count, nbytes, op, comm, dtype, site, peer), cseq, step, state)

    def enter_static(self, static: int, cseq: int, step: int, state: int = IN, _time=time.time_ns) -> int:
        self.n = n = self.n + 1
        w, o = self.words, RING + ((n & self.mask) << 3)
        w[o + 1] = _time()
        w[o + 2] = cseq
        w[o + 3] = step
        w[o + 4] = static
        w[o + 6] = state
        w[o] = n
        return n

    def leave(self, n: int, state: int = DONE, _time=time.time_ns) -> None:
        if self.n - n < self.K:  # its slot was not reused meanwhile
            w, o = self.words, RING + ((n & self.mask) << 3)
            w[o + 5] = _time()
            w[o + 6] = state

    # -- reading ------------------------------------------------------------------------------------
    def _write_layout(self) -> None:
        LAYOUT.pack_into(self.mm, LAYOUT_OFF, self.K, SLOT.size, self.statics_off, self.table_off, self.table_used,
                         os.getpid())

    def set_info(self, text: str) -> None:
        raw = text.encode("utf-8", "replace")[:HEADER - INFO_OFF - 1]
        self.mm[INFO_OFF:HEADER] = raw + b"\0" * (HEADER - INFO_OFF - len(raw))

    def entries(self) -> list[dict]:
        """The recorded calls, oldest first (a snapshot; safe from any thread)."""
        return decode(bytes(self.mm[:self.size]))[1]

    # -- during training: a file-backed ring, faulthandler and the sentinel ----------------------------
    def attach(self, out_dir: str, rank: int, host: str | None = None) -> None:
        """From now on a crash of this process leaves <out_dir>/hpcopt-crash-<rank>.txt."""
        import faulthandler

        self.rank = rank
        self.crash_path = os.path.join(out_dir, CRASH_NAME.format(rank=rank))
        self.set_info(f"rank {rank} host {host or socket.gethostname()} pid {os.getpid()} run {out_dir}")
        if self.path is None:
            self._to_file()
        if self.fault_file is not None and not self.attached:
            self._faulthandler_was = faulthandler.is_enabled()
            faulthandler.enable(file=self.fault_file, all_threads=True)
        self._tell(f"watch\t{self.crash_path}\t{rank}")
        self.attached += 1

    def detach(self) -> None:
        """Training is over: a fatal signal from here on is no longer written to a crash file. The crash
        path is kept for write_crash (an exception that ends the job after the Trainer let go)."""
        if not self.attached:
            return
        self.attached -= 1
        if self.attached:  # another Trainer of this process still runs (population-based training)
            return
        import faulthandler

        if self.fault_file is not None:
            if self._faulthandler_was:
                faulthandler.enable(file=sys.stderr, all_threads=True)
            else:
                faulthandler.disable()
        self._tell("forget")

    def _to_file(self) -> None:
        """Move the ring into a file (tmpfs when there is one) and start the sentinel that watches it."""
        base = SHM if os.path.isdir(SHM) and os.access(SHM, os.W_OK) else None
        if base is None:
            import tempfile

            base = tempfile.gettempdir()
        path = os.path.join(base, f"hpcopt-ring-{os.getpid()}-{os.urandom(4).hex()}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:
            return  # no file: the ring stays anonymous (an exception still writes its crash file)
        try:
            os.ftruncate(fd, self.size)
            mm = mmap.mmap(fd, self.size)
        finally:
            os.close(fd)
        mm[:] = self.mm[:]
        self.mm, self.words, self.path = mm, memoryview(mm).cast("q"), path
        self.fault_file = open(path, "ab")  # O_APPEND: faulthandler writes behind the ring
        self.sentinel = _spawn_sentinel(path)
        if self.sentinel is None:  # no helper: nothing would delete the file at exit
            import atexit

            atexit.register(_remove, path)

    def _tell(self, line: str) -> None:
        p = self.sentinel
        if p is None or p.stdin is None:
            return
        try:
            p.stdin.write((line + "\n").encode())
            p.stdin.flush()
        except (OSError, ValueError):
            self.sentinel = None

    # -- crash files ----------------------------------------------------------------------------------
    def write_crash(self, exc: BaseException | None = None) -> str | None:
        """<run dir>/hpcopt-crash-<rank>.txt for an exception that ends the job (None: no run directory
        known, or it cannot be written). Its path."""
        if self.crash_path is None:
            return None
        head, _ = _info(bytes(self.mm[:HEADER]))
        if exc is not None:
            cause = f"unhandled exception {type(exc).__name__}: {exc}"
            tail = "".join(traceback.format_exception(exc))
        else:
            cause, tail = "ended on request", ""
        text = crash_text(head, cause, self.entries(), time.time(), tail)
        return _write_file(self.crash_path, text)


def _spawn_sentinel(ring_path: str):
    import subprocess

    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from hpcopt.diagnosis.recorder import sentinel_main; sentinel_main(sys.argv[2])")
    try:
        return subprocess.Popen([sys.executable, "-I", "-S", "-c", code, _ROOT, ring_path], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                close_fds=True)
    except OSError:
        return None


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _write_file(path: str, text: str) -> str | None:
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
        return path
    except OSError:
        _remove(tmp)
        return None


# -- decoding (in the rank, in the sentinel, in the tests) ---------------------------------------------
def _info(buf: bytes) -> tuple[str, int]:
    pid = LAYOUT.unpack_from(buf, LAYOUT_OFF)[5] if len(buf) >= LAYOUT_OFF + LAYOUT.size else 0
    return buf[INFO_OFF:HEADER].split(b"\0", 1)[0].decode("utf-8", "replace"), pid


def decode(buf: bytes) -> tuple[str, list[dict]]:
    """(the header's text, the recorded calls oldest first) of a ring's bytes."""
    if not buf.startswith(MAGIC):
        return "", []
    k, slot, statics_off, table_off, used, _ = LAYOUT.unpack_from(buf, LAYOUT_OFF)
    names, off, end = [], table_off, table_off + used
    while off + 2 <= end:
        (n,) = struct.unpack_from("<H", buf, off)
        names.append(buf[off + 2:off + 2 + n].decode("utf-8", "replace"))
        off += 2 + n

    def name(i: int) -> str:
        return names[i] if 0 <= i < len(names) else "?"

    out = []
    for i in range(k):
        n, t0, cseq, step, static, t1, state, _ = SLOT.unpack_from(buf, HEADER + i * slot)
        if not n:
            continue
        count = nbytes = 0
        op = comm = dtype = site = peer = -1
        if 0 <= static < (table_off - statics_off) // STATIC.size:
            count, nbytes, op, comm, dtype, site, peer, _ = STATIC.unpack_from(buf, statics_off + static * STATIC.size)
        out.append(dict(n=n, t0=t0 / 1e9, t1=t1 / 1e9 if state in (DONE, ERROR) else 0.0, count=count, nbytes=nbytes,
                        cseq=cseq, step=step, op=name(op), comm=name(comm), dtype=name(dtype), site=name(site),
                        peer=peer, state=STATES[state] if 0 <= state < len(STATES) else "?"))
    out.sort(key=lambda e: e["n"])
    return _info(buf)[0], out


def describe_call(e: dict) -> str:
    """Allreduce(dp, 7.1 MB); bcast(world); Send(pp, 1.0 MB, peer 2)."""
    parts = [e["comm"]]
    if e["nbytes"]:
        parts.append(human_bytes(e["nbytes"]))
    if e["peer"] >= 0:
        parts.append(f"{'peer' if e['op'] in P2P else 'root'} {e['peer']}")
    return f"{e['op']}({', '.join(parts)})"


def format_entries(entries: list[dict], now: float, indent: str = "  ") -> list[str]:
    """One line per call, oldest first."""
    lines = [f"{indent}{'event':>7} {'state':6} {'started':>10} {'took':>9}  {'step':>7}  {'call#':>8}  call, site"]
    for e in entries:
        took = f"{e['t1'] - e['t0']:.4f}s" if e["t1"] else "-"
        what = describe_call(e)
        if e["count"] and e["dtype"] not in ("", "?"):
            what += f" [{e['count']} x {e['dtype']}]"
        lines.append(f"{indent}{e['n']:>7} {e['state']:6} {now - e['t0']:>9.3f}s {took:>9}  {e['step']:>7}  "
                     f"{e['comm'] + ('#' + str(e['cseq']) if e['cseq'] else ''):>8}  {what} at {e['site']}")
    return lines


def crash_text(head: str, cause: str, entries: list[dict], now: float, tail: str) -> str:
    lines = [f"hpcopt crash report: {head or 'pid ' + str(os.getpid())}",
             f"time: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now))}",
             f"cause: {cause}", "",
             f"last {len(entries)} MPI calls of this rank (oldest first; started = seconds before this report):"]
    lines += format_entries(entries, now) if entries else ["  (none recorded)"]
    lines += ["", tail.rstrip(), ""]
    return "\n".join(lines)


def sentinel_main(ring_path: str) -> None:
    """The crash sentinel (a process of its own): follows the rank's orders on stdin (`watch CRASH RANK`,
    `forget`) until the pipe closes, i.e. the rank is gone. Then: faulthandler's output behind the ring
    (a fatal signal) -> the crash file; either way the ring file is removed."""
    watching = None
    try:
        for line in sys.stdin.buffer:
            parts = line.decode("utf-8", "replace").rstrip("\n").split("\t")
            if parts[0] == "watch" and len(parts) >= 2:
                watching = parts[1]
            elif parts[0] == "forget":
                watching = None
    except (OSError, KeyboardInterrupt):
        pass
    try:
        with open(ring_path, "rb") as f:
            buf = f.read()
    except OSError:
        return
    try:
        if watching and buf.startswith(MAGIC):
            k, slot, statics_off, table_off, _, _ = LAYOUT.unpack_from(buf, LAYOUT_OFF)
            size = table_off + TABLE
            fault = buf[size:].decode("utf-8", "replace").strip()
            if fault:
                head, entries = decode(buf[:size])
                now = time.time()
                text = crash_text(head, "fatal signal: the process was killed by the signal named below "
                                  "(faulthandler's stacks of its threads; written by hpcopt's crash sentinel "
                                  "after the process died)", entries, now, fault)
                _write_file(watching, text)
    finally:
        _remove(ring_path)


RECORDER = Recorder()
