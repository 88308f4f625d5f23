"""A contiguous range of the model's units over ONE flat buffer: the model partition of every layout
(DESIGN §3, §5). The unsplit model is the one stage [0, L) with every layer FULL (`nn.MLP`, `nn.Model`);
a pipeline stage is a shorter range; under tensor parallelism each dense layer is a block (nn/layers.py).

The model is a modelspec.Spec (or MLP widths): units are its top-level layers (a residual block is one
unit). Every layer is named and initialised from `init_rng(seed, index)` by its model-wide index
however the model is cut, so any (pp, tp) layout starts from the very parameters of the unsplit model.

    forward(x, ...) -> Trace [x, y_lo, ..., y_hi-1] with .saved (what each layer's backward needs)
    backward(trace, dout, ...)  parameter gradients of the stage; dx for the stage before, if asked
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..modelspec import Spec, from_widths
from .build import build_layer, leaves
from .layers import COLUMN, EVAL, FULL, ROW, Ctx, Dense, TpSum, _no_sum, init_rng  # noqa: F401 (re-exported)
from .losses import LOSSES, row_scores, scores
from .params import FlatParams


class Trace(list):
    """[x, a_1, ..., a_n]: a stage's input and every layer's output; `saved[j]`: layer j's backward state."""
    saved: list


class Stage:
    """Units [lo, hi) of the model over one FlatParams (backward order); `splits[i]` says how global
    unit i is sharded (FULL everywhere unless tensor parallel, which splits dense layers only). The loss
    belongs to the stage holding the last unit. `model`: a modelspec.Spec, or MLP widths (with
    `activation` between the layers)."""

    def __init__(self, model: Spec | Sequence[int], lo: int = 0, hi: int | None = None, activation: str = "relu",
                 loss: str = "softmax_ce", dtype: str = "float32", seed: int = 0, init: str = "he",
                 splits: Sequence[str] | None = None, tp: int = 1, tp_rank: int = 0):
        spec = model if isinstance(model, Spec) else from_widths(list(model), activation)
        n = len(spec.units)
        hi = n if hi is None else hi
        splits = list(splits) if splits is not None else [FULL] * n
        self.spec, self.lo, self.hi, self.n_layers = spec, lo, hi, n
        self.units = spec.units[lo:hi]
        self.layers = [build_layer(u, splits[i], tp, tp_rank, seed) for i, u in zip(range(lo, hi), self.units)]
        self.is_first, self.is_last = lo == 0, hi == n
        self.loss_name = loss
        self.loss_fn = LOSSES[loss]
        specs = [s for layer in reversed(self.layers) for s in layer.param_specs()]  # backward order
        self.flat = FlatParams(specs, np.dtype(dtype))
        self.by_name, self.unit_of = {}, {}   # leaf name -> leaf; -> the model index of its unit
        for i, layer in zip(range(lo, hi), self.layers):
            for leaf in leaves(layer):
                self.by_name[leaf.name], self.unit_of[leaf.name] = leaf, i
                leaf.bind(self.flat)
                leaf.init(init_rng(seed, leaf.index), init)
        held = [leaf for layer in self.layers for leaf in leaves(layer)]
        self.buffers = FlatParams([s for leaf in held for s in leaf.buffer_specs()], np.float64, with_grad=False)
        for leaf in held:
            if leaf.buffer_specs():
                leaf.bind_buffers(self.buffers)
        first, last = self.layers[0], self.layers[-1]
        self.in_shape = (first.n_in,) if isinstance(first, Dense) else self.units[0].in_shape     # this rank's
        self.out_shape = (last.n_out,) if isinstance(last, Dense) else self.units[-1].out_shape

    @property
    def dtype(self) -> np.dtype:
        return self.flat.dtype

    @property
    def in_width(self) -> int:
        """Values per sample of the stage's input on this rank (a COLUMN layer before the cut leaves them split)."""
        return int(np.prod(self.in_shape))

    @property
    def out_width(self) -> int:
        return int(np.prod(self.out_shape))

    def layer(self, key: str):
        """The layer holding tensor `key` ("conv2d0.weight", "residual1.bias", ...)."""
        return self.by_name[key.split(".")[0]]

    def output_buffers(self, rows: int) -> list[np.ndarray | None]:
        """Preallocated outputs for forward(acts=...): one per dense layer (None for the others, which
        make their own)."""
        return [np.empty((rows, layer.n_out), self.dtype) if isinstance(layer, Dense) else None
                for layer in self.layers]

    def forward(self, x: np.ndarray, acts: list | None = None, tp_sum: TpSum = _no_sum,
                ctx: Ctx | None = None) -> Trace:
        """Returns the Trace [x, a_lo+1, ..., a_hi]; `acts`: output_buffers() to fill; x's rows are
        reshaped to the stage's input shape (data rows are flat)."""
        ctx = ctx or Ctx(tp_sum=tp_sum)
        if x.shape[1:] != self.in_shape:
            x = x.reshape(x.shape[0], *self.in_shape)
        out = Trace([x])
        out.saved = []
        for j, layer in enumerate(self.layers):
            y, s = layer.forward(out[-1], ctx, acts[j] if acts is not None else None)
            out.append(y)
            out.saved.append(s)
        return out

    def backward(self, acts: Trace, dout: np.ndarray, need_dx: bool = False, accumulate: bool = False,
                 dx_out: np.ndarray | None = None, tp_sum: TpSum = _no_sum,
                 on_layer_done: Callable[[int], None] | None = None, ctx: Ctx | None = None) -> np.ndarray | None:
        """dout (B, *out_shape) is overwritten. Fills (or adds to) this stage's gradients; returns dL/dx
        (into dx_out for a dense first layer) when need_dx (a stage after the first sends it back).
        on_layer_done(i): called with the model index i of each unit once its gradients are written
        (the data-parallel exchange starts buckets from it)."""
        ctx = ctx or Ctx(tp_sum=tp_sum)
        d = dout
        for j in range(len(self.layers) - 1, -1, -1):
            first = j == 0
            d = self.layers[j].backward(acts.saved[j], d, need_dx or not first, accumulate, ctx,
                                        dx_out if first else None)
            if on_layer_done is not None:
                on_layer_done(self.lo + j)
        return d if need_dx else None

    def loss(self, out: np.ndarray, labels: np.ndarray, global_batch: int, dout: np.ndarray,
             rows: np.ndarray | None = None) -> float:
        """The loss's SUM over the rows of `out`; dout := its gradient scaled by 1 / global batch.
        labels: integer classes (B,), or float targets (B, ...) of as many values per row as out's.
        rows (B,) float64, given: each row's loss, kept there (run.reproducible sums them exactly)."""
        if rows is None:
            return self.loss_fn(out, labels, global_batch, dout)
        return self.loss_fn(out, labels, global_batch, dout, rows)

    def score(self, out: np.ndarray, labels: np.ndarray, rows: bool = False) -> np.ndarray:
        """The evaluation sums of the network's output rows (losses.scores): [sum of losses, number
        correct] for classes; the regression sums (relative L2, squared errors, target moments) else.
        rows: each row's terms instead, (B, len(sums)) (losses.row_scores; run.reproducible)."""
        scratch = np.empty_like(out)
        if rows:
            losses = np.empty(len(out))
            self.loss_fn(out, labels, 1, scratch, losses)
            return row_scores(out, labels, losses)
        return scores(out, labels, self.loss_fn(out, labels, 1, scratch))

    # -- the whole model in one process (a stage holding every unit) -----------------------------------
    def loss_and_grad(self, x: np.ndarray, labels: np.ndarray, global_batch: int,
                      on_layer_done: Callable[[int], None] | None = None, ctx: Ctx | None = None) -> float:
        """One forward + backward on this rank's slice; returns the SUM of its per-sample losses."""
        acts = self.forward(np.ascontiguousarray(x, dtype=self.dtype), ctx=ctx)
        dout = np.empty_like(acts[-1])
        loss_sum = self.loss(acts[-1], labels, global_batch, dout)
        self.backward(acts, dout, on_layer_done=on_layer_done, ctx=ctx)
        return loss_sum

    def evaluate(self, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """score() of a slice, no gradients kept (running statistics, no dropout)."""
        return self.score(self.forward(np.ascontiguousarray(x, dtype=self.dtype), ctx=EVAL)[-1], labels)
