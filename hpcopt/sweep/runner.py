"""Algorithm parallelism: the world splits into groups of `ranks_per_trial` ranks (Comm.Split); each
group trains one trial at a time, an ordinary Trainer on the group's communicator; world rank 0 also
coordinates (hands out trials, takes results, asks the pruner), between its own steps.

    group leader:  ask -> trial (or None: done) -> trial to its group -> train -> result -> ask ...
    rank 0:        the same, and between its steps (and when its group is idle) answers the others

Groups that finish early take the next trial (dynamic scheduling). Every wait for a message is a
probe-and-sleep loop (0.1 -> 5 ms), never a blocking MPI call that spins: a waiting rank gives its core
to the trials of the other groups (Open MPI's blocking receives poll at 100% CPU). A trial that fails
with a user error (its configuration refused, a non-finite stop) is recorded as failed with its one-line
reason and the sweep goes on; any other error ends the whole job (cli.main aborts the world).

Files (rank 0): SWEEP_DIR/results.jsonl (a line per trial event: running, then done/failed/pruned/
interrupted), SWEEP_DIR/trial_NNNN/ (a run directory), SWEEP_DIR/best.toml, SWEEP_DIR/sweep.toml.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass

from mpi4py import MPI

from .. import comm as hcomm
from .. import config, rundir
from ..errors import ConfigError, DataError, HpcoptError
from .search import Search
from .spec import SweepSpec, trial_dir

TAG_REQUEST, TAG_REPLY, TAG_TRIAL = 301, 302, 303
FINAL = ("done", "failed", "pruned")


def wait_message(comm: MPI.Comm, source: int, tag: int):
    """Receive one message without spinning: probe, sleep (0.1 ms growing to 5 ms), probe again."""
    delay = 1e-4
    while not comm.iprobe(source=source, tag=tag):
        time.sleep(delay)
        delay = min(2 * delay, 5e-3)
    return comm.recv(source=source, tag=tag)


class Results:
    """results.jsonl: appended a line per event, flushed and synced; the last line of a trial wins."""

    def __init__(self, sweep_dir: str):
        self.path = os.path.join(sweep_dir, "results.jsonl")
        self.history = read_results(self.path)
        try:
            self.file = open(self.path, "a", buffering=1)
        except OSError as e:
            raise DataError(f"{self.path}: cannot write ({e.strerror or e})") from None

    def write(self, rec: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.history[rec["trial"]] = rec

    def close(self) -> None:
        self.file.close()


def read_results(path: str) -> dict[int, dict]:
    """trial -> its last record; a torn last line (the job was killed mid-write) is ignored."""
    out: dict[int, dict] = {}
    if not os.path.exists(path):
        return out
    with open(path) as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            out[int(rec["trial"])] = rec
        except (ValueError, KeyError, TypeError):
            if i == len(lines) - 1:
                continue
            raise DataError(f"{path}: line {i + 1} is not a results record") from None
    return out


@dataclass
class Context:
    """What every rank knows about the sweep."""
    spec: SweepSpec
    world: MPI.Comm          # a duplicate of COMM_WORLD: sweep messages never meet a trial's
    group: MPI.Comm          # this rank's group (a trial's world)
    gctl: MPI.Comm           # the group's control messages (leader -> members)
    index: int               # the group's number
    groups: int
    sweep_dir: str
    signals: object
    data: object = None      # data.shared.NodeData when every trial reads the same file
    coordinator: "Coordinator | None" = None

    @property
    def leader(self) -> bool:
        return self.group.Get_rank() == 0

    def request(self, msg: dict):
        """Leader: send a request to the coordinator, wait (sleeping) for its reply; rank 0 calls it directly."""
        if self.coordinator is not None:
            return self.coordinator.handle(msg)
        self.world.send(msg, dest=0, tag=TAG_REQUEST)
        return wait_message(self.world, 0, TAG_REPLY)


class Coordinator:
    """World rank 0: the search, the results file, who has which trial."""

    def __init__(self, ctx: Context, search: Search, results: Results):
        self.ctx, self.search, self.results = ctx, search, results
        self.stopping = False          # a signal arrived: hand out no more trials
        self.finished_groups = 0       # groups told there is nothing left

    def poll(self) -> None:
        """Answer every request waiting (cheap when none: one probe)."""
        w, st = self.ctx.world, MPI.Status()
        while w.iprobe(source=MPI.ANY_SOURCE, tag=TAG_REQUEST, status=st):
            src = st.Get_source()
            msg = w.recv(source=src, tag=TAG_REQUEST)
            w.send(self.handle(msg), dest=src, tag=TAG_REPLY)

    def handle(self, msg: dict):
        kind = msg["kind"]
        if self.ctx.signals.received:
            self.stopping = True
        if kind == "ask":
            job = None if self.stopping else self.search.ask()
            if job is None:
                self.finished_groups += 1
                return None
            t, values, resumed = job
            self.results.write(dict(trial=t, dir=os.path.basename(trial_dir(self.ctx.spec.sweep_dir(), t)),
                                    values=values, status="running", group=msg["group"], resumed=resumed,
                                    metric_name=self.ctx.spec.metric, start=round(time.time(), 3)))
            return dict(trial=t, values=values, resumed=resumed)
        if kind == "report":
            rec = self.results.history.get(msg["trial"], {})
            inter = dict(rec.get("intermediate") or {})
            inter[str(msg["step"])] = msg["value"]
            rec["intermediate"] = inter
            return self.search.report(msg["trial"], msg["step"], msg["value"])
        if kind == "result":
            t = msg["trial"]
            rec = dict(self.results.history.get(t, {}))
            rec.update(msg["record"], end=round(time.time(), 3))
            self.results.write(rec)
            if rec["status"] == "interrupted":
                self.stopping = True
            else:
                self.search.tell(t, rec["status"], rec.get("metric"))
            return None
        raise ValueError(f"unknown request {kind!r}")


class TrialHooks:
    """What a sweep adds to a trial's loop: rank 0 answers requests after each of its steps; under asha
    the leader reports each evaluation and the group stops together when the pruner says so."""

    def __init__(self, ctx: Context, trial: int):
        self.ctx, self.trial = ctx, trial
        self.intermediate: dict[str, float] = {}

    def after_step(self, trainer) -> None:
        if self.ctx.coordinator is not None:
            self.ctx.coordinator.poll()

    def after_eval(self, trainer, step: int, rec: dict) -> bool:
        spec = self.ctx.spec
        if spec.method != "asha":
            return False
        value = rec.get(spec.metric)
        self.intermediate[str(step)] = value
        prune = None
        if self.ctx.leader:
            prune = self.ctx.request(dict(kind="report", trial=self.trial, step=step, value=value))
        return bool(self.ctx.group.bcast(prune, root=0))


def run_trial(ctx: Context, job: dict) -> dict:
    """Train one trial on the group (collective over ctx.group); the result record (on every rank)."""
    from ..train import Trainer

    spec, t = ctx.spec, job["trial"]
    out_dir = trial_dir(ctx.sweep_dir, t)
    t0 = time.perf_counter()
    rec = dict(steps=0, metric=None, reason=None)
    grid = trainer = None
    try:
        cfg = hcomm.agree(ctx.group, trial_config, spec, job["values"], out_dir)
        shape = hcomm.agree(ctx.group, hcomm.grid_shape, ctx.group.Get_size(), cfg.parallel.dp, cfg.parallel.pp,
                            cfg.parallel.tp, cfg.source)
        grid = hcomm.make_grid(ctx.group, *shape, cfg.source)
        trainer = Trainer(cfg, grid, out_dir, quiet=True, resume="auto" if job["resumed"] else None,
                          signals=ctx.signals, data=ctx.data)
        hooks = TrialHooks(ctx, t)
        summary = trainer.fit(hooks=hooks)
        if summary.finished_at is not None:      # finished before the sweep could record it
            scores = trainer.evaluate()
            rec.update(status="done", steps=summary.finished_at, metric=scores.get(spec.metric))
        else:
            last = trainer.last_record
            status = {"pruned": "pruned", None: "done"}.get(summary.stopped_by, "interrupted")
            rec.update(status=status, steps=trainer.step_count, metric=last.get(spec.metric))
            if status == "interrupted":
                rec["reason"] = f"{summary.stopped_by} at step {trainer.step_count}"
        if hooks.intermediate:
            rec["intermediate"] = hooks.intermediate
    except HpcoptError as e:
        if not getattr(e, "all_ranks", False):
            raise                      # one rank alone: the others cannot know; cli.main ends the job
        rec.update(status="failed", reason=str(e))
        if trainer is not None:
            rec["steps"] = trainer.step_count
    finally:
        if trainer is not None:
            trainer.release()
        if grid is not None:
            grid.free()
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    m = rec.get("metric")
    if rec["status"] == "done" and (m is None or not math.isfinite(m)):
        rec.update(status="failed", reason=f"{spec.metric} is {m} at the end")
    return rec


def trial_config(spec: SweepSpec, values: dict, out_dir: str) -> config.JobConfig:
    cfg = spec.trial_config(values, out_dir)
    if spec.method == "asha" and spec.min_steps:   # evaluate at every rung (min_steps * rf^k)
        cfg.run.eval_every = spec.min_steps
        cfg.run.log_every = math.gcd(cfg.run.log_every, spec.min_steps)
    return cfg


def group_loop(ctx: Context) -> None:
    """Every rank: take trials until the coordinator has none left."""
    members = range(1, ctx.group.Get_size())
    while True:
        if ctx.leader:
            job = ctx.request(dict(kind="ask", group=ctx.index))
            for r in members:
                ctx.gctl.send(job, dest=r, tag=TAG_TRIAL)
        else:
            job = wait_message(ctx.gctl, 0, TAG_TRIAL)
        if job is None:
            return
        rec = run_trial(ctx, job)
        if ctx.leader:
            ctx.request(dict(kind="result", trial=job["trial"], record=rec))


def leaderboard(spec: SweepSpec, history: dict[int, dict]) -> list[dict]:
    """Records, best first: finished trials by metric, then pruned (by their last report), then failed."""
    def key(r):
        m = r.get("metric")
        order = {"done": 0, "pruned": 1, "interrupted": 2, "running": 2, "failed": 3}[r["status"]]
        if m is None or not math.isfinite(m):
            return (order, math.inf, r["trial"])
        return (order, -m if spec.direction == "max" else m, r["trial"])
    return sorted(history.values(), key=key)


def format_table(spec: SweepSpec, rows: list[dict], limit: int = 20) -> str:
    head = ["rank", "trial", "status", spec.metric, "steps", "seconds", *spec.keys]
    cells = []
    for i, r in enumerate(rows[:limit]):
        m = r.get("metric")
        cells.append([str(i + 1), str(r["trial"]), r["status"], "-" if m is None else f"{m:.4f}", str(r.get("steps", "")),
                      f"{r.get('seconds', 0):.1f}", *(_short(r["values"].get(k)) for k in spec.keys)])
    widths = [max(len(h), *(len(c[j]) for c in cells)) if cells else len(h) for j, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more in results.jsonl")
    return "\n".join(lines)


def _short(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_best(spec: SweepSpec, best: dict) -> str:
    cfg = spec.trial_config(best["values"], "")
    cfg.run.name = f"{spec.name}-best"
    text = config.to_toml(cfg).replace(config.to_toml(cfg).splitlines()[0],
                                       f"# the best trial ({best['dir']}, {spec.metric} = {best.get('metric')}) of "
                                       f"sweep {spec.name}: hpcopt train best.toml", 1)
    path = os.path.join(spec.sweep_dir(), "best.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def start(spec: SweepSpec, resume: str | None, source_path: str):
    """Rank 0, under agree: lock the sweep directory, refuse a fresh sweep over an old one, keep a copy
    of the sweep file. Returns (lock, history)."""
    d = spec.sweep_dir()
    if os.path.exists(d) and not os.path.isdir(d):
        raise ConfigError(f"{d}: not a directory (sweep.out_dir)")
    if os.path.isdir(d) and os.listdir(d) and not os.path.exists(os.path.join(d, "results.jsonl")):
        if set(os.listdir(d)) - {rundir.LOCK, "sweep.toml"}:
            raise ConfigError(f"{d}: is not empty and not a sweep directory; choose sweep.name or sweep.out_dir")
    lock, _ = rundir.acquire(d)
    try:
        history = read_results(os.path.join(d, "results.jsonl"))
        if history and resume is None:
            raise ConfigError(f"{d}: already holds a sweep ({len(history)} trials); continue it with --resume "
                              f"auto, or set sweep.name to a new one")
        shutil.copyfile(source_path, os.path.join(d, "sweep.toml"))
    except BaseException:
        lock.release()
        raise
    return lock, history


def run_sweep(spec: SweepSpec, world: MPI.Comm, resume: str | None, signals, quiet: bool = False) -> int:
    """The whole sweep, collective over `world`. Returns the exit code (75: interrupted, resume it)."""
    from ..data.shared import NodeData

    rank = world.Get_rank()
    ctl = world.Dup()
    lock, history = hcomm.agree(ctl, start, spec, resume, spec.path) if rank == 0 else hcomm.agree(ctl, lambda: (None, None))
    try:
        index = rank // spec.ranks_per_trial
        group = ctl.Split(color=index, key=rank)
        ctx = Context(spec, ctl, group, group.Dup(), index, ctl.Get_size() // spec.ranks_per_trial,
                      spec.sweep_dir(), signals)
        if "data.path" not in spec.keys:
            loss = spec.job_doc.get("model", {}).get("loss")
            ctx.data = NodeData(spec.job_doc.get("data", {}).get("path", config.DataConfig().path), ctl,
                                nonzero_targets=loss == "rel_l2")
        results = None
        if rank == 0:
            results = Results(ctx.sweep_dir)
            ctx.coordinator = Coordinator(ctx, Search(spec, history), results)
            done = sum(r["status"] in FINAL for r in history.values())
            print(f"hpcopt: sweep {spec.name} ({spec.method}, {spec.trials} trials, metric {spec.metric}) on "
                  f"{ctx.groups} groups of {spec.ranks_per_trial} rank(s); directory {ctx.sweep_dir}"
                  + (f"; resuming: {done} trials finished" if history else ""), flush=True)
        if spec.method == "pbt":
            from .pbt import run_pbt

            interrupted = run_pbt(ctx, results)
        else:
            group_loop(ctx)
            interrupted = False
            if rank == 0:          # answer the other groups until every one has been told "done"
                coord, delay = ctx.coordinator, 1e-4
                while coord.finished_groups < ctx.groups:
                    coord.poll()
                    time.sleep(delay)
                    delay = min(2 * delay, 5e-3)
                interrupted = coord.stopping
        interrupted = ctl.bcast(interrupted, root=0)
        if ctx.data is not None:
            ctx.data.release()
        if rank == 0:
            results.close()
            rows = leaderboard(spec, results.history)
            if not quiet:
                print(format_table(spec, rows), flush=True)
            best = rows[0] if rows and rows[0]["status"] == "done" else None
            if interrupted:
                print(f"hpcopt: sweep {spec.name} stopped by a signal: trials in progress checkpointed; continue "
                      f"with --resume auto", flush=True)
            elif best is not None:
                path = write_best(spec, best)
                print(f"hpcopt: best trial {best['trial']} ({spec.metric} = {best['metric']:.4f}): "
                      + ", ".join(f"{k} = {_short(v)}" for k, v in best["values"].items()) + f"; wrote {path}",
                      flush=True)
            else:
                print(f"hpcopt: sweep {spec.name}: no trial finished", file=sys.stderr, flush=True)
        group.Free()
        ctx.gctl.Free()
        return 75 if interrupted else 0
    finally:
        if lock is not None:
            lock.release()
