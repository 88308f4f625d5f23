"""Generating a PDE data set in parallel: --samples darcy2d samples at --grid (default 2,048 at G = 64)
written by `make_pde` on 1 and 2 ranks (--ranks), and the file's write bandwidth vs numpy.save.

Run alone (`hpcopt bench data`) it launches itself once per rank count and repeat (repeat by repeat:
1 rank, 2 ranks, 1 rank, 2 ranks, ..., so that a drift in the machine's speed falls on both sides of
each pair) with `mpirun -n R --oversubscribe --bind-to none` (`--allow-run-as-root` as root), each
rank with ONE thread
(OMP_NUM_THREADS=1, NUMBA_NUM_THREADS=1; the suite's --threads is not used) for every R, so that the
efficiency compares like with like: R ranks on R cores against 1 rank on 1 core. Under a launcher of
your own (`mpirun -n 2 hpcopt bench data --threads 1`) it measures that one rank count.

Inside each job, after start-up (MPI, Python, imports) and an untimed warm-up (a small make_pde of the
same grid: Numba's kernels loaded, MPI-IO opened once), every repeat times, on all ranks:
  generation  make_pde("darcy2d", ...) from a barrier to its return, when the file is committed
              (written, fsynced, renamed, directory fsynced): samples/s = N / that time. The ranks
              take 16-sample pieces from a shared counter (an MPI atomic), solve them (Numba: random
              field + banded Cholesky) and write each into the one HDF5 file (h5py mpio).
  solve       the time make_pde spends generating samples, summed over the ranks: ms per sample
  write       the HDF5 write phase of make_pde (file create, dataset creation, the pieces' writes,
              close, and rank 0's fsync of the file), the slowest rank's: MB/s of the four datasets'
              bytes (train/x, train/y, test/x, test/y; /stats is not counted)
  np.save     the peer, on rank 0 after the job: the same four arrays (read back from the file,
              untimed) saved as .npy files to the same directory, each file fsynced: fsync on both
              sides, so both figures count the bytes reaching the disk and not the page cache.
Rows: samples/s per rank count; parallel efficiency rate(R) / (R * rate(1)), the median of the
repeats' pairs (`pairs`), with limit 1.0 (perfect scaling) and, as the peer, the issue's target 0.85 (ratio = efficiency / 0.85: >= 1 meets it); write
MB/s vs np.save (ratio = hpcopt / np.save); solve ms per sample, R ranks vs 1 rank (ratio < 1: each
sample took longer to solve with R ranks running, the ranks slowing each other through shared caches,
memory or a loaded machine; no communication happens while solving); start-up, which the rates do not
include; the busy fraction, the ranks' time in solves over R x the wall time: what the parallel
generator loses to coordination, waiting and writing, blind to how fast each solve ran (the
efficiency also counts each solve's slowdown, and the machine's drift between the runs of a pair).
The generation row splits its seconds: solve_s (solving, per rank: the ranks' sum / R),
write_s (the write phase) and other_s (the rest: waiting for the rank solving the last piece, rank
0's /stats, the rename). Medians over --repeats. The files are written in a temporary directory under
--dir (default: here), removed at the end.

What this machine cannot show: 2 cores on one node, so neither multi-node scaling (the ranks here talk
through shared memory) nor a parallel file system (Lustre, GPFS: striping, many writers, its latency);
the file goes to one local disk, so the write figures say what the HDF5/MPI-IO layer costs over a plain
write, not how writing scales.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

PROBLEM = "darcy2d"
REPEATED = ("gen_s", "solve_s", "write_s", "npsave_s", "startup_s", "warmup_s", "job_wall_s")  # per launch
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def add_arguments(p) -> None:
    p.add_argument("--samples", type=int, default=2048, help="darcy2d samples, train + test (default 2048)")
    p.add_argument("--grid", type=int, default=64, help="grid points per side (default 64)")
    p.add_argument("--ranks", default="1,2", help="rank counts to launch, comma-separated (default 1,2)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per rank count (medians reported)")
    p.add_argument("--dir", default=None, help="where the files go (a temporary directory in it, removed "
                   "afterwards; default: the current directory)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one job of the launches
    p.add_argument("--launched-at", type=float, default=None, help=argparse.SUPPRESS)  # time.time() at launch


def _launched_alone() -> bool:
    return not any(v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "SLURM_STEP_ID"))


def run(args) -> list[dict]:
    if args.worker or not _launched_alone():
        return _measure(args)
    ranks = [int(r) for r in str(args.ranks).split(",") if r.strip()]
    if not ranks or min(ranks) < 1:
        raise SystemExit(f"hpcopt bench data: --ranks must list positive rank counts (got {args.ranks!r})")
    env = dict(os.environ)
    env.update({v: "1" for v in THREAD_VARS})  # one thread per rank, whatever this process was given
    base = tempfile.mkdtemp(prefix="hpcopt-bench-data-", dir=args.dir or os.getcwd())
    got = {}
    try:  # repeat-major: each repeat launches every rank count once, so a drift of the machine's speed
        for _ in range(args.repeats):  # over minutes falls on both sides of a pair alike
            for n in ranks:
                cmd = ["mpirun", "-n", str(n), "--oversubscribe", "--bind-to", "none"]
                if os.geteuid() == 0:
                    cmd.append("--allow-run-as-root")
                for var in THREAD_VARS:
                    cmd += ["-x", var]
                cmd += [sys.executable, "-m", "hpcopt", "bench", "data", "--json", "--threads", "1", "--worker",
                        "--samples", str(args.samples), "--grid", str(args.grid), "--repeats", "1",
                        "--dir", base, "--launched-at", repr(time.time())]
                t0 = time.perf_counter()
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                wall = time.perf_counter() - t0
                if out.returncode != 0:
                    raise RuntimeError(f"bench data under mpirun -n {n} failed:\n{out.stderr}")
                raw = [json.loads(line)["raw"] for line in out.stdout.splitlines() if line.startswith("{")][0]
                raw["job_wall_s"] = wall
                merged = got.setdefault(n, dict(raw, **{k: [] for k in REPEATED}))
                for k in REPEATED:  # each launch's figures, one after the other
                    merged[k] += _listed(raw[k])
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return _rows(got)


def _measure(args) -> list[dict]:
    import numba
    import numpy as np
    from mpi4py import MPI

    from ..data.pde import make_pde

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    numba.set_num_threads(1)
    comm.Barrier()  # start-up ends here: every rank has MPI and hpcopt's modules
    startup = time.time() - args.launched_at if args.launched_at else None
    own = args.dir is None or not args.worker  # under a launcher of the user's: our own temporary directory
    base = args.dir
    if own:
        base = comm.bcast(tempfile.mkdtemp(prefix="hpcopt-bench-data-", dir=args.dir or os.getcwd())
                          if rank == 0 else None)
    raw = dict(ranks=size, samples=args.samples, grid=args.grid, startup_s=startup, gen_s=[], solve_s=[],
               write_s=[], npsave_s=[], threads_per_rank=1)
    try:
        t0 = time.perf_counter()
        warm = os.path.join(base, f"warm-up-{size}.h5")  # untimed: kernels from Numba's cache, MPI-IO opened
        make_pde(PROBLEM, warm, 4 * size, args.grid, chunk_samples=1)
        if rank == 0:
            os.remove(warm)
        comm.Barrier()
        raw["warmup_s"] = time.perf_counter() - t0
        for r in range(args.repeats):
            path = os.path.join(base, f"{PROBLEM}-G{args.grid}-N{args.samples}-{size}ranks.h5")
            comm.Barrier()
            t0 = time.perf_counter()
            info = make_pde(PROBLEM, path, args.samples, args.grid)  # returns once the file is committed
            raw["gen_s"].append(time.perf_counter() - t0)
            raw["solve_s"].append(info.solve_seconds)
            raw["write_s"].append(info.write_seconds)
            if rank == 0:
                raw["bytes"], seconds = _np_save_peer(path, os.path.join(base, f"npy-{size}-{r}"), np)
                raw["npsave_s"].append(seconds)
                os.remove(path)
            comm.Barrier()
    finally:
        if own and rank == 0:
            shutil.rmtree(base, ignore_errors=True)
    if rank != 0:
        sys.exit(0)  # rank 0 reports
    if args.worker:
        return [dict(name="raw", unit="-", hpcopt=None, peer_name=None, peer=None, ratio=None, limit=None, raw=raw)]
    return _rows({size: raw})


def _np_save_peer(path: str, d: str, np) -> tuple[int, float]:
    """(bytes, seconds): numpy.save of the file's four datasets, each .npy fsynced, into directory d
    (removed after). The arrays are read back from the file first, untimed."""
    import h5py

    with h5py.File(path, "r") as f:
        arrays = [f[k][()] for k in ("train/x", "train/y", "test/x", "test/y")]
    os.makedirs(d)
    t0 = time.perf_counter()
    for i, a in enumerate(arrays):
        p = os.path.join(d, f"{i}.npy")
        np.save(p, a)
        with open(p, "rb+") as fh:
            os.fsync(fh.fileno())
    seconds = time.perf_counter() - t0
    shutil.rmtree(d)
    return sum(a.nbytes for a in arrays), seconds


def _listed(v) -> list:
    return v if isinstance(v, list) else [v]


def _rows(got: dict) -> list[dict]:
    med = statistics.median
    rows = []
    one = got.get(1)
    rate1 = one["samples"] / med(one["gen_s"]) if one else None
    solve1 = 1e3 * med(one["solve_s"]) / one["samples"] if one else None
    for n in sorted(got):
        r = got[n]
        what = f"{PROBLEM} G={r['grid']}, {r['samples']:,} samples, {n} rank{'s' if n > 1 else ''}"
        rate = r["samples"] / med(r["gen_s"])
        gen, solve_s, write_s = med(r["gen_s"]), med(r["solve_s"]) / n, med(r["write_s"])
        rows.append(dict(name=f"{what}: generation (solve + write, file committed)", unit="samples/s",
                         hpcopt=rate, peer_name=None, peer=None, ratio=None, limit=None, seconds=gen,
                         solve_s=solve_s, write_s=write_s, other_s=gen - solve_s - write_s,
                         threads_per_rank=r["threads_per_rank"]))
        if n > 1 and rate1:  # each repeat's pair (launched one after the other), then their median
            pairs = [one["gen_s"][i] / (n * r["gen_s"][i]) for i in range(min(len(r["gen_s"]), len(one["gen_s"])))]
            eff = med(pairs)
            rows.append(dict(name=f"parallel efficiency 1 -> {n} ranks: rate({n}) / ({n} x rate(1))", unit="fraction",
                             hpcopt=eff, peer_name="the issue's target (ratio >= 1: met)", peer=0.85,
                             ratio=eff / 0.85, limit=1.0, one_rank_sps=rate1, pairs=pairs))
            busy = med([solve / (n * gen) for solve, gen in zip(r["solve_s"], r["gen_s"])])
            busy1 = med([solve / gen for solve, gen in zip(one["solve_s"], one["gen_s"])])
            rows.append(dict(name=f"{what}: busy fraction, time solving / ({n} x wall time)", unit="fraction",
                             hpcopt=busy, peer_name="1 rank", peer=busy1, ratio=busy / busy1, limit=1.0))
        mb = r["bytes"] / 1e6
        rows.append(dict(name=f"{what}: HDF5 write phase (create, writes, close, fsync), {mb:.1f} MB",
                         unit="MB/s", hpcopt=mb / med(r["write_s"]),
                         peer_name="numpy.save + fsync (rank 0, same arrays, same directory)",
                         peer=mb / med(r["npsave_s"]), ratio=med(r["npsave_s"]) / med(r["write_s"]), limit=None,
                         hpcopt_s=med(r["write_s"]), peer_s=med(r["npsave_s"])))
        solve = 1e3 * med(r["solve_s"]) / r["samples"]
        peer = n > 1 and solve1 is not None
        rows.append(dict(name=f"{what}: solve time per sample (random field + Cholesky, summed over ranks)",
                         unit="ms/sample", hpcopt=solve, peer_name="1 rank" if peer else None,
                         peer=solve1 if peer else None, ratio=solve1 / solve if peer else None, limit=None))
        startup = [t for t in _listed(r.get("startup_s")) if t is not None]
        if startup:
            rows.append(dict(name=f"{what}: start-up (mpirun, Python, imports; not in the rates)", unit="s",
                             hpcopt=med(startup), peer_name=None, peer=None, ratio=None, limit=None,
                             warmup_s=med(_listed(r["warmup_s"])), job_wall_s=sum(_listed(r.get("job_wall_s", 0)))))
    return rows
