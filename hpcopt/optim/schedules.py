"""Learning-rate schedules: the lr used for the step-th update (0-based), as a pure function.

    lr = lr_at(step, opt.hp.lr, cfg.schedule, total_steps, scale=batch_scale(cfg.schedule, global_batch, dp))

peak = base_lr * scale (scale: the linear scaling rule, Goyal et al. 2017; 1.0 when it is off).
Warmup (warmup_steps = W > 0): lr = peak * (step + 1) / W for step < W, a linear ramp whose first
update already moves (peak / W; a zero-lr step would be wasted) and whose step W-1 uses peak.
After warmup, with s = step - W and D = max(horizon - W, 1) decay steps, horizon = schedule.total_steps
or else the run's total_steps:
    constant     peak
    step         peak * gamma ^ floor(s / step_size)
    exponential  peak * gamma ^ s
    cosine       min_lr + (peak - min_lr) * (1 + cos(pi * min(s / D, 1))) / 2
    linear       peak + (min_lr - peak) * min(s / D, 1)
min_lr is absolute (not scaled); cosine and linear stay at min_lr after the horizon.
"""
from __future__ import annotations

import math

from ..config import ScheduleConfig
from ..errors import ConfigError


def lr_at(step: int, base_lr: float, cfg: ScheduleConfig, total_steps: int, scale: float = 1.0) -> float:
    """The learning rate for update number `step` (0-based)."""
    peak = base_lr * scale
    warmup = cfg.warmup_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    s = step - warmup
    if cfg.name == "constant":
        return peak
    if cfg.name == "step":
        return peak * cfg.gamma ** (s // cfg.step_size)
    if cfg.name == "exponential":
        return peak * cfg.gamma ** s
    horizon = cfg.total_steps or total_steps
    if horizon <= 0:
        raise ConfigError(f"schedule.name = \"{cfg.name}\" needs a horizon: set schedule.total_steps or run.steps")
    frac = min(s / max(horizon - warmup, 1), 1.0)
    if cfg.name == "cosine":
        return cfg.min_lr + (peak - cfg.min_lr) * (1.0 + math.cos(math.pi * frac)) / 2.0
    if cfg.name == "linear":
        return peak + (cfg.min_lr - peak) * frac
    raise ConfigError(f"schedule.name must be one of constant, step, exponential, cosine, linear (got {cfg.name!r})")


def batch_scale(cfg: ScheduleConfig, global_batch: int, dp: int) -> float:
    """The linear-scaling-rule factor global_batch / base_batch_size; 1.0 unless scale_lr_with_batch.

    base_batch_size = 0 means the per-replica batch (global_batch / dp), so the factor is then dp.
    For full-batch training pass the data set size as global_batch.
    """
    if not cfg.scale_lr_with_batch:
        return 1.0
    base = cfg.base_batch_size or global_batch / dp
    return global_batch / base
