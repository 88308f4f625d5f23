"""Layers built from a model description (modelspec.Spec), and the residual block.

`build_layer(unit, ...)` makes the layer object of one unit of the spec (nn/layers.py's Dense, or a
layer of nn/layers2d.py, or a Residual holding its body); every leaf carries `index`, its model-wide
position, which keys its init stream and dropout stream. A Stage (nn/stage.py) holds a run of units.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from ..modelspec import Unit
from ..kernels import cpu as K
from .layers import FULL, TRAIN, Ctx, Dense, flat_view
from .layers2d import (Activation, AvgPool2d, BatchNorm1d, BatchNorm2d, Conv1d, Conv2d, Dropout, Flatten, GlobalAvgPool,
                       LayerNorm, MaxPool2d)
from .params import ParamSpec


class Residual:
    """y = act(body(x) + x), or act(body(x) + proj(x)) when the body changes the shape (proj: a dense
    layer for flat shapes, a strided 1x1 convolution for images and sequences); act: the block's
    `activation` (identity, relu, tanh, sigmoid), fused into the sum. The projection's tensors are the
    block's own: "<residual name>.weight" / ".bias". x's gradient is the body's plus the skip's."""

    def __init__(self, unit: Unit, body: list, seed: int):
        self.name, self.index, self.body = unit.name, unit.index, body
        self.activation = unit.keys.get("activation", "identity")
        self.act = K.ACTIVATIONS[self.activation]
        self.proj = None
        a, b = unit.in_shape, unit.out_shape
        if unit.projection == "dense":
            self.proj = Dense(unit.name, a[0], b[0])
        elif unit.projection == "conv" and len(a) == 3:
            self.proj = Conv2d(unit.name, a[0], b[0], 1, unit.proj_stride)
        elif unit.projection == "conv":
            self.proj = Conv1d(unit.name, a[0], b[0], 1, unit.proj_stride)
        if self.proj is not None:
            self.proj.index = unit.index

    def leaves(self) -> Iterator:
        """The projection (if any), then the body's layers, depth-first."""
        if self.proj is not None:
            yield self.proj
        for layer in self.body:
            yield from leaves(layer)

    def param_specs(self) -> list[ParamSpec]:
        """Backward order: the projection, then the body from its last layer to its first."""
        own = self.proj.param_specs() if self.proj is not None else []
        return own + [s for layer in reversed(self.body) for s in layer.param_specs()]

    def out_shape(self, in_shape):
        return self.proj.out_shape(in_shape) if self.proj is not None else tuple(in_shape)

    def forward(self, x: np.ndarray, ctx: Ctx = TRAIN, out=None):
        h, saved = x, []
        for layer in self.body:
            h, s = layer.forward(h, ctx)
            saved.append(s)
        if self.proj is not None:
            p, ps = self.proj.forward(x, ctx)
        else:
            p, ps = x, None
        h, p = np.ascontiguousarray(h), np.ascontiguousarray(p)
        y = np.empty_like(h)
        K.add_act(flat_view(h), flat_view(p), self.act, flat_view(y))   # act(body + skip), one pass
        return y, (saved, ps, y)

    def backward(self, saved, dy: np.ndarray, need_dx: bool, accumulate: bool = False, ctx: Ctx = TRAIN,
                 dx_out=None) -> np.ndarray | None:
        body_saved, ps, y = saved
        if self.act != K.IDENTITY:
            dy = np.ascontiguousarray(dy)
            K.act_backward_from_output(flat_view(dy), flat_view(y), self.act)
        d = dy.copy()   # the body's layers overwrite the gradient they are given; dy also feeds the skip
        for j in range(len(self.body) - 1, -1, -1):
            d = self.body[j].backward(body_saved[j], d, need_dx or j > 0, accumulate, ctx)
        skip = dy
        if self.proj is not None:
            skip = self.proj.backward(ps, dy, need_dx, accumulate, ctx)
        if not need_dx:
            return None
        d += skip
        return d


def leaves(layer) -> Iterator:
    """The layers holding tensors or buffers (a residual block's projection and body, recursively)."""
    if isinstance(layer, Residual):
        yield from layer.leaves()
    else:
        yield layer


def build_layer(u: Unit, split: str = FULL, tp: int = 1, tp_rank: int = 0, seed: int = 0):
    """The layer of one unit; `split` (tensor parallelism) applies to dense layers only."""
    k, shape = u.keys, u.in_shape
    t = u.type
    if t == "dense":
        layer = Dense(u.name, shape[0], k["units"], k["activation"], split, tp, tp_rank)
    elif t == "conv2d":
        layer = Conv2d(u.name, shape[0], k["channels"], k["kernel"], k["stride"], k["padding"], k["dilation"],
                       k["activation"])
    elif t == "conv1d":
        layer = Conv1d(u.name, shape[0], k["channels"], k["kernel"], k["stride"], k["padding"], k["dilation"],
                       k["activation"])
    elif t in ("maxpool2d", "avgpool2d"):
        layer = (MaxPool2d if t == "maxpool2d" else AvgPool2d)(u.name, k["kernel"], k["stride"] or None, k["padding"])
    elif t == "global_avgpool":
        layer = GlobalAvgPool(u.name)
    elif t == "flatten":
        layer = Flatten(u.name)
    elif t == "activation":
        layer = Activation(u.name, k["function"])
    elif t == "layernorm":
        layer = LayerNorm(u.name, shape, k["eps"])
    elif t == "batchnorm":
        layer = (BatchNorm2d if len(shape) == 3 else BatchNorm1d)(u.name, shape[0], k["momentum"], k["eps"],
                                                                  k["activation"])
    elif t == "dropout":
        layer = Dropout(u.name, k["p"], u.index, seed)
    elif t == "residual":
        layer = Residual(u, [build_layer(v, FULL, 1, 0, seed) for v in u.layers], seed)
    else:  # modelspec.LAYERS lists what is built here (tests/unit/test_models.py checks both)
        raise ValueError(f"no layer of type {t!r}")
    layer.index = u.index
    return layer
