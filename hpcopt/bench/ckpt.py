"""Checkpoint save and load of 256 MB (parameters + Adam state) with N ranks, vs numpy.save / torch.save.

Run it under a launcher (`mpirun -n 2 hpcopt bench ckpt`); run alone, it launches itself with
`mpirun -n --ranks`. hpcopt: every rank writes its rows of one file through parallel HDF5, fsync and
rename included; loading reads and verifies every array on every rank, as a data-parallel resume does.
Peers, in the same run on rank 0: `numpy.save` of the same bytes (one .npy per array, then fsync) and
`torch.save` of the same arrays as tensors (then fsync), and their loads. GB/s counts the bytes once.
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

COLS = 1024


def add_arguments(p) -> None:
    p.add_argument("--mb", type=float, default=256, help="checkpoint size in MB: params + Adam m and v")
    p.add_argument("--ranks", type=int, default=2, help="ranks to launch when run without mpirun")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")


def _arrays(mb: float) -> dict[str, np.ndarray]:
    """Three equal float32 groups (params, m, v), each 4 tensors of (rows, 1024)."""
    rows = max(4, int(mb * 2**20 / (3 * 4 * 4 * COLS)))
    rng = np.random.default_rng(0)
    out = {}
    for group in ("params", "optim/exp_avg", "optim/exp_avg_sq"):
        for t in range(4):
            out[f"{group}/layer{t}/weight"] = rng.standard_normal((rows, COLS), dtype=np.float32)
    return out


def _fsync(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _launched_alone() -> bool:
    return not any(v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "SLURM_STEP_ID"))


def run(args) -> list[dict]:
    if _launched_alone() and args.ranks > 1:
        cmd = ["mpirun", "-n", str(args.ranks), "--oversubscribe", "--bind-to", "none"]
        if os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
        threads = max(1, len(os.sched_getaffinity(0)) // args.ranks)  # ranks share the cores, as in training
        cmd += [sys.executable, "-m", "hpcopt", "bench", "ckpt", "--json", "--mb", str(args.mb),
                "--repeats", str(args.repeats), "--threads", str(threads)] + (["--dir", args.dir] if args.dir else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"bench ckpt under mpirun failed:\n{out.stderr}")
        import json

        return [{k: v for k, v in json.loads(line).items() if k != "suite"}
                for line in out.stdout.splitlines() if line.startswith("{")]
    return _measure(args)


def _measure(args) -> list[dict]:
    import numba
    from mpi4py import MPI

    from .. import checkpoint

    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    arrays = _arrays(args.mb)
    nbytes = sum(a.nbytes for a in arrays.values())
    base = comm.bcast(tempfile.mkdtemp(prefix="hpcopt-bench-", dir=args.dir) if rank == 0 else None)
    pieces = []
    for name, a in arrays.items():
        lo, hi = checkpoint.rows_of(a.shape[0], rank, size)
        pieces.append(checkpoint.Piece(name, a.shape, a[lo:hi], lo))
    attrs = dict(step=1, epoch=0, config="", world=np.array([size, 1, 1]))
    save, load, np_save, np_load, th_save, th_load = [], [], [], [], [], []
    try:
        import torch
    except ImportError:
        torch = None
    warm = os.path.join(base, "warm-up.h5")  # untimed: kernels loaded from Numba's cache, files warm
    checkpoint.write_parallel(warm, comm, pieces, attrs)
    checkpoint.read(warm, comm).release()
    for r in range(args.repeats):
        path = os.path.join(base, f"step_{r:08d}.h5")
        comm.Barrier()
        t0 = time.perf_counter()
        checkpoint.write_parallel(path, comm, pieces, attrs)
        save.append(time.perf_counter() - t0)
        comm.Barrier()
        t0 = time.perf_counter()
        ck = checkpoint.read(path, comm)
        comm.Barrier()
        load.append(time.perf_counter() - t0)
        ck.release()
        if rank == 0:
            d = os.path.join(base, f"npy{r}")
            os.makedirs(d)
            t0 = time.perf_counter()
            for i, a in enumerate(arrays.values()):
                p = os.path.join(d, f"{i}.npy")
                np.save(p, a)
                _fsync(p)
            np_save.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            back = [np.load(os.path.join(d, f"{i}.npy")) for i in range(len(arrays))]
            np_load.append(time.perf_counter() - t0)
            del back
            if torch is not None:
                p = os.path.join(base, f"torch{r}.pt")
                tensors = {k: torch.from_numpy(a) for k, a in arrays.items()}
                t0 = time.perf_counter()
                torch.save(tensors, p)
                _fsync(p)
                th_save.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                back = torch.load(p)
                th_load.append(time.perf_counter() - t0)
                del back
            shutil.rmtree(d)
        os.remove(path) if rank == 0 else None
        comm.Barrier()
    if rank == 0:
        shutil.rmtree(base, ignore_errors=True)
    if rank != 0:
        sys.exit(0)  # rank 0 reports
    gb = nbytes / 1e9
    med = statistics.median
    rows = []
    for what, ours, peer, tpeer in (("save", save, np_save, th_save), ("load", load, np_load, th_load)):
        rows.append(dict(name=f"checkpoint {what} {nbytes / 2**20:.0f} MB, {size} ranks", unit="GB/s",
                         hpcopt=gb / med(ours), peer_name="numpy.save/np.load (1 process)",
                         peer=gb / med(peer), ratio=med(peer) / med(ours), limit=None,
                         hpcopt_s=med(ours), peer_s=med(peer)))
        if tpeer:
            rows.append(dict(name=f"checkpoint {what} {nbytes / 2**20:.0f} MB, {size} ranks", unit="GB/s",
                             hpcopt=gb / med(ours), peer_name=f"torch.save/torch.load {torch.__version__}",
                             peer=gb / med(tpeer), ratio=med(tpeer) / med(ours), limit=None,
                             hpcopt_s=med(ours), peer_s=med(tpeer)))
    return rows
