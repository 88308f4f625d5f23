"""Optimizers over flat buffers: a registry by name, each one fused kernel per step (DESIGN §4).

    from hpcopt import optim
    opt = optim.build(cfg.optimizer, segments, device="cpu")  # segments: [(offset, length)] per tensor
    state = opt.init_state(n)                                  # {name: float32[n]}, {} for plain sgd
    opt.step(params, grads, state, t, lr)                      # t: 1-based update count; lr after schedule

`step` updates params and state in place and never writes grads. `opt.hp` holds the resolved
hyperparameters (a frozen dataclass: every default filled in); `DEFAULTS[name]` lists the defaults
(torch.optim's wherever torch has the optimizer). Clipping: `optim.clip`; schedules: `optim.schedules`.
"""
from __future__ import annotations

from typing import Any

from .adadelta import Adadelta
from .adagrad import Adagrad
from .adam import Adam, Adamax, NAdam
from .base import HP_FIELDS, Optimizer
from .lars import LAMB, LARS
from .rmsprop import RMSprop
from .sgd import SGD

__all__ = ["build", "Optimizer", "REGISTRY", "DEFAULTS", "STATE_NAMES", "HP_FIELDS", "state_names"]

# name -> optimizer class; the order is the docs' and the benchmark's.
REGISTRY: dict[str, type[Optimizer]] = {}
for _cls in (SGD, Adagrad, RMSprop, Adadelta, Adam, Adamax, NAdam, LARS, LAMB):
    for _name in _cls.defaults:
        REGISTRY[_name] = _cls

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


def state_names(opt: Optimizer) -> tuple[str, ...]:
    """The state arrays this optimizer (with its options) keeps, in a stable order."""
    return tuple(opt.state_spec())
