"""run.reproducible, measured: the data-parallel step of the MLP 784-1024-1024-10 (Adam) with
reproducible = true against the default path IN THE SAME RUN (timed in alternating pairs, so the
machine's drifting load hits both alike), on 1 and --ranks ranks; and the exact-sum collective
(reprosum.allreduce_exact: fixed point in int64, one Allreduce) against a plain float32 Allreduce of the
same 1.9M-element buffer. Target: step overhead <= 10% (goal <= 5%).

Run alone (`hpcopt bench reproducible`) it launches itself with mpirun -n 1 and -n --ranks.
What this 2-core machine cannot show: ranks on separate nodes (the reproducible path moves the
layers' rows with Allgather instead of summing dW with Allreduce: fewer bytes when the batch per
step is small against the layer, more when it is large).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np


def add_arguments(p) -> None:
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--layers", default="784,1024,1024,10")
    p.add_argument("--batch", type=int, default=64, help="samples per rank per step")
    p.add_argument("--steps", type=int, default=10, help="steps per timed sample")
    p.add_argument("--repeats", type=int, default=7)


def _launched_alone() -> bool:
    return not any(v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "SLURM_STEP_ID"))


def run(args) -> list[dict]:
    if not _launched_alone():
        return _measure(args)
    rows = []
    for n in sorted({1, args.ranks}):
        threads = max(1, args.threads // n)
        cmd = ["mpirun", "-n", str(n), "--oversubscribe", "--bind-to", "none"]
        if os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
        cmd += [sys.executable, "-m", "hpcopt", "bench", "reproducible", "--json", "--threads", str(threads),
                "--layers", args.layers, "--batch", str(args.batch), "--steps", str(args.steps),
                "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"bench reproducible under mpirun -n {n} failed:\n{out.stderr}")
        rows += [{k: v for k, v in json.loads(line).items() if k != "suite"}
                 for line in out.stdout.splitlines() if line.startswith("{")]
    return rows


def _strategy(widths, batch, world, reproducible: bool):
    from .. import comm as hcomm
    from .. import parallel
    from ..config import from_doc

    cfg = from_doc(dict(model=dict(layers=widths), optimizer=dict(name="adam", lr=1e-3),
                        data=dict(batch_size=batch * world.Get_size()), run=dict(reproducible=reproducible)),
                   "bench reproducible")
    grid = hcomm.make_grid(world, "auto", 1, 1, cfg.source)
    return parallel.build(cfg, grid, batch * world.Get_size())


def _pairs(a, b, comm, steps: int, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds per call of a and of b, timed in pairs after a barrier (which goes first alternates)."""
    times: dict = {a: [], b: []}
    for r in range(repeats):
        for f in ((a, b) if r % 2 == 0 else (b, a)):
            comm.Barrier()
            t0 = time.perf_counter()
            for _ in range(steps):
                f()
            comm.Barrier()
            times[f].append((time.perf_counter() - t0) / steps)
    return times[a], times[b]


def _measure(args) -> list[dict]:
    import numba
    from mpi4py import MPI

    from ..parallel import reprosum

    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    world = MPI.COMM_WORLD
    rank, n = world.Get_rank(), world.Get_size()
    widths = [int(w) for w in args.layers.split(",")]
    rng = np.random.default_rng(rank)
    x = rng.random((args.batch, widths[0]), dtype=np.float32)
    y = rng.integers(0, widths[-1], args.batch)
    plain, repro = _strategy(widths, args.batch, world, False), _strategy(widths, args.batch, world, True)
    t = [0, 0]

    def step_plain():
        t[0] += 1
        plain.step(x, y, t[0], 1e-3)

    def step_repro():
        t[1] += 1
        repro.step(x, y, t[1], 1e-3)

    for f in (step_plain, step_repro, step_plain, step_repro):   # compile, verify BLAS paths, touch buffers
        f()
    tp, tr = _pairs(step_plain, step_repro, world, args.steps, args.repeats)
    med = statistics.median
    model = f"MLP {args.layers}, adam, batch {args.batch}/rank, {n} rank(s) x {args.threads} thread(s)"
    rows = [dict(name=f"step, {model}", unit="ms", hpcopt=1e3 * med(tr),
                 peer_name="the default (not reproducible) step, same run", peer=1e3 * med(tp),
                 ratio=med(tp) / med(tr), limit=None, overhead=med(tr) / med(tp) - 1, target_overhead=0.10)]
    if n > 1:
        buf = rng.standard_normal(plain.flat.grad.size).astype(np.float32)
        work, out = buf.copy(), np.empty_like(buf)

        def exact():
            reprosum.allreduce_exact(world, buf, out)

        def float_sum():
            np.copyto(work, buf)
            world.Allreduce(MPI.IN_PLACE, work, op=MPI.SUM)

        exact()
        float_sum()
        te, tf = _pairs(exact, float_sum, world, args.steps, args.repeats)
        rows.append(dict(name=f"exact sum of {buf.size / 1e6:.2f}M float32 over {n} ranks (int64 fixed point, "
                              f"one Allreduce)", unit="ms", hpcopt=1e3 * med(te),
                         peer_name="float32 Allreduce, same buffer", peer=1e3 * med(tf), ratio=med(tf) / med(te),
                         limit=None))
    return rows if rank == 0 else []
