"""The Adam family: Adam, AdamW, Adamax, NAdam (torch.optim's update rules, one fused pass each).

Adam / AdamW (bias-corrected; AdamW decays decoupled from the gradient, L2 for Adam):
    p = p * (1 - lr * weight_decay)       (adamw)     |  g = grad + weight_decay * p   (adam)
    m = beta1 * m + (1 - beta1) * g;   v = beta2 * v + (1 - beta2) * g^2
    v_max = max(v_max, v), used instead of v          (amsgrad)
    p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
Adamax:
    g = grad + weight_decay * p;   m as Adam;   u = max(beta2 * u, |g| + eps)
    p = p - lr / (1 - beta1^t) * m / u
NAdam (Dozat 2016 with torch's momentum schedule mu_t = beta1 * (1 - 0.5 * 0.96^(t * momentum_decay))):
    g = grad + weight_decay * p;   m, v as Adam;   d = sqrt(v / (1 - beta2^t)) + eps
    p = p - lr * (1 - mu_t) / (1 - prod_{i<=t} mu_i) * g / d
          - lr * mu_{t+1} / (1 - prod_{i<=t+1} mu_i) * m / d
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Optimizer

_BETAS = (0.9, 0.999)


@dataclass(frozen=True)
class AdamHyperparams:
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    amsgrad: bool


@dataclass(frozen=True)
class AdamaxHyperparams:
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float


@dataclass(frozen=True)
class NAdamHyperparams:
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    momentum_decay: float


class Adam(Optimizer):
    defaults = {
        "adam": dict(lr=1e-3, betas=_BETAS, eps=1e-8, weight_decay=0.0, amsgrad=False),
        "adamw": dict(lr=1e-3, betas=_BETAS, eps=1e-8, weight_decay=1e-2, amsgrad=False),
    }
    hp_type = AdamHyperparams

    def state_spec(self) -> dict[str, float]:
        spec = {"exp_avg": 0.0, "exp_avg_sq": 0.0}
        if self.hp.amsgrad:
            spec["max_exp_avg_sq"] = 0.0
        return spec

    def step(self, params, grads, state, t: int, lr: float) -> None:
        hp = self.hp
        self.k.adam_step(params, grads, state["exp_avg"], state["exp_avg_sq"],
                         state.get("max_exp_avg_sq", self._placeholder), lr, hp.betas[0], hp.betas[1], hp.eps,
                         hp.weight_decay, hp.amsgrad, self.name == "adamw", t)


class Adamax(Optimizer):
    defaults = {"adamax": dict(lr=2e-3, betas=_BETAS, eps=1e-8, weight_decay=0.0)}
    hp_type = AdamaxHyperparams

    def state_spec(self) -> dict[str, float]:
        return {"exp_avg": 0.0, "exp_inf": 0.0}

    def step(self, params, grads, state, t: int, lr: float) -> None:
        hp = self.hp
        self.k.adamax_step(params, grads, state["exp_avg"], state["exp_inf"], lr, hp.betas[0], hp.betas[1], hp.eps,
                           hp.weight_decay, t)


class NAdam(Optimizer):
    defaults = {"nadam": dict(lr=2e-3, betas=_BETAS, eps=1e-8, weight_decay=0.0, momentum_decay=4e-3)}
    hp_type = NAdamHyperparams

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._mu_cache = (0, 1.0)  # (t, prod mu_1..t): lets consecutive steps cost one multiply

    def state_spec(self) -> dict[str, float]:
        return {"exp_avg": 0.0, "exp_avg_sq": 0.0}

    def mu_product(self, t: int) -> float:
        """prod_{i=1..t} mu_i, rounded to float32 after each factor as torch's float32 `mu_product` state is.

        A function of t alone, so it is not part of the state (checkpoints stay plain arrays)."""
        beta1, psi = self.hp.betas[0], self.hp.momentum_decay
        t0, prod = self._mu_cache if self._mu_cache[0] <= t else (0, 1.0)
        prod = np.float32(prod)
        for i in range(t0 + 1, t + 1):
            if prod == 0:  # underflowed: stays 0 (every mu_i < 1)
                break
            prod = np.float32(prod * np.float32(beta1 * (1.0 - 0.5 * 0.96 ** (i * psi))))
        self._mu_cache = (t, float(prod))
        return float(prod)

    def step(self, params, grads, state, t: int, lr: float) -> None:
        hp = self.hp
        self.k.nadam_step(params, grads, state["exp_avg"], state["exp_avg_sq"], lr, hp.betas[0], hp.betas[1], hp.eps,
                          hp.weight_decay, hp.momentum_decay, t, self.mu_product(t))
