"""Typed job config (DESIGN §7): TOML file + `section.key=value` overrides, validated once at the edge.

Every error names the source (the file, or "command line") and the key, in one line:
    jobs/x.toml: optimizer.lr must be > 0 (got -1)
This module imports no numpy, so the CLI can read the config (and the thread count) before numpy loads.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Union

from . import modelspec, names
from .errors import ConfigError

OPTIMIZERS = tuple(names.OPTIMIZERS)
SCHEDULES = names.LR_SCHEDULES
STRATEGIES = tuple(names.STRATEGIES)


def opt(default: Any, *, gt: float | None = None, ge: float | None = None, le: float | None = None,
        lt: float | None = None, choices: tuple | None = None, length: int | None = None,
        doc: str = ""):
    """A config field with its bounds; `None` default means "the component's own default"."""
    meta = dict(gt=gt, ge=ge, le=le, lt=lt, choices=choices, length=length, doc=doc)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    name: str = opt("run", doc="run name; the default out_dir is runs/<name>")
    seed: int = opt(0, ge=0, le=2**63 - 1, doc="keys the init and the data order (counter-based: any rank count, same run)")
    out_dir: str = opt("", doc="run directory; empty: runs/<name> (runs/<name>-<jobid> under Slurm)")
    steps: int = opt(0, ge=0, le=2**53, doc="optimizer steps; 0: run.epochs worth of steps")
    epochs: int = opt(1, ge=1, le=2**53, doc="passes over the training data, when run.steps = 0")
    log_every: int = opt(10, ge=1, doc="steps between metrics lines")
    eval_every: int = opt(0, ge=0, doc="steps between test-set evaluations; 0: only at the end")
    reproducible: bool = opt(False, doc="bitwise the same parameters for any number of data-parallel ranks, "
                             "threads and buckets (docs/reproducible.md)")
    stall_timeout_s: float = opt(0.0, ge=0, doc="no step completed for this long: a stall (report, then "
                                 "run.on_stall); 0: max(10 x the median step time, 60 s), longer during "
                                 "start-up and checkpoints (docs/diagnosis.md)")
    on_stall: str = opt("abort", choices=("abort", "report"), doc="after a stall report: end the job (exit 76) "
                        "or go on waiting")
    check_collectives: bool = opt(True, doc="compare a fingerprint of every collective across its ranks: a "
                                  "mismatch stops the job with both call sites (exit 77); +1.5-2% on the "
                                  "digits job's 1.2 ms step (docs/diagnosis.md)")


@dataclass
class DataConfig:
    path: str = opt("data/digits.h5", doc="HDF5 file made by `hpcopt data make`")
    name: str = opt("", doc="data set name, informational (digits, synthetic, ...)")
    batch_size: Union[int, str] = opt(64, doc="GLOBAL batch (all ranks together), or \"all\" for full batch")
    shuffle: str = opt("global", choices=("global", "block"), doc="global: any row in any batch (scattered reads); "
                       "block: chunk order shuffled, then rows within windows of chunks (data larger than memory)")
    window_chunks: int = opt(8, ge=1, doc="shuffle = block: chunks whose rows are shuffled together")
    read_ahead: bool = opt(False, doc="read the next step's rows on a background thread during the step")
    normalize_targets: bool = opt(False, doc="regression: train on (y - mean) / std of the training split "
                                  "(/stats of the data file: hpcopt data stats); metrics in original units")


@dataclass
class ModelConfig:
    layers: list[int] = opt([64, 128, 10], length=2, ge=1, doc="the MLP: widths input, hidden..., output "
                            "(dense layers; model.activation between them)")
    activation: str = opt("relu", choices=names.ACTIVATIONS, doc="the MLP's, between layers; none after the last")
    input: list[int] = opt([], ge=1, doc="per-sample input shape for model.layer: [features], [channels, length] "
                           "or [channels, height, width]; data rows are reshaped to it")
    layer: list[dict] = opt([], doc="the general form: a list of layer tables (docs/models.md); "
                            "replaces model.layers")
    loss: str = opt("softmax_ce", choices=names.LOSSES, doc="classes: softmax_ce, mse (one-hot); regression targets: mse, l1, huber, rel_l2 "
                      "(per-sample ||out - y|| / ||y||); docs/data.md")
    dtype: str = opt("float32", choices=("float32", "float64"), doc="parameters, activations and optimizer state")
    init: str = opt("he", choices=names.INITS, doc="he: normal(0, sqrt(2/n_in)); xavier: Glorot uniform; biases 0")


@dataclass
class OptimizerConfig:
    name: str = opt("adam", choices=OPTIMIZERS + ("auto",), doc="see docs/optimizers.md; \"auto\": race the zoo "
                    "on groups of ranks for optimizer.auto_fraction of the steps, continue the winner (docs/sweep.md)")
    lr: float | None = opt(None, gt=0, doc="None: the optimizer's default (torch.optim's)")
    momentum: float | None = opt(None, ge=0, lt=1, doc="sgd/momentum/nesterov/rmsprop/lars")
    dampening: float | None = opt(None, ge=0, le=1, doc="sgd/momentum")
    nesterov: bool | None = opt(None, doc="sgd: Nesterov momentum (the same as name = nesterov)")
    betas: list[float] | None = opt(None, ge=0, lt=1, length=2, doc="adam family and lamb: [beta1, beta2]")
    eps: float | None = opt(None, gt=0, doc="added to the denominator")
    weight_decay: float | None = opt(None, ge=0, doc="L2 (decoupled for adamw and lamb)")
    amsgrad: bool | None = opt(None, doc="adam/adamw: keep the max of v")
    alpha: float | None = opt(None, ge=0, lt=1, doc="rmsprop smoothing constant")
    centered: bool | None = opt(None, doc="rmsprop: normalise by the variance estimate")
    rho: float | None = opt(None, ge=0, le=1, doc="adadelta decay")
    lr_decay: float | None = opt(None, ge=0, doc="adagrad")
    initial_accumulator_value: float | None = opt(None, ge=0, doc="adagrad")
    momentum_decay: float | None = opt(None, ge=0, doc="nadam")
    trust_coefficient: float | None = opt(None, gt=0, doc="lars")
    clip_norm: float = opt(0.0, ge=0, doc="clip the global gradient L2 norm to this; 0: off")
    clip_value: float = opt(0.0, ge=0, doc="clip each gradient element to [-v, v]; 0: off")
    on_nonfinite: str = opt("skip", choices=("skip", "stop"), doc="a NaN/inf gradient skips the step or stops")
    auto_fraction: float = opt(0.1, gt=0, lt=1, doc="name = \"auto\": the share of the steps each candidate "
                               "of the race trains before the winner continues")


@dataclass
class ScheduleConfig:
    name: str = opt("constant", choices=SCHEDULES, doc="lr as a function of the step (docs/optimizers.md)")
    warmup_steps: int = opt(0, ge=0, doc="linear warm-up to the base lr, then the schedule")
    step_size: int = opt(100, ge=1, doc="step: decay every step_size steps")
    gamma: float = opt(0.1, gt=0, le=1, doc="step/exponential: decay factor")
    min_lr: float = opt(0.0, ge=0, doc="cosine/linear: final lr")
    total_steps: int = opt(0, ge=0, doc="cosine/linear horizon; 0: the run's steps")
    scale_lr_with_batch: bool = opt(False, doc="linear scaling rule: lr *= global_batch / base_batch_size")
    base_batch_size: int = opt(0, ge=0, doc="batch the lr was tuned for; 0: global batch / dp")


@dataclass
class ParallelConfig:
    strategy: str = opt("data", choices=STRATEGIES, doc="how ranks share the work (README: parallel strategies); "
                        "which keys apply to which: \"Rules between keys\" below")
    dp: Union[int, str] = opt("auto", doc="data-parallel replicas, or \"auto\": world / (pp*tp)")
    pp: int = opt(1, ge=1, doc="pipeline stages (pipeline, hybrid)")
    tp: int = opt(1, ge=1, doc="tensor-parallel ranks per dense pair (tensor, hybrid)")
    micro_batches: int = opt(1, ge=1, doc="micro-batches per replica's batch; gradients accumulate over them "
                             "(pipeline, tensor, hybrid)")
    schedule: str = opt("1f1b", choices=names.PIPELINE_SCHEDULES, doc="pipeline schedule: gpipe (all forwards, "
                        "then all backwards) or 1f1b (at most P micro-batches of activations held)")
    balance: str = opt("params", choices=("params", "flops"),
                       doc="pipeline stages: cut the layers so each stage gets about equal parameters or FLOPs")
    stage_layers: list[int] = opt([], ge=1, doc="pipeline stages given explicitly: layers per stage (pp entries "
                                  "summing to the layer count); empty: balanced by parallel.balance")
    bucket_mb: float = opt(25.0, gt=0, doc="gradient bucket size in MiB for the dp exchange (data, pipeline, "
                           "tensor, hybrid)")
    overlap: bool = opt(True, doc="start each bucket's exchange during backward as soon as its layers are done")
    compression: str = opt("none", choices=names.CODECS, doc="gradients on the wire: fp16/bf16 (16-bit sums "
                           "in float32) or topk with error feedback (data; float32 models)")
    topk_density: float = opt(0.01, gt=0, le=1, doc="fraction of each bucket sent by compression = topk")
    zero: int = opt(0, ge=0, le=1, doc="1: ZeRO stage 1, optimizer state sharded over dp (data; cpu; not lars/lamb)")
    average_every: int = opt(1, ge=1, doc="local_sgd: average the replicas' parameters every H updates")
    average_optimizer_state: bool = opt(False, doc="local_sgd: average the optimizer state with the parameters "
                                        "every parallel.average_every steps (checkpoints always average both)")
    max_staleness: int = opt(4, ge=0, doc="async: pushes a worker may have unanswered before it waits")


@dataclass
class CheckpointConfig:
    every_steps: int = opt(0, ge=0, le=2**53, doc="0: off")
    every_seconds: float = opt(0.0, ge=0, doc="0: off")
    keep: int = opt(3, ge=1, doc="newest checkpoints kept; older ones removed after a commit")


@dataclass
class BackendConfig:
    device: str = opt("cpu", choices=names.DEVICES, doc="where optimizer kernels run (cuda: numba.cuda)")
    threads: int = opt(0, ge=0, doc="threads per rank (BLAS and Numba); 0: cores / ranks on the node")


@dataclass
class JobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    source: str = field(default="<defaults>", compare=False, repr=False)

    def section(self, name: str):
        return getattr(self, name)


SECTIONS = tuple(f.name for f in dataclasses.fields(JobConfig) if f.name != "source")


# --------------------------------------------------------------------------------------------
def _type_name(tp) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a table"}
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(args[0]).replace('an ', '').replace('a ', '')}s"
    return names.get(tp, str(tp))


def _coerce(value: Any, tp) -> Any:
    """Return value as type tp, or raise TypeError. Ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a)
            except TypeError:
                pass
        raise TypeError
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise TypeError
        return [_coerce(v, inner) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise TypeError
            return float(value)
        raise TypeError
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError
    if tp is dict:
        if isinstance(value, dict):
            return value
        raise TypeError
    raise TypeError


def _check_bounds(key: str, value: Any, meta: dict) -> str | None:
    if value is None:
        return None
    if meta.get("length") is not None and isinstance(value, list) and len(value) < meta["length"]:
        return f"{key} needs at least {meta['length']} entries (got {len(value)})"
    items = value if isinstance(value, list) else [value]
    for v in items:
        if meta.get("choices") and v not in meta["choices"]:
            return f"{key} must be one of {', '.join(meta['choices'])} (got {v!r})"
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            for bound, ok, word in (("gt", lambda a, b: a > b, ">"), ("ge", lambda a, b: a >= b, ">="),
                                    ("lt", lambda a, b: a < b, "<"), ("le", lambda a, b: a <= b, "<=")):
                b = meta.get(bound)
                if b is not None and not ok(v, b):
                    return f"{key} must be {word} {b:g} (got {_fmt(value)})"
    return None


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_fmt(x)}" for k, x in v.items()) + " }"
    return str(v)


def _set(cfg: JobConfig, section: str, key: str, value: Any, source: str) -> None:
    if section not in SECTIONS:
        raise ConfigError(f"{source}: unknown section [{section}] (sections: {', '.join(SECTIONS)})")
    sec = cfg.section(section)
    fields = {f.name: f for f in dataclasses.fields(sec)}
    if key not in fields:
        raise ConfigError(f"{source}: unknown key {section}.{key} (keys: {', '.join(fields)})")
    tp = typing.get_type_hints(type(sec))[key]
    try:
        value = _coerce(value, tp)
    except TypeError:
        raise ConfigError(f"{source}: {section}.{key} must be {_type_name(tp)} (got {_fmt(value)})") from None
    problem = _check_bounds(f"{section}.{key}", value, fields[key].metadata)
    if problem:
        raise ConfigError(f"{source}: {problem}")
    setattr(sec, key, value)


def _parse_override(text: str) -> tuple[str, str, Any]:
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"command line: override {text!r} must look like section.key=value")
    lhs, raw = text.split("=", 1)
    section, key = lhs.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word such as adam or runs/x is taken as a string
    return section, key, value


def load(path: str | None, overrides: typing.Sequence[str] = ()) -> JobConfig:
    """Read a job file (or defaults when path is None), apply overrides, validate; raise ConfigError."""
    doc: dict = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such job file") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: is a directory, not a job file") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not valid TOML (not UTF-8 text)") from None
    return from_doc(doc, path or "<defaults>", overrides)


def from_doc(doc: dict, source: str, overrides: typing.Sequence[str] = (), rules: bool = True) -> JobConfig:
    """Build and validate a config from a parsed TOML document (rules=False: each key alone, no
    cross-key rules: for configs stored by an earlier version, whose rules may have been looser)."""
    cfg = JobConfig(source=source)
    for section, table in doc.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: {section} must be a [section] table, not a top-level key")
        for key, value in table.items():
            if isinstance(value, dict):
                raise ConfigError(f"{source}: {section}.{key} must be a value, not a table")
            _set(cfg, section, key, value, source)
    for text in overrides:
        section, key, value = _parse_override(text)
        _set(cfg, section, key, value, "command line")
    if rules:
        validate(cfg)
    return cfg


# -- rules between keys: tables, checked once at load (validate) and once the world is known (validate_layout)
ALL_BUT = lambda *out: tuple(s for s in STRATEGIES if s not in out)  # noqa: E731

# A key that changes what a strategy does, and the strategies that read it: set to anything but its
# default under any other strategy, it is an error (it would be silently ignored).
APPLIES_TO: dict[str, tuple[str, ...]] = {
    "parallel.micro_batches": ("pipeline", "tensor", "hybrid"),
    "parallel.schedule": ("pipeline", "hybrid"),
    "parallel.balance": ("pipeline", "hybrid"),
    "parallel.stage_layers": ("pipeline", "hybrid"),
    "parallel.bucket_mb": ("data", "pipeline", "tensor", "hybrid"),
    "parallel.overlap": ("data", "pipeline", "tensor", "hybrid"),
    "parallel.compression": ("data",),
    "parallel.topk_density": ("data",),
    "parallel.zero": ("data",),
    "parallel.average_every": ("local_sgd",),
    "parallel.average_optimizer_state": ("local_sgd",),
    "parallel.max_staleness": ("async",),
}

# A key that only means something when another key has one of some values (set otherwise: an error).
NEEDS: dict[str, tuple[str, tuple]] = {
    "parallel.topk_density": ("parallel.compression", ("topk",)),
    "data.window_chunks": ("data.shuffle", ("block",)),
    "schedule.step_size": ("schedule.name", ("step",)),
    "schedule.gamma": ("schedule.name", ("step", "exponential")),
    "schedule.min_lr": ("schedule.name", ("cosine", "linear")),
    "schedule.total_steps": ("schedule.name", ("cosine", "linear")),
    "schedule.base_batch_size": ("schedule.scale_lr_with_batch", (True,)),
    "optimizer.nesterov": ("optimizer.name", ("sgd", "momentum", "nesterov")),
    "optimizer.auto_fraction": ("optimizer.name", ("auto",)),
}

# Hyperparameter keys of one optimizer: with optimizer.name = "auto" each candidate takes its own defaults.
OPTIMIZER_HP = ("lr", "momentum", "dampening", "nesterov", "betas", "eps", "weight_decay", "amsgrad", "alpha",
                "centered", "rho", "lr_decay", "initial_accumulator_value", "momentum_decay", "trust_coefficient")

# strategy -> the backend.device values it runs on (the update of local_sgd, async and ZeRO-1 is host-only)
DEVICES_OF: dict[str, tuple[str, ...]] = {s: names.DEVICES for s in STRATEGIES}
DEVICES_OF.update(local_sgd=("cpu",), **{"async": ("cpu",)})

# (condition, why) pairs of values that cannot go together; `why` follows the first key's "= value".
EXCLUDES: list[tuple[str, object, str, object, str]] = [
    ("parallel.zero", 1, "optimizer.name", ("lars", "lamb"),
     "{b} needs whole-layer norms, which parallel.zero = 1 shards apart; use parallel.zero = 0"),
    ("parallel.zero", 1, "parallel.compression", ("fp16", "bf16", "topk"),
     "is not available with {b} (use one or the other)"),
    ("parallel.zero", 1, "backend.device", ("cuda",),
     "runs the optimizer on the host: not available with {b}"),
    ("parallel.strategy", "async", "optimizer.on_nonfinite", ("stop",),
     "drops non-finite gradients on the server; {b} is not available with it"),
    ("parallel.compression", ("fp16", "bf16", "topk"), "model.dtype", ("float64",),
     "needs model.dtype = \"float32\" (not {b})"),
]


def get(cfg: JobConfig, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(cfg.section(section), key)


def default_of(dotted: str) -> Any:
    section, key = dotted.split(".")
    f = {f.name: f for f in dataclasses.fields(type(JobConfig().section(section)))}[key]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _is_set(cfg: JobConfig, dotted: str) -> bool:
    return get(cfg, dotted) != default_of(dotted)


def _matches(value: Any, allowed: Any) -> bool:
    return value in allowed if isinstance(allowed, tuple) else value == allowed


def _eq(dotted: str, value: Any) -> str:
    return f"{dotted} = {_fmt(value)}"


def validate(cfg: JobConfig) -> None:
    """Checks that involve several keys, from the tables above. World-size checks: validate_layout."""
    src = cfg.source
    name = cfg.run.name
    if not name or name in (".", "..") or not all(c.isalnum() or c in "._-" for c in name):
        raise ConfigError(f"{src}: run.name must be a name, not a path: letters, digits and . _ - "
                          f"(got {_fmt(name)}); set run.out_dir to choose a directory")
    bs = cfg.data.batch_size
    if isinstance(bs, str) and bs != "all":
        raise ConfigError(f"{src}: data.batch_size must be a positive integer or \"all\" (got {_fmt(bs)})")
    if isinstance(bs, int) and bs < 1:
        raise ConfigError(f"{src}: data.batch_size must be >= 1 (got {bs})")
    dp = cfg.parallel.dp
    if isinstance(dp, str) and dp != "auto":
        raise ConfigError(f"{src}: parallel.dp must be a positive integer or \"auto\" (got {_fmt(dp)})")
    if isinstance(dp, int) and dp < 1:
        raise ConfigError(f"{src}: parallel.dp must be >= 1 (got {dp})")
    if cfg.optimizer.betas is not None and len(cfg.optimizer.betas) != 2:
        raise ConfigError(f"{src}: optimizer.betas needs exactly 2 entries [beta1, beta2] "
                          f"(got {_fmt(cfg.optimizer.betas)})")
    if cfg.model.layer:
        for key in ("model.layers", "model.activation"):
            if _is_set(cfg, key):
                raise ConfigError(f"{src}: {key} belongs to the MLP form; with model.layer give every layer "
                                  f"its own keys (remove {key})")
    modelspec.from_config(cfg.model, src)
    if cfg.optimizer.name == "auto":
        for key in OPTIMIZER_HP:
            if getattr(cfg.optimizer, key) is not None:
                raise ConfigError(f"{src}: optimizer.{key} is set but optimizer.name = \"auto\" races each optimizer "
                                  f"at its own defaults and learning rates: remove optimizer.{key}")
    strategy = cfg.parallel.strategy
    for key, strategies in APPLIES_TO.items():
        if strategy not in strategies and _is_set(cfg, key):
            raise ConfigError(f"{src}: {_eq(key, get(cfg, key))} applies to parallel.strategy = "
                              f"{' / '.join(_fmt(s) for s in strategies)} only (this job's is {_fmt(strategy)})")
    for key, (other, values) in NEEDS.items():
        if _is_set(cfg, key) and get(cfg, other) not in values:
            raise ConfigError(f"{src}: {key} applies only when {other} = {' / '.join(_fmt(v) for v in values)} "
                              f"(this job's is {_fmt(get(cfg, other))})")
    if cfg.backend.device not in DEVICES_OF[strategy]:
        raise ConfigError(f"{src}: parallel.strategy = {_fmt(strategy)} runs the optimizer on "
                          f"{' / '.join(DEVICES_OF[strategy])} only: backend.device = {_fmt(cfg.backend.device)} "
                          f"is not available with it")
    for a, a_values, b, b_values, why in EXCLUDES:
        if _matches(get(cfg, a), a_values) and _matches(get(cfg, b), b_values):
            raise ConfigError(f"{src}: {_eq(a, get(cfg, a))} " + why.format(b=_eq(b, get(cfg, b))))


# strategy -> the grid axes (besides dp) it may split: pp / tp > 1 under any other is an error
AXES_OF = {"pipeline": ("pp",), "tensor": ("tp",), "hybrid": ("pp", "tp")}


def validate_layout(cfg: JobConfig, dp: int, pp: int, tp: int, global_batch: int) -> None:
    """The rules that need the process grid and the global batch; ConfigError naming the keys. Runs on
    every rank alike (no communication), before any buffer is allocated."""
    src, p = cfg.source, cfg.parallel
    spec = modelspec.from_config(cfg.model, src)
    name, axes = p.strategy, AXES_OF.get(p.strategy, ())
    if (pp > 1 or tp > 1) and not axes:
        raise ConfigError(f"{src}: parallel.pp/tp > 1 need parallel.strategy = \"pipeline\", "
                          f"\"tensor\" or \"hybrid\"")
    if tp > 1 and "tp" not in axes:
        raise ConfigError(f"{src}: parallel.tp = {tp} needs parallel.strategy = \"tensor\" or "
                          f"\"hybrid\" (\"{name}\" splits only into parallel.pp stages)")
    if pp > 1 and "pp" not in axes:
        raise ConfigError(f"{src}: parallel.pp = {pp} needs parallel.strategy = \"pipeline\" or "
                          f"\"hybrid\" (\"{name}\" splits only over parallel.tp)")
    if not axes:
        return
    n_layers = len(spec.units)
    what = "model.layers" if spec.mlp else "model.layer"
    if pp > n_layers:
        raise ConfigError(f"{src}: parallel.pp = {pp} stages but {what} has only {n_layers} layers")
    if p.stage_layers and (len(p.stage_layers) != pp or sum(p.stage_layers) != n_layers):
        raise ConfigError(f"{src}: parallel.stage_layers = {p.stage_layers} must have parallel.pp = {pp} entries "
                          f"summing to the {n_layers} layers of {what}")
    per_replica = global_batch // dp
    if per_replica % p.micro_batches:
        raise ConfigError(f"{src}: parallel.micro_batches = {p.micro_batches} does not divide the per-replica "
                          f"batch data.batch_size / dp = {global_batch}/{dp} = {per_replica}")
    if tp > 1:
        other = next((u for u in spec.units if u.type != "dense"), None)
        if other is not None:
            raise ConfigError(f"{src}: parallel.tp = {tp} splits pairs of dense layers only; layer {other.name} "
                              f"({other.type}) cannot be split: use parallel.tp = 1 (pipeline stages and dp "
                              f"replicas take any layer)")
        widths = [spec.input[0]] + [u.keys["units"] for u in spec.units]
        for i in range(0, n_layers - 1, 2):  # dense i (column) and dense i+1 (row) split width i+1
            if widths[i + 1] % tp:
                where = f"model.layers[{i + 1}]" if spec.mlp else f"model.layer[{i}].units"
                raise ConfigError(f"{src}: {where} = {widths[i + 1]} does not divide by "
                                  f"parallel.tp = {tp} (dense{i} and dense{i + 1} split that width)")
        if cfg.optimizer.name in ("lars", "lamb"):
            raise ConfigError(f"{src}: optimizer.name = \"{cfg.optimizer.name}\" takes per-tensor norms, "
                              f"which parallel.tp = {tp} splits over ranks: use parallel.tp = 1")


def resolve_out_dir(cfg: JobConfig, env: typing.Mapping[str, str] = os.environ) -> str:
    """The run directory: run.out_dir, else runs/<name> (runs/<name>-<SLURM_JOB_ID> under Slurm)."""
    if cfg.run.out_dir:
        return cfg.run.out_dir
    job = env.get("SLURM_ARRAY_JOB_ID") or env.get("SLURM_JOB_ID")
    return os.path.join("runs", f"{cfg.run.name}-{job}" if job else cfg.run.name)


def to_toml(cfg: JobConfig) -> str:
    """The resolved config as TOML text; `None` values (component defaults) are left out."""
    lines = [f"# resolved hpcopt job config (from {cfg.source})"]
    for section in SECTIONS:
        lines.append(f"\n[{section}]")
        for f in dataclasses.fields(cfg.section(section)):
            v = getattr(cfg.section(section), f.name)
            if section == "model" and f.name in (("layers", "activation") if cfg.model.layer else ("input", "layer")):
                continue  # the other form of the model: not this job's
            if v is not None:
                lines.append(f"{f.name} = {_fmt(v)}")
    return "\n".join(lines) + "\n"


def from_toml_text(text: str, source: str) -> JobConfig:
    """Parse a resolved config (e.g. a checkpoint's `config` attribute)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: stored config is not valid TOML ({e})") from None
    return from_doc(doc, source, rules=False)


def as_dict(cfg: JobConfig) -> dict[str, dict[str, Any]]:
    return {s: dataclasses.asdict(cfg.section(s)) for s in SECTIONS}


def reference_markdown() -> str:
    """docs/config.md: every section and key with its type, default, bounds and meaning."""
    out = ["# Job config reference", "",
           "A job is a TOML file of these sections; every key can be overridden on the command line as",
           "`section.key=value` (the value in TOML syntax; a bare word is taken as a string). A default of",
           "`-` means the component's own default (for `[optimizer]`: the optimizer's, see optimizers.md).",
           "This page is generated from `hpcopt/config.py` (`python -m hpcopt.config > docs/config.md`).", ""]
    hints = typing.get_type_hints
    for section in SECTIONS:
        sec_type = type(getattr(JobConfig(), section))
        out += [f"## [{section}]", "", "| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        for f in dataclasses.fields(sec_type):
            m = f.metadata
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            allowed = []
            if m.get("choices"):
                allowed.append(", ".join(m["choices"]))
            for bound, word in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
                if m.get(bound) is not None:
                    allowed.append(f"{word} {m[bound]:g}")
            if m.get("length"):
                allowed.append(f"at least {m['length']} entries")
            out.append(f"| `{f.name}` | {_type_name(hints(sec_type)[f.name])} | "
                       f"{'-' if default is None else '`' + _fmt(default) + '`'} | {'; '.join(allowed)} | "
                       f"{m.get('doc', '')} |")
        out.append("")
    out += ["## Rules between keys", "",
            "Checked once when the job is read (`config.validate`), from the tables in `hpcopt/config.py`; a",
            "broken rule is one line naming the keys, exit 2. A key left at its default never breaks a rule.", "",
            "| key | applies to parallel.strategy |", "|---|---|"]
    out += [f"| `{k}` | {', '.join(v)} |" for k, v in APPLIES_TO.items()]
    out += ["", "| key | applies only when |", "|---|---|"]
    out += [f"| `{k}` | `{o}` = {' / '.join(_fmt(x) for x in vs)} |" for k, (o, vs) in NEEDS.items()]
    out += ["", "| parallel.strategy | backend.device |", "|---|---|"]
    out += [f"| `{k}` | {', '.join(v)} |" for k, v in DEVICES_OF.items()]
    out += ["", "| when | and | refused because |", "|---|---|---|"]
    for a, av, b, bv, why in EXCLUDES:
        vals = lambda v: " / ".join(_fmt(x) for x in v) if isinstance(v, tuple) else _fmt(v)  # noqa: E731
        out.append(f"| `{a}` = {vals(av)} | `{b}` = {vals(bv)} | {why.format(b=b)} |")
    out += ["", "Once the world size is known (`config.validate_layout`, before any buffer is allocated):",
            "`parallel.pp` > 1 needs `pipeline` or `hybrid`, `parallel.tp` > 1 `tensor` or `hybrid`; at most one",
            "stage per layer; `parallel.stage_layers` has `pp` entries summing to the layers; `micro_batches`",
            "divides the per-replica batch; under tp > 1 the width between the layers of each dense pair",
            "divides by tp, and lars/lamb (per-tensor norms) are refused. `data.batch_size` divides among",
            "the dp ranks and fits the data (checked with the data file).", ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(reference_markdown(), end="")
