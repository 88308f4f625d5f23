"""A real single-node Slurm for the tests: slurmctld + slurmd started here, without systemd.

`install_reason()` installs Slurm from Debian's packages when it is missing and says why the suite
cannot run (not root, no Slurm to be had), or None. `SlurmCluster` writes a slurm.conf into a temp
directory (the node line from `slurmd -C`), starts `slurmctld -D` and `slurmd -D`, waits for the node
to be idle, submits and watches jobs, and stops the daemons by their PIDs.
"""
from __future__ import annotations

import ctypes
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import time

APT_PACKAGES = ["slurmctld", "slurmd", "slurm-client"]
DAEMONS = ["slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo", "srun"]
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                   "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def _missing() -> list[str]:
    return [d for d in DAEMONS if shutil.which(d) is None]


def unavailable_reason() -> str | None:
    """Why Slurm cannot be had here, as far as is known without installing anything (None: it may be)."""
    if os.geteuid() != 0:
        return "Slurm tests need root (they start slurmctld and slurmd themselves)"
    if _missing() and shutil.which("apt-get") is None:
        return f"Slurm is not installed ({', '.join(_missing())} missing) and there is no apt-get to install it"
    return None


def install_reason() -> str | None:
    """None when Slurm is usable here (installing it if needed), else the one-line reason to skip."""
    reason = unavailable_reason()
    if reason or not _missing():
        return reason
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "--no-install-recommends", *APT_PACKAGES]
    p = subprocess.run(install, capture_output=True, text=True, env=env)
    if p.returncode != 0:  # stale package lists: refresh once, then try again
        subprocess.run(["apt-get", "update"], capture_output=True, text=True, env=env)
        p = subprocess.run(install, capture_output=True, text=True, env=env)
    if p.returncode != 0 or _missing():
        last = (p.stderr.strip() or p.stdout.strip()).splitlines()[-1:] or ["?"]
        return f"Slurm is not installed and `{' '.join(install)}` failed: {last[0]}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: a child that already dropped root may not read it
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In a daemon's child process before exec: get SIGTERM if the test process dies without stopping it."""
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _plugin(name: str) -> bool:
    """Whether Slurm's plugin NAME.so is installed (auth_none went away in newer Slurm)."""
    pattern = ["/usr/lib/*/slurm-wlm", "/usr/lib/slurm", "/usr/lib64/slurm", "/usr/local/lib/slurm"]
    return any(glob.glob(os.path.join(d, f"{name}.so")) for d in pattern)


class SlurmCluster:
    """One node, one partition; everything (state, spool, logs, pids) under `root`."""

    def __init__(self, root: str):
        self.root = root
        self.conf = os.path.join(root, "slurm.conf")
        self.procs: dict[str, subprocess.Popen] = {}
        self.jobs: list[str] = []
        self.node = ""

    # -- configuration ----------------------------------------------------------------------------
    def write_conf(self) -> None:
        for d in ("state", "spool", "log"):
            os.makedirs(os.path.join(self.root, d), exist_ok=True)
        node_line = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
        node_line = node_line.splitlines()[0].strip()  # NodeName=... CPUs=... RealMemory=...
        self.node = re.search(r"NodeName=(\S+)", node_line).group(1)
        detected = int(re.search(r"RealMemory=(\d+)", node_line).group(1))
        # below what slurmd detects, else the node drains for "Low RealMemory"
        node_line = re.sub(r"RealMemory=\d+", f"RealMemory={max(256, detected // 2)}", node_line)
        if _plugin("auth_none"):  # Slurm <= 23.02: no munge needed
            auth = "AuthType=auth/none\nCredType=cred/none"
        else:
            self.start_munge()
            auth = "AuthType=auth/munge\nCredType=cred/munge"
        r = self.root
        text = f"""# written by the hpcopt Slurm tests
ClusterName=hpcopt-test
SlurmctldHost={self.node}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
{auth}
# a requeued job may start again after cred_expire seconds (default 120)
AuthInfo=cred_expire=10
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
KillWait=5
MinJobAge=600
MailProg=/bin/true
SchedulerParameters=sched_interval=2,bf_interval=1
{node_line} State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""
        with open(self.conf, "w") as f:
            f.write(text)

    def start_munge(self) -> None:
        """munged in the foreground as user munge (for a Slurm without auth/none)."""
        if shutil.which("munged") is None:
            subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "munge"],
                           capture_output=True, check=True)
        os.makedirs("/run/munge", exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        self._start("munged", ["munged", "-F"], user="munge")

    # -- daemons ---------------------------------------------------------------------------------------
    def env(self, extra: dict | None = None) -> dict:
        """This process's environment for Slurm commands and jobs: SLURM_CONF set, no outer job's SLURM_*."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        env["SLURM_CONF"] = self.conf
        env.update(extra or {})
        return env

    def _start(self, name: str, cmd: list[str], user: str | None = None) -> None:
        log = open(os.path.join(self.root, "log", f"{name}.out"), "w")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                            stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
                                            user=user, group=user)
        log.close()

    def start(self, timeout: float = 60) -> None:
        self.write_conf()
        self._start("slurmctld", ["slurmctld", "-D", "-f", self.conf])
        self._start("slurmd", ["slurmd", "-D", "-f", self.conf])
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode}\n{self.logs()}")
            r = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, env=self.env())
            state = r.stdout.strip()
            if r.returncode == 0 and state == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"node not idle after {timeout}s (state {state!r})\n{self.logs()}")

    def stop(self, timeout: float = 60) -> None:
        """Cancel this session's jobs, wait for them to end, then stop the daemons by their PIDs."""
        ctld = self.procs.get("slurmctld")
        running = ctld is not None and ctld.poll() is None
        live = [j for j in self.jobs if running and self.state(j)["JobState"] not in TERMINAL_STATES]
        if live:
            self.cmd(["scancel", *live])
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and any(self.state(j)["JobState"] not in TERMINAL_STATES
                                                      for j in live):
                time.sleep(1)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def logs(self, tail: int = 30) -> str:
        out = []
        for path in sorted(glob.glob(os.path.join(self.root, "log", "*.log"))):
            with open(path, errors="replace") as f:
                lines = f.read().splitlines()[-tail:]
            out.append(f"--- {os.path.basename(path)} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(out)

    # -- jobs ------------------------------------------------------------------------------------------
    def cmd(self, cmd: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True, env=self.env())

    def sbatch(self, script: str, args: list[str], env: dict, opts: list[str], cwd: str) -> str:
        """Submit SCRIPT ARGS with sbatch OPTS from CWD; returns the job id."""
        p = subprocess.run(["sbatch", "--parsable", *opts, script, *args], capture_output=True, text=True,
                           env=self.env(env), cwd=cwd)
        if p.returncode != 0:
            raise RuntimeError(f"sbatch failed ({p.returncode}): {p.stderr.strip()}")
        job = p.stdout.strip().split(";")[0]
        self.jobs.append(job)
        return job

    def state(self, job: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, Reason, ...)."""
        p = self.cmd(["scontrol", "show", "job", "-o", job])
        if p.returncode != 0:
            return {"JobState": "UNKNOWN", "error": p.stderr.strip()}
        return dict(re.findall(r"(\w+)=(\S*)", p.stdout))

    def wait_end(self, job: str, timeout: float) -> dict[str, str]:
        """Poll until the job reaches a terminal state; returns its final `scontrol show job` fields."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.state(job)
            if s["JobState"] in TERMINAL_STATES:
                return s
            time.sleep(1)
        raise TimeoutError(f"job {job} not finished after {timeout}s: {self.state(job)}")
