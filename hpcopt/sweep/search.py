"""Where the next trial's values come from: grid and random (hpcopt's own, no extra), tpe and asha
(Optuna's ask-and-tell: TPESampler; RandomSampler + SuccessiveHalvingPruner), run by the coordinating
rank alone with Optuna's in-memory storage (no database server: many HPC sites have none).

A search is rebuilt from results.jsonl on `--resume auto`: finished trials are told again (Optuna:
add_trial with their values, state and intermediate values), interrupted ones are handed out first,
with their values, so the sampler continues from the recorded history.
"""
from __future__ import annotations

import math

import numpy as np

from .spec import Dim, SweepSpec


def random_values(spec: SweepSpec, trial: int) -> dict:
    """Trial `trial`'s values: a counter-based stream keyed by (seed, trial), so trial k draws the same
    values whatever order the groups asked in and after a restart."""
    rng = np.random.Generator(np.random.Philox(key=np.array([spec.seed, trial], dtype=np.uint64)))
    out = {}
    for d in spec.space:
        out[d.key] = draw(d, rng)
    return out


def draw(d: Dim, rng: np.random.Generator):
    if d.kind == "choice":
        return d.values[int(rng.integers(len(d.values)))]
    if d.kind == "int_uniform":
        return int(rng.integers(int(d.low), int(d.high) + 1))
    if d.kind == "log_uniform":
        return float(f"{math.exp(rng.uniform(math.log(d.low), math.log(d.high))):.6g}")
    return float(f"{rng.uniform(d.low, d.high):.6g}")


class Search:
    """ask() -> (trial, values) or None; tell(trial, status, metric); report(trial, step, value) -> prune?"""

    def __init__(self, spec: SweepSpec, history: dict[int, dict]):
        """history: trial -> its last results.jsonl record (resume); records with status running or
        interrupted are handed out again first."""
        self.spec = spec
        self.next_trial = max(history, default=-1) + 1
        self.again = sorted(t for t, r in history.items() if r["status"] in ("running", "interrupted"))
        self.values_of = {t: r["values"] for t, r in history.items()}
        self.study = None
        if spec.method in ("tpe", "asha"):
            self._optuna(history)

    # -- Optuna -----------------------------------------------------------------------------------
    def _optuna(self, history: dict[int, dict]) -> None:
        import logging

        import optuna

        optuna.logging.set_verbosity(logging.WARNING)
        spec = self.spec
        if spec.method == "tpe":
            sampler = optuna.samplers.TPESampler(seed=spec.seed)
            pruner = optuna.pruners.NopPruner()
        else:
            sampler = optuna.samplers.RandomSampler(seed=spec.seed)
            pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=spec.min_steps,
                                                            reduction_factor=spec.reduction_factor)
        self.study = optuna.create_study(direction="maximize" if spec.direction == "max" else "minimize",
                                         sampler=sampler, pruner=pruner)
        self.dists = {d.key: self._distribution(d) for d in spec.space}
        self.trials: dict[int, object] = {}
        states = {"done": optuna.trial.TrialState.COMPLETE, "pruned": optuna.trial.TrialState.PRUNED,
                  "failed": optuna.trial.TrialState.FAIL}
        for t, r in sorted(history.items()):
            if r["status"] not in states:
                continue
            value = r.get("metric") if r["status"] == "done" else None
            state = states[r["status"]]
            if state == optuna.trial.TrialState.COMPLETE and (value is None or not math.isfinite(value)):
                state, value = optuna.trial.TrialState.FAIL, None
            inter = {int(k): v for k, v in (r.get("intermediate") or {}).items() if v is not None}
            self.study.add_trial(optuna.trial.create_trial(params=r["values"], distributions=self.dists,
                                                           value=value, state=state, intermediate_values=inter))

    @staticmethod
    def _distribution(d: Dim):
        from optuna import distributions as od

        if d.kind == "choice":
            return od.CategoricalDistribution(d.values)
        if d.kind == "int_uniform":
            return od.IntDistribution(int(d.low), int(d.high))
        return od.FloatDistribution(float(d.low), float(d.high), log=d.kind == "log_uniform")

    # -- the interface ---------------------------------------------------------------------------
    def ask(self) -> tuple[int, dict, bool] | None:
        """The next trial: (index, values, resumed), or None when every trial has been handed out."""
        if self.again:
            t = self.again.pop(0)
            if self.study is not None:
                self.study.enqueue_trial(self.values_of[t])
                self.trials[t] = self.study.ask(self.dists)
            return t, self.values_of[t], True
        t = self.next_trial
        if t >= self.spec.trials:
            return None
        self.next_trial += 1
        if self.spec.method == "grid":
            values = self.spec.grid()[t]
        elif self.study is None:
            values = random_values(self.spec, t)
        else:
            trial = self.study.ask(self.dists)
            self.trials[t] = trial
            values = {k: _plain(trial.params[k]) for k in self.spec.keys}
        self.values_of[t] = values
        return t, values, False

    def tell(self, t: int, status: str, metric: float | None) -> None:
        if self.study is None or t not in self.trials:
            return
        import optuna

        trial = self.trials.pop(t)
        if status == "done" and metric is not None and math.isfinite(metric):
            self.study.tell(trial, metric)
        elif status == "pruned":
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        elif status in ("failed", "done"):
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        # interrupted: left running in the study; the restart tells it again

    def report(self, t: int, step: int, value: float) -> bool:
        """An intermediate metric of trial t at `step`: True when the pruner stops it (asha)."""
        if self.study is None or t not in self.trials or value is None or not math.isfinite(value):
            return False
        trial = self.trials[t]
        trial.report(value, step)
        return bool(trial.should_prune())


def _plain(v):
    """numpy/Optuna scalars as plain Python values (TOML and JSON write them)."""
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    return v
