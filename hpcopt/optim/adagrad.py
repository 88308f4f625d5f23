"""Adagrad (torch.optim.Adagrad):

    g = grad + weight_decay * p
    s = s + g^2                      (s starts at initial_accumulator_value)
    p = p - lr / (1 + (t - 1) * lr_decay) * g / (sqrt(s) + eps)
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Optimizer


@dataclass(frozen=True)
class AdagradHyperparams:
    lr: float
    lr_decay: float
    weight_decay: float
    initial_accumulator_value: float
    eps: float


class Adagrad(Optimizer):
    defaults = {"adagrad": dict(lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0, eps=1e-10)}
    hp_type = AdagradHyperparams

    def state_spec(self) -> dict[str, float]:
        return {"sum": self.hp.initial_accumulator_value}

    def step(self, params, grads, state, t: int, lr: float) -> None:
        hp = self.hp
        self.k.adagrad_step(params, grads, state["sum"], lr, hp.weight_decay, hp.eps, hp.lr_decay, t)
