"""Threads per rank: ranks that share a node split its cores, for BLAS and Numba alike.

No MPI and no numpy here: the CLI calls this before numpy is imported (BLAS reads its thread
count once, at import).
"""
from __future__ import annotations

import os


def threads_per_rank(requested: int, local_ranks: int, env=os.environ) -> tuple[int, str]:
    """(threads, where the number came from): `backend.threads`; else OMP_NUM_THREADS as the user set it
    (HPC users and batch scripts set it on purpose); else Slurm's CPUs per task; else this rank's cores
    split among the node's ranks."""
    if requested > 0:
        return requested, "backend.threads"
    omp = env.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp), "OMP_NUM_THREADS"
    cpus = env.get("SLURM_CPUS_PER_TASK")
    if cpus and cpus.isdigit() and int(cpus) > 0:
        return int(cpus), "SLURM_CPUS_PER_TASK"
    try:
        cores = len(os.sched_getaffinity(0))  # the cores this rank may run on (mpirun/srun binding)
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_ranks)), f"{cores} cores / {local_ranks} ranks on the node"


def pin_threads(n: int) -> None:
    """Limit BLAS/OpenMP threads to n. Effective only before numpy is first imported; Numba is set later."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
                "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
        os.environ[var] = str(n)
    os.environ.setdefault("NUMBA_NUM_THREADS", str(max(n, 1)))
    # BLAS and Numba take turns on the same cores, step after step: threads that finish must sleep
    # soon instead of spinning, or the other library's threads wait for the cores (measured on the
    # 784-1024-1024-10 MLP step, 2 threads: 52 ms spinning, 25 ms with these two settings).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")        # Numba's OpenMP threading layer
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")      # OpenBLAS: spin 2**4 cycles, then sleep
