"""What every optimizer shares: resolved hyperparameters, named state arrays, the kernel back end.

An optimizer is `init_state(n) -> dict[str, array]` plus `step(params, grads, state, t, lr)`: one fused
kernel call over the flat buffers (DESIGN §4). It holds no per-step state of its own (everything that
changes lives in `state`, so checkpoints and ZeRO shards need no optimizer-specific code); the little it
precomputes (lars/lamb pieces, scratch for per-layer norms) depends only on the segments.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, ClassVar

import numpy as np

from .. import memory
from ..errors import ConfigError

# OptimizerConfig fields that are hyperparameters (the rest, clip_* and on_nonfinite, belong to the trainer).
HP_FIELDS = ("lr", "momentum", "dampening", "nesterov", "betas", "eps", "weight_decay", "amsgrad", "alpha",
             "centered", "rho", "lr_decay", "initial_accumulator_value", "momentum_decay", "trust_coefficient")


def kernels(device: str):
    """The kernel module for a device; optim_cuda (and numba.cuda) is only imported for device="cuda"."""
    if device == "cpu":
        return importlib.import_module("hpcopt.kernels.optim_cpu")
    if device == "cuda":
        return importlib.import_module("hpcopt.kernels.optim_cuda")
    raise ConfigError(f"backend.device must be cpu or cuda (got {device!r})")


class Optimizer:
    """Base class. A family sets `defaults` (name -> hyperparameter defaults), `hp_type` (a frozen
    dataclass with those fields) and implements `state_spec` and `step`."""

    defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    hp_type: ClassVar[type] = object

    @classmethod
    def check(cls, name: str, hp: dict[str, Any]) -> str | None:
        """A problem with a combination of hyperparameters, as one line; None when fine."""
        return None

    @classmethod
    def from_config(cls, name: str, cfg: Any, segments: list[tuple[int, int]], device: str = "cpu",
                    source: str = "job config") -> "Optimizer":
        values = resolve(name, cfg, cls.defaults[name], source, lambda hp: cls.check(name, hp))
        return cls(name, cls.hp_type(**values), segments, device)

    def __init__(self, name: str, hp: Any, segments: list[tuple[int, int]], device: str = "cpu"):
        self.name = name
        self.hp = hp
        self.device = device
        self.segments = [(int(o), int(n)) for o, n in segments]
        self.n_params = check_segments(self.segments)
        self.k = kernels(device)
        self._placeholder = self._zeros(1)  # stands for a state array an option turns off

    # -- state -------------------------------------------------------------------------------
    def state_spec(self) -> dict[str, float]:
        """State array name -> initial value, for this optimizer's hyperparameters."""
        return {}

    def init_state(self, n: int) -> dict[str, Any]:
        """Fresh state: float32 arrays of length n (CUDA device arrays for device="cuda")."""
        if self.segments and n != self.n_params:
            raise ValueError(f"{self.name}: init_state({n}) but the segments cover {self.n_params} parameters")
        return {key: self._full(n, value) for key, value in self.state_spec().items()}

    def step(self, params, grads, state: dict[str, Any], t: int, lr: float) -> None:
        raise NotImplementedError

    # -- helpers -----------------------------------------------------------------------------
    def _zeros(self, n: int, dtype=np.float32):
        return self._full(n, 0.0, dtype)

    def _full(self, n, value: float, dtype=np.float32):
        if self.device == "cuda":
            from numba import cuda
            return cuda.to_device(np.full(n, value, dtype=dtype))
        return memory.full(n, value, dtype)

    def _to_device(self, host: np.ndarray):
        if self.device == "cuda":
            from numba import cuda
            return cuda.to_device(host)
        return host

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, hp={self.hp}, device={self.device!r})"


def check_segments(segments: list[tuple[int, int]]) -> int:
    """Segments must tile [0, n) exactly (in any order); returns n."""
    end = 0
    for off, length in sorted(segments):
        if off != end or length < 0:
            raise ValueError(f"segments must tile [0, n) without gaps or overlaps; "
                             f"found ({off}, {length}) where offset {end} was expected")
        end = off + length
    return end


def make_pieces(segments: list[tuple[int, int]], chunk: int) -> tuple[np.ndarray, ...]:
    """Split each non-empty segment into pieces of at most `chunk` elements.

    Returns int64 arrays (piece_start, piece_len, piece_seg [n_pieces], seg_pieces [n_seg+1]): the pieces
    of segment s are seg_pieces[s]:seg_pieces[s+1]. Empty segments are dropped (their norm is 0).
    """
    starts, lens, segs, seg_pieces = [], [], [], [0]
    for off, length in (s for s in segments if s[1] > 0):
        for a in range(off, off + length, chunk):
            starts.append(a)
            lens.append(min(chunk, off + length - a))
            segs.append(len(seg_pieces) - 1)
        seg_pieces.append(len(starts))
    as64 = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
    return as64(starts), as64(lens), as64(segs), as64(seg_pieces)


def resolve(name: str, cfg: Any, defaults: dict[str, Any], source: str,
            check: Callable[[dict[str, Any]], str | None] | None = None) -> dict[str, Any]:
    """Every default filled in from `defaults`, overridden by the config fields that are not None.

    A field the optimizer does not have is a ConfigError, not silently ignored.
    """
    values = dict(defaults)
    for key in HP_FIELDS:
        v = getattr(cfg, key, None)
        if v is None:
            continue
        if key not in defaults:
            raise ConfigError(f"{source}: optimizer.{key} does not apply to {name} "
                              f"(its hyperparameters: {', '.join(defaults)})")
        values[key] = tuple(float(b) for b in v[:2]) if key == "betas" else v
    if check is not None:
        problem = check(values)
        if problem:
            raise ConfigError(f"{source}: {problem}")
    return values
