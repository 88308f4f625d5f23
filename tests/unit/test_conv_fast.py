"""The convolution of nn/conv.py (channel-major im2col + BLAS, kernels/conv.py's *_planes kernels):
finite differences in float64, equality with PyTorch in float32 (forward, dx, dW, db), conv1d as conv2d
over (B, C, 1, L), results independent of the thread count, scratch reuse, and `hpcopt bench conv`."""
import json
import math

import numba
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hpcopt.kernels import cpu as K
from hpcopt.nn import conv
from hpcopt.nn.conv import conv2d_backward, conv2d_forward
from tests.conftest import hpcopt

TORCH_ACT = {K.IDENTITY: lambda t: t, K.RELU: torch.relu, K.TANH: torch.tanh, K.SIGMOID: torch.sigmoid}


def _pair(v):
    return (v, v) if np.isscalar(v) else v


# ---------------------------------------------------------------- finite differences (float64)

@pytest.mark.parametrize("stride,padding,dilation,c_in,act", [
    (1, 1, 1, 1, K.IDENTITY), (1, 0, 1, 3, K.RELU), (2, 1, 1, 3, K.TANH), (1, 2, 2, 2, K.SIGMOID),
    ((2, 1), (0, 1), (1, 2), 3, K.RELU), ((1, 3), (2, 0), (2, 1), 1, K.TANH)])
def test_gradients_match_finite_differences(stride, padding, dilation, c_in, act):
    """L = sum(y · R) for a fixed random R, so dy = R; central differences over every element of x, W, b.
    float64 with h = 1e-6: truncation ~1e-12, rounding ~eps·|L|/h ~ 1e-9; rtol 1e-6 / atol 1e-8 sit
    well above both and far below a real error. Random continuous inputs keep ReLU off its kink."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, c_in, 7, 8))
    w = rng.standard_normal((3, c_in, 3, 2)) * 0.5
    b = rng.standard_normal(3) * 0.5
    args = (stride, padding, dilation, act)
    y = conv2d_forward(x, w, b, *args)
    R = rng.standard_normal(y.shape)
    dw, db = np.empty_like(w), np.empty_like(b)
    dx = conv2d_backward(x, y, R, w, dw, db, *args, need_dx=True)

    def numeric(a):
        g, flat, h = np.empty(a.size), a.reshape(-1), 1e-6
        for i in range(a.size):
            old = flat[i]
            flat[i] = old + h
            lp = float(np.sum(conv2d_forward(x, w, b, *args) * R))
            flat[i] = old - h
            lm = float(np.sum(conv2d_forward(x, w, b, *args) * R))
            flat[i] = old
            g[i] = (lp - lm) / (2 * h)
        return g.reshape(a.shape)

    for analytic, a in ((dx, x), (dw, w), (db, b)):
        np.testing.assert_allclose(analytic, numeric(a), rtol=1e-6, atol=1e-8)
    assert np.abs(dx).max() > 1e-2   # not vacuous


# ---------------------------------------------------------------- float32 against PyTorch

def close(ours, ref):
    """float32 vs torch: sums of up to ~600 terms in different orders differ by ~sqrt(K)·6e-8 of the
    tensor's scale; rtol 1e-5 with atol 1e-5·max|ref| leaves a margin, and real errors are O(1)."""
    ref = ref.detach().numpy() if isinstance(ref, torch.Tensor) else ref
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * max(np.abs(ref).max(), 1e-30))


def torch_conv(x, w, b, dy, stride, padding, dilation, act, conv=F.conv2d):
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    yt = TORCH_ACT[act](conv(xt, wt, bt, stride, padding, dilation))
    yt.backward(torch.tensor(dy))
    return yt, xt.grad, wt.grad, bt.grad


@pytest.mark.parametrize("shape,c_out,kernel,stride,padding,dilation,act", [
    ((4, 16, 32, 32), 16, 3, 1, 1, 1, K.RELU),       # the benchmark's layer: GEMMs in column blocks
    ((5, 1, 8, 8), 32, 3, 1, 1, 1, K.RELU),          # C_in = 1 (digits)
    ((6, 32, 8, 8), 32, 3, 1, 1, 1, K.TANH),
    ((3, 5, 12, 11), 6, 3, 2, 2, 2, K.SIGMOID),
    ((3, 4, 9, 10), 5, (2, 3), (2, 1), (0, 2), (1, 2), K.IDENTITY),
    ((2, 3, 5, 5), 4, 1, 1, 0, 1, K.RELU),           # 1 × 1
])
def test_matches_torch_float32(shape, c_out, kernel, stride, padding, dilation, act):
    rng = np.random.default_rng(10)
    kh, kw = _pair(kernel)
    x = rng.standard_normal(shape).astype(np.float32)
    w = (rng.standard_normal((c_out, shape[1], kh, kw)) * 0.3).astype(np.float32)
    b = rng.standard_normal(c_out).astype(np.float32)
    scratch = {}
    y = conv2d_forward(x, w, b, stride, padding, dilation, act, scratch)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dw, db = np.empty_like(w), np.empty_like(b)
    dx = conv2d_backward(x, y, dy, w, dw, db, stride, padding, dilation, act, True, scratch)
    yt, dxt, dwt, dbt = torch_conv(x, w, b, dy, stride, padding, dilation, act)
    close(y, yt)
    close(dx, dxt)
    close(dw, dwt)
    close(db, dbt)
    assert conv2d_backward(x, y, dy, w, dw, db, stride, padding, dilation, act, False, scratch) is None
    close(dw, dwt)   # need_dx=False still writes dW, db


def test_conv1d_is_conv2d_over_one_row():
    """x (B, C, L) seen (B, C, 1, L) with a (1, k) kernel, stride (1, s), padding (0, p), dilation (1, d)."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((3, 4, 40)).astype(np.float32)
    w = (rng.standard_normal((6, 4, 5)) * 0.3).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    y4 = conv2d_forward(x[:, :, None, :], w[:, :, None, :], b, (1, 2), (0, 2), (1, 2), K.TANH)
    dy = rng.standard_normal((3, 6, y4.shape[3])).astype(np.float32)
    dw4, db = np.empty((6, 4, 1, 5), np.float32), np.empty(6, np.float32)
    dx4 = conv2d_backward(x[:, :, None, :], y4, dy[:, :, None, :], w[:, :, None, :], dw4, db, (1, 2), (0, 2),
                          (1, 2), K.TANH)
    yt, dxt, dwt, dbt = torch_conv(x, w, b, dy, 2, 2, 2, K.TANH, conv=F.conv1d)
    close(y4[:, :, 0, :], yt)
    close(dx4[:, :, 0, :], dxt)
    close(dw4[:, :, 0, :], dwt)
    close(db, dbt)


# ---------------------------------------------------------------- threads, scratch, inputs

@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 Numba threads")
def test_results_do_not_depend_on_the_thread_count(monkeypatch):
    """The batch is cut into chunks independent of the thread count and the per-chunk dW, db are summed
    in chunk order, so 1 thread and 2 (the chunks split over two Python threads, forced here at this
    small size) give the same bits."""
    monkeypatch.setattr(conv, "_SPLIT_FLOPS", 0)
    shares = []
    run = conv._run
    monkeypatch.setattr(conv, "_run", lambda tasks, *a: (shares.append(len(tasks)), run(tasks, *a)))
    rng = np.random.default_rng(12)
    x = rng.standard_normal((9, 8, 10, 10)).astype(np.float32)
    w = rng.standard_normal((12, 8, 3, 3)).astype(np.float32)
    b = rng.standard_normal(12).astype(np.float32)
    dy = rng.standard_normal((9, 12, 10, 10)).astype(np.float32)
    before = numba.get_num_threads()
    out = []
    try:
        for threads in (1, 2):
            numba.set_num_threads(threads)
            y = conv2d_forward(x, w, b, 1, 1, 1, K.RELU, {})
            dw, db = np.empty_like(w), np.empty_like(b)
            dx = conv2d_backward(x, y, dy, w, dw, db, 1, 1, 1, K.RELU, True, {})
            out.append((y, dx, dw, db))
    finally:
        numba.set_num_threads(before)
    assert shares == [1, 1, 2, 2]      # the 2-thread calls did split
    for a, c in zip(*out):
        assert np.array_equal(a, c)


def test_scratch_is_reused_across_shapes_and_outputs_are_not_views_into_it():
    rng = np.random.default_rng(13)
    scratch = {}
    w = rng.standard_normal((4, 3, 3, 3))
    b = rng.standard_normal(4)
    x1, x2 = rng.standard_normal((3, 3, 9, 9)), rng.standard_normal((2, 3, 6, 7))
    y1 = conv2d_forward(x1, w, b, 1, 1, 1, K.IDENTITY, scratch)
    y1_copy = y1.copy()
    y2 = conv2d_forward(x2, w, b, 1, 1, 1, K.IDENTITY, scratch)          # another shape, same scratch
    y3 = conv2d_forward(x1.astype(np.float32), w.astype(np.float32), b.astype(np.float32), 1, 1, 1,
                        K.IDENTITY, scratch)                            # and another dtype
    assert np.array_equal(y1, y1_copy)                                   # held outputs untouched
    ref = conv2d_forward(x2, w, b, 1, 1, 1, K.IDENTITY)                  # scratch=None: fresh buffers
    assert np.array_equal(y2, ref)
    assert y3.dtype == np.float32 and np.allclose(y3, y1, rtol=1e-5, atol=1e-5)


def test_non_contiguous_inputs_and_errors():
    rng = np.random.default_rng(14)
    xs = rng.standard_normal((2, 3, 8, 14))[:, :, :, ::2]                # strided view
    w = rng.standard_normal((4, 3, 3, 3))
    b = rng.standard_normal(4)
    ref = conv2d_forward(np.ascontiguousarray(xs), w, b, 1, 1)
    assert np.array_equal(conv2d_forward(xs, w, b, 1, 1), ref)
    with pytest.raises(ValueError, match="gelu"):
        conv2d_forward(xs, w, b, act=K.GELU)
    with pytest.raises(ValueError, match="smaller than"):
        conv2d_forward(rng.standard_normal((1, 3, 2, 2)), w, b)


# ---------------------------------------------------------------- the benchmark runs

def test_bench_conv_prints_rows_with_ratio_and_limit():
    p = hpcopt("bench", "conv", "--json", "--threads", "1", "--repeats", "1", "--batch", "2", "--gemm-size", "128",
               timeout=120)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 8, p.stdout
    for r in rows:
        assert {"name", "unit", "hpcopt", "peer_name", "peer", "ratio", "limit", "hpcopt_ms", "peer_ms",
                "threads"} <= r.keys(), r
        assert r["suite"] == "conv" and r["unit"] == "GFLOP/s" and r["threads"] == 1
        for k in ("hpcopt", "peer", "ratio", "limit", "hpcopt_ms", "peer_ms"):
            assert isinstance(r[k], float) and math.isfinite(r[k]) and r[k] > 0, (k, r)
        assert math.isclose(r["ratio"], r["peer_ms"] / r["hpcopt_ms"], rel_tol=1e-9)
    assert sum(r["name"].endswith("fwd+bwd") for r in rows) == 4
