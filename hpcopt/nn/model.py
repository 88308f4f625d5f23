"""The MLP: Dense layers over one FlatParams, forward/backward as explicit passes."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..kernels import cpu as K
from .layers import Dense
from .losses import LOSSES
from .params import FlatParams


def init_rng(seed: int, layer_index: int) -> np.random.Generator:
    """Counter-based stream per (seed, layer): a layer's init does not depend on how the model is split."""
    return np.random.Generator(np.random.Philox(key=np.array([seed, 1_000_000 + layer_index], dtype=np.uint64)))


class MLP:
    """widths = [n_in, hidden..., n_out]; `activation` between layers, none after the last."""

    def __init__(self, widths: Sequence[int], activation: str = "relu", loss: str = "softmax_ce",
                 dtype: str = "float32", seed: int = 0, init: str = "he"):
        self.widths = list(widths)
        n = len(widths) - 1
        self.layers = [Dense(f"dense{i}", widths[i], widths[i + 1], activation if i < n - 1 else "identity")
                       for i in range(n)]
        self.loss_name = loss
        self.loss_fn = LOSSES[loss]
        specs = [s for layer in reversed(self.layers) for s in layer.param_specs()]  # backward order
        self.flat = FlatParams(specs, np.dtype(dtype))
        for i, layer in enumerate(self.layers):
            layer.bind(self.flat)
            layer.init(init_rng(seed, i), init)

    @property
    def dtype(self) -> np.dtype:
        return self.flat.dtype

    def forward(self, x: np.ndarray) -> list[np.ndarray]:
        """Returns [x, a1, ..., logits]: what backward needs."""
        acts = [np.ascontiguousarray(x, dtype=self.dtype)]
        for layer in self.layers:
            acts.append(layer.forward(acts[-1]))
        return acts

    def backward(self, acts: list[np.ndarray], dout: np.ndarray,
                 on_layer_done: Callable[[int], None] | None = None) -> None:
        """Fill flat.grad from dL/d(output). Calls on_layer_done(i) as soon as layer i's grads are final."""
        d = dout
        for i in range(len(self.layers) - 1, -1, -1):
            d = self.layers[i].backward(acts[i], acts[i + 1], d, need_dx=i > 0)
            if on_layer_done is not None:
                on_layer_done(i)

    def loss_and_grad(self, x: np.ndarray, labels: np.ndarray, global_batch: int,
                      on_layer_done: Callable[[int], None] | None = None) -> float:
        """One forward + backward on this rank's slice; returns the SUM of its per-sample losses."""
        acts = self.forward(x)
        dout = np.empty_like(acts[-1])
        loss_sum = self.loss_fn(acts[-1], labels, global_batch, dout)
        self.backward(acts, dout, on_layer_done)
        return loss_sum

    def evaluate(self, x: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
        """(sum of losses, number correct) on a slice, no gradients kept."""
        out = self.forward(x)[-1]
        scratch = np.empty_like(out)
        return self.loss_fn(out, labels, 1, scratch), K.count_correct(out, labels)
