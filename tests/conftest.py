"""Shared fixtures: the digits data file and a launcher for real MPI runs."""
from __future__ import annotations

import compileall
import contextlib
import io
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The hundreds of `python -m hpcopt` processes the tests start read hpcopt's bytecode from __pycache__;
# where PYTHONDONTWRITEBYTECODE is set none of them would write it, and each would compile every module
# again (about 0.2 s of each start-up). Written once here; a module edited later is recompiled as usual.
compileall.compile_dir(os.path.join(REPO, "hpcopt"), quiet=2)

# Open MPI in every process the tests start (inherited through mpirun, srun and sbatch): the ob1 messaging
# layer, which moves the messages of ranks on one node (all these tests have) through shared memory, and
# no helper daemon for a process started alone. Left to choose, each MPI_Init first probes the layers
# for cluster networks (cm: PSM, PSM2, libfabric), and each lone process starts an orted for spawns that
# hpcopt never makes: 0.2-0.4 s of each of the suite's hundreds of start-ups. A value set by whoever runs
# the tests is kept. (hpcopt's own commands ask for the second themselves: cli.main.)
os.environ.setdefault("OMPI_MCA_pml", "ob1")
os.environ.setdefault("OMPI_MCA_ess_singleton_isolated", "1")


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


def hpcopt_here(*args: str) -> tuple[int, str, str]:
    """`hpcopt ARGS` through its entry point (cli.main) in this process: (exit code, stdout, stderr).
    For the commands that only read files (ckpt verify, ckpt export), where a test needs what they
    check or write and not a process of their own: the same code without a process start-up."""
    from hpcopt import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(args))
    return code, out.getvalue(), err.getvalue()


def ckpt_verify(ckpt) -> str:
    """`hpcopt ckpt verify CKPT` (in this process) must succeed; its output line."""
    code, out, err = hpcopt_here("ckpt", "verify", str(ckpt))
    if code != 0:
        pytest.fail(f"hpcopt ckpt verify {ckpt}: exit {code}\n{out}{err}")
    return out


def ckpt_export(ckpt, npz) -> dict:
    """`hpcopt ckpt export CKPT NPZ` (in this process) must succeed; the arrays it wrote."""
    code, out, err = hpcopt_here("ckpt", "export", str(ckpt), str(npz))
    if code != 0:
        pytest.fail(f"hpcopt ckpt export {ckpt} {npz}: exit {code}\n{out}{err}")
    import numpy as np

    with np.load(npz) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("data") / "digits.h5")
    hpcopt("data", "make", "digits", path, check=True)
    return path
