"""`hpcopt doctor` under mpirun: a healthy launch, each simulated problem (test hook HPCOPT_DOCTOR_SIMULATE),
a real unwritable directory, oversubscription, a rank that hangs, and a process started alone."""
import json
import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import hpcopt, mpirun_cmd, run_env

pytestmark = pytest.mark.mpi
HOST = socket.gethostname()


def doctor(tmp_path, *extra, n=2, env=None, timeout=60):
    """`mpirun -n N python -m hpcopt doctor --dir TMP EXTRA` with `env` added to what conftest passes."""
    env = dict(env or {})
    cmd = mpirun_cmd(n, ["-m", "hpcopt", "doctor", "--dir", str(tmp_path), *extra], export=tuple(env))
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(run_env(), **env))
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"hpcopt doctor hung ({timeout} s): {e.stdout}\n{e.stderr}")


def lines(p, status):
    return [line for line in p.stdout.splitlines() if line.split(" ", 1)[0] == status]


def one_problem(p, check):
    """The one problem line of the run, which must be of `check`; the run must exit 1."""
    problems = lines(p, "problem")
    assert p.returncode == 1, p.stdout + p.stderr
    assert len(problems) == 1 and problems[0].split()[1] == check, p.stdout
    return problems[0]


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="2 ranks x 1 thread needs 2 cores to be healthy")
def test_healthy_launch_exits_0(tmp_path):
    p = hpcopt("doctor", "--dir", str(tmp_path), n=2, timeout=60)
    out = p.stdout
    assert p.returncode == 0, out + p.stderr
    assert not lines(p, "problem"), out
    from mpi4py import MPI

    assert MPI.Get_library_version().replace("\x00", "").splitlines()[0].strip() in out  # the MPI library, named
    assert "MPI_THREAD_" in out and "mpirun (Open MPI) started 2 processes" in out
    assert "2 ranks on 1 node" in out and f"{HOST} (2 ranks: 0-1)" in out
    assert "ok       h5py              h5py" in out and "with MPI" in out
    assert "ok       versions          equal on all 2 ranks" in out
    assert "ok       parallel-hdf5     2 ranks wrote a 2x8 dataset" in out
    assert "ok       allreduce" in out and "ok       directory" in out
    assert out.rstrip().endswith("no problems found: exit 0")
    assert os.listdir(tmp_path) == []  # the test files are gone


@pytest.mark.parametrize("hook, check, expected", [
    ("no-mpi-h5py", "h5py", f"h5py on ranks 0-1 (host {HOST}) was built without MPI: checkpoints and `data make` "
                            f"need parallel HDF5; run `make setup`"),
    ("version-mismatch@1", "versions", f"numpy differs: rank 1 (host {HOST}) has "),
    ("unwritable@1", "directory", f"rank 1 (host {HOST}) cannot create and write a file in "),
], ids=["no-mpi-h5py", "version-mismatch", "unwritable"])
def test_each_simulated_problem_is_one_line_and_exit_1(tmp_path, hook, check, expected):
    p = doctor(tmp_path, env={"HPCOPT_DOCTOR_SIMULATE": hook})
    line = one_problem(p, check)
    assert expected in line, line
    assert f"test hook HPCOPT_DOCTOR_SIMULATE={hook} is set" in p.stdout
    if hook.startswith("version"):
        import numpy

        assert f"has {numpy.__version__}+simulated, rank 0 (host {HOST}) has {numpy.__version__}" in line
    if hook != "version-mismatch@1":  # without parallel HDF5 on every rank, or a writable directory on every rank
        assert "skip     parallel-hdf5     not run" in p.stdout
    assert os.listdir(tmp_path) == []


def test_real_unwritable_directory_as_json(tmp_path):
    (tmp_path / "afile").write_text("not a directory\n")
    p = doctor(tmp_path / "afile" / "sub", "--json")
    assert p.returncode == 1, p.stdout + p.stderr
    results = [json.loads(line) for line in p.stdout.splitlines()]  # every line one JSON object
    by = {(r["check"], r["status"]) for r in results}
    assert {"versions", "h5py", "allreduce", "parallel-hdf5", "numba", "cuda"} <= {c for c, _ in by}
    problems = [r for r in results if r["status"] == "problem"]
    assert [r["check"] for r in problems] == ["directory"], problems
    assert problems[0]["details"]["ranks"] == [0, 1]
    assert f"ranks 0-1 (host {HOST}) cannot create and write a file in" in problems[0]["message"]
    assert "Not a directory" in problems[0]["message"]
    assert ("parallel-hdf5", "skip") in by


def test_oversubscription_4_ranks(tmp_path):
    threads = os.cpu_count() or 1  # 4 ranks x cpu_count threads > cpu_count cores on any machine
    p = doctor(tmp_path, n=4, env={"OMP_NUM_THREADS": str(threads)})
    line = one_problem(p, "oversubscription")
    assert f"{HOST}: 4 ranks x {threads} thread" in line and f"= {4 * threads} threads on" in line, line
    assert "use fewer ranks per node or fewer threads per rank" in line
    assert f"{threads} thread{'s' if threads > 1 else ''} per rank (OMP_NUM_THREADS)" in p.stdout


def test_a_rank_that_hangs_ends_the_job(tmp_path):
    p = doctor(tmp_path, "--timeout", "4", env={"HPCOPT_DOCTOR_SIMULATE": "hang@1"}, timeout=40)
    assert p.returncode != 0
    assert "Timeout (0:00:04)!" in p.stderr, p.stderr  # faulthandler's watchdog: each stuck rank's stack
    assert "in _parallel_hdf5" in p.stderr  # rank 0, waiting in the collective that rank 1 never joins
    assert "ok       directory" in p.stdout  # the lines known before the stuck step were printed


def test_alone_world_size_1(tmp_path):
    env = {k: v for k, v in run_env().items() if not k.startswith(("SLURM_", "OMPI_COMM_WORLD", "PMI_", "PMIX_"))}
    p = subprocess.run([sys.executable, "-m", "hpcopt", "doctor", "--dir", str(tmp_path)], capture_output=True,
                       text=True, timeout=60, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "started alone (no mpirun/srun variables): an MPI world of 1" in p.stdout
    assert "1 rank on 1 node" in p.stdout and "ok       parallel-hdf5     1 rank wrote" in p.stdout
    # the same inside a Slurm allocation of 4 tasks: srun is missing
    p = subprocess.run([sys.executable, "-m", "hpcopt", "doctor", "--dir", str(tmp_path)], capture_output=True,
                       text=True, timeout=60, env=dict(env, SLURM_JOB_ID="1", SLURM_NTASKS="4"))
    line = one_problem(p, "launcher")
    assert "started alone (world size 1) inside a Slurm allocation of SLURM_NTASKS=4 tasks" in line
    assert "`srun hpcopt doctor`" in line
