"""The run directory: one run at a time (a lock), nothing of anybody else's overwritten, files written
through unpredictable temporary names. Rank 0 does all of it; nothing here communicates.

The lock is a file `RUN/.lock`, created with O_CREAT | O_EXCL (atomic on local disks and on NFS v3+ and
Lustre, where flock may not work), holding who took it: host, pid, the process's start time, the Slurm
job id and restart count, the time. A second run on the directory is refused with one line naming the
holder. A lock whose holder is provably gone is stale and cleared with a note: the same host and the pid
no longer running (or running a process that started at another time), or the same Slurm job on a later
restart (a requeued job). Any other lock is reported with the command that clears it.
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass

from .ckptfile import temp_name, write_new
from .errors import ConfigError

LOCK = ".lock"
CONFIG_HEADER = "# resolved hpcopt job config"
OURS = ("config.toml", "metrics.jsonl", "checkpoints", LOCK, "auto")  # what a run directory holds (auto/:
# the optimizer race of optimizer.name = "auto")


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a live pid from a reused one."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _exited(pid: int) -> bool:
    """A zombie (killed, not yet reaped: its launcher died with it) holds nothing any more (Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False


def holder_info() -> dict:
    env = os.environ
    return dict(host=socket.gethostname(), pid=os.getpid(), proc_start=_proc_start(os.getpid()),
                job=env.get("SLURM_JOB_ID", ""), restart=int(env.get("SLURM_RESTART_COUNT", "0") or 0),
                started=time.strftime("%Y-%m-%d %H:%M:%S"))


def _alive(info: dict) -> bool:
    pid = int(info.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0
    if _exited(pid):
        return False
    start = info.get("proc_start")
    return start is None or _proc_start(pid) == start


def stale(info: dict) -> str | None:
    """Why the lock's holder is gone, or None when it may be alive."""
    me = holder_info()
    if info.get("job") and info["job"] == me["job"] and int(info.get("restart", 0)) < me["restart"]:
        return f"Slurm job {info['job']} restart {info.get('restart', 0)} (this is restart {me['restart']})"
    if info.get("host") == me["host"] and not _alive(info):
        return f"pid {info.get('pid')} on {info.get('host')} is not running"
    return None


def describe(info: dict) -> str:
    job = f", Slurm job {info['job']}" if info.get("job") else ""
    return f"host {info.get('host', '?')}, pid {info.get('pid', '?')}{job}, since {info.get('started', '?')}"


@dataclass
class Lock:
    path: str
    text: str
    created_dir: bool   # the run directory did not exist before this run

    def release(self) -> None:
        """Remove the lock if it is still ours (and the directory, if this run made it and left it empty)."""
        try:
            with open(self.path) as f:
                if f.read() != self.text:
                    return
            os.remove(self.path)
        except OSError:
            return
        d = os.path.dirname(self.path)
        if self.created_dir:
            for sub in (os.path.join(d, "checkpoints"), d):
                try:
                    os.rmdir(sub)  # only when empty: nothing of the run's is removed
                except OSError:
                    pass


def acquire(out_dir: str) -> tuple[Lock, list[str]]:
    """Create the run directory if needed and take its lock; (lock, notes). ConfigError when another
    run holds it or the directory cannot be made."""
    created = not os.path.isdir(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{out_dir}: cannot create the run directory ({e.strerror or e}) (run.out_dir)") from None
    path, notes = os.path.join(out_dir, LOCK), []
    text = json.dumps(holder_info()) + "\n"
    for _ in range(20):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except FileExistsError:
            info = _read(path)
            if info is None:        # being written this instant, or garbage: look again shortly
                time.sleep(0.05)
                info = _read(path)
                if info is None:
                    raise ConfigError(f"{out_dir}: unreadable lock file {path}; if no run uses the directory, "
                                      f"clear it: rm {path}") from None
            why = stale(info)
            if why is None:
                raise ConfigError(f"{out_dir}: in use by another run ({describe(info)}); wait for it to end, "
                                  f"or if it is gone, clear its lock: rm {path}") from None
            if _break(path, info):
                notes.append(f"cleared the stale lock of {out_dir} ({why})")
            continue
        except OSError as e:
            raise ConfigError(f"{out_dir}: cannot create the lock file ({e.strerror or e}) (run.out_dir)") from None
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        return Lock(path, text, created), notes
    raise ConfigError(f"{out_dir}: could not take the lock {path}; clear it if no run uses it: rm {path}")


def _read(path: str) -> dict | None:
    try:
        with open(path) as f:
            info = json.loads(f.read())
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


def _break(path: str, info: dict) -> bool:
    """Move a stale lock aside (atomic rename) and drop it, unless it changed in between (another run
    took it first: then it is put back where it was if the place is still free)."""
    aside = temp_name(path)
    try:
        os.rename(path, aside)
    except OSError:
        return False  # someone else moved it first
    if _read(aside) != info:  # not the lock we judged: restore it (link fails if a new one exists)
        try:
            os.link(aside, path)
        except OSError:
            pass
        os.remove(aside)
        return False
    os.remove(aside)
    return True


def check_not_foreign(out_dir: str) -> None:
    """A directory with files hpcopt did not write (a user's project, say) is not a run directory. A run
    directory holds metrics.jsonl or checkpoints/; any other non-empty directory may hold only what a run
    that stopped early leaves (its lock, a config.toml that hpcopt wrote)."""
    try:
        entries = set(os.listdir(out_dir))
    except OSError:
        return
    if entries & {"metrics.jsonl", "checkpoints"}:
        return
    if "config.toml" in entries:
        try:
            with open(os.path.join(out_dir, "config.toml")) as f:
                first = f.readline()
        except OSError:
            first = ""
        if not first.startswith(CONFIG_HEADER):
            raise ConfigError(f"{out_dir}: holds a config.toml that hpcopt did not write; choose a new run.out_dir "
                              f"(or run.name) for the run")
    reports = {e for e in entries if e.startswith(("stall-", "hpcopt-crash-")) and e.endswith(".txt")}
    if entries - set(OURS) - reports:   # a stall report or crash file of a run that stopped before its metrics
        raise ConfigError(f"{out_dir}: is not empty and not an hpcopt run directory; choose a new run.out_dir "
                          f"(or run.name) for the run")


def check_writable(out_dir: str) -> None:
    """The checkpoint directory accepts a file (refused now rather than at the first save)."""
    ckpt = os.path.join(out_dir, "checkpoints")
    try:
        os.makedirs(ckpt, exist_ok=True)
        probe = temp_name(os.path.join(ckpt, "probe"))
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"{ckpt}: checkpoints cannot be written there ({e.strerror or e})") from None


def write_config(out_dir: str, text: str) -> None:
    """config.toml, replaced atomically through an unpredictable temporary name (never a planted link)."""
    try:
        write_new(os.path.join(out_dir, "config.toml"), text.encode())
    except OSError as e:
        raise ConfigError(f"{out_dir}: cannot write config.toml ({e.strerror or e})") from None
