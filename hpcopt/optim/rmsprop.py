"""RMSprop (torch.optim.RMSprop), optionally centered and with momentum:

    g   = grad + weight_decay * p
    sa  = alpha * sa + (1 - alpha) * g^2
    ga  = alpha * ga + (1 - alpha) * g                      (centered)
    avg = sqrt(sa - ga^2) + eps  (centered)  |  sqrt(sa) + eps
    b   = momentum * b + g / avg;  p = p - lr * b           (momentum > 0)
    p   = p - lr * g / avg                                  (momentum == 0)
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Optimizer


@dataclass(frozen=True)
class RMSpropHyperparams:
    lr: float
    alpha: float
    eps: float
    weight_decay: float
    momentum: float
    centered: bool


class RMSprop(Optimizer):
    defaults = {"rmsprop": dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False)}
    hp_type = RMSpropHyperparams

    def state_spec(self) -> dict[str, float]:
        spec = {"square_avg": 0.0}
        if self.hp.momentum > 0:
            spec["momentum_buffer"] = 0.0
        if self.hp.centered:
            spec["grad_avg"] = 0.0
        return spec

    def step(self, params, grads, state, t: int, lr: float) -> None:
        hp = self.hp
        self.k.rmsprop_step(params, grads, state["square_avg"], state.get("grad_avg", self._placeholder),
                            state.get("momentum_buffer", self._placeholder), lr, hp.alpha, hp.eps,
                            hp.weight_decay, hp.momentum, hp.centered)
