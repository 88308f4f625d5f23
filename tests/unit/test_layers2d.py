"""Convolutional-network layers (nn/layers2d.py, kernels/conv.py): finite differences in float64,
equality with PyTorch in float32, synchronised batch norm over simulated ranks, dropout's random stream."""
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hpcopt.nn.layers2d import (AvgPool2d, BatchNorm1d, BatchNorm2d, Conv1d, Conv2d, Dropout, Flatten,
                                GlobalAvgPool, LayerNorm, MaxPool2d, batchnorm_backward_apply,
                                batchnorm_backward_sums, batchnorm_forward_train, batchnorm_stats,
                                dropout_forward, dropout_mask)
from hpcopt.nn.layers import EVAL, TRAIN, Ctx
from hpcopt.nn.params import FlatParams


def bind(layer, dtype, rng=None):
    """A flat buffer for the layer; parameters random (not the init's 1/0 norms, so every term counts)."""
    flat = FlatParams(layer.param_specs(), dtype=dtype)
    layer.bind(flat)
    layer.init(np.random.default_rng(0), "he")
    if rng is not None and flat.size:
        is_norm = isinstance(layer, (LayerNorm, BatchNorm2d))
        flat.data[:] = rng.standard_normal(flat.size) * 0.5 + (1.0 if is_norm else 0.0)
    return flat


def finite_difference_check(layer, x, rng, h=1e-6, ctx=TRAIN):
    """Loss L = sum(y · R) for a fixed random R, so dy = R. Compares backward's dx and parameter
    gradients with central differences over every input and parameter element."""
    flat = bind(layer, np.float64, rng)
    y, saved = layer.forward(x, ctx)
    R = rng.standard_normal(y.shape)
    dx = layer.backward(saved, R.copy(), True, ctx=ctx)
    analytic_p = flat.grad.copy()

    def loss():
        return float(np.sum(layer.forward(x, ctx)[0] * R))

    numeric_p = np.empty(flat.size)
    for i in range(flat.size):
        old = flat.data[i]
        flat.data[i] = old + h
        lp = loss()
        flat.data[i] = old - h
        lm = loss()
        flat.data[i] = old
        numeric_p[i] = (lp - lm) / (2 * h)
    xf = x.reshape(-1)   # a view: perturbing it perturbs x
    numeric_x = np.empty(x.size)
    for i in range(x.size):
        old = xf[i]
        xf[i] = old + h
        lp = loss()
        xf[i] = old - h
        lm = loss()
        xf[i] = old
        numeric_x[i] = (lp - lm) / (2 * h)
    # float64 central differences with h=1e-6: truncation O(h²) ~ 1e-12, rounding ~ eps·|L|/h ~ 1e-9 for
    # |L| ~ 10; rtol 1e-6 with atol 1e-8 sits well above both and far below any real error.
    np.testing.assert_allclose(dx.reshape(-1), numeric_x, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(analytic_p, numeric_p, rtol=1e-6, atol=1e-8)
    assert np.abs(numeric_x).max() > 1e-2   # not vacuous
    return flat


# ---------------------------------------------------------------- finite differences (float64)

@pytest.mark.parametrize("stride,padding,dilation,act", [
    (1, 0, 1, "identity"), (2, 1, 1, "tanh"), (1, 1, 2, "sigmoid"), (2, 1, 2, "relu"),
    ((2, 1), (0, 1), (1, 2), "identity")])
def test_conv2d_gradcheck(stride, padding, dilation, act):
    rng = np.random.default_rng(1)
    layer = Conv2d("conv", 3, 4, (3, 2) if isinstance(stride, tuple) else 3, stride, padding, dilation, act)
    # ReLU: continuous random pre-activations, none within h=1e-6 of the kink
    finite_difference_check(layer, rng.standard_normal((2, 3, 7, 8)), rng)


def test_conv1d_gradcheck():
    rng = np.random.default_rng(2)
    layer = Conv1d("c1", 3, 4, 3, stride=2, padding=1, dilation=2)
    finite_difference_check(layer, rng.standard_normal((2, 3, 11)), rng)


@pytest.mark.parametrize("layer", [MaxPool2d("mp", 2), MaxPool2d("mp", 3, stride=2, padding=1),
                                   AvgPool2d("ap", 2), AvgPool2d("ap", 3, stride=2, padding=1),
                                   GlobalAvgPool("gap"), Flatten("flat")])
def test_pooling_gradcheck(layer):
    rng = np.random.default_rng(3)
    # continuous random inputs: no ties in a max window, and no pair within h of each other
    finite_difference_check(layer, rng.standard_normal((2, 3, 6, 7)), rng)


def test_layernorm_gradcheck():
    rng = np.random.default_rng(4)
    finite_difference_check(LayerNorm("ln", (3, 4, 5)), rng.standard_normal((3, 3, 4, 5)) * 2 + 1, rng)


@pytest.mark.parametrize("layer,shape", [(BatchNorm2d("bn", 3), (4, 3, 3, 2)), (BatchNorm1d("bn", 5), (6, 5))])
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_gradcheck(layer, shape, training):
    rng = np.random.default_rng(5)
    layer.running_mean[:] = rng.standard_normal(layer.C)
    layer.running_var[:] = rng.uniform(0.5, 2, layer.C)
    momentum = layer.momentum
    layer.momentum = 0.0   # the many forwards of the check would otherwise move the eval statistics
    finite_difference_check(layer, rng.standard_normal(shape) * 1.5 + 0.5, rng, ctx=TRAIN if training else EVAL)
    layer.momentum = momentum


@pytest.mark.parametrize("act", ["tanh", "sigmoid"])
def test_batchnorm_with_fused_activation_gradcheck(act):
    rng = np.random.default_rng(8)
    finite_difference_check(BatchNorm2d("bn", 3, activation=act), rng.standard_normal((4, 3, 3, 2)) * 1.5, rng)


def test_batchnorm_with_fused_relu_matches_torch():
    rng = np.random.default_rng(15)
    layer = BatchNorm2d("bn", 4, activation="relu")
    bind(layer, np.float32, rng)
    x = (rng.standard_normal((6, 4, 5, 5)) * 2 + 1).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    y, saved = layer.forward(x)
    dx = layer.backward(saved, dy.copy(), True)
    xt, wt, bt = torch_leaf(x), torch_leaf(layer.W.copy()), torch_leaf(layer.b.copy())
    yt = torch.relu(F.batch_norm(xt, None, None, wt, bt, training=True, eps=1e-5))
    yt.backward(torch.tensor(dy))
    close(y, yt)
    close(dx, xt.grad)
    close(layer.dW, wt.grad)
    close(layer.db, bt.grad)


def test_dropout_gradcheck():
    rng = np.random.default_rng(6)
    layer = Dropout("drop", 0.4, layer_index=2, seed=9)
    finite_difference_check(layer, rng.standard_normal((5, 3, 4)), rng, ctx=Ctx(step=7, first_row=100))


# ---------------------------------------------------------------- float32 against PyTorch

def close(ours, ref):
    """float32 vs torch: sums of up to ~100 terms in different orders differ by ~sqrt(K)·6e-8 of the
    tensor's scale; rtol 1e-5 with atol 1e-5·max|ref| leaves a 10× margin, and real errors are O(1)."""
    ref = ref.detach().numpy() if isinstance(ref, torch.Tensor) else ref
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * max(np.abs(ref).max(), 1e-30))


def torch_leaf(a):
    return torch.tensor(a, requires_grad=True)


@pytest.mark.parametrize("stride,padding,dilation", [(1, 0, 1), (2, 1, 1), (1, 1, 2), (2, 2, 2)])
def test_conv2d_matches_torch(stride, padding, dilation):
    rng = np.random.default_rng(10)
    layer = Conv2d("conv", 5, 6, 3, stride, padding, dilation, activation="relu")
    flat = bind(layer, np.float32)
    flat.data[:] = rng.standard_normal(flat.size).astype(np.float32) * 0.3
    x = rng.standard_normal((4, 5, 12, 11)).astype(np.float32)
    dy = rng.standard_normal((4, *layer.out_shape(x.shape[1:]))).astype(np.float32)
    y, saved = layer.forward(x)
    dx = layer.backward(saved, dy.copy(), True)
    xt, wt, bt = torch_leaf(x), torch_leaf(layer.W.copy()), torch_leaf(layer.b.copy())
    yt = torch.relu(F.conv2d(xt, wt, bt, stride, padding, dilation))
    yt.backward(torch.tensor(dy))
    close(y, yt)
    close(dx, xt.grad)
    close(layer.dW, wt.grad)
    close(layer.db, bt.grad)


def test_conv1d_matches_torch():
    rng = np.random.default_rng(11)
    layer = Conv1d("c1", 4, 6, 5, stride=2, padding=2, dilation=1, activation="tanh")
    flat = bind(layer, np.float32)
    layer.init(np.random.default_rng(0), "xavier")
    x = rng.standard_normal((3, 4, 40)).astype(np.float32)
    assert layer.W.shape == (6, 4, 5)
    y, saved = layer.forward(x)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = layer.backward(saved, dy.copy(), True)
    xt, wt, bt = torch_leaf(x), torch_leaf(layer.W.copy()), torch_leaf(layer.b.copy())
    yt = torch.tanh(F.conv1d(xt, wt, bt, 2, 2, 1))
    yt.backward(torch.tensor(dy))
    close(y, yt)
    close(dx, xt.grad)
    close(layer.dW, wt.grad)
    close(layer.db, bt.grad)
    assert np.shares_memory(layer.dW, flat.grad)


@pytest.mark.parametrize("layer,ref", [
    (MaxPool2d("mp", 2), lambda t: F.max_pool2d(t, 2)),
    (MaxPool2d("mp", 3, stride=2, padding=1), lambda t: F.max_pool2d(t, 3, 2, 1)),
    (AvgPool2d("ap", 2), lambda t: F.avg_pool2d(t, 2)),
    (AvgPool2d("ap", 3, stride=2, padding=1), lambda t: F.avg_pool2d(t, 3, 2, 1)),
    (GlobalAvgPool("gap"), lambda t: F.adaptive_avg_pool2d(t, 1).flatten(1)),
    (Flatten("flat"), lambda t: t.flatten(1)),
])
def test_pooling_matches_torch(layer, ref):
    rng = np.random.default_rng(12)
    x = rng.standard_normal((3, 4, 9, 10)).astype(np.float32)
    y, saved = layer.forward(x)
    assert y.shape == (3, *layer.out_shape(x.shape[1:]))
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = layer.backward(saved, dy.copy(), True)
    xt = torch_leaf(x)
    yt = ref(xt)
    yt.backward(torch.tensor(dy))
    close(y, yt)
    close(dx, xt.grad)


def test_layernorm_matches_torch():
    rng = np.random.default_rng(13)
    layer = LayerNorm("ln", (4, 6, 5))
    bind(layer, np.float32)
    layer.W[...] = rng.standard_normal(layer.shape)
    layer.b[...] = rng.standard_normal(layer.shape)
    x = (rng.standard_normal((3, 4, 6, 5)) * 3 + 2).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    y, saved = layer.forward(x)
    dx = layer.backward(saved, dy.copy(), True)
    xt, wt, bt = torch_leaf(x), torch_leaf(layer.W.copy()), torch_leaf(layer.b.copy())
    yt = F.layer_norm(xt, (4, 6, 5), wt, bt, eps=1e-5)
    yt.backward(torch.tensor(dy))
    close(y, yt)
    close(dx, xt.grad)
    close(layer.dW, wt.grad)
    close(layer.db, bt.grad)


@pytest.mark.parametrize("cls,shape", [(BatchNorm2d, (8, 5, 6, 7)), (BatchNorm1d, (32, 5))])
def test_batchnorm_matches_torch(cls, shape):
    rng = np.random.default_rng(14)
    layer = cls("bn", 5)
    bind(layer, np.float32)
    layer.W[...] = rng.standard_normal(5)
    layer.b[...] = rng.standard_normal(5)
    rm, rv = rng.standard_normal(5), rng.uniform(0.5, 2, 5)
    layer.running_mean[:], layer.running_var[:] = rm, rv
    x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    y, saved = layer.forward(x)
    dx = layer.backward(saved, dy.copy(), True)
    xt, wt, bt = torch_leaf(x), torch_leaf(layer.W.copy()), torch_leaf(layer.b.copy())
    rmt, rvt = torch.tensor(rm, dtype=torch.float32), torch.tensor(rv, dtype=torch.float32)
    yt = F.batch_norm(xt, rmt, rvt, wt, bt, training=True, momentum=0.1, eps=1e-5)
    yt.backward(torch.tensor(dy))
    close(y, yt)
    close(dx, xt.grad)
    close(layer.dW, wt.grad)
    close(layer.db, bt.grad)
    # running stats: float64 here, float32 in torch; the unbiased variance update as torch's
    np.testing.assert_allclose(layer.running_mean, rmt.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.running_var, rvt.numpy(), rtol=1e-5, atol=1e-6)
    # eval mode uses the running statistics
    ye, _ = layer.forward(x, EVAL)
    close(ye, F.batch_norm(torch.tensor(x), rmt, rvt, wt.detach(), bt.detach(), training=False, eps=1e-5))


# ---------------------------------------------------------------- synchronised batch norm

def test_sync_batchnorm_functional_halves_equal_whole():
    """Two simulated ranks, sums added by hand, give the whole batch's output and gradients.
    float64: only the summation order differs (two partial sums added), so ~1e-15 relative; 1e-12."""
    rng = np.random.default_rng(20)
    x = rng.standard_normal((10, 4, 3, 5)) * 2 + 1
    dy = rng.standard_normal(x.shape)
    w, b = rng.standard_normal(4), rng.standard_normal(4)

    s, q, n = batchnorm_stats(x)
    rm, rv = np.zeros(4), np.ones(4)
    y, mean, rstd = batchnorm_forward_train(x, s, q, n, w, b, rm, rv)
    sdy, sdyx = batchnorm_backward_sums(dy, x, mean, rstd)
    dx = batchnorm_backward_apply(dy, x, w, mean, rstd, sdy, sdyx, n)

    halves = (slice(0, 3), slice(3, 10))   # unequal split: counts must add, not average
    stats = [batchnorm_stats(x[h]) for h in halves]
    S, Q, N = (sum(st[i] for st in stats) for i in range(3))
    assert N == n
    rm2, rv2 = np.zeros(4), np.ones(4)
    outs = [batchnorm_forward_train(x[h], S, Q, N, w, b, rm2 if k == 0 else None, rv2 if k == 0 else None)
            for k, h in enumerate(halves)]
    sums = [batchnorm_backward_sums(dy[h], x[h], o[1], o[2]) for h, o in zip(halves, outs)]
    SDY, SDYX = sums[0][0] + sums[1][0], sums[0][1] + sums[1][1]
    dxs = [batchnorm_backward_apply(dy[h], x[h], w, o[1], o[2], SDY, SDYX, N) for h, o in zip(halves, outs)]
    np.testing.assert_allclose(np.concatenate([o[0] for o in outs]), y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.concatenate(dxs), dx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(SDYX, sdyx, rtol=1e-12)   # dweight
    np.testing.assert_allclose(SDY, sdy, rtol=1e-12)     # dbias
    np.testing.assert_allclose(rm2, rm, rtol=1e-12)
    np.testing.assert_allclose(rv2, rv, rtol=1e-12)


class ThreadAllreduce:
    """An in-place sum over `n` threads standing in for ranks (parts added in rank order)."""

    def __init__(self, n):
        self.parts = [None] * n
        self.barrier = threading.Barrier(n)

    def for_rank(self, rank):
        def allreduce_sum(a):
            self.parts[rank] = a.copy()
            self.barrier.wait()
            total = self.parts[0].copy()
            for p in self.parts[1:]:
                total += p
            self.barrier.wait()
            a[...] = total
        return allreduce_sum


def test_sync_batchnorm_layers_over_two_ranks_equal_one():
    """BatchNorm2d layers on two threads with an allreduce give one layer's results on the whole batch;
    the ranks' parameter gradients SUM to the whole batch's (the data-parallel gradient sum)."""
    rng = np.random.default_rng(21)
    x = rng.standard_normal((8, 3, 4, 4)) * 2 - 1
    dy = rng.standard_normal(x.shape)

    def make(allreduce=None):
        layer = BatchNorm2d("bn", 3)
        layer.ctx = Ctx(dp_sum=allreduce)
        bind(layer, np.float64)
        layer.W[...] = [0.5, 1.5, -2.0]
        layer.b[...] = [0.1, 0.2, 0.3]
        return layer

    whole = make()
    y, saved = whole.forward(x, whole.ctx)
    dx = whole.backward(saved, dy.copy(), True, ctx=whole.ctx)

    comm = ThreadAllreduce(2)
    ranks = [make(comm.for_rank(r)) for r in range(2)]
    halves = (slice(0, 4), slice(4, 8))
    results = [None, None]

    def run(r):
        layer, h = ranks[r], halves[r]
        yr, sr = layer.forward(x[h], layer.ctx)
        results[r] = (yr, layer.backward(sr, dy[h].copy(), True, ctx=layer.ctx))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # float64, two partial sums added: ~1e-15 relative
    np.testing.assert_allclose(np.concatenate([r[0] for r in results]), y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.concatenate([r[1] for r in results]), dx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ranks[0].dW + ranks[1].dW, whole.dW, rtol=1e-12)
    np.testing.assert_allclose(ranks[0].db + ranks[1].db, whole.db, rtol=1e-12)
    for layer in ranks:
        np.testing.assert_allclose(layer.running_mean, whole.running_mean, rtol=1e-12)
        np.testing.assert_allclose(layer.running_var, whole.running_var, rtol=1e-12)


# ---------------------------------------------------------------- dropout

def test_dropout_mask_does_not_depend_on_the_split():
    shape = (12, 3, 5)
    whole = dropout_mask(shape, 0.3, seed=4, step=17, layer=2, first_row=40)
    parts = [dropout_mask((5, 3, 5), 0.3, 4, 17, 2, first_row=40),
             dropout_mask((7, 3, 5), 0.3, 4, 17, 2, first_row=45)]
    np.testing.assert_array_equal(whole, np.concatenate(parts))
    # the forward of the slices equals the slices of the forward, bit for bit
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    y = dropout_forward(x, 0.3, 4, 17, 2, first_row=40)
    y2 = np.concatenate([dropout_forward(x[:5], 0.3, 4, 17, 2, 40), dropout_forward(x[5:], 0.3, 4, 17, 2, 45)])
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(y, x * whole * np.float32(1 / 0.7))   # inverted: kept values scaled by 1/(1-p)


def test_dropout_keep_fraction_and_streams():
    p, shape = 0.3, (1000, 1000)
    m = dropout_mask(shape, p, seed=1, step=0, layer=0, first_row=0)
    # 1e6 Bernoulli(0.7) draws: std of the fraction 4.6e-4, so 1% of 0.7 (7e-3) is ~15 std
    assert abs(m.mean() - (1 - p)) < 0.01 * (1 - p)
    # rows and columns are not correlated with their neighbours (a weak hash would show here)
    agree = (m[:-1] == m[1:]).mean()
    assert abs(agree - (p * p + (1 - p) ** 2)) < 0.01
    base = m[:200]
    for other in (dropout_mask((200, 1000), p, 1, 1, 0, 0), dropout_mask((200, 1000), p, 1, 0, 1, 0),
                  dropout_mask((200, 1000), p, 2, 0, 0, 0)):
        # independent masks agree on p² + (1-p)² = 0.58 of the elements; identical ones on all
        assert abs((other == base).mean() - 0.58) < 0.01


def test_dropout_layer_backward_uses_the_forward_mask():
    layer = Dropout("d", 0.5, layer_index=3, seed=1)
    x = np.random.default_rng(1).standard_normal((6, 10))
    y, saved = layer.forward(x, Ctx(step=5, first_row=12))
    dy = np.ones_like(x)
    dx = layer.backward(saved, dy, True, ctx=Ctx(step=99, first_row=0))   # the forward's mask, not ctx's
    np.testing.assert_array_equal(dx, (y != 0) * 2.0)
    assert layer.forward(x, EVAL)[0] is x


# ---------------------------------------------------------------- interface details

def test_shape_errors_name_the_layer_and_shapes():
    with pytest.raises(ValueError, match=r"conv3.*\(4, H, W\).*\(3, 8, 8\)"):
        Conv2d("conv3", 4, 8, 3).out_shape((3, 8, 8))
    with pytest.raises(ValueError, match="conv4"):
        Conv2d("conv4", 3, 8, 5).out_shape((3, 4, 4))
    with pytest.raises(ValueError, match=r"ln.*\(3, 4\).*\(3, 5\)"):
        LayerNorm("ln", (3, 4)).out_shape((3, 5))
    with pytest.raises(ValueError, match="bn1"):
        BatchNorm2d("bn1", 4).forward(np.zeros((2, 3, 2, 2)))
    assert Conv2d("c", 3, 8, 3, stride=2, padding=1).out_shape((3, 32, 32)) == (8, 16, 16)
    assert MaxPool2d("m", 2).out_shape((8, 16, 16)) == (8, 8, 8)
    assert Flatten("f").out_shape((8, 8, 8)) == (512,)


def test_init_schemes_and_accumulate():
    conv = Conv2d("c", 16, 32, 3)
    flat = FlatParams(conv.param_specs() + LayerNorm("ln", 7).param_specs(), dtype=np.float64)
    conv.bind(flat)
    conv.init(np.random.default_rng(0), "he")
    assert abs(conv.W.std() - np.sqrt(2 / (16 * 9))) < 0.05 * np.sqrt(2 / (16 * 9)) and not conv.b.any()
    conv.init(np.random.default_rng(0), "xavier")
    assert np.abs(conv.W).max() <= np.sqrt(6 / (16 * 9 + 32 * 9))
    ln = LayerNorm("ln", 7)
    ln.bind(flat)
    ln.init(None, "he")
    assert (ln.W == 1).all() and (ln.b == 0).all()
    # a second micro-batch with accumulate adds its gradients
    x = np.random.default_rng(1).standard_normal((2, 16, 6, 6))
    y, saved = conv.forward(x)
    dy = np.ones_like(y)
    conv.backward(saved, dy, False)
    once = flat.grad.copy()
    conv.backward(saved, dy, False, accumulate=True)
    np.testing.assert_allclose(flat.grad, 2 * once, rtol=1e-14)
