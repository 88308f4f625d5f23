"""`optimizer.name = "auto"`: race the optimizer zoo, continue the winner.

Every candidate (each optimizer of RACE at its documented default lr and at that lr x 1/3 and x 3) trains
the job's model from the job's initialisation on the job's batches for optimizer.auto_fraction of the
steps, as a grid sweep of the world in groups (one rank each for data parallelism; pp x tp ranks for a
model-parallel layout) in RUN_DIR/auto/. The lr schedule keeps the whole run's horizon. The candidate
with the best test score at the end of the race wins (test loss for classes, relative L2 for
regression); every rank then continues it, with its parameters and optimizer state (the candidate's
final checkpoint, read on the job's own layout) to the last step. So the winner's run has the job's
total number of steps. The choice, the table and the reason go to metrics.jsonl (event "auto") and
stdout; RUN_DIR/auto/choice.json makes `--resume auto` continue without racing again.
"""
from __future__ import annotations

import json
import math
import os

from mpi4py import MPI

from .. import checkpoint, config
from ..comm import agree, root_print
from ..errors import ConfigError
from .spec import Dim, SweepSpec, trial_dir

RACE = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adadelta", "adam", "adamax")
LR_FACTORS = (1 / 3, 1.0, 3.0)


def candidates() -> list[dict]:
    from .. import optim

    out = []
    for name in RACE:
        lr = optim.DEFAULTS[name]["lr"]
        out += [{"optimizer.name": name, "optimizer.lr": float(f"{lr * f:.4g}")} for f in LR_FACTORS]
    return out


def total_steps(cfg: config.JobConfig) -> int:
    """The run's steps, as the Trainer counts them (run.steps, or epochs of whole global batches)."""
    if cfg.run.steps:
        return cfg.run.steps
    from ..data import inspect

    info = inspect(cfg.data.path, check_values=False)
    batch = info.sizes["train"] if cfg.data.batch_size == "all" else cfg.data.batch_size
    return cfg.run.epochs * (info.sizes["train"] // batch)


def resolve(cfg: config.JobConfig, world: MPI.Comm, out_dir: str, resume: str | None, signals):
    """Race (or, resumed, read the recorded choice). Returns (the job with the winner, the checkpoint to
    continue from or the caller's resume, True) or (None, None, False) when a signal stopped the race."""
    from .runner import read_results, run_sweep

    auto_dir = os.path.join(out_dir, "auto")
    choice_path = os.path.join(auto_dir, "choice.json")
    choice = agree(world, _read_choice, choice_path)
    steps = agree(world, total_steps, cfg)
    race_steps = max(1, round(steps * cfg.optimizer.auto_fraction))
    if choice is None:
        spec = race_spec(cfg, steps, race_steps, auto_dir, world.Get_size())
        again = "auto" if agree(world, os.path.exists, os.path.join(auto_dir, "results.jsonl")) else None
        root_print(f"hpcopt: optimizer.name = \"auto\": racing {len(spec.candidates)} candidates for {race_steps} of "
                   f"{steps} steps ({cfg.optimizer.auto_fraction:g}), then the winner continues")
        code = run_sweep(spec, world, again, signals, quiet=False)
        if code == 75:
            return None, None, False
        choice = None
        if world.Get_rank() == 0:
            choice = decide(spec, read_results(os.path.join(auto_dir, "results.jsonl")), race_steps)
            choice["checkpoint"] = os.path.join(trial_dir(auto_dir, choice["trial"]), "checkpoints",
                                                checkpoint.file_name(race_steps))
            with open(choice_path, "w") as f:
                json.dump(choice, f, indent=1)
        choice = world.bcast(choice, root=0)
        if choice.get("error"):
            err = ConfigError(f"{cfg.source}: optimizer.name = \"auto\": {choice['error']}")
            err.all_ranks = True
            raise err
        root_print(f"hpcopt: optimizer auto: chose {choice['name']} (lr {choice['lr']:g}): {choice['reason']}")
        if world.Get_rank() == 0:
            from ..metrics import MetricsLog

            log = MetricsLog(out_dir)
            log.write(dict(event="auto", step=race_steps, choice=choice["name"], lr=choice["lr"],
                           reason=choice["reason"], table=choice["table"]))
            log.close()
    winner = winner_config(cfg, choice, steps)
    has_own = agree(world, lambda: bool(checkpoint.list_checkpoints(out_dir)))
    start = resume if (resume is not None and has_own) else choice["checkpoint"]
    return winner, start, True


def _read_choice(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def job_doc(cfg: config.JobConfig, steps: int) -> dict:
    """The job as a TOML document without optimizer.name's race key, with the lr schedule's horizon
    fixed to the whole run's steps (the race and the winner's continuation follow one schedule)."""
    doc = {s: {k: v for k, v in t.items() if v is not None} for s, t in config.as_dict(cfg).items()}
    doc["optimizer"].pop("auto_fraction", None)
    if cfg.model.layer:
        doc["model"].pop("layers", None), doc["model"].pop("activation", None)
    else:
        doc["model"].pop("layer", None), doc["model"].pop("input", None)
    if cfg.schedule.name in ("cosine", "linear") and not cfg.schedule.total_steps:
        doc["schedule"]["total_steps"] = steps
    return doc


def race_spec(cfg: config.JobConfig, steps: int, race_steps: int, auto_dir: str, world_size: int) -> SweepSpec:
    doc = job_doc(cfg, steps)
    doc["run"].pop("epochs", None)
    doc["checkpoint"]["every_steps"] = 0
    doc["checkpoint"]["every_seconds"] = 0.0
    per = cfg.parallel.pp * cfg.parallel.tp
    if world_size % per:
        raise ConfigError(f"{cfg.source}: parallel.pp * parallel.tp = {per} does not divide the {world_size} ranks")
    doc["parallel"]["dp"] = 1
    regression = cfg.model.loss in ("l1", "huber", "rel_l2") or _regression_file(cfg)
    cands = candidates()
    return SweepSpec(path=cfg.source, job=cfg.source, job_doc=doc,
                     space=[Dim("optimizer.name", "choice", values=list(RACE)),
                            Dim("optimizer.lr", "choice", values=sorted({c["optimizer.lr"] for c in cands}))],
                     name="auto", out_dir=auto_dir, method="grid", trials=len(cands), ranks_per_trial=per,
                     metric="test_rel_l2" if regression else "test_loss", budget_steps=race_steps, candidates=cands)


def _regression_file(cfg) -> bool:
    import h5py

    with h5py.File(cfg.data.path, "r") as f:
        task = f.attrs.get("task", "classification")
    return (task.decode() if isinstance(task, bytes) else str(task)) == "regression"


def decide(spec: SweepSpec, history: dict[int, dict], race_steps: int) -> dict:
    from .runner import leaderboard

    rows = leaderboard(spec, history)
    table = [dict(name=r["values"]["optimizer.name"], lr=r["values"]["optimizer.lr"], status=r["status"],
                  **{spec.metric: r.get("metric")}) for r in rows]
    done = [r for r in rows if r["status"] == "done"]
    if not done:
        return dict(error="no candidate of the race finished (see " + os.path.join(spec.sweep_dir(), "results.jsonl")
                    + ")", table=table)
    best = done[0]
    name, lr = best["values"]["optimizer.name"], best["values"]["optimizer.lr"]
    word = "test loss" if spec.metric == "test_loss" else "test relative L2"
    reason = f"lowest {word} {best['metric']:.4g} after {race_steps} steps among {len(rows)} candidates"
    other = next((r for r in done[1:] if r["values"]["optimizer.name"] != name), None)
    if other is not None:
        reason += (f"; best other optimizer {other['values']['optimizer.name']} (lr {other['values']['optimizer.lr']:g}) "
                   f"{other['metric']:.4g}")
    failed = sum(r["status"] == "failed" for r in rows)
    if failed:
        reason += f"; {failed} candidates failed"
    return dict(name=name, lr=lr, trial=best["trial"], metric=spec.metric, value=best["metric"], reason=reason,
                table=[{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in t.items()}
                       for t in table])


def winner_config(cfg: config.JobConfig, choice: dict, steps: int) -> config.JobConfig:
    doc = job_doc(cfg, steps)
    doc["optimizer"]["name"], doc["optimizer"]["lr"] = choice["name"], choice["lr"]
    return config.from_doc(doc, cfg.source)
