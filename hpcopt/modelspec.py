"""The model a job describes, as data (numpy-free, so the config checks it before numpy loads).

Two forms in `[model]`:
    layers = [64, 128, 10]               the MLP: dense layers of these widths, model.activation between
    input = [1, 8, 8]                    the general form: per-sample input shape, then a layer list
    layer = [{ type = "conv2d", channels = 32, kernel = 3, padding = 1, activation = "relu" }, ...]

Both become one `Spec`: the input shape and a list of UNITS (the top-level layers; a residual block is
one unit holding its own list). A unit is the smallest thing a pipeline stage holds. Every layer,
nested or not, gets a model-wide index in depth-first order and the name f"{type}{index}"; its
parameters are keyed "<name>.weight" / "<name>.bias" and initialised from the stream (seed, index), so
the MLP form keeps the names dense0, dense1, ... of every earlier checkpoint.

Shapes are inferred here, unit by unit, and a mismatch is one line naming the layer and both shapes.
`describe()` is the canonical text of a spec, stored in checkpoints and compared on resume.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from . import names
from .errors import ConfigError

REQUIRED = object()


@dataclass(frozen=True)
class Key:
    kind: str                 # int, float, str, pair (an int or [h, w]), layers (a list of layer tables)
    default: Any = REQUIRED
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    choices: tuple | None = None
    doc: str = ""


_ACT = Key("str", "identity", choices=("identity",) + names.ACTIVATIONS,
           doc="applied after the bias (fused); identity: none")
_CONV = {
    "channels": Key("int", ge=1, doc="output channels"),
    "kernel": Key("pair", ge=1, doc="kernel size: k or [kh, kw]"),
    "stride": Key("pair", 1, ge=1, doc="step between windows"),
    "padding": Key("pair", 0, ge=0, doc="zeros added on each side"),
    "dilation": Key("pair", 1, ge=1, doc="spacing of the kernel's taps"),
    "activation": _ACT,
}
_POOL = {
    "kernel": Key("pair", ge=1, doc="window size"),
    "stride": Key("pair", 0, ge=0, doc="step between windows; 0: the kernel size"),
    "padding": Key("pair", 0, ge=0, doc="padding on each side (at most half the kernel)"),
}

# type -> its keys (besides `type`); docs/models.md lists them in this order (a test keeps it so)
LAYERS: dict[str, dict[str, Key]] = {
    "dense": {"units": Key("int", ge=1, doc="output features"), "activation": _ACT},
    "conv2d": _CONV,
    "conv1d": {k: Key("int" if v.kind == "pair" else v.kind, v.default, v.ge, v.lt, v.le, v.choices,
                      v.doc.replace("k or [kh, kw]", "k"))
               for k, v in _CONV.items()},
    "maxpool2d": _POOL,
    "avgpool2d": _POOL,
    "global_avgpool": {},
    "flatten": {},
    "activation": {"function": Key("str", choices=names.ACTIVATIONS, doc="relu, tanh, sigmoid, gelu or silu, "
                                   "elementwise (e.g. after a batchnorm)")},
    "layernorm": {"eps": Key("float", 1e-5, ge=0, doc="added to the variance")},
    "batchnorm": {"momentum": Key("float", 0.1, ge=0, le=1, doc="running statistics: r = (1-m) r + m v"),
                  "eps": Key("float", 1e-5, ge=0, doc="added to the variance"),
                  "activation": Key("str", "identity", choices=("identity", "relu", "tanh", "sigmoid"),
                                    doc="applied after the affine step, fused into the same pass")},
    "dropout": {"p": Key("float", ge=0, lt=1, doc="probability of zeroing an element")},
    "residual": {"layers": Key("layers", doc="the block's layers; its output is added to its input "
                                             "(through a 1x1 projection when the shapes differ)"),
                 "activation": Key("str", "identity", choices=("identity", "relu", "tanh", "sigmoid"),
                                   doc="applied to the sum, fused into the same pass")},
}
PARAMETRISED = ("dense", "conv2d", "conv1d", "layernorm", "batchnorm")


@dataclass
class Unit:
    """One layer of the spec with its keys filled in; `layers`: a residual block's body."""
    type: str
    index: int
    keys: dict[str, Any]
    in_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()
    layers: list["Unit"] = field(default_factory=list)
    projection: str = ""        # residual: "", "dense" or "conv" (a 1x1 convolution, `proj_stride`)
    proj_stride: int = 1

    @property
    def name(self) -> str:
        return f"{self.type}{self.index}"

    def walk(self):
        """This unit and every layer inside it, depth-first."""
        yield self
        for u in self.layers:
            yield from u.walk()

    def as_dict(self) -> dict:
        """The layer's table with every key that differs from its default (so a key added later, with a
        default, leaves the description of earlier models unchanged)."""
        keys = LAYERS[self.type]
        d = {"type": self.type, **{k: v for k, v in self.keys.items() if v != keys[k].default}}
        if self.type == "residual":
            d["layers"] = [u.as_dict() for u in self.layers]
        return d


@dataclass
class Spec:
    input: tuple[int, ...]
    units: list[Unit]
    mlp: bool = False           # written as model.layers (widths)

    @property
    def output(self) -> tuple[int, ...]:
        return self.units[-1].out_shape if self.units else self.input

    def walk(self):
        for u in self.units:
            yield from u.walk()

    def describe(self) -> str:
        """The canonical text of the model: equal texts, the same tensors in the same places."""
        return json.dumps({"input": list(self.input), "layers": [u.as_dict() for u in self.units]},
                          separators=(",", ":"), sort_keys=True)

    def params_of(self, unit: Unit) -> int:
        return sum(_params(u) for u in unit.walk()) + _projection_params(unit)

    def n_params(self) -> int:
        return sum(self.params_of(u) for u in self.units)

    def flops_of(self, unit: Unit) -> int:
        """Forward + backward FLOPs per sample (3x the forward's multiply-adds x2), roughly."""
        return sum(_flops(u) for u in unit.walk()) + 6 * _projection_params(unit) * _pixels(unit.out_shape)

    def dense_only(self) -> bool:
        return all(u.type == "dense" for u in self.walk())


def from_widths(widths: list[int], activation: str = "relu") -> Spec:
    """The MLP form: dense{i} of widths[i] -> widths[i+1], `activation` after all but the last."""
    n = len(widths) - 1
    units = [Unit("dense", i, {"units": widths[i + 1], "activation": activation if i < n - 1 else "identity"},
                  (widths[i],), (widths[i + 1],)) for i in range(n)]
    return Spec((widths[0],), units, mlp=True)


def from_config(model, source: str) -> Spec:
    """The Spec of a config's [model] section (model.layer if given, else model.layers); ConfigError
    (one line, naming the key or layer) for anything that does not fit."""
    if not model.layer:
        if model.input:
            raise ConfigError(f"{source}: model.input applies to the model.layer list only (model.layers = "
                              f"{list(model.layers)} gives the input width itself)")
        return from_widths(list(model.layers), model.activation)
    if not model.input:
        raise ConfigError(f"{source}: model.layer needs model.input, the per-sample input shape "
                          f"([features], [channels, length] or [channels, height, width])")
    if len(model.input) > 3:
        raise ConfigError(f"{source}: model.input = {list(model.input)} has {len(model.input)} dimensions "
                          f"(at most 3: [channels, height, width])")
    counter = [0]
    units = [_parse(t, f"model.layer[{i}]", source, counter) for i, t in enumerate(model.layer)]
    spec = Spec(tuple(model.input), units)
    shape = spec.input
    for u in units:
        shape = _infer(u, shape, source)
    return spec


def _parse(table: Any, where: str, source: str, counter: list[int]) -> Unit:
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: {where} must be a table such as {{ type = \"dense\", units = 10 }}")
    kind = table.get("type")
    if kind not in LAYERS:
        raise ConfigError(f"{source}: {where}.type must be one of {', '.join(LAYERS)} (got {kind!r})")
    keys = LAYERS[kind]
    index = counter[0]
    counter[0] += 1
    where = f"{where} ({kind}{index})"
    for k in table:
        if k != "type" and k not in keys:
            raise ConfigError(f"{source}: {where}: unknown key {k!r} (keys of {kind}: "
                              f"{', '.join(keys) or 'none'})")
    values, body = {}, []
    for k, key in keys.items():
        if k not in table:
            if key.default is REQUIRED:
                raise ConfigError(f"{source}: {where} needs {k} ({key.doc})")
            v = key.default
        else:
            v = table[k]
        if key.kind == "layers":
            if not isinstance(v, list) or not v:
                raise ConfigError(f"{source}: {where}.{k} must be a non-empty list of layer tables")
            body = [_parse(t, f"{where}.{k}[{j}]", source, counter) for j, t in enumerate(v)]
            continue
        values[k] = _check_value(v, key, f"{where}.{k}", source)
    unit = Unit(kind, index, values, layers=body)
    if kind in ("maxpool2d", "avgpool2d"):
        kh, kw = _pair(values["kernel"])
        ph, pw = _pair(values["padding"])
        if 2 * ph > kh or 2 * pw > kw:
            raise ConfigError(f"{source}: {where}.padding = {values['padding']} exceeds half the kernel "
                              f"{values['kernel']}")
    return unit


def _check_value(v: Any, key: Key, where: str, source: str) -> Any:
    bad = ConfigError(f"{source}: {where} must be {_kind_text(key)} (got {v!r})")
    if key.kind in ("int", "pair"):
        items = v if key.kind == "pair" and isinstance(v, list) else [v]
        if key.kind == "pair" and isinstance(v, list) and len(v) != 2:
            raise bad
        if not all(isinstance(a, int) and not isinstance(a, bool) for a in items):
            raise bad
    elif key.kind == "float":
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise bad
        v = float(v)
        items = [v]
    else:
        if not isinstance(v, str):
            raise bad
        if key.choices and v not in key.choices:
            raise ConfigError(f"{source}: {where} must be one of {', '.join(key.choices)} (got {v!r})")
        return v
    for a in items:
        if ((key.ge is not None and a < key.ge) or (key.lt is not None and a >= key.lt)
                or (key.le is not None and a > key.le)):
            raise bad
    return v


def _kind_text(key: Key) -> str:
    text = {"int": "an integer", "pair": "an integer or [h, w]", "float": "a number", "str": "a string"}[key.kind]
    bounds = [f">= {key.ge:g}"] if key.ge is not None else []
    bounds += [f"< {key.lt:g}"] if key.lt is not None else []
    bounds += [f"<= {key.le:g}"] if key.le is not None else []
    return text + (f" {' and '.join(bounds)}" if bounds else "")


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (v[0], v[1])


def conv_out_size(n: int, k: int, stride: int, pad: int, dil: int) -> int:
    """Output length of one spatial axis (torch's floor formula)."""
    return (n + 2 * pad - dil * (k - 1) - 1) // stride + 1


def _shape_error(source: str, u: Unit, expected: str, got: tuple[int, ...], hint: str = "") -> ConfigError:
    return ConfigError(f"{source}: layer {u.name} ({u.type}) expects input shape {expected} but gets "
                       f"{list(got)}{hint}")


def _infer(u: Unit, shape: tuple[int, ...], source: str) -> tuple[int, ...]:
    """Fill u.in_shape/out_shape (per sample) from the input shape; ConfigError on a mismatch."""
    u.in_shape = tuple(shape)
    t, k = u.type, u.keys
    if t == "dense":
        if len(shape) != 1:
            raise _shape_error(source, u, "[features]", shape, " (put a flatten or global_avgpool before it)")
        out = (k["units"],)
    elif t in ("conv2d", "conv1d"):
        dims = 2 if t == "conv2d" else 1
        if len(shape) != dims + 1:
            raise _shape_error(source, u, "[channels, height, width]" if dims == 2 else "[channels, length]", shape)
        ks = _pair(k["kernel"]) if dims == 2 else (1, k["kernel"])
        st = _pair(k["stride"]) if dims == 2 else (1, k["stride"])
        pd = _pair(k["padding"]) if dims == 2 else (0, k["padding"])
        dl = _pair(k["dilation"]) if dims == 2 else (1, k["dilation"])
        sizes = (shape[1], shape[2]) if dims == 2 else (1, shape[1])
        o = [conv_out_size(sizes[a], ks[a], st[a], pd[a], dl[a]) for a in range(2)]
        if min(o) < 1:
            raise _shape_error(source, u, f"a size of at least the dilated kernel {k['kernel']}", shape)
        out = (k["channels"], *o) if dims == 2 else (k["channels"], o[1])
    elif t in ("maxpool2d", "avgpool2d"):
        if len(shape) != 3:
            raise _shape_error(source, u, "[channels, height, width]", shape)
        ks, pd = _pair(k["kernel"]), _pair(k["padding"])
        st = tuple(s or kk for s, kk in zip(_pair(k["stride"]), ks))   # 0: the window's size
        o = [conv_out_size(shape[1 + a], ks[a], st[a], pd[a], 1) for a in range(2)]
        if min(o) < 1:
            raise _shape_error(source, u, f"a size of at least the window {k['kernel']}", shape)
        out = (shape[0], *o)
    elif t == "global_avgpool":
        if len(shape) != 3:
            raise _shape_error(source, u, "[channels, height, width]", shape)
        out = (shape[0],)
    elif t == "flatten":
        out = (math.prod(shape),)
    elif t == "batchnorm":
        if len(shape) not in (1, 3):
            raise _shape_error(source, u, "[features] or [channels, height, width]", shape)
        out = tuple(shape)
    elif t == "residual":
        s = tuple(shape)
        for v in u.layers:
            s = _infer(v, s, source)
        out = s
        if out != tuple(shape):
            _projection(u, tuple(shape), out, source)
    else:  # layernorm, dropout: shape-preserving
        out = tuple(shape)
    u.out_shape = tuple(out)
    return u.out_shape


def _projection(u: Unit, a: tuple[int, ...], b: tuple[int, ...], source: str) -> None:
    """A residual whose body changes the shape adds proj(x): a dense layer for flat shapes, a 1x1
    convolution (with the stride that maps a's size onto b's) for images and sequences."""
    if len(a) == 1 and len(b) == 1:
        u.projection = "dense"
        return
    if len(a) == len(b) and len(a) in (2, 3):
        for s in range(1, max(a[1:]) + 1):
            if all(conv_out_size(n, 1, s, 0, 1) == m for n, m in zip(a[1:], b[1:])):
                u.projection, u.proj_stride = "conv", s
                return
    raise ConfigError(f"{source}: layer {u.name} (residual): its body maps {list(a)} to {list(b)}, which no "
                      f"1x1 projection (dense, or a strided 1x1 convolution) can match")


def _params(u: Unit) -> int:
    k, i = u.keys, u.in_shape
    if u.type == "dense":
        return i[0] * k["units"] + k["units"]
    if u.type in ("conv2d", "conv1d"):
        area = math.prod(_pair(k["kernel"])) if u.type == "conv2d" else k["kernel"]
        return k["channels"] * i[0] * area + k["channels"]
    if u.type == "layernorm":
        return 2 * math.prod(i)
    if u.type == "batchnorm":
        return 2 * i[0]
    return 0


def _projection_params(u: Unit) -> int:
    if not u.projection:
        return 0
    return u.in_shape[0] * u.out_shape[0] + u.out_shape[0]


def _pixels(shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:]) if len(shape) > 1 else 1


def _flops(u: Unit) -> int:
    """Per sample, forward + backward: 6 per weight use for the GEMM layers, a few per element else."""
    k = u.keys
    if u.type == "dense":
        return 6 * u.in_shape[0] * k["units"] + 4 * k["units"]
    if u.type in ("conv2d", "conv1d"):
        return 6 * (_params(u) - k["channels"]) * _pixels(u.out_shape) + 4 * math.prod(u.out_shape)
    if u.type == "residual":
        return math.prod(u.out_shape)  # the add (the body's layers are walked separately)
    return 8 * math.prod(u.in_shape) if u.in_shape else 0


def _leaf_tensors(u: Unit) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of one layer's own tensors, in its param_specs order (nn/ builds them alike)."""
    k, i, name = u.keys, u.in_shape, u.name
    if u.type == "dense":
        return [(f"{name}.weight", (i[0], k["units"])), (f"{name}.bias", (k["units"],))]
    if u.type == "conv2d":
        return [(f"{name}.weight", (k["channels"], i[0], *_pair(k["kernel"]))), (f"{name}.bias", (k["channels"],))]
    if u.type == "conv1d":
        return [(f"{name}.weight", (k["channels"], i[0], k["kernel"])), (f"{name}.bias", (k["channels"],))]
    if u.type == "layernorm":
        return [(f"{name}.weight", tuple(i)), (f"{name}.bias", tuple(i))]
    if u.type == "batchnorm":
        return [(f"{name}.weight", (i[0],)), (f"{name}.bias", (i[0],))]
    if u.type == "residual":
        own = []
        if u.projection == "dense":
            own = [(f"{name}.weight", (i[0], u.out_shape[0])), (f"{name}.bias", (u.out_shape[0],))]
        elif u.projection == "conv":
            ones = (1, 1) if len(i) == 3 else (1,)
            own = [(f"{name}.weight", (u.out_shape[0], i[0], *ones)), (f"{name}.bias", (u.out_shape[0],))]
        return own + [t for v in reversed(u.layers) for t in _leaf_tensors(v)]
    return []


def tensors(spec: Spec) -> list[tuple[str, tuple[int, ...]]]:
    """(key, global shape) of every parameter tensor of the whole model, in the unsplit model's flat
    buffer order (backward order): the params/ datasets of a checkpoint, listed alike by every rank."""
    return [t for u in reversed(spec.units) for t in _leaf_tensors(u)]


def buffers(spec: Spec) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of every buffer (batch norm's running statistics), in forward order."""
    return [(f"{u.name}.{b}", (u.in_shape[0],)) for u in spec.walk() if u.type == "batchnorm"
            for b in ("running_mean", "running_var")]


def difference(a: Spec, b: Spec) -> str:
    """Where two specs first differ, in words (for a refused resume)."""
    if a.input != b.input:
        return f"input {list(a.input)} vs {list(b.input)}"
    for i, (u, v) in enumerate(zip(a.units, b.units)):
        if u.as_dict() != v.as_dict():
            return (f"layer {i} is {json.dumps(u.as_dict(), separators=(',', ':'))} in the checkpoint, "
                    f"{json.dumps(v.as_dict(), separators=(',', ':'))} in the job")
    return f"{len(a.units)} layers in the checkpoint, {len(b.units)} in the job"
