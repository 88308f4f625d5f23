"""@njit CPU kernels for the network: fused bias + activation forward/backward, losses, accuracy.

GEMMs are not here: they go to BLAS through numpy (`np.matmul(..., out=...)`). Everything around a
GEMM is one fused, in-place pass, run on ONE thread: it is O(B·N) next to the GEMM's O(B·N·K), and a
threaded kernel right after a threaded GEMM waits for BLAS's still-spinning threads to give up the
cores (measured: a step of the 784-1024-1024-10 MLP took 72 ms with threaded kernels, 21 ms without). Reductions run in a fixed order (never a threaded `+=` reduction),
so results do not depend on the thread count: the same inputs give the same bits on any layout.
Optimizer kernels live in `optim_cpu.py` (CUDA twins in `cuda.py`/`optim_cuda.py`).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

# activation codes (ints so kernels can branch without object arguments). relu, tanh and sigmoid take
# their derivative from the OUTPUT (fused into bias_act_*); gelu and silu need the INPUT, so a layer
# using them keeps the pre-activation z and calls act_forward / act_backward (FROM_INPUT).
IDENTITY, RELU, TANH, SIGMOID, GELU, SILU = 0, 1, 2, 3, 4, 5
ACTIVATIONS = {"identity": IDENTITY, "relu": RELU, "tanh": TANH, "sigmoid": SIGMOID, "gelu": GELU, "silu": SILU}
FROM_INPUT = (GELU, SILU)

_BLOCK = 64  # columns per task in column reductions: contiguous rows of 64 floats per thread


@njit(cache=True)
def bias_act_forward(z, b, act):
    """z (B, N) := act(z + b), in place; b (N,). Returns nothing."""
    B, N = z.shape
    for i in range(B):
        for j in range(N):
            v = z[i, j] + b[j]
            if act == RELU:
                v = v if v > 0 else 0.0
            elif act == TANH:
                v = math.tanh(v)
            elif act == SIGMOID:
                v = 1 / (1 + math.exp(-v))
            z[i, j] = v


@njit(cache=True)
def bias_act_backward(dz, a, act, db):
    """dz (B, N): in dL/da, out dL/dz (in place); a (B, N): the forward's output; db (N,) := sum_i dL/dz.

    The activation derivative is taken from the OUTPUT a (relu: a > 0, tanh: 1 - a², sigmoid: a(1 - a)),
    so the forward stores one array per layer. db is summed over i in order, per column block.
    """
    B, N = dz.shape
    nblocks = (N + _BLOCK - 1) // _BLOCK
    for jb in range(nblocks):
        j0 = jb * _BLOCK
        j1 = min(N, j0 + _BLOCK)
        for j in range(j0, j1):
            db[j] = 0
        for i in range(B):
            for j in range(j0, j1):
                d = dz[i, j]
                if act == RELU:
                    d = d if a[i, j] > 0 else 0.0
                elif act == TANH:
                    d = d * (1 - a[i, j] * a[i, j])
                elif act == SIGMOID:
                    d = d * (a[i, j] * (1 - a[i, j]))
                dz[i, j] = d
                db[j] += d


_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


@njit(cache=True)
def act_forward(z, a, act):
    """a := act(z) elementwise over 1-D views (any activation code); gelu is the exact erf form
    (torch's default), silu = z·σ(z). One loop per activation, so relu's vectorises."""
    n = z.shape[0]
    if act == RELU:
        for i in range(n):
            v = z[i]
            a[i] = v if v > 0 else 0   # a select: vectorises (max() keeps NaN's order rules and does not)
    elif act == GELU:
        for i in range(n):
            a[i] = 0.5 * z[i] * (1.0 + math.erf(z[i] * _SQRT_HALF))
    elif act == SILU:
        for i in range(n):
            a[i] = z[i] / (1.0 + math.exp(-z[i]))
    elif act == TANH:
        for i in range(n):
            a[i] = math.tanh(z[i])
    elif act == SIGMOID:
        for i in range(n):
            a[i] = 1 / (1 + math.exp(-z[i]))
    else:
        for i in range(n):
            a[i] = z[i]


@njit(cache=True)
def add_act(h, p, act, y):
    """y := act(h + p) elementwise over 1-D views (a residual block's sum and its activation, one pass);
    act: identity, relu, tanh or sigmoid."""
    n = h.shape[0]
    if act == RELU:
        for i in range(n):
            v = h[i] + p[i]
            y[i] = v if v > 0 else 0
    elif act == TANH:
        for i in range(n):
            y[i] = math.tanh(h[i] + p[i])
    elif act == SIGMOID:
        for i in range(n):
            y[i] = 1 / (1 + math.exp(-(h[i] + p[i])))
    else:
        for i in range(n):
            y[i] = h[i] + p[i]


@njit(cache=True)
def act_backward_from_output(dy, y, act):
    """dy := dy·act'(x) in place (1-D views), with the derivative taken from the OUTPUT y = act(x):
    relu [y > 0], tanh 1 - y², sigmoid y(1 - y) (identity: unchanged)."""
    n = y.shape[0]
    if act == RELU:
        for i in range(n):
            dy[i] = dy[i] if y[i] > 0 else 0
    elif act == TANH:
        for i in range(n):
            dy[i] *= 1 - y[i] * y[i]
    elif act == SIGMOID:
        for i in range(n):
            dy[i] *= y[i] * (1 - y[i])


@njit(cache=True)
def act_backward(dz, z, act):
    """dz := dz·act'(z) in place (1-D views), the derivative taken at the INPUT z: gelu' = Φ(z) + z·φ(z),
    silu' = σ(z)·(1 + z·(1 - σ(z))), relu' = [z > 0], tanh' = 1 - tanh², sigmoid' = σ(1 - σ)."""
    n = z.shape[0]
    if act == RELU:
        for i in range(n):
            dz[i] = dz[i] if z[i] > 0 else 0
    elif act == GELU:
        for i in range(n):
            v = z[i]
            dz[i] *= 0.5 * (1.0 + math.erf(v * _SQRT_HALF)) + v * _INV_SQRT_2PI * math.exp(-0.5 * v * v)
    elif act == SILU:
        for i in range(n):
            s = 1.0 / (1.0 + math.exp(-z[i]))
            dz[i] *= s * (1.0 + z[i] * (1.0 - s))
    elif act == TANH:
        for i in range(n):
            t = math.tanh(z[i])
            dz[i] *= 1.0 - t * t
    elif act == SIGMOID:
        for i in range(n):
            s = 1.0 / (1.0 + math.exp(-z[i]))
            dz[i] *= s * (1.0 - s)


@njit(cache=True)
def softmax_ce(logits, labels, scale, dlogits):
    """Softmax cross-entropy. logits (B, C); labels (B,) int in [0, C); dlogits (B, C) out.

    dlogits := (softmax(logits) - onehot(labels)) * scale, with scale = 1 / global batch, so that the
    SUM over data-parallel ranks is the mean gradient. Returns the SUM of per-sample losses (float64).
    """
    losses = np.empty(logits.shape[0], dtype=np.float64)
    softmax_ce_rows(logits, labels, scale, dlogits, losses)
    total = 0.0
    for i in range(losses.shape[0]):
        total += losses[i]
    return total


@njit(cache=True)
def softmax_ce_rows(logits, labels, scale, dlogits, losses):
    """softmax_ce's work, keeping each row's loss in losses (B,) float64 (summed exactly elsewhere)."""
    B, C = logits.shape
    for i in range(B):
        m = logits[i, 0]
        for j in range(1, C):
            m = max(m, logits[i, j])
        s = 0.0
        for j in range(C):
            s += math.exp(logits[i, j] - m)
        lse = m + math.log(s)
        y = labels[i]
        losses[i] = lse - logits[i, y]
        for j in range(C):
            p = math.exp(logits[i, j] - lse)
            if j == y:
                p -= 1.0
            dlogits[i, j] = p * scale


@njit(cache=True)
def mse_onehot(out, labels, scale, dout, losses):
    """Mean squared error against one-hot targets. out, dout (B, C); labels (B,) int.

    Per-sample loss sum_j (out_ij - t_ij)², averaged over samples AND outputs (torch's MSELoss mean):
    dout := 2 (out - t) * scale with scale = 1 / (global batch * C). Returns the SUM of squared errors.
    losses (B,) float64, or empty: each row's squared error / C (a sample's loss), kept.
    """
    B, C = out.shape
    sq = np.empty(B, dtype=np.float64)
    for i in range(B):
        acc = 0.0
        for j in range(C):
            t = 1.0 if j == labels[i] else 0.0
            d = out[i, j] - t
            acc += d * d
            dout[i, j] = 2 * d * scale
        sq[i] = acc
        if losses.size:
            losses[i] = acc / C
    total = 0.0
    for i in range(B):
        total += sq[i]
    return total


LOSS_MSE, LOSS_L1, LOSS_HUBER, LOSS_REL_L2 = 0, 1, 2, 3


@njit(cache=True)
def regression_loss(out, t, code, scale, dout, losses):
    """Regression losses over rows: out, t, dout (B, T). Per sample, the MEAN over its T values of
    (o - t)² (mse), |o - t| (l1), huber with delta 1 (0.5 d² where |d| < 1, |d| - 0.5 else), or the
    relative error ||o - t|| / ||t|| (rel_l2). dout := the gradient times `scale` (1 / global batch).
    Returns the SUM over samples (float64, accumulated in row order); losses (B,) float64, or empty:
    each sample's loss, kept."""
    B, T = out.shape
    total = 0.0
    for i in range(B):
        acc = 0.0
        if code == LOSS_REL_L2:
            nt = 0.0
            for j in range(T):
                d = np.float64(out[i, j]) - t[i, j]
                acc += d * d
                nt += np.float64(t[i, j]) * t[i, j]
            e, nt = math.sqrt(acc), math.sqrt(nt)
            g = scale / (e * nt) if e > 0 else 0.0
            for j in range(T):
                dout[i, j] = (out[i, j] - t[i, j]) * g
            total += e / nt
            if losses.size:
                losses[i] = e / nt
            continue
        for j in range(T):
            d = np.float64(out[i, j]) - t[i, j]
            if code == LOSS_MSE:
                acc += d * d
                g = 2 * d
            elif code == LOSS_L1:
                acc += abs(d)
                g = 1.0 if d > 0 else (-1.0 if d < 0 else 0.0)
            else:
                if abs(d) < 1:
                    acc += 0.5 * d * d
                    g = d
                else:
                    acc += abs(d) - 0.5
                    g = 1.0 if d > 0 else -1.0
            dout[i, j] = g * scale / T
        total += acc / T
        if losses.size:
            losses[i] = acc / T
    return total


@njit(cache=True)
def _add_row_stats(out, t, i, res):
    """ADD row i's evaluation terms to res (3 + 2T,): [_, ||o - t|| / ||t||, sum of (o - t)², t_j (T values),
    t_j² (T values)] (regression_stats over rows, regression_rows per row: the same arithmetic)."""
    T = out.shape[1]
    e = 0.0
    nt = 0.0
    for j in range(T):
        d = np.float64(out[i, j]) - t[i, j]
        y = np.float64(t[i, j])
        e += d * d
        nt += y * y
        res[3 + j] += y
        res[3 + T + j] += y * y
    res[1] += math.sqrt(e) / math.sqrt(nt)
    res[2] += e


@njit(cache=True)
def regression_stats(out, t, res):
    """Evaluation sums over rows of out, t (B, T), ADDED to res (3 + 2T,) float64: [_, sum of per-sample
    ||o - t|| / ||t||, sum of (o - t)², sum of t_j (T values), sum of t_j² (T values)]."""
    for i in range(out.shape[0]):
        _add_row_stats(out, t, i, res)


@njit(cache=True)
def regression_rows(out, t, res):
    """regression_stats per row: res (B, 3 + 2T) float64 := row i's terms in res[i] (run.reproducible sums
    the rows exactly)."""
    res[...] = 0.0
    for i in range(out.shape[0]):
        _add_row_stats(out, t, i, res[i])


@njit(cache=True)
def _first_max(logits, i):
    """The column of row i's first maximum (like numpy's argmax, NaN aside)."""
    best = 0
    for j in range(1, logits.shape[1]):
        if logits[i, j] > logits[i, best]:
            best = j
    return best


@njit(cache=True)
def correct_rows(logits, labels, out):
    """count_correct per row: out[i] := 1.0 if row i's argmax (first maximum) is its label, else 0.0."""
    for i in range(logits.shape[0]):
        out[i] = 1.0 if _first_max(logits, i) == labels[i] else 0.0


@njit(cache=True)
def count_correct(logits, labels):
    """Number of rows whose argmax equals the label (first maximum wins, like numpy)."""
    n = 0
    for i in range(logits.shape[0]):
        if _first_max(logits, i) == labels[i]:
            n += 1
    return n


CHECKSUM_MOD = 2147483647  # 2**31 - 1
_CHECKSUM_CHUNK = 1 << 14   # per chunk, sum(j * w) < 2**14 * 2**14 * 2**32 = 2**60: no overflow, no mod inside


@njit(parallel=True, cache=True)
def checksum_parts(words, first):
    """Position-weighted Fletcher sums of uint32 words whose global word index starts at `first`.

    Returns (s1, s2) = (sum w_i, sum (i + 1) w_i) mod 2**31 - 1. Both are sums over positions, so the
    checksum of a global array is the sum of its slices' parts, whoever wrote which slice: a
    checkpoint written by any layout is verified by any reader. A flipped bit changes s1; a moved
    word changes s2. The inner loop is multiply-add only (the mod is taken once per chunk).
    """
    n = words.shape[0]
    nchunks = (n + _CHECKSUM_CHUNK - 1) // _CHECKSUM_CHUNK
    p1 = np.zeros(nchunks, dtype=np.uint64)
    p2 = np.zeros(nchunks, dtype=np.uint64)
    m = np.uint64(CHECKSUM_MOD)
    for c in prange(nchunks):
        lo = c * _CHECKSUM_CHUNK
        hi = min(n, lo + _CHECKSUM_CHUNK)
        a = np.uint64(0)
        b = np.uint64(0)
        for i in range(lo, hi):
            w = np.uint64(words[i])
            a += w
            b += np.uint64(i - lo) * w
        base = np.uint64(first + lo + 1) % m  # sum (i+1) w = sum (i-lo) w + (first+lo+1) sum w
        p1[c] = a % m
        p2[c] = (b % m + base * (a % m)) % m
    s1 = np.uint64(0)
    s2 = np.uint64(0)
    for c in range(nchunks):
        s1 = (s1 + p1[c]) % m
        s2 = (s2 + p2[c]) % m
    return s1, s2
