"""Layer-wise adaptive optimizers: LARS (You et al. 2017) and LAMB (You et al. 2019).

A "layer" is one segment (offset, length) of the flat buffer. Both make two passes: per-layer sums of
squares (float64, per piece of at most `chunk` elements, then summed per layer), then the fused update.

LARS (Algorithm 1):   local_lr = trust_coefficient * ||w|| / (||g|| + weight_decay * ||w||)
                      b = momentum * b + lr * local_lr * (g + weight_decay * w);   w = w - b
LAMB (Algorithm 2):   m = beta1 m + (1 - beta1) g;   v = beta2 v + (1 - beta2) g^2
                      u = m / (1 - beta1^t) / (sqrt(v / (1 - beta2^t)) + eps) + weight_decay * w
                      w = w - lr * ||w|| / ||u|| * u
The ratio is 1 for a layer where either norm is 0 (fresh zero biases, zero gradients).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Optimizer, make_pieces

CHUNK = {"cpu": 1 << 16, "cuda": 1 << 13}  # elements per piece: parallel work unit of the norm pass


@dataclass(frozen=True)
class LARSHyperparams:
    lr: float
    momentum: float
    weight_decay: float
    trust_coefficient: float


@dataclass(frozen=True)
class LAMBHyperparams:
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float


class _LayerWise(Optimizer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        host = make_pieces(self.segments, CHUNK[self.device])
        self.pieces = tuple(self._to_device(a) for a in host)
        n_pieces, n_seg = host[0].size, host[3].size - 1
        self.piece_sq = self._to_device(np.zeros((max(n_pieces, 1), 2)))  # scratch: per-piece sums of squares
        self.seg_coef = self._to_device(np.zeros(max(n_seg, 0)))         # scratch: lr * ratio per layer

    def init_state(self, n: int):
        if not self.segments:
            raise ValueError(f"{self.name} needs the layer segments (got none)")
        return super().init_state(n)


class LARS(_LayerWise):
    # lr 1.0 with trust_coefficient 1e-3 moves each layer by ~0.1% of its norm per step (x10 with momentum).
    defaults = {"lars": dict(lr=1.0, momentum=0.9, weight_decay=0.0, trust_coefficient=1e-3)}
    hp_type = LARSHyperparams

    def state_spec(self) -> dict[str, float]:
        return {"momentum_buffer": 0.0}

    def step(self, params, grads, state, t: int, lr: float) -> None:
        hp = self.hp
        self.k.lars_step(params, grads, state["momentum_buffer"], self.pieces, self.piece_sq, self.seg_coef, lr,
                         hp.momentum, hp.weight_decay, hp.trust_coefficient)


class LAMB(_LayerWise):
    defaults = {"lamb": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=1e-2)}
    hp_type = LAMBHyperparams

    def state_spec(self) -> dict[str, float]:
        return {"exp_avg": 0.0, "exp_avg_sq": 0.0}

    def step(self, params, grads, state, t: int, lr: float) -> None:
        hp = self.hp
        self.k.lamb_step(params, grads, state["exp_avg"], state["exp_avg_sq"], self.pieces, self.piece_sq,
                         self.seg_coef, lr, hp.betas[0], hp.betas[1], hp.eps, hp.weight_decay, t)
