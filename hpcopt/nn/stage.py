"""A contiguous range of the MLP's layers over ONE flat buffer: the model partition of every layout
(DESIGN §3, §5). The unsplit model is the one stage [0, L) with every layer FULL (`nn.MLP`); a
pipeline stage is a shorter range; under tensor parallelism each layer is a block (nn/layers.py).

Layer i of the global widths [n0, ..., nL] is named `dense{i}` and initialised from `init_rng(seed, i)`
however the model is cut, so any (pp, tp) layout starts from the very parameters of the unsplit MLP.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..kernels import cpu as K
from .layers import COLUMN, FULL, ROW, Dense, TpSum, _no_sum, init_rng  # noqa: F401 (COLUMN, ROW re-exported)
from .losses import LOSSES
from .params import FlatParams


class Stage:
    """Layers [lo, hi) of the MLP `widths` over one FlatParams (backward order); `splits[i]` says how
    global layer i is sharded (FULL everywhere unless tensor parallel). The loss belongs to the stage
    holding the last layer."""

    def __init__(self, widths: Sequence[int], lo: int, hi: int, activation: str = "relu",
                 loss: str = "softmax_ce", dtype: str = "float32", seed: int = 0, init: str = "he",
                 splits: Sequence[str] | None = None, tp: int = 1, tp_rank: int = 0):
        self.widths = list(widths)
        n = len(widths) - 1
        splits = list(splits) if splits is not None else [FULL] * n
        self.lo, self.hi, self.n_layers = lo, hi, n
        self.layers = [Dense(f"dense{i}", widths[i], widths[i + 1], activation if i < n - 1 else "identity",
                             splits[i], tp, tp_rank) for i in range(lo, hi)]
        self.is_first, self.is_last = lo == 0, hi == n
        self.loss_name = loss
        self.loss_fn = LOSSES[loss]
        specs = [s for layer in reversed(self.layers) for s in layer.param_specs()]  # backward order
        self.flat = FlatParams(specs, np.dtype(dtype))
        for i, layer in zip(range(lo, hi), self.layers):
            layer.bind(self.flat)
            layer.init(init_rng(seed, i), init)

    @property
    def dtype(self) -> np.dtype:
        return self.flat.dtype

    @property
    def in_width(self) -> int:
        """Columns of the stage's input on this rank (a COLUMN layer before the cut leaves them split)."""
        return self.layers[0].n_in

    @property
    def out_width(self) -> int:
        return self.layers[-1].n_out

    def layer(self, key: str) -> Dense:
        return self.layers[int(key.split(".")[0][len("dense"):]) - self.lo]

    def forward(self, x: np.ndarray, acts: list[np.ndarray] | None = None,
                tp_sum: TpSum = _no_sum) -> list[np.ndarray]:
        """Returns [x, a_lo+1, ..., a_hi]; `acts`: preallocated outputs (len(layers) arrays) to fill."""
        out = [x]
        for j, layer in enumerate(self.layers):
            out.append(layer.forward(out[-1], acts[j] if acts is not None else None, tp_sum))
        return out

    def backward(self, acts: list[np.ndarray], dout: np.ndarray, need_dx: bool = False, accumulate: bool = False,
                 dx_out: np.ndarray | None = None, tp_sum: TpSum = _no_sum,
                 on_layer_done: Callable[[int], None] | None = None) -> np.ndarray | None:
        """dout (B, out_width) is overwritten. Fills (or adds to) this stage's gradients; returns dL/dx
        into dx_out when need_dx (a stage after the first sends it back). on_layer_done(i): called with
        the model index i of each layer once its weight and bias gradients are written (the
        data-parallel exchange starts buckets from it)."""
        d = dout
        for j in range(len(self.layers) - 1, -1, -1):
            first = j == 0
            d = self.layers[j].backward(acts[j], acts[j + 1], d, need_dx=need_dx or not first,
                                        accumulate=accumulate, dx_out=dx_out if first else None, tp_sum=tp_sum)
            if on_layer_done is not None:
                on_layer_done(self.lo + j)
        return d if need_dx else None

    def loss(self, out: np.ndarray, labels: np.ndarray, global_batch: int, dout: np.ndarray) -> float:
        """The loss's SUM over the rows of `out`; dout := its gradient scaled by 1 / global batch."""
        return self.loss_fn(out, labels, global_batch, dout)

    def score(self, out: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
        """(sum of losses, number correct) of the network's output rows."""
        scratch = np.empty_like(out)
        return self.loss_fn(out, labels, 1, scratch), K.count_correct(out, labels)

    # -- the whole model in one process (a stage holding every layer) ------------------------------------
    def loss_and_grad(self, x: np.ndarray, labels: np.ndarray, global_batch: int,
                      on_layer_done: Callable[[int], None] | None = None) -> float:
        """One forward + backward on this rank's slice; returns the SUM of its per-sample losses."""
        acts = self.forward(np.ascontiguousarray(x, dtype=self.dtype))
        dout = np.empty_like(acts[-1])
        loss_sum = self.loss(acts[-1], labels, global_batch, dout)
        self.backward(acts, dout, on_layer_done=on_layer_done)
        return loss_sum

    def evaluate(self, x: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
        """(sum of losses, number correct) on a slice, no gradients kept."""
        return self.score(self.forward(np.ascontiguousarray(x, dtype=self.dtype))[-1], labels)
