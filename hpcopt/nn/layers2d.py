"""Layers for convolutional networks, as explicit forward/backward functions over arrays (NCHW).

Shapes: x (B, C, H, W) for the 2-D layers, (B, C, L) for Conv1d, (B, F) for BatchNorm1d; weights as
torch stores them (conv: (C_out, C_in, kh, kw)), so a torch model's tensors copy over unchanged.

Every layer has the interface of `layers.Dense`: `param_specs()`, `bind(flat)` (views into the ONE flat
parameter buffer and its gradient twin), `init(rng, scheme)`, `out_shape(in_shape)` (per sample), and

    forward(x, ctx=TRAIN) -> (y, saved)            saved: what backward needs (held per micro-batch by
    backward(saved, dy, need_dx, accumulate=False, ctx=TRAIN) -> dx | None       the caller, never here)

backward WRITES the parameter gradients into the bound gradient views (or adds them: `accumulate`, a
later micro-batch) and returns dx, or None when need_dx is False (the first layer). A layer keeps no
per-call state, so a pipeline may hold several micro-batches' forwards before their backwards.

Parallel contracts (nn/ holds no communicator; `ctx` (layers.Ctx) carries the callables):
  * BatchNorm normalises with statistics summed by `ctx.dp_sum(a)` (a float64 array summed over the
    data-parallel ranks IN PLACE; None: this rank's rows alone). Two small Allreduces per layer per
    call: [sum x, sum x², count] forward, [sum dy, sum dy·xhat] backward. Its running statistics are
    buffers (not parameters): `buffer_specs()` / `bind_buffers(bufs)`, checkpointed beside the flat buffer.
  * Dropout's mask is a pure function of (seed, ctx.step, layer index, GLOBAL sample index
    ctx.first_row + r, element), so a global batch gets the same mask however it is split over ranks.
"""
from __future__ import annotations

import math
import numpy as np

from ..kernels import conv as KC
from ..kernels import cpu as K
from .conv import conv2d_backward, conv2d_forward
from .layers import TRAIN, Ctx, activate, flat_view
from .params import FlatParams, ParamSpec

def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if np.isscalar(v) else (int(v[0]), int(v[1]))


class _Whole:
    """A layer held whole on every rank that has it (tensor parallelism splits dense pairs only): its
    tensors are global tensors; no buffers unless it says so."""

    name: str

    def global_shape(self, which: str) -> tuple[int, ...]:
        return next(p.shape for p in self.param_specs() if p.name == which)

    def block(self, which: str) -> tuple[slice, ...]:
        return (slice(0, self.global_shape(which)[0]),)

    def replicated_over_tp(self, which: str) -> bool:
        return True

    def buffer_specs(self) -> list[ParamSpec]:
        return []


class _Affine(_Whole):
    """The elementwise weight and bias of a normalisation layer, of shape `param_shape()`; they start
    as the identity (scale 1, shift 0)."""

    def param_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def param_specs(self) -> list[ParamSpec]:
        return [ParamSpec(self.name, "weight", self.param_shape()), ParamSpec(self.name, "bias", self.param_shape())]

    def bind(self, flat: FlatParams) -> None:
        self.W, self.b = flat.param(f"{self.name}.weight"), flat.param(f"{self.name}.bias")
        self.dW, self.db = flat.grad_of(f"{self.name}.weight"), flat.grad_of(f"{self.name}.bias")

    def init(self, rng: np.random.Generator, scheme: str) -> None:
        self.W[...] = 1
        self.b[...] = 0


def _shape_error(name: str, expected: str, got: tuple[int, ...]) -> ValueError:
    return ValueError(f"{name}: expected input of per-sample shape {expected}, got {tuple(got)}")


def _he_or_xavier(rng: np.random.Generator, scheme: str, shape: tuple[int, ...],
                  fan_in: int, fan_out: int) -> np.ndarray:
    """he: normal(0, sqrt(2 / fan_in)); xavier: Glorot uniform(±sqrt(6 / (fan_in + fan_out)))."""
    if scheme == "he":
        return rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
    if scheme == "xavier":
        lim = np.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-lim, lim, shape)
    raise ValueError(f"unknown init scheme {scheme!r} (he, xavier)")


class _NoParams(_Whole):
    """Pooling, flatten, dropout: nothing in the flat buffer."""

    def param_specs(self) -> list[ParamSpec]:
        return []

    def bind(self, flat: FlatParams) -> None:
        return None

    def init(self, rng: np.random.Generator, scheme: str) -> None:
        return None


# ================================================================ convolution

class Conv2d(_Whole):
    """y = act(conv2d(x, W) + b). x (B, C_in, H, W) -> y (B, C_out, OH, OW); W (C_out, C_in, kh, kw)."""

    def __init__(self, name: str, c_in: int, c_out: int, kernel, stride=1, padding=0, dilation=1,
                 activation: str = "identity"):
        self.name, self.c_in, self.c_out = name, c_in, c_out
        self.kernel, self.stride = _pair(kernel), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.activation = activation
        self.act = K.ACTIVATIONS[activation]
        self._scratch: dict = {}               # the convolution's reusable buffers
        self._dW = self._db = None             # scratch for accumulate, made on first use

    def weight_shape(self) -> tuple[int, ...]:
        return (self.c_out, self.c_in, *self.kernel)

    def param_specs(self) -> list[ParamSpec]:
        return [ParamSpec(self.name, "weight", self.weight_shape()),
                ParamSpec(self.name, "bias", (self.c_out,))]

    def bind(self, flat: FlatParams) -> None:
        self.W, self.b = flat.param(f"{self.name}.weight"), flat.param(f"{self.name}.bias")
        self.dW, self.db = flat.grad_of(f"{self.name}.weight"), flat.grad_of(f"{self.name}.bias")
        # the (C_out, C_in, kh, kw) views the 2-D code works on (Conv1d: its (C_out, C_in, k) seen so)
        self._W4 = self.W.reshape(self.c_out, self.c_in, *self.kernel)
        self._dW4 = self.dW.reshape(self.c_out, self.c_in, *self.kernel)

    def init(self, rng: np.random.Generator, scheme: str) -> None:
        """fan_in = C_in·kh·kw, fan_out = C_out·kh·kw (torch's convention for conv weights)."""
        area = math.prod(self.kernel)
        self.W[...] = _he_or_xavier(rng, scheme, self.weight_shape(), self.c_in * area, self.c_out * area)
        self.b[...] = 0

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        """(C_in, H, W) -> (C_out, OH, OW)."""
        if len(in_shape) != 3 or in_shape[0] != self.c_in:
            raise _shape_error(self.name, f"({self.c_in}, H, W)", in_shape)
        _, H, W = in_shape
        OH = KC.conv_out_size(H, self.kernel[0], self.stride[0], self.padding[0], self.dilation[0])
        OW = KC.conv_out_size(W, self.kernel[1], self.stride[1], self.padding[1], self.dilation[1])
        if OH < 1 or OW < 1:
            raise ValueError(f"{self.name}: input {tuple(in_shape)} is smaller than the dilated kernel "
                             f"{self.kernel} (padding {self.padding}, dilation {self.dilation}): "
                             f"output would be ({self.c_out}, {OH}, {OW})")
        return (self.c_out, OH, OW)

    def forward(self, x: np.ndarray, ctx: Ctx = TRAIN, out=None):
        """x (B, C_in, H, W) -> (y (B, C_out, OH, OW), saved)."""
        self.out_shape(x.shape[1:])
        return self._forward4(x)

    def _forward4(self, x: np.ndarray):
        if self.act in K.FROM_INPUT:   # gelu/silu: keep the pre-activation for backward
            z = conv2d_forward(x, self._W4, self.b, self.stride, self.padding, self.dilation, K.IDENTITY,
                               self._scratch)
            y = activate(z, self.act)
            return y, (x, z, y)
        y = conv2d_forward(x, self._W4, self.b, self.stride, self.padding, self.dilation, self.act,
                           self._scratch)
        return y, (x, y)

    def backward(self, saved, dy: np.ndarray, need_dx: bool, accumulate: bool = False,
                 ctx: Ctx = TRAIN, dx_out=None) -> np.ndarray | None:
        """dy (B, C_out, OH, OW) -> dW, db written (added if accumulate); dx (B, C_in, H, W) or None."""
        return self._backward4(saved, dy, need_dx, accumulate)

    def _backward4(self, saved, dy, need_dx, accumulate):
        x, y = saved[0], saved[1]
        act = self.act
        if act in K.FROM_INPUT:
            dy = np.ascontiguousarray(dy)
            K.act_backward(flat_view(dy), flat_view(y), act)   # y is z here: dL/dz = dL/dy · act'(z)
            act = K.IDENTITY
        dW, db = self._dW4, self.db
        if accumulate:
            if self._dW is None:
                self._dW, self._db = np.empty_like(self._dW4), np.empty_like(self.db)
            dW, db = self._dW, self._db
        dx = conv2d_backward(x, y, dy, self._W4, dW, db, self.stride, self.padding, self.dilation, act,
                             need_dx, self._scratch)
        if accumulate:
            self._dW4 += dW
            self.db += db
        return dx


class Conv1d(Conv2d):
    """Conv2d over (B, C, 1, L): x (B, C_in, L) -> y (B, C_out, OL); W (C_out, C_in, k) as torch's."""

    def __init__(self, name: str, c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, activation: str = "identity"):
        super().__init__(name, c_in, c_out, (1, kernel), (1, stride), (0, padding), (1, dilation), activation)

    def weight_shape(self) -> tuple[int, ...]:
        return (self.c_out, self.c_in, self.kernel[1])

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        """(C_in, L) -> (C_out, OL)."""
        if len(in_shape) != 2 or in_shape[0] != self.c_in:
            raise _shape_error(self.name, f"({self.c_in}, L)", in_shape)
        c, _, ol = super().out_shape((in_shape[0], 1, in_shape[1]))
        return (c, ol)

    def forward(self, x: np.ndarray, ctx: Ctx = TRAIN, out=None):
        """x (B, C_in, L) -> (y (B, C_out, OL), saved)."""
        self.out_shape(x.shape[1:])
        y, saved = self._forward4(x[:, :, None, :])
        return y[:, :, 0, :], saved

    def backward(self, saved, dy: np.ndarray, need_dx: bool, accumulate: bool = False,
                 ctx: Ctx = TRAIN, dx_out=None) -> np.ndarray | None:
        """dy (B, C_out, OL) -> dW (C_out, C_in, k), db written; dx (B, C_in, L) or None."""
        dx = self._backward4(saved, dy[:, :, None, :], need_dx, accumulate)
        return None if dx is None else dx[:, :, 0, :]


# ================================================================ pooling, flatten

class MaxPool2d(_NoParams):
    """x (B, C, H, W) -> y (B, C, OH, OW): window maxima; backward sends dy to each window's argmax."""

    def __init__(self, name: str, kernel, stride=None, padding=0):
        self.name = name
        self.kernel = _pair(kernel)
        self.stride = tuple(s or k for s, k in zip(_pair(stride or 0), self.kernel))   # 0 / None: the kernel
        self.padding = _pair(padding)
        if 2 * self.padding[0] > self.kernel[0] or 2 * self.padding[1] > self.kernel[1]:
            raise ValueError(f"{name}: padding {self.padding} exceeds half the kernel {self.kernel}")

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        """(C, H, W) -> (C, OH, OW)."""
        if len(in_shape) != 3:
            raise _shape_error(self.name, "(C, H, W)", in_shape)
        C, H, W = in_shape
        OH = KC.conv_out_size(H, self.kernel[0], self.stride[0], self.padding[0], 1)
        OW = KC.conv_out_size(W, self.kernel[1], self.stride[1], self.padding[1], 1)
        if OH < 1 or OW < 1:
            raise _shape_error(self.name, f"(C, H >= {self.kernel[0]}, W >= {self.kernel[1]})", in_shape)
        return (C, OH, OW)

    def forward(self, x: np.ndarray, ctx: Ctx = TRAIN, out=None):
        """x (B, C, H, W) -> (y (B, C, OH, OW), saved: x's shape and the argmax indices)."""
        shape = (x.shape[0], *self.out_shape(x.shape[1:]))
        y = np.empty(shape, x.dtype)
        idx = np.empty(shape, np.int64)
        KC.maxpool2d_forward(x, *self.kernel, *self.stride, *self.padding, y, idx)
        return y, (x.shape, idx)

    def backward(self, saved, dy: np.ndarray, need_dx: bool, accumulate: bool = False,
                 ctx: Ctx = TRAIN, dx_out=None) -> np.ndarray | None:
        """dy (B, C, OH, OW) -> dx (B, C, H, W): each dy added at its window's argmax."""
        if not need_dx:
            return None
        shape, idx = saved
        dx = np.empty(shape, dy.dtype)
        KC.maxpool2d_backward(np.ascontiguousarray(dy), idx, dx)
        return dx


class AvgPool2d(MaxPool2d):
    """x (B, C, H, W) -> y (B, C, OH, OW): window means (padding counted as zeros, torch's default)."""

    def forward(self, x: np.ndarray, ctx: Ctx = TRAIN, out=None):
        y = np.empty((x.shape[0], *self.out_shape(x.shape[1:])), x.dtype)
        KC.avgpool2d_forward(x, *self.kernel, *self.stride, *self.padding, y)
        return y, x.shape

    def backward(self, saved, dy: np.ndarray, need_dx: bool, accumulate: bool = False,
                 ctx: Ctx = TRAIN, dx_out=None) -> np.ndarray | None:
        if not need_dx:
            return None
        dx = np.empty(saved, dy.dtype)
        KC.avgpool2d_backward(np.ascontiguousarray(dy), *self.kernel, *self.stride, *self.padding, dx)
        return dx


class GlobalAvgPool(_NoParams):
    """x (B, C, H, W) -> y (B, C): the mean over H·W (torch's adaptive_avg_pool2d(x, 1) flattened)."""

    def __init__(self, name: str):
        self.name = name

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(in_shape) != 3:
            raise _shape_error(self.name, "(C, H, W)", in_shape)
        return (in_shape[0],)

    def forward(self, x: np.ndarray, ctx: Ctx = TRAIN, out=None):
        self.out_shape(x.shape[1:])
        return x.mean(axis=(2, 3), dtype=x.dtype), x.shape

    def backward(self, saved, dy: np.ndarray, need_dx: bool, accumulate: bool = False,
                 ctx: Ctx = TRAIN, dx_out=None) -> np.ndarray | None:
        """dy (B, C) -> dx (B, C, H, W) = dy / (H·W) at every pixel."""
        if not need_dx:
            return None
        dx = np.empty(saved, dy.dtype)
        dx[...] = (dy / (saved[2] * saved[3]))[:, :, None, None]
        return dx


class Flatten(_NoParams):
    """x (B, C, H, W) -> (B, C·H·W) and back: views (x is copied only when it is not contiguous)."""

    def __init__(self, name: str):
        self.name = name

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (math.prod(in_shape),)

    def forward(self, x: np.ndarray, ctx: Ctx = TRAIN, out=None):
        return np.ascontiguousarray(x).reshape(x.shape[0], -1), x.shape

    def backward(self, saved, dy: np.ndarray, need_dx: bool, accumulate: bool = False,
                 ctx: Ctx = TRAIN, dx_out=None) -> np.ndarray | None:
        return dy.reshape(saved) if need_dx else None


class Activation(_NoParams):
    """y = act(x) elementwise, for any shape (after a normalisation, say: conv -> batchnorm -> relu);
    the derivative is taken at the input, kept by forward."""

    def __init__(self, name: str, function: str):
        self.name, self.function = name, function
        self.act = K.ACTIVATIONS[function]

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(in_shape)

    def forward(self, x: np.ndarray, ctx: Ctx = TRAIN, out=None):
        x = np.ascontiguousarray(x)
        y = np.empty_like(x)
        K.act_forward(flat_view(x), flat_view(y), self.act)
        return y, x

    def backward(self, saved, dy: np.ndarray, need_dx: bool, accumulate: bool = False,
                 ctx: Ctx = TRAIN, dx_out=None) -> np.ndarray | None:
        """dy is overwritten with dx (a copy is made only when dy is not contiguous)."""
        if not need_dx:
            return None
        dx = np.ascontiguousarray(dy)
        K.act_backward(flat_view(dx), flat_view(saved), self.act)
        return dx


# ================================================================ layer norm

def layernorm_forward(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float = 1e-5):
    """x (B, *S), weight and bias S -> (y (B, *S), mean (B,), rstd (B,)), normalising each sample over
    all of S (torch.nn.functional.layer_norm(x, S, weight, bias, eps)). Stats are float64."""
    B = x.shape[0]
    x2 = np.ascontiguousarray(x).reshape(B, -1)
    y = np.empty_like(x2)
    mean, rstd = np.empty(B), np.empty(B)
    KC.layernorm_forward(x2, weight.reshape(-1), bias.reshape(-1), eps, y, mean, rstd)
    return y.reshape(x.shape), mean, rstd


def layernorm_backward(dy: np.ndarray, x: np.ndarray, weight: np.ndarray, mean: np.ndarray,
                       rstd: np.ndarray, dweight: np.ndarray, dbias: np.ndarray,
                       need_dx: bool = True) -> np.ndarray | None:
    """dy, x (B, *S) -> dweight, dbias (S) written; returns dx (B, *S) when need_dx."""
    B = x.shape[0]
    x2 = np.ascontiguousarray(x).reshape(B, -1)
    dy2 = np.ascontiguousarray(dy).reshape(B, -1)
    dx = np.empty_like(x2)   # unwritten when need_dx is False
    KC.layernorm_backward(dy2, x2, weight.reshape(-1), mean, rstd, dx, dweight.reshape(-1),
                          dbias.reshape(-1), need_dx)
    return dx.reshape(x.shape) if need_dx else None


class LayerNorm(_Affine):
    """y = (x - mean)·rstd·weight + bias per sample, over all non-batch dims; weight, bias (*shape)."""

    def __init__(self, name: str, shape, eps: float = 1e-5):
        self.name = name
        self.shape = (int(shape),) if np.isscalar(shape) else tuple(int(s) for s in shape)
        self.eps = eps
        self._dW = self._db = None

    def param_shape(self) -> tuple[int, ...]:
        return self.shape

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        if tuple(in_shape) != self.shape:
            raise _shape_error(self.name, str(self.shape), in_shape)
        return self.shape

    def forward(self, x: np.ndarray, ctx: Ctx = TRAIN, out=None):
        """x (B, *shape) -> (y (B, *shape), saved: x, mean and rstd (B,))."""
        self.out_shape(x.shape[1:])
        y, mean, rstd = layernorm_forward(x, self.W, self.b, self.eps)
        return y, (x, mean, rstd)

    def backward(self, saved, dy: np.ndarray, need_dx: bool, accumulate: bool = False,
                 ctx: Ctx = TRAIN, dx_out=None) -> np.ndarray | None:
        x, mean, rstd = saved
        dW, db = self.dW, self.db
        if accumulate:
            if self._dW is None:
                self._dW, self._db = np.empty_like(self.dW), np.empty_like(self.db)
            dW, db = self._dW, self._db
        dx = layernorm_backward(dy, x, self.W, mean, rstd, dW, db, need_dx)
        if accumulate:
            self.dW += dW
            self.db += db
        return dx


# ================================================================ batch norm (training: batch statistics)

def _bcs(a: np.ndarray) -> np.ndarray:
    """(B, C, H, W) or (B, C) -> the (B, C, S) view the kernels take (copied only if not contiguous)."""
    return np.ascontiguousarray(a).reshape(a.shape[0], a.shape[1], -1)


def batchnorm_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """x (B, C, H, W) or (B, C) -> (sum x (C,), sum x² (C,), count = B·H·W), float64.

    Sums, not means: every field adds over data-parallel ranks (synchronised batch norm)."""
    xs = _bcs(x)
    sums = np.empty((2, xs.shape[1]))
    KC.batchnorm_stats(xs, sums)
    return sums[0], sums[1], xs.shape[0] * xs.shape[2]


def _fold(mean: np.ndarray, rstd: np.ndarray, weight: np.ndarray, bias: np.ndarray, dtype):
    """y = (x - mean)·rstd·w + b as y = x·a + c: (a, c) per channel, computed in float64, in x's dtype."""
    a = rstd * weight
    return a.astype(dtype), (bias - mean * a).astype(dtype)


def batchnorm_forward_train(x: np.ndarray, sum_x: np.ndarray, sum_x2: np.ndarray, count: int,
                            weight: np.ndarray, bias: np.ndarray, running_mean: np.ndarray | None = None,
                            running_var: np.ndarray | None = None, momentum: float = 0.1,
                            eps: float = 1e-5, act: int = K.IDENTITY):
    """Normalise x (B, C, ...) with the (possibly globally summed) statistics of batchnorm_stats, then
    the activation `act` (identity, relu, tanh, sigmoid), fused: one pass.

    Returns (y, mean, rstd): y shaped as x, mean and rstd (C,) float64 (backward recomputes xhat from x
    with them: nothing of x's size is stored but y). Biased variance normalises; running_mean/var (C,),
    if given, are updated in place as torch does: r ← (1 - momentum)·r + momentum·v with the UNBIASED
    variance v·count/(count - 1).
    """
    mean = sum_x / count
    var = np.maximum(sum_x2 / count - mean * mean, 0.0)   # float64 sums: rounding can dip below 0 only at var ≈ 0
    rstd = 1.0 / np.sqrt(var + eps)
    xs = _bcs(x)
    y = np.empty_like(xs)
    KC.batchnorm_normalize(xs, *_fold(mean, rstd, weight, bias, xs.dtype), act, y)
    if running_mean is not None:
        running_mean *= 1 - momentum
        running_mean += momentum * mean
    if running_var is not None:
        running_var *= 1 - momentum
        running_var += momentum * var * (count / max(count - 1, 1))
    return y.reshape(x.shape), mean, rstd


def batchnorm_forward_eval(x: np.ndarray, running_mean: np.ndarray, running_var: np.ndarray,
                           weight: np.ndarray, bias: np.ndarray, eps: float = 1e-5, act: int = K.IDENTITY):
    """Inference: normalise x (B, C, ...) with the running statistics. Returns (y, mean, rstd (C,))."""
    mean = np.asarray(running_mean, np.float64)
    rstd = 1.0 / np.sqrt(np.asarray(running_var, np.float64) + eps)
    xs = _bcs(x)
    y = np.empty_like(xs)
    KC.batchnorm_normalize(xs, *_fold(mean, rstd, weight, bias, xs.dtype), act, y)
    return y.reshape(x.shape), mean, rstd


def batchnorm_backward_sums(dy: np.ndarray, x: np.ndarray, mean: np.ndarray,
                            rstd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """dy, x (B, C, ...) -> (sum dy (C,), sum dy·xhat (C,)), float64, summable over ranks.

    On a rank's own rows they are that rank's dbias and dweight; summed over ranks, the global ones."""
    sums = np.empty((2, dy.shape[1]))
    KC.batchnorm_backward_sums(_bcs(dy), _bcs(x), mean, sums)
    return sums[0], sums[1] * rstd


def batchnorm_backward_apply(dy: np.ndarray, x: np.ndarray, weight: np.ndarray, mean: np.ndarray,
                             rstd: np.ndarray, sum_dy: np.ndarray, sum_dy_xhat: np.ndarray, count: int) -> np.ndarray:
    """dx (B, C, ...) = weight·rstd·(dy - sum_dy/count - xhat·sum_dy_xhat/count), xhat = (x - mean)·rstd,
    on the GLOBAL sums and count, as one multiply-add pass dx = a·dy + b·x + c. Eval mode (statistics
    are constants) passes zero sums."""
    dys = _bcs(dy)
    g = weight * rstd                                   # float64 (C,)
    b = -g * rstd * sum_dy_xhat / count
    c = -g * sum_dy / count - b * mean
    dx = np.empty_like(dys)
    KC.batchnorm_backward_apply(dys, _bcs(x), g.astype(dys.dtype), b.astype(dys.dtype), c.astype(dys.dtype), dx)
    return dx.reshape(dy.shape)


class BatchNorm2d(_Affine):
    """x (B, C, H, W) -> y: per-channel batch normalisation, statistics over (B, H, W) of the rows
    normalised together (summed over ranks by `ctx.dp_sum`, if given); weight, bias (C,); then the
    activation (identity, relu, tanh or sigmoid), fused into the same pass.

    running_mean/running_var (C,) float64 are buffers, not parameters: no gradient, no optimizer step;
    checkpoints save them beside the flat buffer (`buffer_specs`, `bind_buffers`; unbound, the layer
    keeps its own). `ctx.training` False: normalise with them. Parameter gradients are this rank's
    sums (dweight = sum dy·xhat, dbias = sum dy over its rows): the data-parallel gradient sum then
    makes them the global ones, as for every other parameter (torch's SyncBatchNorm does the same);
    dx uses the globally summed terms. Saved for backward: x (held anyway by the caller), y when an
    activation needs it, and (C,) statistics; xhat is recomputed.
    """

    ndim = 3  # per-sample dims

    def __init__(self, name: str, num_features: int, momentum: float = 0.1, eps: float = 1e-5,
                 activation: str = "identity"):
        self.name, self.C = name, num_features
        self.momentum, self.eps = momentum, eps
        self.activation = activation
        self.act = K.ACTIVATIONS[activation]
        if self.act in K.FROM_INPUT:
            raise ValueError(f"{name}: activation {activation} cannot be fused into batchnorm (relu, tanh, "
                             f"sigmoid can); add an activation layer after it")
        self.running_mean = np.zeros(num_features)
        self.running_var = np.ones(num_features)

    def param_shape(self) -> tuple[int, ...]:
        return (self.C,)

    def buffer_specs(self) -> list[ParamSpec]:
        return [ParamSpec(self.name, "running_mean", (self.C,)), ParamSpec(self.name, "running_var", (self.C,))]

    def bind_buffers(self, bufs: FlatParams) -> None:
        """Take views into a float64 buffer array (a Stage's); sets them to the start values (0, 1)."""
        self.running_mean = bufs.param(f"{self.name}.running_mean")
        self.running_var = bufs.param(f"{self.name}.running_var")
        self.running_mean[...] = 0
        self.running_var[...] = 1

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(in_shape) != self.ndim or in_shape[0] != self.C:
            raise _shape_error(self.name, f"({self.C}, H, W)" if self.ndim == 3 else f"({self.C},)", in_shape)
        return tuple(in_shape)

    def forward(self, x: np.ndarray, ctx: Ctx = TRAIN, out=None):
        """x (B, C, ...) -> (y shaped as x, saved); training: one ctx.dp_sum of [sum x, sum x², count]."""
        self.out_shape(x.shape[1:])
        if not ctx.training:
            y, mean, rstd = batchnorm_forward_eval(x, self.running_mean, self.running_var, self.W, self.b, self.eps,
                                                   self.act)
            return y, (x, y, mean, rstd, 0)
        s, q, n = batchnorm_stats(x)
        packed = np.concatenate([s, q, [n]])
        if ctx.dp_sum is not None:
            ctx.dp_sum(packed)
        C = self.C
        count = int(round(packed[2 * C]))
        y, mean, rstd = batchnorm_forward_train(x, packed[:C], packed[C:2 * C], count, self.W, self.b,
                                                self.running_mean, self.running_var, self.momentum, self.eps,
                                                self.act)
        return y, (x, y, mean, rstd, count)

    def backward(self, saved, dy: np.ndarray, need_dx: bool, accumulate: bool = False,
                 ctx: Ctx = TRAIN, dx_out=None) -> np.ndarray | None:
        """dy shaped as x (overwritten when an activation is fused) -> dweight, dbias (C,) written (added
        if accumulate): this rank's sums; dx from the globally summed [sum dy, sum dy·xhat] (one
        ctx.dp_sum) when need_dx."""
        x, y, mean, rstd, count = saved
        if self.act != K.IDENTITY:
            dy = np.ascontiguousarray(dy)
            K.act_backward_from_output(flat_view(dy), flat_view(y), self.act)
        s_dy, s_dyx = batchnorm_backward_sums(dy, x, mean, rstd)
        if accumulate:
            self.dW += s_dyx
            self.db += s_dy
        else:
            self.dW[...] = s_dyx
            self.db[...] = s_dy
        if not need_dx:
            return None
        if count == 0:   # normalised with the running statistics: constants
            zero = np.zeros(self.C)
            return batchnorm_backward_apply(dy, x, self.W, mean, rstd, zero, zero, 1)
        packed = np.concatenate([s_dy, s_dyx])
        if ctx.dp_sum is not None:
            ctx.dp_sum(packed)
        return batchnorm_backward_apply(dy, x, self.W, mean, rstd, packed[:self.C], packed[self.C:], count)


class BatchNorm1d(BatchNorm2d):
    """x (B, F) -> y (B, F): per-feature batch normalisation over the (global) batch."""

    ndim = 1


# ================================================================ dropout

def dropout_forward(x: np.ndarray, p: float, seed: int, step: int, layer: int, first_row: int) -> np.ndarray:
    """x (B, ...) -> y: inverted dropout, kept values scaled by 1/(1 - p). Row r is GLOBAL sample
    first_row + r; element j's keep decision is hash(seed, step, layer, first_row + r, j) >= p·2^53."""
    return _dropout(x, p, seed, step, layer, first_row)


def dropout_backward(dy: np.ndarray, p: float, seed: int, step: int, layer: int, first_row: int) -> np.ndarray:
    """dy -> dx = the same mask and scale applied to dy (the mask is recomputed, never stored)."""
    return _dropout(dy, p, seed, step, layer, first_row)


def _dropout(x, p, seed, step, layer, first_row):
    if not 0 <= p < 1:
        raise ValueError(f"dropout probability {p} not in [0, 1)")
    x2 = np.ascontiguousarray(x).reshape(x.shape[0], -1)
    y = np.empty_like(x2)
    KC.dropout_apply(x2, np.uint64(KC.dropout_key(seed, step, layer)), first_row, int(round(p * 2.0**53)),
                     x.dtype.type(1.0 / (1.0 - p)), y)
    return y.reshape(x.shape)


def dropout_mask(shape: tuple[int, ...], p: float, seed: int, step: int, layer: int,
                 first_row: int) -> np.ndarray:
    """The keep mask (uint8, `shape` = (B, ...)) dropout_forward would use."""
    B, D = shape[0], math.prod(shape[1:])
    m = np.empty((B, D), np.uint8)
    KC.dropout_mask(B, D, np.uint64(KC.dropout_key(seed, step, layer)), first_row, int(round(p * 2.0**53)), m)
    return m.reshape(shape)


class Dropout(_NoParams):
    """Inverted dropout over x (B, ...), keyed by (seed, ctx.step, layer_index, ctx.first_row + r, element);
    `ctx.training` False or p = 0: identity. `layer_index` keys the stream, so two dropout layers draw
    different masks."""

    def __init__(self, name: str, p: float, layer_index: int, seed: int = 0):
        if not 0 <= p < 1:
            raise ValueError(f"{name}: dropout probability {p} not in [0, 1)")
        self.name, self.p, self.layer_index, self.seed = name, p, layer_index, seed

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(in_shape)

    def forward(self, x: np.ndarray, ctx: Ctx = TRAIN, out=None):
        if not ctx.training or self.p == 0:
            return x, None
        return dropout_forward(x, self.p, self.seed, ctx.step, self.layer_index, ctx.first_row), (ctx.step, ctx.first_row)

    def backward(self, saved, dy: np.ndarray, need_dx: bool, accumulate: bool = False,
                 ctx: Ctx = TRAIN, dx_out=None) -> np.ndarray | None:
        """dy -> dx with the mask of the forward's (step, first_row) (recomputed, never stored)."""
        if not need_dx:
            return None
        if saved is None:
            return dy
        step, first_row = saved
        return dropout_backward(dy, self.p, self.seed, step, self.layer_index, first_row)
