"""A sweep file, read and checked once (numpy-free): the base job, the search space, the method.

    job = "digits_mlp.toml"          # relative to the sweep file
    [sweep]
    name = "digits_optimizers"        # runs/<name>/ (or out_dir)
    method = "tpe"                    # grid | random | tpe | asha | pbt
    trials = 32                       # grid: 0 = the whole grid
    ranks_per_trial = 2               # the world splits into world / ranks_per_trial groups
    metric = "test_acc"               # test_acc, test_loss, test_rel_l2, test_r2 or loss; direction follows
    budget_steps = 1000               # run.steps of every trial
    [space]
    "optimizer.name" = ["sgd", "adam"]                  # a choice
    "optimizer.lr" = { log_uniform = [1e-4, 1e-1] }    # also uniform, int_uniform; grid = N points
    "data.batch_size" = [32, 64, 128]

Every mistake is a ConfigError with one line naming the file and the key, raised before any trial starts.
"""
from __future__ import annotations

import itertools
import math
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from .. import config
from ..errors import ConfigError

METHODS = ("grid", "random", "tpe", "asha", "pbt")
METRICS = {"test_acc": "max", "test_loss": "min", "test_rel_l2": "min", "test_r2": "max", "loss": "min"}
NEEDS_OPTUNA = ("tpe", "asha")

# [sweep] keys: name -> (type, default, meaning); the sweep's own settings
SWEEP_KEYS: dict[str, tuple[type | tuple, Any, str]] = {
    "name": (str, "sweep", "runs/<name>/ holds the trials, results.jsonl and best.toml"),
    "out_dir": (str, "", "the sweep directory; empty: runs/<name>"),
    "method": (str, "random", "grid | random | tpe | asha | pbt"),
    "trials": (int, 0, "trials to run (grid: 0 = the whole grid; pbt: the population)"),
    "ranks_per_trial": (int, 1, "ranks of each trial's group (any strategy that fits them)"),
    "metric": (str, "test_acc", "what ranks the trials: " + ", ".join(METRICS)),
    "budget_steps": (int, 0, "run.steps of every trial; 0: the job's own steps/epochs"),
    "seed": (int, 0, "keys the sampler (random, tpe, asha, pbt)"),
    "min_steps": (int, 0, "asha: steps of the first rung (0: budget / 27)"),
    "reduction_factor": (int, 3, "asha: keep 1 / reduction_factor of the trials at each rung"),
    "interval_steps": (int, 0, "pbt: steps between exploit/explore rounds (0: budget / 10)"),
    "fraction": (float, 0.25, "pbt: the worst fraction copies a member of the best fraction"),
    "perturb": (list, [0.8, 1.25], "pbt: factors a copied numeric value is multiplied by (one at random)"),
}

DISTRIBUTIONS = ("log_uniform", "uniform", "int_uniform", "choice")


@dataclass
class Dim:
    """One swept key: a choice among values, or a range (log_uniform/uniform/int_uniform [low, high])."""
    key: str                       # "section.key"
    kind: str                      # one of DISTRIBUTIONS
    values: list = field(default_factory=list)   # choice: the values
    low: float = 0.0
    high: float = 0.0
    grid: int = 0                  # points of a range on a grid

    def grid_values(self) -> list:
        if self.kind == "choice":
            return list(self.values)
        n = self.grid
        if n == 1:
            return [self.low]
        if self.kind == "log_uniform":
            a, b = math.log(self.low), math.log(self.high)
            return [float(f"{math.exp(a + (b - a) * i / (n - 1)):.6g}") for i in range(n)]
        if self.kind == "int_uniform":
            return sorted({round(self.low + (self.high - self.low) * i / (n - 1)) for i in range(n)})
        return [float(f"{self.low + (self.high - self.low) * i / (n - 1):.6g}") for i in range(n)]

    @property
    def numeric(self) -> bool:
        return self.kind != "choice" or all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                            for v in self.values)


@dataclass
class SweepSpec:
    path: str
    job: str                       # the base job file (resolved against the sweep file's folder)
    job_doc: dict                  # its parsed TOML, overrides applied
    space: list[Dim]
    name: str = "sweep"
    out_dir: str = ""
    method: str = "random"
    trials: int = 0
    ranks_per_trial: int = 1
    metric: str = "test_acc"
    budget_steps: int = 0
    seed: int = 0
    min_steps: int = 0
    reduction_factor: int = 3
    interval_steps: int = 0
    fraction: float = 0.25
    perturb: list = field(default_factory=lambda: [0.8, 1.25])
    candidates: list[dict] | None = None   # grid: these combinations instead of the product (optimizer "auto")

    @property
    def direction(self) -> str:
        return METRICS[self.metric]

    @property
    def keys(self) -> list[str]:
        return [d.key for d in self.space]

    def better(self, a: float | None, b: float | None) -> bool:
        """a ranks above b (None: a failed trial, below everything)."""
        if a is None or (isinstance(a, float) and math.isnan(a)):
            return False
        if b is None or (isinstance(b, float) and math.isnan(b)):
            return True
        return a > b if self.direction == "max" else a < b

    def sweep_dir(self) -> str:
        return self.out_dir or os.path.join("runs", self.name)

    def grid(self) -> list[dict]:
        """Every combination, the last key varying fastest."""
        if self.candidates is not None:
            return list(self.candidates)
        return [dict(zip(self.keys, combo)) for combo in itertools.product(*(d.grid_values() for d in self.space))]

    def trial_config(self, values: dict, out_dir: str) -> config.JobConfig:
        """The resolved job of one trial: the base job, the trial's values, its run directory and budget.
        A combination the job rules refuse raises ConfigError (a failed trial, not a failed sweep)."""
        doc = {s: dict(t) for s, t in self.job_doc.items()}
        for key, v in values.items():
            section, name = key.split(".")
            doc.setdefault(section, {})[name] = v
        run = doc.setdefault("run", {})
        run["out_dir"] = out_dir
        if self.budget_steps:
            run["steps"] = self.budget_steps
        return config.from_doc(doc, f"{self.job} (trial {os.path.basename(out_dir)})")


def trial_dir(sweep_dir: str, t: int) -> str:
    """A trial's run directory (a population member's under pbt)."""
    return os.path.join(sweep_dir, f"trial_{t:04d}")


def _typed(source: str, key: str, value, tp) -> Any:
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        name = {str: "a string", int: "an integer", float: "a number", list: "a list"}[tp]
        raise ConfigError(f"{source}: sweep.{key} must be {name} (got {value!r})")
    return value


def _dim(source: str, key: str, raw) -> Dim:
    where = f"{source}: space \"{key}\""
    if isinstance(raw, list):
        raw = {"choice": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a list of values or a table such as {{ log_uniform = [1e-4, 1e-1] }} "
                          f"(got {raw!r})")
    kinds = [k for k in raw if k in DISTRIBUTIONS]
    unknown = [k for k in raw if k not in DISTRIBUTIONS and k != "grid"]
    if unknown or len(kinds) != 1:
        raise ConfigError(f"{where}: give exactly one of {', '.join(DISTRIBUTIONS)} (and optionally grid = N); "
                          f"got {', '.join(raw) or 'nothing'}")
    kind = kinds[0]
    grid = raw.get("grid", 0)
    if not isinstance(grid, int) or isinstance(grid, bool) or grid < 0:
        raise ConfigError(f"{where}: grid must be a whole number of points (got {grid!r})")
    if kind == "choice":
        values = raw["choice"]
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: the list of values is empty")
        if len({repr(v) for v in values}) != len(values):
            raise ConfigError(f"{where}: a value is listed twice")
        return Dim(key, kind, values=list(values))
    bounds = raw[kind]
    if (not isinstance(bounds, list) or len(bounds) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)):
        raise ConfigError(f"{where}: {kind} needs [low, high] numbers (got {bounds!r})")
    low, high = bounds
    if not low < high:
        raise ConfigError(f"{where}: {kind} needs low < high (got [{low}, {high}])")
    if kind == "log_uniform" and low <= 0:
        raise ConfigError(f"{where}: log_uniform needs low > 0 (got {low})")
    if kind == "int_uniform" and not (float(low).is_integer() and float(high).is_integer()):
        raise ConfigError(f"{where}: int_uniform needs whole numbers (got [{low}, {high}])")
    return Dim(key, kind, low=low, high=high, grid=grid)


def _check_value(source: str, job_doc: dict, dim: Dim) -> None:
    """Every value (or both bounds) of the dimension is a valid value of its job key, alone."""
    probe = dim.values if dim.kind == "choice" else ([int(dim.low), int(dim.high)] if dim.kind == "int_uniform"
                                                      else [float(dim.low), float(dim.high)])
    section, name = dim.key.split(".")
    for v in probe:
        doc = {section: {name: v}}
        try:
            config.from_doc(doc, source, rules=False)
        except ConfigError as e:
            detail = str(e).split(": ", 1)[-1]
            raise ConfigError(f"{source}: space \"{dim.key}\" value {v!r}: {detail}") from None


def load(path: str, overrides: list[str] = (), world_size: int | None = None) -> SweepSpec:
    """Read and check a sweep file; `overrides` are section.key=value for the BASE job (sweep.key=value
    sets a [sweep] key). Raises ConfigError with one line."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such sweep file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a sweep file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    top = set(doc) - {"job", "sweep", "space"}
    if top:
        raise ConfigError(f"{path}: unknown top-level key or table {sorted(top)[0]!r} (a sweep file has job, "
                          f"[sweep] and [space])")
    if not isinstance(doc.get("job"), str):
        raise ConfigError(f"{path}: job = \"JOB.toml\" (the base job file) is missing")
    sweep = dict(doc.get("sweep", {}))
    job_overrides = []
    for text in overrides:
        if text.startswith("sweep."):
            k, _, raw = text[len("sweep."):].partition("=")
            try:
                sweep[k] = tomllib.loads(f"v = {raw}")["v"]
            except tomllib.TOMLDecodeError:
                sweep[k] = raw
        else:
            job_overrides.append(text)
    values = {}
    for k, v in sweep.items():
        if k not in SWEEP_KEYS:
            raise ConfigError(f"{path}: unknown key sweep.{k} (keys: {', '.join(SWEEP_KEYS)})")
        values[k] = _typed(path, k, v, SWEEP_KEYS[k][0])
    spec_kw = {k: values.get(k, d) for k, (_, d, _) in SWEEP_KEYS.items()}
    if spec_kw["method"] not in METHODS:
        raise ConfigError(f"{path}: sweep.method = {spec_kw['method']!r} is not one of {', '.join(METHODS)}")
    if spec_kw["metric"] not in METRICS:
        raise ConfigError(f"{path}: sweep.metric = {spec_kw['metric']!r} is not one of {', '.join(METRICS)}")
    for k in ("trials", "budget_steps", "min_steps", "interval_steps", "seed"):
        if spec_kw[k] < 0:
            raise ConfigError(f"{path}: sweep.{k} must be >= 0 (got {spec_kw[k]})")
    if spec_kw["ranks_per_trial"] < 1:
        raise ConfigError(f"{path}: sweep.ranks_per_trial must be >= 1 (got {spec_kw['ranks_per_trial']})")
    if spec_kw["reduction_factor"] < 2:
        raise ConfigError(f"{path}: sweep.reduction_factor must be >= 2 (got {spec_kw['reduction_factor']})")
    if not 0 < spec_kw["fraction"] <= 0.5:
        raise ConfigError(f"{path}: sweep.fraction must be in (0, 0.5] (got {spec_kw['fraction']})")
    p = spec_kw["perturb"]
    if not p or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in p):
        raise ConfigError(f"{path}: sweep.perturb must be a list of positive factors (got {p!r})")
    if world_size is not None and world_size % spec_kw["ranks_per_trial"]:
        raise ConfigError(f"{path}: sweep.ranks_per_trial = {spec_kw['ranks_per_trial']} does not divide the "
                          f"{world_size} ranks of this job")
    if spec_kw["method"] in NEEDS_OPTUNA:
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError(f"{path}: sweep.method = \"{spec_kw['method']}\" needs Optuna: pip install "
                              f"'hpcopt[sweep]' (grid, random and pbt work without it)") from None

    job = os.path.join(os.path.dirname(os.path.abspath(path)), doc["job"])
    base = config.load(job, job_overrides)           # the base job must be valid on its own
    job_doc = {s: dict(config.as_dict(base)[s]) for s in config.SECTIONS}
    for s, t in job_doc.items():                      # None: the component's default; keep it unset
        job_doc[s] = {k: v for k, v in t.items() if v is not None}
    if base.model.layer:
        job_doc["model"].pop("layers", None)
        job_doc["model"].pop("activation", None)
    else:
        job_doc["model"].pop("layer", None)
        job_doc["model"].pop("input", None)

    raw_space = doc.get("space", {})
    if not isinstance(raw_space, dict) or not raw_space:
        raise ConfigError(f"{path}: [space] is empty: name at least one job key to sweep, e.g. "
                          f"\"optimizer.lr\" = {{ log_uniform = [1e-4, 1e-1] }}")
    space = []
    for key, raw in raw_space.items():
        if key.count(".") != 1:
            raise ConfigError(f"{path}: space key {key!r} must be section.key (e.g. \"optimizer.lr\")")
        section, name = key.split(".")
        if section not in config.SECTIONS:
            raise ConfigError(f"{path}: space key {key!r}: unknown section [{section}] "
                              f"(sections: {', '.join(config.SECTIONS)})")
        known = list(config.as_dict(config.JobConfig())[section])
        if name not in known:
            raise ConfigError(f"{path}: space key {key!r}: unknown key {key} (keys: {', '.join(known)})")
        if key in ("run.out_dir", "run.steps", "run.name"):
            raise ConfigError(f"{path}: space key {key!r} is set by the sweep itself")
        dim = _dim(path, key, raw)
        _check_value(path, job_doc, dim)
        space.append(dim)
    spec = SweepSpec(path=path, job=job, job_doc=job_doc, space=space, **spec_kw)
    if spec.method == "grid":
        ranges = [d.key for d in space if d.kind != "choice" and d.grid < 1]
        if ranges:
            raise ConfigError(f"{path}: method = \"grid\" needs a finite set for \"{ranges[0]}\": give a list of "
                              f"values or grid = N points")
        if not spec.trials:
            spec.trials = len(spec.grid())
    elif spec.trials < 1:
        raise ConfigError(f"{path}: sweep.trials must be >= 1 for method = \"{spec.method}\"")
    if spec.method == "pbt":
        if not spec.budget_steps:
            raise ConfigError(f"{path}: method = \"pbt\" needs sweep.budget_steps (the steps of every member)")
        if not spec.interval_steps:
            spec.interval_steps = max(1, spec.budget_steps // 10)
        state_keys = [d.key for d in space if d.key.startswith(("model.", "data.", "parallel.", "backend."))]
        if state_keys:
            raise ConfigError(f"{path}: method = \"pbt\" cannot vary \"{state_keys[0]}\" during a run (members "
                              f"copy each other's parameters): sweep it with grid/random/tpe")
        if spec.trials < 2:
            raise ConfigError(f"{path}: method = \"pbt\" needs a population of sweep.trials >= 2")
    if spec.method == "asha":
        budget = spec.budget_steps or 0
        if not spec.min_steps:
            if not budget:
                raise ConfigError(f"{path}: method = \"asha\" needs sweep.budget_steps or sweep.min_steps")
            spec.min_steps = max(1, budget // spec.reduction_factor ** 3)
    return spec
