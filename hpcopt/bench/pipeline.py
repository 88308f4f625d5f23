"""Pipeline bubble and step time: GPipe vs 1F1B for P stages and M micro-batches, against the theory.

Run it under a launcher (`mpirun -n P hpcopt bench pipeline`: P = the world size, dp = tp = 1); run
alone, it launches itself once per `--pp` value with `mpirun -n P`. The model is P·L Dense layers of
width W (`--layers-per-stage`, `--width`), balanced by parameters, so every stage does the same work;
each micro-batch has `--rows` rows, so a step is M·rows samples and a micro-batch costs the same for
every M. Timed: `--steps` steps after 2 warm-up steps, repeated `--repeats` times; medians.

The bubble of a step is measured two ways, both from the runner's per-action records:
  wall    per stage, 1 - (wall time inside forward/backward) / (first compute start to last compute end
          over all stages); the mean over stages. Honest when every rank has a core of its own.
  replay  the schedule replayed with each action's measured CPU time (this thread's, so time spent
          descheduled does not count) on a model machine with one core per stage and free messages:
          the bubble the measured stage costs give when ranks do not share cores. With more ranks
          than cores (P = 4 on 2 cores) the wall figure mixes in time slicing, and this is the one
          to compare with the theory.
Theory: (P-1)/(M+P-1) for equal stages. `stage_costs_model` replays the schedule with each stage's
median forward and backward cost: what the stages' unequal costs alone add to the theory (stage 0
skips its first layer's input gradient; the last computes the loss), the rest of `replay` is jitter. Step time: wall time of a whole step (update included).
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
    p.add_argument("--pp", default="2,4", help="stage counts P, comma separated (one mpirun each)")
    p.add_argument("--micro-batches", default="4,8,16", help="micro-batch counts M, comma separated")
    p.add_argument("--schedules", default="gpipe,1f1b")
    p.add_argument("--width", type=int, default=512, help="layer width W")
    p.add_argument("--layers-per-stage", type=int, default=2)
    p.add_argument("--rows", type=int, default=64, help="rows per micro-batch")
    p.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=3)


def _launched_alone() -> bool:
    return not any(v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "SLURM_STEP_ID"))


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def run(args) -> list[dict]:
    if not _launched_alone():
        return _measure(args)
    rows = []
    for P in _ints(args.pp):
        cmd = ["mpirun", "-n", str(P), "--oversubscribe", "--bind-to", "none"]
        if os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
        cmd += [sys.executable, "-m", "hpcopt", "bench", "pipeline", "--json", "--threads", "1",
                "--pp", str(P), "--micro-batches", args.micro_batches, "--schedules", args.schedules,
                "--width", str(args.width), "--layers-per-stage", str(args.layers_per_stage),
                "--rows", str(args.rows), "--steps", str(args.steps), "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"bench pipeline under mpirun -n {P} failed:\n{out.stderr}")
        rows += [{k: v for k, v in json.loads(line).items() if k != "suite"}
                 for line in out.stdout.splitlines() if line.startswith("{")]
    return rows


def _strategy(P: int, M: int, schedule: str, args, grid):
    from .. import config, parallel

    W, L = args.width, args.layers_per_stage
    doc = dict(model=dict(layers=[W] * (P * L + 1), loss="mse"), data=dict(batch_size=args.rows * M),
               optimizer=dict(name="sgd", lr=1e-4),
               parallel=dict(strategy="pipeline", pp=P, micro_batches=M, schedule=schedule))
    cfg = config.from_doc(doc, "bench pipeline")
    return parallel.build(cfg, grid, args.rows * M)


def _measure(args) -> list[dict]:
    import numba
    from mpi4py import MPI

    from ..comm import make_grid
    from ..parallel.schedule import build_schedule, simulate, theoretical_bubble

    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    world = MPI.COMM_WORLD
    P = world.Get_size()
    grid = make_grid(world, 1, P, 1, "bench pipeline")
    rng = np.random.default_rng(0)
    results = []
    for M in _ints(args.micro_batches):
        x = rng.standard_normal((args.rows * M, args.width), dtype=np.float32)
        labels = rng.integers(0, args.width, args.rows * M).astype(np.int64)
        for schedule in args.schedules.split(","):
            strat = _strategy(P, M, schedule, args, grid)
            sched = build_schedule(schedule, P, M)
            wall_b, replay_b, step_s = [], [], []
            per_stage: dict[tuple[int, str], list[float]] = {}  # (stage, op) -> CPU seconds of each action
            t = 0
            for rep in range(args.repeats + 1):  # the first round (2 steps) warms up
                for _ in range(args.steps if rep else 2):
                    t += 1
                    world.Barrier()
                    t0 = time.perf_counter()
                    strat.step(x, labels, t, 1e-4)
                    t1 = time.perf_counter()
                    st = strat.executor.last_stats
                    mine = dict(busy=st.busy, first=st.events[0][2], last=st.end, step=t1 - t0,
                                costs=[(op, mb, cpu) for op, mb, _, _, cpu in st.events],
                                peak=st.peak_activations)
                    every = world.gather(mine, root=0)
                    if world.Get_rank() != 0 or rep == 0:
                        continue
                    span = max(e["last"] for e in every) - min(e["first"] for e in every)
                    wall_b.append(1 - statistics.mean(e["busy"] for e in every) / span)
                    costs = {(s, op, mb): cpu for s, e in enumerate(every) for op, mb, cpu in e["costs"]}
                    tl = simulate(sched, costs=costs)
                    replay_b.append(statistics.mean(tl.bubble(s) for s in range(P)))
                    for key, cpu in costs.items():
                        per_stage.setdefault(key[:2], []).append(cpu)
                    step_s.append(max(e["step"] for e in every))
            if world.Get_rank() == 0:
                med = statistics.median
                theory = theoretical_bubble(P, M)
                # the schedule with each stage's median forward and backward cost: imbalance, no jitter
                typical = {(s, op, k): statistics.median(v) for (s, op), v in per_stage.items() for k in range(M)}
                tl = simulate(sched, costs=typical)
                stages_model = statistics.mean(tl.bubble(s) for s in range(P))
                results.append(dict(P=P, M=M, schedule=schedule, theory=theory, wall=med(wall_b),
                                    replay=med(replay_b), stages_model=stages_model, step_s=med(step_s), peak=every[0]["peak"],
                                    peaks=[e["peak"] for e in every]))
    if world.Get_rank() != 0:
        sys.exit(0)  # rank 0 reports
    return _rows(results, args)


def _rows(results: list[dict], args) -> list[dict]:
    rows = []
    for r in results:
        rows.append(dict(name=f"bubble P={r['P']} M={r['M']} {r['schedule']}", unit="fraction of step",
                         hpcopt=r["replay"], peer_name="theory (P-1)/(M+P-1)", peer=r["theory"],
                         ratio=r["theory"] / r["replay"] if r["replay"] > 0 else None, limit=None,
                         wall=r["wall"], stage_costs_model=r["stages_model"], replay_minus_theory_pp=100 * (r["replay"] - r["theory"]),
                         wall_minus_theory_pp=100 * (r["wall"] - r["theory"]), step_ms=1e3 * r["step_s"],
                         peak_activations_stage0=r["peak"], peak_activations=r["peaks"]))
    by = {(r["P"], r["M"], r["schedule"]): r for r in results}
    for (P, M, s), r in by.items():
        g = by.get((P, M, "gpipe"))
        if s == "1f1b" and g is not None:
            rows.append(dict(name=f"step P={P} M={M}: 1f1b vs gpipe", unit="ms/step",
                             hpcopt=1e3 * r["step_s"], peer_name="gpipe", peer=1e3 * g["step_s"],
                             ratio=g["step_s"] / r["step_s"], limit=None,
                             peak_activations_stage0=r["peak"], peer_peak_activations_stage0=g["peak"],
                             samples_per_s=args.rows * M / r["step_s"]))
    return rows
