"""Population-based training over MPI (Jaderberg et al. 2017), synchronous, in memory.

The population (sweep.trials members) is spread over the groups, member m on group m % groups; each
group keeps a Trainer per member and trains each for interval_steps in turn. After every interval all
ranks learn every member's metric (one allgather) and take the same decisions from it, keyed by
(seed, round): the worst `fraction` of the members each copy a member of the best `fraction` —
parameters, optimizer state and buffers, rank by rank from the source's group to the destination's
(point-to-point MPI messages of the flat buffers: no pickles, no files) — and continue with the
source's values, each numeric one multiplied by a factor of sweep.perturb drawn at random (clipped to
its range; choices are copied, never redrawn: an optimizer's state belongs to its name). Nothing
depends on timing, so a PBT run is bitwise repeatable.

After every exploit each member checkpoints; `--resume auto` restarts every member from the round all
of them completed. results.jsonl: a line per member per round (status running, the round, its values
and metric) and a final line (done).
"""
from __future__ import annotations

import math
import os
import time

import numpy as np
from mpi4py import MPI

from .. import checkpoint
from .. import comm as hcomm
from ..errors import ConfigError
from ..metrics import MetricsLog
from .search import random_values
from .spec import SweepSpec, trial_dir

TAG_COPY = 4000


def exploit_plan(spec: SweepSpec, scores: dict[int, float | None], values: dict[int, dict], rnd: int):
    """[(dst, src, new values)] for one round: the worst fraction copy one of the best, perturbed."""
    members = sorted(scores)
    nan_last = lambda m: (scores[m] is None or not math.isfinite(scores[m]))  # noqa: E731
    sign = -1.0 if spec.direction == "max" else 1.0
    ranked = sorted(members, key=lambda m: (nan_last(m), sign * (scores[m] or 0.0) if not nan_last(m) else 0.0, m))
    q = max(1, int(len(members) * spec.fraction))
    top, bottom = ranked[:q], ranked[-q:]
    rng = np.random.Generator(np.random.Philox(key=np.array([spec.seed, 1 << 32 | rnd], dtype=np.uint64)))
    plan = []
    for dst in bottom:
        src = top[int(rng.integers(len(top)))]
        new = dict(values[src])
        for d in spec.space:
            if d.kind == "choice":
                continue
            v = new[d.key] * spec.perturb[int(rng.integers(len(spec.perturb)))]
            v = min(max(v, d.low), d.high)
            new[d.key] = int(round(v)) if d.kind == "int_uniform" else float(f"{v:.6g}")
        plan.append((dst, src, new))
    return plan


def run_pbt(ctx, results) -> bool:
    """The population on every rank (collective over ctx.world). True when a signal interrupted it."""
    from ..train import Trainer

    spec, world = ctx.spec, ctx.world
    P, G, rpt = spec.trials, ctx.groups, spec.ranks_per_trial
    if P % G:
        err = ConfigError(f"{spec.path}: method = \"pbt\" needs sweep.trials (the population, {P}) to be a multiple "
                          f"of the {G} groups of this job")
        err.all_ranks = True
        raise err
    mine = [m for m in range(P) if m % G == ctx.index]
    history = world.bcast(results.history if results is not None else None, root=0)
    values = {m: (history[m]["values"] if m in history else random_values(spec, m)) for m in range(P)}
    interval, budget = spec.interval_steps, spec.budget_steps
    rounds = -(-budget // interval)
    start_round = min((history[m].get("round", 0) for m in range(P)), default=0) if len(history) == P else 0
    if start_round and any(history[m]["status"] == "done" for m in range(P)):
        start_round = rounds
    cfgs = {m: spec.trial_config(values[m], trial_dir(ctx.sweep_dir, m)) for m in mine}
    first = next(iter(cfgs.values()))
    shape = hcomm.agree(ctx.group, hcomm.grid_shape, ctx.group.Get_size(), first.parallel.dp, first.parallel.pp,
                        first.parallel.tp, first.source)
    grid = hcomm.make_grid(ctx.group, *shape, first.source)
    trainers = {}
    try:
        for m in mine:
            resume = None
            if start_round:
                resume = os.path.join(trial_dir(ctx.sweep_dir, m), "checkpoints",
                                      checkpoint.file_name(min(start_round * interval, budget)))
            trainers[m] = Trainer(cfgs[m], grid, trial_dir(ctx.sweep_dir, m), quiet=True, resume=resume,
                                  signals=ctx.signals, data=ctx.data)
        interrupted = False
        seconds = {m: 0.0 for m in mine}
        for rnd in range(start_round, rounds):
            until = min((rnd + 1) * interval, budget)
            for m in mine:
                t0 = time.perf_counter()
                trainers[m].fit(until=until)
                seconds[m] += time.perf_counter() - t0
            flags = np.array([ctx.signals.received], dtype=np.int64)
            world.Allreduce(MPI.IN_PLACE, flags, op=MPI.MAX)
            mine_scores = {m: trainers[m].last_record.get(spec.metric) for m in mine} if ctx.leader else {}
            scores = {}
            for d in world.allgather(mine_scores):
                scores.update(d)
            if until == budget:
                break
            plan = exploit_plan(spec, scores, values, rnd)
            copy_state(ctx, trainers, mine, plan)
            for dst, src, new in plan:
                values[dst] = new
                if dst in trainers:
                    cfg = spec.trial_config(new, trial_dir(ctx.sweep_dir, dst))
                    trainers[dst].set_hyperparameters(cfg)
                    if grid.is_root:
                        log = MetricsLog(trial_dir(ctx.sweep_dir, dst))
                        log.write(dict(event="exploit", step=until, source=src, values=new))
                        log.close()
            for m in mine:
                trainers[m].save()
            if results is not None:
                for m in range(P):
                    results.write(dict(trial=m, dir=os.path.basename(trial_dir(ctx.sweep_dir, m)), values=values[m],
                                       status="running", round=rnd + 1, step=until, metric_name=spec.metric,
                                       metric=scores.get(m), copied_from=next((s for d, s, _ in plan if d == m), None)))
            if flags[0]:
                interrupted = True
                break
        if not interrupted:
            final = {}
            for m in mine:
                if trainers[m].step_count < budget:   # a resumed, finished population: nothing left to train
                    trainers[m].fit()
                final[m] = (trainers[m].last_record.get(spec.metric), trainers[m].step_count, round(seconds[m], 3))
            if start_round >= rounds:
                for m in mine:
                    final[m] = (trainers[m].evaluate().get(spec.metric), trainers[m].step_count, 0.0)
            gathered = {}
            for d in world.allgather(final if ctx.leader else {}):
                gathered.update(d)
            if results is not None:
                for m in range(P):
                    metric, steps, secs = gathered[m]
                    ok = metric is not None and math.isfinite(metric)
                    results.write(dict(trial=m, dir=os.path.basename(trial_dir(ctx.sweep_dir, m)), values=values[m],
                                       status="done" if ok else "failed", metric_name=spec.metric, metric=metric,
                                       steps=steps, round=rounds, seconds=secs,
                                       reason=None if ok else f"{spec.metric} is {metric} at the end"))
        return interrupted
    finally:
        for t in trainers.values():
            t.release()
        grid.free()


def copy_state(ctx, trainers: dict, mine: list[int], plan) -> None:
    """Each (dst, src): src's arrays into dst's, rank r of src's group to rank r of dst's group."""
    G, rpt, r = ctx.groups, ctx.spec.ranks_per_trial, ctx.group.Get_rank()
    state = {m: trainers[m].strategy.local_state() for m in mine}   # collective within the group, same order
    requests, loaded = [], []
    for dst, src, _ in plan:
        if dst in state and src in state:
            for a, b in zip(state[dst], state[src]):
                np.copyto(a, b)
            loaded.append(dst)
        elif src in state:
            peer = (dst % G) * rpt + r
            requests += [ctx.world.Isend(a, dest=peer, tag=TAG_COPY + 64 * dst + i) for i, a in enumerate(state[src])]
        elif dst in state:
            peer = (src % G) * rpt + r
            requests += [ctx.world.Irecv(a, source=peer, tag=TAG_COPY + 64 * dst + i) for i, a in enumerate(state[dst])]
            loaded.append(dst)
    MPI.Request.Waitall(requests)
    for dst in loaded:
        trainers[dst].strategy.local_state_loaded(state[dst])
