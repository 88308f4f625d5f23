"""Shared fixtures: the digits data file and a launcher for real MPI runs."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mpirun_cmd(n: int, args: list[str], export: tuple[str, ...] = ()) -> list[str]:
    """`mpirun -n N python ARGS`; one thread per rank (ranks share 2 cores); `export`: more env vars."""
    cmd = ["mpirun", "-n", str(n), "--oversubscribe", "--bind-to", "none"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS", "PYTHONPATH", *export):
        cmd += ["-x", var]
    return cmd + [sys.executable] + args


def run_env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", NUMBA_NUM_THREADS="1",
               PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    return env


def run(args: list[str], n: int | None = None, timeout: float = 120, cwd: str | None = None,
        check: bool = False) -> subprocess.CompletedProcess:
    """Run `python ARGS` alone (n=None) or under `mpirun -n n`; a hang fails the test at `timeout`."""
    cmd = mpirun_cmd(n, args) if n else [sys.executable] + args
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=run_env(), cwd=cwd)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n{e.stdout}\n{e.stderr}")
    if check and p.returncode != 0:
        pytest.fail(f"exit {p.returncode}: {' '.join(cmd)}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


def hpcopt(*args: str, n: int | None = None, timeout: float = 120, check: bool = False, cwd=None):
    return run(["-m", "hpcopt", *args], n=n, timeout=timeout, check=check, cwd=cwd)


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("data") / "digits.h5")
    hpcopt("data", "make", "digits", path, check=True)
    return path
