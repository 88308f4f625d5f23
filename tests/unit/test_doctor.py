"""hpcopt.doctor's judgement of gathered facts (pure functions, no MPI job): binding, oversubscription,
versions, launcher, and that a check that fails becomes a problem line."""
import subprocess
import sys

from hpcopt import doctor
from hpcopt.doctor import analyze, launcher_check


def fact(rank, node=0, host="a", affinity=(0, 1, 2, 3), cpu_count=4, threads=1, **kw):
    versions = {"python": "3.11.7", "hpcopt": "0.1.0", "mpi4py": "4.1.2", "MPI library": "Open MPI v4.1.4",
                "numpy": "2.4.6", "h5py": "3.16.0", "numba": "0.68.1", "HDF5": "1.10.8"}
    versions.update(kw.pop("versions", {}))
    f = {"rank": rank, "host": host, "node": node, "local_rank": 0, "local_size": 1, "cpu_count": cpu_count,
         "affinity": list(affinity), "threads": threads, "thread_source": "OMP_NUM_THREADS", "errors": {},
         "mpi_library": "Open MPI v4.1.4", "mpi_version": "3.1", "thread_level": "MPI_THREAD_MULTIPLE",
         "thread_requested": "multiple", "env": {}, "mpirun": "/opt/openmpi/bin/mpirun", "versions": versions,
         "h5py_mpi": True, "numba": {"layer": "omp", "threads": threads, "max_threads": 4, "configured": "default"},
         "cuda": {"available": False, "reason": "no driver"},
         "dir": {"path": "/shared/runs", "error": None, "sees_rank0": True},
         "allreduce": {"ok": True, "error": None, "us": 3.0}}
    f.update(kw)
    return f


def problems(facts, check=None):
    return [r for r in analyze(facts, env={}) if r.status == "problem" and (check is None or r.check == check)]


def test_healthy_facts_have_no_problem():
    assert problems([fact(0, affinity=(0, 1)), fact(1, affinity=(2, 3))]) == []


def test_ranks_bound_to_overlapping_cores_are_named():
    facts = [fact(0, affinity=(0, 1)), fact(1, affinity=(1, 2)), fact(2, affinity=(3,))]
    (p,) = problems(facts, "binding")
    assert "a: ranks 0 and 1 share core(s) 1" in p.message and "--bind-to core" in p.message
    assert p.details["ranks"] == [0, 1]
    # the same cores for two ranks, bound (not the whole node): also overlapping
    (p,) = problems([fact(0, affinity=(0,)), fact(1, affinity=(0,)), fact(2, affinity=(1, 2, 3))], "binding")
    assert "ranks 0 and 1 share core(s) 0" in p.message
    # not bound (each may run on every core the job has on the node): not a binding problem
    assert problems([fact(0), fact(1)], "binding") == []


def test_oversubscription_per_node_and_per_bound_rank():
    (p,) = problems([fact(r, threads=2) for r in range(4)], "oversubscription")  # 4 x 2 on 4 cores
    assert p.message.startswith("a: 4 ranks x 2 threads = 8 threads on 4 cores:")
    # only node b is oversubscribed; the message names it
    facts = [fact(0, node=0, host="a"), fact(1, node=1, host="b", threads=8)]
    (p,) = problems(facts, "oversubscription")
    assert p.message.startswith("b: 1 rank x 8 threads = 8 threads on 4 cores")
    # each rank bound to 1 core but running 2 threads: the node has room, the ranks do not
    facts = [fact(r, affinity=(r,), threads=2, cpu_count=8) for r in range(2)]
    facts.append(fact(2, affinity=range(2, 8), threads=1, cpu_count=8))  # 5 threads on 8 cores in all
    (p,) = problems(facts, "oversubscription")
    assert p.message.startswith("ranks 0-1 (host a): 2 threads per rank on 1 bound core each")
    assert "OMP_NUM_THREADS=1" in p.message
    # cores the job may not use count for nothing (a Slurm cpuset of 2 cores on a 4-core node)
    (p,) = problems([fact(r, affinity=(0, 1)) for r in range(3)], "oversubscription")
    assert "on 2 cores (the ranks may use 2 of the node's 4)" in p.message


def test_a_different_version_names_rank_host_and_both_versions():
    facts = [fact(0), fact(1), fact(2, host="b", versions={"numba": "0.60.0"})]
    (p,) = problems(facts, "versions")
    assert p.message.startswith("numba differs: rank 2 (host b) has 0.60.0, rank 0 (host a) has 0.68.1:")
    facts = [fact(0), fact(1, host="b", versions={"h5py": None}, errors={"import h5py": "ImportError: no"})]
    msgs = [p.message for p in problems(facts)]
    assert any(m.startswith("rank 1 (host b) cannot import h5py (ImportError: no)") for m in msgs), msgs
    assert not any("HDF5 (" in m for m in msgs), msgs  # said once, for h5py


def test_h5py_without_mpi_and_unwritable_directory():
    (p,) = problems([fact(0), fact(1, h5py_mpi=False)])
    assert p.check == "h5py" and p.message.startswith("h5py on rank 1 (host a) was built without MPI")
    assert doctor.hdf5_decision([fact(0), fact(1, h5py_mpi=False)]) == "h5py without MPI (see h5py)"
    d = {"path": "/shared/runs", "error": "Permission denied", "sees_rank0": None}
    (p,) = problems([fact(0), fact(1, host="b", dir=d)])
    assert p.message.startswith("rank 1 (host b) cannot create and write a file in /shared/runs (Permission denied)")
    d = {"path": "/shared/runs", "error": None, "sees_rank0": False}
    (p,) = problems([fact(0), fact(1, host="b", dir=d), fact(2, host="b", dir=d)])
    assert p.message.startswith("ranks 1-2 (host b) do not see the file rank 0 created in /shared/runs")


def test_launcher():
    assert launcher_check({}, 1).status == "ok"
    r = launcher_check({"OMPI_COMM_WORLD_SIZE": "4"}, 4)
    assert (r.status, r.message) == ("ok", "mpirun (Open MPI) started 4 processes: one MPI world of 4 ranks")
    r = launcher_check({"PMI_SIZE": "4", "PMI_RANK": "2"}, 1, "Open MPI v4.1.4", "/opt/mpich/bin/mpirun")
    assert r.status == "problem" and "started 4 processes but each is an MPI world of 1" in r.message
    assert "another MPI than mpi4py's (Open MPI v4.1.4)" in r.message and "/opt/mpich/bin/mpirun" in r.message
    r = launcher_check({"SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "8"}, 1)
    assert r.status == "problem" and "srun --mpi=pmix" in r.message
    r = launcher_check({"SLURM_JOB_ID": "5", "SLURM_NTASKS": "8"}, 1)
    assert r.status == "problem" and "missing `srun`" in r.message
    assert launcher_check({"SLURM_JOB_ID": "5", "SLURM_NTASKS": "1"}, 1).status == "ok"


def test_a_failing_check_is_a_problem_line_not_a_crash():
    facts = [fact(0)]
    del facts[0]["allreduce"]
    (p,) = problems(facts)
    assert p.check == "allreduce" and "the check itself failed (KeyError" in p.message


def test_helpers_and_hook():
    assert doctor.ranges([7, 0, 1, 2, 5, 8]) == "0-2,5,7-8"
    env = {doctor.SIMULATE_ENV: "unwritable@1, no-mpi-h5py"}
    assert doctor.simulated("unwritable", 1, env) and not doctor.simulated("unwritable", 0, env)
    assert doctor.simulated("no-mpi-h5py", 0, env) and not doctor.simulated("hang", 0, env)
    r = analyze([fact(0)], env={doctor.SIMULATE_ENV: "bogus@1"})
    assert [x.check for x in r if x.status == "problem"] == ["simulate"]


def test_module_imports_nothing_heavy():
    code = ("import sys, hpcopt.doctor; heavy = {'numpy', 'mpi4py', 'h5py', 'numba'} & set(sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_rank_whose_facts_could_not_be_collected_is_one_problem():
    node = {"node": 0, "local_rank": 0, "local_size": 1}
    broken = doctor._fallback_facts(1, node, 1, "OMP_NUM_THREADS", "runs", "KeyError: 'x'")
    broken["allreduce"] = {"ok": True, "error": None, "us": 3.0}
    (p,) = problems([fact(0), broken])
    assert p.check == "collect" and p.message.startswith("collecting the facts of rank 1 (host ")
    assert doctor.hdf5_decision([fact(0), broken]) is not None  # the parallel HDF5 test is skipped


def test_bound_cores_left_idle_is_an_info_line():
    facts = [fact(r, affinity=(2 * r, 2 * r + 1), threads=1) for r in range(2)]  # 2 cores each, 1 thread
    infos = [r for r in analyze(facts, env={}) if r.check == "threads" and r.status == "info"]
    assert [r.message for r in infos] == ["ranks 0-1 (host a): bound to 2 cores each but 1 thread per rank: set "
                                          "backend.threads = 2 (or OMP_NUM_THREADS=2) to use them all"]
    assert problems(facts) == []
