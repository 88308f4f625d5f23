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

from .errors import ConfigError

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adadelta", "adam", "adamw",
              "adamax", "nadam", "lars", "lamb")
SCHEDULES = ("constant", "step", "exponential", "cosine", "linear")
STRATEGIES = ("data", "pipeline", "tensor", "hybrid", "local_sgd", "async")


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
    seed: int = opt(0, ge=0, doc="keys the init and the data order (counter-based: any rank count, same run)")
    out_dir: str = opt("", doc="run directory; empty: runs/<name> (runs/<name>-<jobid> under Slurm)")
    steps: int = opt(0, ge=0, doc="optimizer steps; 0: run.epochs worth of steps")
    epochs: int = opt(1, ge=1, doc="passes over the training data, when run.steps = 0")
    log_every: int = opt(10, ge=1, doc="steps between metrics lines")
    eval_every: int = opt(0, ge=0, doc="steps between test-set evaluations; 0: only at the end")


@dataclass
class DataConfig:
    path: str = opt("data/digits.h5", doc="HDF5 file made by `hpcopt data make`")
    name: str = opt("", doc="data set name, informational (digits, synthetic, ...)")
    batch_size: Union[int, str] = opt(64, doc="GLOBAL batch (all ranks together), or \"all\" for full batch")


@dataclass
class ModelConfig:
    layers: list[int] = opt([64, 128, 10], length=2, ge=1, doc="widths: input, hidden..., output")
    activation: str = opt("relu", choices=("relu", "tanh", "sigmoid"), doc="between layers; none after the last")
    loss: str = opt("softmax_ce", choices=("softmax_ce", "mse"), doc="mse: against one-hot labels, mean over outputs")
    dtype: str = opt("float32", choices=("float32", "float64"), doc="parameters, activations and optimizer state")
    init: str = opt("he", choices=("he", "xavier"), doc="he: normal(0, sqrt(2/n_in)); xavier: Glorot uniform; biases 0")


@dataclass
class OptimizerConfig:
    name: str = opt("adam", choices=OPTIMIZERS, doc="see docs/optimizers.md")
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
    strategy: str = opt("data", choices=STRATEGIES)
    dp: Union[int, str] = opt("auto", doc="data-parallel replicas, or \"auto\": world / (pp*tp)")
    pp: int = opt(1, ge=1)
    tp: int = opt(1, ge=1)
    micro_batches: int = opt(1, ge=1)
    schedule: str = opt("1f1b", choices=("gpipe", "1f1b"))
    balance: str = opt("params", choices=("params", "flops"),
                       doc="pipeline stages: cut the layers so each stage gets about equal parameters or FLOPs")
    stage_layers: list[int] = opt([], ge=1, doc="pipeline stages given explicitly: layers per stage (pp entries "
                                  "summing to the layer count); empty: balanced by parallel.balance")
    bucket_mb: float = opt(25.0, gt=0)
    overlap: bool = opt(True)
    compression: str = opt("none", choices=("none", "fp16", "bf16", "topk"))
    topk_density: float = opt(0.01, gt=0, le=1)
    zero: int = opt(0, ge=0, le=1)
    average_every: int = opt(1, ge=1)
    average_optimizer_state: bool = opt(False, doc="local_sgd: average the optimizer state with the parameters "
                                        "every parallel.average_every steps (checkpoints always average both)")
    max_staleness: int = opt(4, ge=0)


@dataclass
class CheckpointConfig:
    every_steps: int = opt(0, ge=0, doc="0: off")
    every_seconds: float = opt(0.0, ge=0, doc="0: off")
    keep: int = opt(3, ge=1, doc="newest checkpoints kept; older ones removed after a commit")


@dataclass
class BackendConfig:
    device: str = opt("cpu", choices=("cpu", "cuda"), doc="where optimizer kernels run (cuda: numba.cuda)")
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
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
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


def from_doc(doc: dict, source: str, overrides: typing.Sequence[str] = ()) -> JobConfig:
    """Build and validate a config from a parsed TOML document."""
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
    validate(cfg)
    return cfg


def validate(cfg: JobConfig) -> None:
    """Checks that involve several keys. World-size checks happen in comm.Grid."""
    src = cfg.source
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
    if cfg.optimizer.nesterov and cfg.optimizer.name not in ("sgd", "momentum", "nesterov"):
        raise ConfigError(f"{src}: optimizer.nesterov applies to sgd/momentum/nesterov, not {cfg.optimizer.name}")


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
            if v is not None:
                lines.append(f"{f.name} = {_fmt(v)}")
    return "\n".join(lines) + "\n"


def from_toml_text(text: str, source: str) -> JobConfig:
    """Parse a resolved config (e.g. a checkpoint's `config` attribute)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: stored config is not valid TOML ({e})") from None
    return from_doc(doc, source)


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
    return "\n".join(out)


if __name__ == "__main__":
    print(reference_markdown(), end="")
