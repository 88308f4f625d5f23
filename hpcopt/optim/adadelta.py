"""Adadelta (torch.optim.Adadelta; Zeiler 2012, with torch's lr factor):

    g  = grad + weight_decay * p
    sa = rho * sa + (1 - rho) * g^2
    d  = sqrt(ad + eps) / sqrt(sa + eps) * g
    ad = rho * ad + (1 - rho) * d^2
    p  = p - lr * d
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Optimizer


@dataclass(frozen=True)
class AdadeltaHyperparams:
    lr: float
    rho: float
    eps: float
    weight_decay: float


class Adadelta(Optimizer):
    defaults = {"adadelta": dict(lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0)}
    hp_type = AdadeltaHyperparams

    def state_spec(self) -> dict[str, float]:
        return {"square_avg": 0.0, "acc_delta": 0.0}

    def step(self, params, grads, state, t: int, lr: float) -> None:
        hp = self.hp
        self.k.adadelta_step(params, grads, state["square_avg"], state["acc_delta"], lr, hp.rho, hp.eps,
                             hp.weight_decay)
