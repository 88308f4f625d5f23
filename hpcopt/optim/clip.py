"""Gradient clipping and non-finite detection over the flat gradient buffer (after the dp all-reduce).

`clip_and_check` is called from ONE place, the update path of every layout (parallel/update.py), which
then skips the optimizer step when the norm is not finite (the Trainer applies optimizer.on_nonfinite).

One parallel read pass computes the squared norm (float64; inf/nan when any element is non-finite), and,
when clipping is on and the gradients are finite, one write pass clamps and scales them in place:
    g = clamp(g, -clip_value, clip_value)                  (clip_value > 0; torch's clip_grad_value_)
    g = g * min(1, clip_norm / (||g|| + 1e-6))             (clip_norm > 0; torch's clip_grad_norm_)
where ||g|| for clip_norm is the global norm AFTER the value clip, as when the two torch calls run in that
order. Works on NumPy arrays and on CUDA device arrays (then with the CUDA kernels).
"""
from __future__ import annotations

import importlib
import math
from typing import Callable

import numpy as np

_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s guard against a zero norm


def _kernels(grads):
    """CPU kernels for a NumPy array, CUDA kernels for anything else (a device array); numba.cuda is
    imported only in the second case."""
    on_host = isinstance(grads, np.ndarray)
    return importlib.import_module("hpcopt.kernels.optim_cpu" if on_host else "hpcopt.kernels.optim_cuda")


def grad_sq_norm(grads) -> float:
    """sum(g^2) over this process's buffer, in float64; inf or nan if any element is non-finite."""
    return _kernels(grads).sum_sq(grads)


def clip_and_check(grads, clip_norm: float, clip_value: float,
                   allreduce_sum: Callable[[float], float] | None = None,
                   sum_sq: Callable | None = None) -> tuple[float, bool]:
    """Clip grads in place; return (global L2 norm before any clipping, whether it is finite).

    allreduce_sum(x) sums a float over the ranks that share these gradients (the caller binds it to the
    right communicator); None for one process. Every rank calls it the same number of times: once, or
    twice when both clip_value and clip_norm are on (the norm after the value clip is a second sum).
    If the norm is not finite, grads are left untouched. sum_sq(grads, clip_value) -> (sum g², sum of the
    value-clipped g²): another way to take the squares' sums (run.reproducible: exact, any thread count).
    """
    total = allreduce_sum or (lambda x: x)
    k = _kernels(grads)
    if sum_sq is not None:
        sq, sq_clipped = sum_sq(grads, clip_value)
    elif clip_value > 0:
        sq, sq_clipped = k.sum_sq_clipped(grads, clip_value)
    else:
        sq = sq_clipped = k.sum_sq(grads)
    sq = total(sq)
    norm = math.sqrt(sq) if sq >= 0 else sq  # nan stays nan, inf stays inf
    if not math.isfinite(sq):
        return norm, False
    scale = 1.0
    if clip_norm > 0:
        clipped_norm = math.sqrt(total(sq_clipped)) if clip_value > 0 else norm
        scale = min(1.0, clip_norm / (clipped_norm + _EPS))
    if clip_value > 0 or scale < 1.0:
        k.clip_scale(grads, clip_value if clip_value > 0 else math.inf, scale)
    return norm, True
