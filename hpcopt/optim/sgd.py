"""SGD, heavy-ball momentum and Nesterov momentum: one kernel (`sgd_step`), torch.optim.SGD's semantics.

    g = grad + weight_decay * p
    b = g                                  at t == 1 (torch initialises the buffer with the gradient)
    b = momentum * b + (1 - dampening) * g at t > 1
    d = g + momentum * b  (nesterov)  |  b  (momentum > 0)  |  g  (momentum == 0)
    p = p - lr * d
Full-batch, mini-batch and per-sample SGD are this same update; only `data.batch_size` ("all", B, 1)
changes what `grad` averages over.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import Optimizer

# lr departs from torch.optim.SGD's 1e-3, which barely moves a model in a few thousand steps (digits:
# 41% after 880 steps): 0.1 for plain SGD, 0.01 with momentum 0.9 (the same effective step lr/(1-m)).
_COMMON = dict(dampening=0.0, weight_decay=0.0)


@dataclass(frozen=True)
class SGDHyperparams:
    lr: float
    dampening: float
    weight_decay: float
    momentum: float
    nesterov: bool


class SGD(Optimizer):
    defaults = {
        "sgd": dict(_COMMON, lr=0.1, momentum=0.0, nesterov=False),
        "momentum": dict(_COMMON, lr=0.01, momentum=0.9, nesterov=False),
        "nesterov": dict(_COMMON, lr=0.01, momentum=0.9, nesterov=True),
    }
    hp_type = SGDHyperparams

    @classmethod
    def check(cls, name: str, hp: dict[str, Any]) -> str | None:
        if name == "nesterov" and not hp["nesterov"]:
            return "optimizer.nesterov = false contradicts optimizer.name = \"nesterov\" (use momentum)"
        if name in ("momentum", "nesterov") and hp["momentum"] <= 0:
            return f"optimizer.momentum must be > 0 for {name} (got {hp['momentum']:g})"
        if hp["nesterov"] and (hp["momentum"] <= 0 or hp["dampening"] != 0):
            return "nesterov momentum needs optimizer.momentum > 0 and optimizer.dampening = 0"
        return None

    def state_spec(self) -> dict[str, float]:
        return {"momentum_buffer": 0.0} if self.hp.momentum > 0 else {}

    def step(self, params, grads, state, t: int, lr: float) -> None:
        hp = self.hp
        buf = state.get("momentum_buffer", self._placeholder)
        self.k.sgd_step(params, grads, buf, lr, hp.weight_decay, hp.momentum, hp.dampening, hp.nesterov, t == 1)
