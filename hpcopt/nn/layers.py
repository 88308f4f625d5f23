"""Dense layer with a fused bias + activation, as explicit forward/backward functions over arrays.

Shapes: x (B, n_in) · weight (n_in, n_out) · bias (n_out,) · a (B, n_out).
The weight is stored (n_in, n_out) so that forward is x @ W (torch's Linear stores W.T).

A layer is the whole global layer or one tensor-parallel block of it (`split`):
    FULL     weight (n_in, n_out)          bias (n_out,)         the whole layer
    COLUMN   weight (n_in, n_out / tp)     bias (n_out / tp,)    output columns [r·n_out/tp, (r+1)·n_out/tp)
    ROW      weight (n_in / tp, n_out)     bias (n_out,)         input rows of the same block; bias whole
A COLUMN layer followed by a ROW layer is a tensor-parallel MLP block: the column layer's output stays
split, the row layer's partial products are summed over tp (`tp_sum`, one Allreduce) before its bias and
activation; backward, the column layer's input gradient is the one sum. nn/ holds no communicator:
the caller passes `tp_sum(a)`, an in-place sum over the tensor-parallel ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..kernels import cpu as K
from .params import FlatParams, ParamSpec

FULL, COLUMN, ROW = "full", "column", "row"
TpSum = Callable[[np.ndarray], None]


def _no_sum(a: np.ndarray) -> None:
    return None


@dataclass
class Ctx:
    """What a layer's forward/backward may need besides its arrays (nn/ holds no communicator):
    tp_sum(a): in-place sum over the tensor-parallel ranks; dp_sum(a): in-place sum of a float64 array
    over the ranks whose rows are normalised together (synchronised batch norm; None: this rank alone);
    training: batch statistics and dropout (False: running statistics, no dropout); step and first_row:
    the optimizer step and the GLOBAL index, within the global batch, of this call's first row (the
    dropout stream's key). run.reproducible (parallel/reproducible.py): matmul(a, b, out) is the
    fixed-order product, dense_backward(x, dz, W, need_dx, dW, db, dx) a dense layer's gradients summed
    over the data-parallel ranks in a fixed order (None: numpy's matmul, this rank's own sums)."""
    tp_sum: TpSum = _no_sum
    dp_sum: Callable[[np.ndarray], None] | None = None
    training: bool = True
    step: int = 0
    first_row: int = 0
    matmul: Callable | None = None
    dense_backward: Callable | None = None


TRAIN = Ctx()
EVAL = Ctx(training=False)


def flat_view(a: np.ndarray) -> np.ndarray:
    """The 1-D view of a C-contiguous array (a kernel writing into it writes into `a`)."""
    if not a.flags.c_contiguous:
        raise ValueError("expected a C-contiguous array")
    return a.reshape(-1)


def activate(z: np.ndarray, act: int) -> np.ndarray:
    """a = act(z) for the activations that need their input for the derivative (gelu, silu): a new
    array; z is kept for backward."""
    a = np.empty_like(z)
    K.act_forward(flat_view(z), flat_view(a), act)
    return a


def init_rng(seed: int, layer_index: int) -> np.random.Generator:
    """Counter-based stream per (seed, layer): a layer's init does not depend on how the model is split."""
    return np.random.Generator(np.random.Philox(key=np.array([seed, 1_000_000 + layer_index], dtype=np.uint64)))


class Dense:
    def __init__(self, name: str, n_in: int, n_out: int, activation: str = "identity",
                 split: str = FULL, tp: int = 1, tp_rank: int = 0):
        self.global_in, self.global_out, self.split = n_in, n_out, split
        self.rows, self.cols = slice(0, n_in), slice(0, n_out)  # this block of the global weight
        if split == COLUMN:
            w = n_out // tp
            self.cols = slice(tp_rank * w, (tp_rank + 1) * w)
        elif split == ROW:
            h = n_in // tp
            self.rows = slice(tp_rank * h, (tp_rank + 1) * h)
        self.name = name
        self.n_in, self.n_out = self.rows.stop - self.rows.start, self.cols.stop - self.cols.start
        self.activation = activation
        self.act = K.ACTIVATIONS[activation]
        self._dW = self._db = None  # scratch for accumulating micro-batches, made on first use

    def param_specs(self) -> list[ParamSpec]:
        return [ParamSpec(self.name, "weight", (self.n_in, self.n_out)),
                ParamSpec(self.name, "bias", (self.n_out,))]

    def global_shape(self, name: str) -> tuple[int, ...]:
        return (self.global_in, self.global_out) if name == "weight" else (self.global_out,)

    def block(self, name: str) -> tuple[slice, ...]:
        """Index of this layer's part in the global tensor `name` ("weight" or "bias")."""
        if name == "weight":
            return self.rows, self.cols
        return (self.cols,)

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (self.n_out,)

    def buffer_specs(self) -> list[ParamSpec]:
        return []

    def replicated_over_tp(self, name: str) -> bool:
        """Whether every tp rank holds this tensor alike (a FULL layer, a ROW layer's bias)."""
        return self.split == FULL or (self.split == ROW and name == "bias")

    def bind(self, flat: FlatParams) -> None:
        """Take views into the flat parameter and gradient buffers."""
        self.W, self.b = flat.param(f"{self.name}.weight"), flat.param(f"{self.name}.bias")
        self.dW, self.db = flat.grad_of(f"{self.name}.weight"), flat.grad_of(f"{self.name}.bias")

    def init(self, rng: np.random.Generator, scheme: str) -> None:
        """The global layer's init drawn whole, then this block of it: any split starts from the
        parameters of the unsplit layer. he: normal(0, sqrt(2 / n_in)); xavier: Glorot uniform."""
        shape = (self.global_in, self.global_out)
        if scheme == "he":
            full = rng.standard_normal(shape) * np.sqrt(2.0 / self.global_in)
        else:
            lim = np.sqrt(6.0 / (self.global_in + self.global_out))
            full = rng.uniform(-lim, lim, shape)
        self.W[...] = full[self.rows, self.cols]
        self.b[...] = 0

    def forward(self, x: np.ndarray, ctx: Ctx = TRAIN, out: np.ndarray | None = None):
        """x (B, n_in) -> (a, saved): a = act(x @ W [summed over tp for ROW] + b) (B, n_out), into `out`
        if given (gelu/silu: `out` keeps the pre-activation and a is new); saved: what backward needs."""
        z = np.matmul(x, self.W, out=out) if ctx.matmul is None else ctx.matmul(x, self.W, out=out)
        if self.split == ROW:
            ctx.tp_sum(z)
        if self.act in K.FROM_INPUT:
            K.bias_act_forward(z, self.b, K.IDENTITY)
            a = activate(z, self.act)
            return a, (x, z, a)
        K.bias_act_forward(z, self.b, self.act)
        return z, (x, z)

    def backward(self, saved, da: np.ndarray, need_dx: bool, accumulate: bool = False, ctx: Ctx = TRAIN,
                 dx_out: np.ndarray | None = None) -> np.ndarray | None:
        """da (B, n_out) is overwritten with dL/dz; writes dW (n_in, n_out) and db (n_out,), or ADDS
        them to the gradient buffer (accumulate: a later micro-batch).

        Returns dx (B, n_in) when need_dx (into dx_out if given), else None (the first layer needs no
        input gradient). A COLUMN block's dx is a partial sum over its output columns: summed over tp.
        """
        x, a = saved[0], saved[1]
        act = self.act
        if act in K.FROM_INPUT:
            K.act_backward(flat_view(da), flat_view(a), act)   # a is z here: dL/dz = dL/da · act'(z)
            act = K.IDENTITY
        if ctx.dense_backward is not None:   # run.reproducible: the sums over the rows of every dp rank
            if act != K.IDENTITY:
                K.act_backward_from_output(flat_view(da), flat_view(a), act)
            _, _, dx = ctx.dense_backward(x, da, self.W, need_dx, self.dW, self.db, dx_out)
            return dx
        if not accumulate:
            K.bias_act_backward(da, a, act, self.db)
            np.matmul(x.T, da, out=self.dW)
        else:
            if self._dW is None:
                self._dW, self._db = np.empty_like(self.dW), np.empty_like(self.db)
            K.bias_act_backward(da, a, act, self._db)
            np.matmul(x.T, da, out=self._dW)
            self.dW += self._dW
            self.db += self._db
        if not need_dx:
            return None
        dx = np.matmul(da, self.W.T, out=dx_out)
        if self.split == COLUMN:
            ctx.tp_sum(dx)
        return dx
