"""Dense layer with a fused bias + activation, as explicit forward/backward functions over arrays.

Shapes: x (B, n_in) · weight (n_in, n_out) · bias (n_out,) · a (B, n_out).
The weight is stored (n_in, n_out) so that forward is x @ W (torch's Linear stores W.T).
"""
from __future__ import annotations

import numpy as np

from ..kernels import cpu as K
from .params import FlatParams, ParamSpec


class Dense:
    def __init__(self, name: str, n_in: int, n_out: int, activation: str = "identity"):
        self.name, self.n_in, self.n_out = name, n_in, n_out
        self.activation = activation
        self.act = K.ACTIVATIONS[activation]

    def param_specs(self) -> list[ParamSpec]:
        return [ParamSpec(self.name, "weight", (self.n_in, self.n_out)),
                ParamSpec(self.name, "bias", (self.n_out,))]

    def bind(self, flat: FlatParams) -> None:
        """Take views into the flat parameter and gradient buffers."""
        self.W, self.b = flat.param(f"{self.name}.weight"), flat.param(f"{self.name}.bias")
        self.dW, self.db = flat.grad_of(f"{self.name}.weight"), flat.grad_of(f"{self.name}.bias")

    def init(self, rng: np.random.Generator, scheme: str) -> None:
        if scheme == "he":
            std = np.sqrt(2.0 / self.n_in)
            self.W[...] = rng.standard_normal(self.W.shape) * std
        else:  # xavier (Glorot) uniform
            lim = np.sqrt(6.0 / (self.n_in + self.n_out))
            self.W[...] = rng.uniform(-lim, lim, self.W.shape)
        self.b[...] = 0

    def forward(self, x: np.ndarray) -> np.ndarray:
        """x (B, n_in) -> a = act(x @ W + b) (B, n_out)."""
        a = np.matmul(x, self.W)
        K.bias_act_forward(a, self.b, self.act)
        return a

    def backward(self, x: np.ndarray, a: np.ndarray, da: np.ndarray, need_dx: bool) -> np.ndarray | None:
        """da (B, n_out) is overwritten with dL/dz; writes dW (n_in, n_out) and db (n_out,).

        Returns dx (B, n_in) when need_dx, else None (the first layer needs no input gradient).
        """
        K.bias_act_backward(da, a, self.act, self.db)
        np.matmul(x.T, da, out=self.dW)
        return np.matmul(da, self.W.T) if need_dx else None
