"""@njit CPU kernels for convolutional networks: im2col/col2im, pooling, layer/batch norm, dropout.

Layout NCHW throughout; float32 and float64 both compile (one specialisation per dtype). As in
`cpu.py`, GEMMs are not here (numpy's matmul, BLAS) and every kernel runs on ONE thread: each is
O(elements) next to the convolution GEMM's O(elements · C_out), and a threaded kernel right after a
threaded GEMM waits for BLAS's spinning threads. Reductions (norm statistics, parameter gradients) run
in a fixed order and accumulate in float64, so results do not depend on thread count or batch split
beyond the order of the final cross-rank sum.

Index conventions:
    im2col row    r = (b·OH + oh)·OW + ow           (B·OH·OW rows)
    im2col column k = (c·kh + i)·kw + j             (C·kh·kw columns: a torch weight (C_out, C, kh, kw)
                                                      reshaped (C_out, C·kh·kw) matches it directly)
    input pixel   ih = oh·sh - ph + i·dh,  iw = ow·sw - pw + j·dw   (outside [0, H)×[0, W): zero padding)
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit


def conv_out_size(n: int, k: int, stride: int, pad: int, dil: int) -> int:
    """Output length of one spatial axis (torch's floor formula)."""
    return (n + 2 * pad - dil * (k - 1) - 1) // stride + 1


# ---------------------------------------------------------------- convolution: im2col / col2im

@njit(cache=True)
def im2col(x, kh, kw, sh, sw, ph, pw, dh, dw, OH, OW, cols):
    """x (B, C, H, W) -> cols (B·OH·OW, C·kh·kw), every entry written (zero where the window is padding).

    Loops run row-outer so the writes are contiguous (one row of C·kh·kw per output pixel).
    """
    B, C, H, W = x.shape
    r = 0
    for b in range(B):
        for oh in range(OH):
            h0 = oh * sh - ph
            for ow in range(OW):
                w0 = ow * sw - pw
                k = 0
                for c in range(C):
                    for i in range(kh):
                        ih = h0 + i * dh
                        inside_h = 0 <= ih < H
                        for j in range(kw):
                            iw = w0 + j * dw
                            if inside_h and 0 <= iw < W:
                                cols[r, k] = x[b, c, ih, iw]
                            else:
                                cols[r, k] = 0
                            k += 1
                r += 1


@njit(cache=True)
def col2im(dcols, kh, kw, sh, sw, ph, pw, dh, dw, OH, OW, dx):
    """The adjoint of im2col: dx (B, C, H, W) += scatter of dcols (B·OH·OW, C·kh·kw).

    ACCUMULATES (an input pixel sits in several windows when stride < kernel): zero dx first.
    Padding entries of dcols are dropped.
    """
    B, C, H, W = dx.shape
    r = 0
    for b in range(B):
        for oh in range(OH):
            h0 = oh * sh - ph
            for ow in range(OW):
                w0 = ow * sw - pw
                k = 0
                for c in range(C):
                    for i in range(kh):
                        ih = h0 + i * dh
                        inside_h = 0 <= ih < H
                        for j in range(kw):
                            iw = w0 + j * dw
                            if inside_h and 0 <= iw < W:
                                dx[b, c, ih, iw] += dcols[r, k]
                            k += 1
                r += 1


@njit(cache=True)
def rows_to_nchw(z, y):
    """z (B·OH·OW, C) -> y (B, C, OH, OW): the GEMM's pixel-major result in NCHW layout."""
    B, C, OH, OW = y.shape
    for b in range(B):
        for c in range(C):
            r = b * OH * OW
            for oh in range(OH):
                for ow in range(OW):
                    y[b, c, oh, ow] = z[r, c]
                    r += 1


@njit(cache=True)
def nchw_to_rows(y, z):
    """y (B, C, OH, OW) -> z (B·OH·OW, C): the inverse of rows_to_nchw."""
    B, C, OH, OW = y.shape
    r = 0
    for b in range(B):
        for oh in range(OH):
            for ow in range(OW):
                for c in range(C):
                    z[r, c] = y[b, c, oh, ow]
                r += 1


# ---------------------------------------------------------------- pooling

@njit(cache=True)
def maxpool2d_forward(x, kh, kw, sh, sw, ph, pw, y, idx):
    """x (B, C, H, W) -> y (B, C, OH, OW) and idx (B, C, OH, OW) int64: argmax as ih·W + iw.

    Padding counts as -inf (never chosen); the FIRST maximum of a window wins on ties, as torch's CPU
    kernel (strict >). Every window holds at least one input pixel when ph <= kh / 2 (torch's rule).
    """
    B, C, H, W = x.shape
    OH, OW = y.shape[2], y.shape[3]
    for b in range(B):
        for c in range(C):
            for oh in range(OH):
                for ow in range(OW):
                    best = -np.inf
                    arg = -1
                    for i in range(kh):
                        ih = oh * sh - ph + i
                        if ih < 0 or ih >= H:
                            continue
                        for j in range(kw):
                            iw = ow * sw - pw + j
                            if iw < 0 or iw >= W:
                                continue
                            v = x[b, c, ih, iw]
                            if v > best or arg < 0:
                                best = v
                                arg = ih * W + iw
                    y[b, c, oh, ow] = best
                    idx[b, c, oh, ow] = arg


@njit(cache=True)
def maxpool2d_backward(dy, idx, dx):
    """dx (B, C, H, W) := 0, then dy (B, C, OH, OW) added at each window's argmax idx."""
    B, C, H, W = dx.shape
    OH, OW = dy.shape[2], dy.shape[3]
    for b in range(B):
        for c in range(C):
            for ih in range(H):
                for iw in range(W):
                    dx[b, c, ih, iw] = 0
            for oh in range(OH):
                for ow in range(OW):
                    a = idx[b, c, oh, ow]
                    dx[b, c, a // W, a % W] += dy[b, c, oh, ow]


@njit(cache=True)
def avgpool2d_forward(x, kh, kw, sh, sw, ph, pw, y):
    """x (B, C, H, W) -> y (B, C, OH, OW): window means; padding counts as zeros in the kh·kw divisor
    (torch's default count_include_pad=True)."""
    B, C, H, W = x.shape
    OH, OW = y.shape[2], y.shape[3]
    inv = 1.0 / (kh * kw)
    for b in range(B):
        for c in range(C):
            for oh in range(OH):
                for ow in range(OW):
                    s = 0.0
                    for i in range(kh):
                        ih = oh * sh - ph + i
                        if ih < 0 or ih >= H:
                            continue
                        for j in range(kw):
                            iw = ow * sw - pw + j
                            if 0 <= iw < W:
                                s += x[b, c, ih, iw]
                    y[b, c, oh, ow] = s * inv


@njit(cache=True)
def avgpool2d_backward(dy, kh, kw, sh, sw, ph, pw, dx):
    """dx (B, C, H, W) := 0, then each dy (B, C, OH, OW) / (kh·kw) added over its window."""
    B, C, H, W = dx.shape
    OH, OW = dy.shape[2], dy.shape[3]
    inv = 1.0 / (kh * kw)
    for b in range(B):
        for c in range(C):
            for ih in range(H):
                for iw in range(W):
                    dx[b, c, ih, iw] = 0
            for oh in range(OH):
                for ow in range(OW):
                    g = dy[b, c, oh, ow] * inv
                    for i in range(kh):
                        ih = oh * sh - ph + i
                        if ih < 0 or ih >= H:
                            continue
                        for j in range(kw):
                            iw = ow * sw - pw + j
                            if 0 <= iw < W:
                                dx[b, c, ih, iw] += g


# ---------------------------------------------------------------- layer norm (per sample, rows of D)

@njit(cache=True)
def layernorm_forward(x, w, b, eps, y, mean, rstd):
    """x, y (B, D); w, b (D,); mean, rstd (B,) float64 out. y = (x - mean)·rstd·w + b per row.

    Two-pass statistics in float64 (mean, then the biased variance of the deviations): no
    E[x²] - E[x]² cancellation for rows with a large mean.
    """
    B, D = x.shape
    for r in range(B):
        s = 0.0
        for k in range(D):
            s += x[r, k]
        m = s / D
        v = 0.0
        for k in range(D):
            d = x[r, k] - m
            v += d * d
        rs = 1.0 / math.sqrt(v / D + eps)
        mean[r] = m
        rstd[r] = rs
        for k in range(D):
            y[r, k] = (x[r, k] - m) * rs * w[k] + b[k]


@njit(cache=True)
def layernorm_backward(dy, x, w, mean, rstd, dx, dw, db, need_dx):
    """dy, x (B, D); w (D,); mean, rstd (B,) from the forward.

    dw := sum_r dy·xhat, db := sum_r dy (D,), summed over rows in order in float64;
    dx (B, D) := rstd·(g - mean(g) - xhat·mean(g·xhat)) with g = dy·w, when need_dx.
    """
    B, D = x.shape
    gw = np.zeros(D, dtype=np.float64)
    gb = np.zeros(D, dtype=np.float64)
    for r in range(B):
        m = mean[r]
        rs = rstd[r]
        sg = 0.0
        sgx = 0.0
        for k in range(D):
            xh = (x[r, k] - m) * rs
            g = dy[r, k]
            gw[k] += g * xh
            gb[k] += g
            g = g * w[k]
            sg += g
            sgx += g * xh
        if need_dx:
            sg /= D
            sgx /= D
            for k in range(D):
                xh = (x[r, k] - m) * rs
                dx[r, k] = rs * (dy[r, k] * w[k] - sg - xh * sgx)
    for k in range(D):
        dw[k] = gw[k]
        db[k] = gb[k]


# ---------------------------------------------------------------- batch norm (x viewed (B, C, S))

@njit(cache=True)
def batchnorm_stats(x, sums):
    """x (B, C, S) -> sums (2, C) float64: [sum over (B, S) of x, of x²].

    Plain sums (not means) so that ranks' partial statistics add: one Allreduce of this array gives the
    global batch's statistics. Accumulated in float64: var = sumsq/n - mean² then loses ~mean²/var·1e-16
    relative, far below float32's resolution for activations of sane scale.
    """
    B, C, S = x.shape
    for c in range(C):
        s = 0.0
        q = 0.0
        for b in range(B):
            for k in range(S):
                v = np.float64(x[b, c, k])
                s += v
                q += v * v
        sums[0, c] = s
        sums[1, c] = q


@njit(cache=True)
def batchnorm_normalize(x, mean, rstd, w, b, xhat, y):
    """x (B, C, S); mean, rstd, w, b (C,) -> xhat = (x - mean)·rstd and y = xhat·w + b, both (B, C, S)."""
    B, C, S = x.shape
    for bi in range(B):
        for c in range(C):
            m = mean[c]
            rs = rstd[c]
            wc = w[c]
            bc = b[c]
            for k in range(S):
                xh = (x[bi, c, k] - m) * rs
                xhat[bi, c, k] = xh
                y[bi, c, k] = xh * wc + bc


@njit(cache=True)
def batchnorm_backward_sums(dy, xhat, sums):
    """dy, xhat (B, C, S) -> sums (2, C) float64: [sum dy, sum dy·xhat] over (B, S), summable over ranks.

    On the global sums these ARE the parameter gradients: dbias = sums[0], dweight = sums[1].
    """
    B, C, S = dy.shape
    for c in range(C):
        s = 0.0
        q = 0.0
        for b in range(B):
            for k in range(S):
                g = np.float64(dy[b, c, k])
                s += g
                q += g * xhat[b, c, k]
        sums[0, c] = s
        sums[1, c] = q


@njit(cache=True)
def batchnorm_backward_apply(dy, xhat, w, rstd, sum_dy, sum_dy_xhat, count, dx):
    """dx (B, C, S) := w·rstd·(dy - sum_dy/count - xhat·sum_dy_xhat/count), with the GLOBAL sums and
    count (the batch normalised together). Eval mode (fixed statistics) passes zero sums: dx = w·rstd·dy.
    """
    B, C, S = dy.shape
    for c in range(C):
        a = w[c] * rstd[c]
        m1 = sum_dy[c] / count
        m2 = sum_dy_xhat[c] / count
        for b in range(B):
            for k in range(S):
                dx[b, c, k] = a * (dy[b, c, k] - m1 - xhat[b, c, k] * m2)


# ---------------------------------------------------------------- dropout (counter-based random stream)

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


@njit(cache=True)
def _mix(z):
    """splitmix64's finaliser: a bijection on uint64 with full avalanche."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


@njit(cache=True)
def dropout_key(seed, step, layer):
    """The stream key of (seed, step, layer): each field mixed in turn, so nearby values decorrelate."""
    k = _mix(np.uint64(seed) + _GOLDEN)
    k = _mix(k ^ (np.uint64(step) + _GOLDEN))
    return _mix(k ^ (np.uint64(layer) * _GOLDEN + _GOLDEN))


@njit(cache=True)
def _keep(key, i, j, threshold):
    """Whether element j of GLOBAL sample i is kept: 53 uniform bits of mix(mix(key + i) + j) >= p·2^53."""
    h = _mix(_mix(key + np.uint64(i) * _GOLDEN) + np.uint64(j) * _M1)
    return (h >> np.uint64(11)) >= threshold


@njit(cache=True)
def dropout_apply(x, key, first_row, threshold, scale, y):
    """x, y (B, D): y = x·scale where kept, 0 where dropped; row r is global sample first_row + r.

    Used for the forward (x the input) and the backward (x = dy): the mask is recomputed, not stored.
    """
    B, D = x.shape
    t = np.uint64(threshold)
    for r in range(B):
        i = first_row + r
        for j in range(D):
            if _keep(key, i, j, t):
                y[r, j] = x[r, j] * scale
            else:
                y[r, j] = 0


@njit(cache=True)
def dropout_mask(B, D, key, first_row, threshold, mask):
    """mask (B, D) uint8 := 1 where kept (for tests and inspection)."""
    t = np.uint64(threshold)
    for r in range(B):
        for j in range(D):
            mask[r, j] = 1 if _keep(key, first_row + r, j, t) else 0
