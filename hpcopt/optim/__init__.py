"""Optimizers over flat buffers: a registry by name, each one fused kernel per step (DESIGN §4).

    from hpcopt import optim
    opt = optim.build(cfg.optimizer, segments, device="cpu")  # segments: [(offset, length)] per tensor
    state = opt.init_state(n)                                  # {name: float32[n]}, {} for plain sgd
    opt.step(params, grads, state, t, lr)                      # t: 1-based update count; lr after schedule

`step` updates params and state in place and never writes grads. `opt.hp` holds the resolved
hyperparameters (a frozen dataclass: every default filled in); `DEFAULTS[name]` lists the defaults
(torch.optim's wherever torch has the optimizer). `base_lr(cfg)` is the resolved lr without building
anything (the schedule starts from it). Clipping: `optim.clip`; schedules: `optim.schedules`; the one
update path that calls both: `parallel.update`.
"""
from __future__ import annotations

import importlib
from typing import Any

from ..names import OPTIMIZERS
from .base import HP_FIELDS, Optimizer

__all__ = ["build", "Optimizer", "REGISTRY", "DEFAULTS", "STATE_NAMES", "HP_FIELDS", "state_names", "base_lr"]


def _load(path: str) -> type[Optimizer]:
    module, cls = path.split(":")
    return getattr(importlib.import_module(module), cls)


# name -> optimizer class, from names.OPTIMIZERS (its order is the docs' and the benchmark's); each class
# declares the names it implements in `defaults`.
REGISTRY: dict[str, type[Optimizer]] = {name: _load(path) for name, path in OPTIMIZERS.items()}
assert all(name in cls.defaults for name, cls in REGISTRY.items()), "names.OPTIMIZERS and the classes disagree"

# name -> {hyperparameter: default}.
DEFAULTS: dict[str, dict[str, Any]] = {name: dict(cls.defaults[name]) for name, cls in REGISTRY.items()}

# name -> every state array name it may use (which ones exist depends on options, see state_names).
STATE_NAMES: dict[str, tuple[str, ...]] = {
    "sgd": ("momentum_buffer",), "momentum": ("momentum_buffer",), "nesterov": ("momentum_buffer",),
    "adagrad": ("sum",), "rmsprop": ("square_avg", "momentum_buffer", "grad_avg"),
    "adadelta": ("square_avg", "acc_delta"), "adam": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    "adamw": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), "adamax": ("exp_avg", "exp_inf"),
    "nadam": ("exp_avg", "exp_avg_sq"), "lars": ("momentum_buffer",), "lamb": ("exp_avg", "exp_avg_sq"),
}


def build(cfg, segments: list[tuple[int, int]], device: str = "cpu", *, source: str = "job config") -> Optimizer:
    """The optimizer `cfg.name` (an OptimizerConfig) with its hyperparameters resolved.

    segments: (offset, length) of each parameter tensor in the flat buffer; they must tile [0, n).
    Raises ConfigError (naming `source`) for a hyperparameter the optimizer does not have or a bad combination.
    """
    from ..errors import ConfigError

    if cfg.name not in REGISTRY:
        raise ConfigError(f"{source}: optimizer.name must be one of {', '.join(REGISTRY)} (got {cfg.name!r})")
    return REGISTRY[cfg.name].from_config(cfg.name, cfg, segments, device, source)


def base_lr(cfg) -> float:
    """The lr the schedule starts from: optimizer.lr, or the optimizer's default (DEFAULTS)."""
    return float(cfg.lr if cfg.lr is not None else DEFAULTS[cfg.name]["lr"])


def state_names(opt: Optimizer) -> tuple[str, ...]:
    """The state arrays this optimizer (with its options) keeps, in a stable order."""
    return tuple(opt.state_spec())
