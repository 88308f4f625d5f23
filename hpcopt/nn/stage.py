"""A contiguous range of the MLP's layers, each whole or one tensor-parallel shard (DESIGN §3, §5).

A model partition for pipeline and tensor parallelism. Layer i of the global widths [n0, ..., nL] is
named `dense{i}` and initialised from `init_rng(seed, i)` however the model is cut: a shard draws the
whole tensor from that stream and keeps its block, so any (pp, tp) layout starts from the very
parameters of the unsplit MLP. A shard is one of
    FULL     weight (n_in, n_out)          bias (n_out,)         the whole layer
    COLUMN   weight (n_in, n_out / tp)     bias (n_out / tp,)    output columns [r·n_out/tp, (r+1)·n_out/tp)
    ROW      weight (n_in / tp, n_out)     bias (n_out,)         input rows of the same block; bias whole
A COLUMN layer followed by a ROW layer is a tensor-parallel MLP block: the column layer's output stays
split, the row layer's partial products are summed over tp (`tp_sum`, one Allreduce) before its bias and
activation; backward, the column layer's input gradient is the one sum. nn/ holds no communicator:
the caller passes `tp_sum(a)`, an in-place sum over the tensor-parallel ranks.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..kernels import cpu as K
from .layers import Dense
from .losses import LOSSES
from .model import init_rng
from .params import FlatParams

FULL, COLUMN, ROW = "full", "column", "row"
TpSum = Callable[[np.ndarray], None]


def _no_sum(a: np.ndarray) -> None:
    return None


class ShardedDense(Dense):
    """Dense over a block of the global layer; forward/backward write into given buffers."""

    def __init__(self, name: str, n_in: int, n_out: int, activation: str = "identity",
                 split: str = FULL, tp: int = 1, tp_rank: int = 0):
        self.global_in, self.global_out, self.split = n_in, n_out, split
        self.rows, self.cols = slice(0, n_in), slice(0, n_out)  # this shard's block of the global weight
        if split == COLUMN:
            w = n_out // tp
            self.cols = slice(tp_rank * w, (tp_rank + 1) * w)
        elif split == ROW:
            h = n_in // tp
            self.rows = slice(tp_rank * h, (tp_rank + 1) * h)
        super().__init__(name, self.rows.stop - self.rows.start, self.cols.stop - self.cols.start, activation)
        self._dW = self._db = None  # scratch for accumulating micro-batches, made on first use

    def global_shape(self, name: str) -> tuple[int, ...]:
        return (self.global_in, self.global_out) if name == "weight" else (self.global_out,)

    def block(self, name: str) -> tuple[slice, ...]:
        """Index of this shard's part in the global tensor `name` ("weight" or "bias")."""
        if name == "weight":
            return self.rows, self.cols
        return (self.cols,)

    def init(self, rng: np.random.Generator, scheme: str) -> None:
        """The global layer's init (Dense.init's draws over the whole tensor), then this block of it."""
        shape = (self.global_in, self.global_out)
        if scheme == "he":
            full = rng.standard_normal(shape) * np.sqrt(2.0 / self.global_in)
        else:
            lim = np.sqrt(6.0 / (self.global_in + self.global_out))
            full = rng.uniform(-lim, lim, shape)
        self.W[...] = full[self.rows, self.cols]
        self.b[...] = 0

    def forward(self, x: np.ndarray, out: np.ndarray | None = None, tp_sum: TpSum = _no_sum) -> np.ndarray:
        """x (B, n_in) -> act(x @ W [summed over tp for ROW] + b) (B, n_out), into `out` if given."""
        a = np.matmul(x, self.W, out=out)
        if self.split == ROW:
            tp_sum(a)
        K.bias_act_forward(a, self.b, self.act)
        return a

    def backward(self, x: np.ndarray, a: np.ndarray, da: np.ndarray, need_dx: bool,
                 accumulate: bool = False, dx_out: np.ndarray | None = None,
                 tp_sum: TpSum = _no_sum) -> np.ndarray | None:
        """Like Dense.backward; accumulate: ADD this micro-batch's dW, db to the gradient buffer.

        A COLUMN shard's dx is a partial sum over its output columns: summed over tp here.
        """
        if not accumulate:
            K.bias_act_backward(da, a, self.act, self.db)
            np.matmul(x.T, da, out=self.dW)
        else:
            if self._dW is None:
                self._dW, self._db = np.empty_like(self.dW), np.empty_like(self.db)
            K.bias_act_backward(da, a, self.act, self._db)
            np.matmul(x.T, da, out=self._dW)
            self.dW += self._dW
            self.db += self._db
        if not need_dx:
            return None
        dx = np.matmul(da, self.W.T, out=dx_out)
        if self.split == COLUMN:
            tp_sum(dx)
        return dx


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
        self.layers = [ShardedDense(f"dense{i}", widths[i], widths[i + 1], activation if i < n - 1 else "identity",
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

    def layer(self, key: str) -> ShardedDense:
        return self.layers[int(key.split(".")[0][len("dense"):]) - self.lo]

    def forward(self, x: np.ndarray, acts: list[np.ndarray] | None = None,
                tp_sum: TpSum = _no_sum) -> list[np.ndarray]:
        """Returns [x, a_lo+1, ..., a_hi]; `acts`: preallocated outputs (len(layers) arrays) to fill."""
        out = [x]
        for j, layer in enumerate(self.layers):
            out.append(layer.forward(out[-1], acts[j] if acts is not None else None, tp_sum))
        return out

    def backward(self, acts: list[np.ndarray], dout: np.ndarray, need_dx: bool, accumulate: bool = False,
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

    def evaluate(self, out: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
        """(sum of losses, number correct) of the network's output rows."""
        scratch = np.empty_like(out)
        return self.loss_fn(out, labels, 1, scratch), K.count_correct(out, labels)
