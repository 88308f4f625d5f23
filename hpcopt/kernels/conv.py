"""@njit CPU kernels for convolutional networks: the convolution's column layout (im2col/col2im over
padded planes, fused bias + activation), pooling, layer/batch norm, dropout.

Layout NCHW throughout; float32 and float64 both compile (one specialisation per dtype). As in
`cpu.py`, GEMMs are not here (numpy's matmul, BLAS; nn/conv.py drives them) and every kernel runs on
ONE thread: each is O(elements) next to the convolution GEMM's O(elements · C_out). Reductions (norm
statistics, parameter gradients) run in a fixed order and accumulate in float64 (the weight-gradient
kernel in float32 blocks, summed in chunk order), so results do not depend on thread count.

    input pixel   ih = oh·sh - ph + i·dh,  iw = ow·sw - pw + j·dw   (outside [0, H)×[0, W): zero padding)
    column row    k = (c·kh + i)·kw + j: a torch weight (C_out, C, kh, kw) reshaped (C_out, C·kh·kw) matches
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from .cpu import RELU, SIGMOID, TANH


def conv_out_size(n: int, k: int, stride: int, pad: int, dil: int) -> int:
    """Output length of one spatial axis (torch's floor formula)."""
    return (n + 2 * pad - dil * (k - 1) - 1) // stride + 1


# ---------------------------------------------------------------- convolution: plane (channel-major) layout
#
# The layout of nn/conv.py (Caffe's): for a chunk of nb images, columns (C·kh·kw, nb·OH·OW), row
# k = (c·kh + i)·kw + j, column (bl·OH + oh)·OW + ow for image b0 + bl. Row k is input plane c shifted by
# (i·dh, j·dw) and sampled with the stride, so im2col is OH runs of OW per (plane, i, j), contiguous
# when sw = 1, and the GEMM W (C_out, C·kh·kw) @ cols comes out channel-major, (C_out, nb·OH·OW): each
# image's NCHW block. Each plane is first copied into a zeroed buffer with the padding around it
# (rows of pitch Wp = W + 2·pw), so no copy tests bounds, and that buffer stays in L1 while its kh·kw
# shifted copies go out. The row pitch of a (rows, columns) buffer is its shape[1], which may exceed
# nb·OH·OW (nn/conv.py pads rows to 64 bytes for BLAS); only the first nb·OH·OW columns are used.
# Single-threaded like the rest of this file, but nogil: nn/conv.py runs them on several Python threads
# at once, each on its own chunk of images.
#
# The kernels index flat views with uint64 offsets: numba wraps negative signed indices, a select per
# access that keeps LLVM from vectorising short loops. Measured, one thread, x (64, 16, 32, 32) and
# (64, 32, 8, 8), 3 × 3, padding 1, per image: im2col with 2-D signed indexing and runs clipped to the
# valid range 160 µs and 35 µs; padded plane + uint64 offsets 19 µs and 8 µs (a plain copy of the same
# 590 KB: 14-20 µs). Also measured and dropped: a "wide" grid (output rows of pitch Wp, junk columns
# dropped later) makes each (plane, i, j) one long run, but its (Wp - OW)/Wp extra GEMM work (6 % at
# 32 × 32, 25 % at 8 × 8) cost more than the shorter copies saved.

_U = np.uint64


@njit(cache=True, nogil=True)
def conv_pad_plane(xf, src0, H, W, ph, pw, plane):
    """plane (flat, (H + 2ph)·(W + 2pw)) := the plane xf[src0 : src0 + H·W] (rows of W) with ph zero
    rows above and below and pw zero columns left and right; every entry written."""
    Wp = W + 2 * pw
    pos = _U(0)
    uW = _U(W)
    for r in range(H):
        base = _U((r + ph) * Wp + pw)
        for t in range(pos, base):
            plane[t] = 0
        s = _U(src0 + r * W)
        for t in range(uW):
            plane[base + t] = xf[s + t]
        pos = base + uW
    for t in range(pos, _U(plane.shape[0])):
        plane[t] = 0


@njit(cache=True, nogil=True)
def im2col_planes(x, b0, nb, kh, kw, sh, sw, ph, pw, dh, dw, OH, OW, cols):
    """x (B, C, H, W) C-contiguous, images b0 .. b0 + nb -> cols (C·kh·kw, >= nb·OH·OW), the first nb·OH·OW
    columns all written:
    cols[(c·kh + i)·kw + j, (bl·OH + oh)·OW + ow] = x[b0 + bl, c, oh·sh - ph + i·dh, ow·sw - pw + j·dw]
    (zero in the padding)."""
    B, C, H, W = x.shape
    Wp = W + 2 * pw
    N = OH * OW
    L = cols.shape[1]
    xf = x.reshape(-1)
    cf = cols.reshape(-1)
    plane = np.empty((H + 2 * ph) * Wp, x.dtype)
    uow, usw = _U(OW), _U(sw)
    for bl in range(nb):
        for c in range(C):
            conv_pad_plane(xf, ((b0 + bl) * C + c) * H * W, H, W, ph, pw, plane)
            for i in range(kh):
                for j in range(kw):
                    d0 = ((c * kh + i) * kw + j) * L + bl * N
                    s0 = i * dh * Wp + j * dw
                    for oh in range(OH):
                        d, s = _U(d0 + oh * OW), _U(s0 + oh * sh * Wp)
                        if sw == 1:
                            for t in range(uow):
                                cf[d + t] = plane[s + t]
                        else:
                            for t in range(uow):
                                cf[d + t] = plane[s + t * usw]


@njit(cache=True, nogil=True)
def col2im_planes(dcols, b0, nb, kh, kw, sh, sw, ph, pw, dh, dw, OH, OW, dx):
    """The adjoint of im2col_planes: dx[b0 + bl] (C, H, W) := the sum of the rows of dcols
    (C·kh·kw, >= nb·OH·OW) added back at their shifts, padding dropped. WRITES dx, C-contiguous (no
    zero-fill needed): each plane is summed in a zeroed padded buffer that stays in L1, then its
    interior copied out."""
    B, C, H, W = dx.shape
    Wp = W + 2 * pw
    N = OH * OW
    L = dcols.shape[1]
    cf = dcols.reshape(-1)
    xf = dx.reshape(-1)
    plane = np.empty((H + 2 * ph) * Wp, dx.dtype)
    uow, usw, uW = _U(OW), _U(sw), _U(W)
    for bl in range(nb):
        for c in range(C):
            for t in range(_U(plane.shape[0])):
                plane[t] = 0
            for i in range(kh):
                for j in range(kw):
                    s0 = ((c * kh + i) * kw + j) * L + bl * N
                    d0 = i * dh * Wp + j * dw
                    for oh in range(OH):
                        d, s = _U(d0 + oh * sh * Wp), _U(s0 + oh * OW)
                        if sw == 1:
                            for t in range(uow):
                                plane[d + t] += cf[s + t]
                        else:
                            for t in range(uow):
                                plane[d + t * usw] += cf[s + t]
            out0 = ((b0 + bl) * C + c) * H * W
            for r in range(H):
                d, s = _U(out0 + r * W), _U((r + ph) * Wp + pw)
                for t in range(uW):
                    xf[d + t] = plane[s + t]


@njit(cache=True, nogil=True)
def bias_act_planes(z, bias, act, b0, nb, y):
    """z (C_out, >= nb·N), a chunk's GEMM result -> y[b0 + bl] (C_out, N) = act(z[:, bl·N:(bl+1)·N] + bias);
    y (B, C_out, N) C-contiguous. act: IDENTITY, RELU, TANH or SIGMOID (cpu.py), branched outside the
    loops."""
    Co, N = y.shape[1], y.shape[2]
    L = z.shape[1]
    zf = z.reshape(-1)
    yf = y.reshape(-1)
    un = _U(N)
    for bl in range(nb):
        for co in range(Co):
            bb = bias[co]
            s = _U(co * L + bl * N)
            d = _U(((b0 + bl) * Co + co) * N)
            if act == RELU:
                for t in range(un):
                    v = zf[s + t] + bb
                    yf[d + t] = v if v > 0 else 0
            elif act == TANH:
                for t in range(un):
                    yf[d + t] = math.tanh(zf[s + t] + bb)
            elif act == SIGMOID:
                for t in range(un):
                    yf[d + t] = 1 / (1 + math.exp(-(zf[s + t] + bb)))
            else:
                for t in range(un):
                    yf[d + t] = zf[s + t] + bb


@njit(cache=True, nogil=True, fastmath={"reassoc"})
def act_backward_planes(dy, y, act, b0, nb, dz, dbias_acc):
    """dy, y (B, C_out, N) C-contiguous -> dz (C_out, >= nb·N) := dy·act'(y) for images b0 .. b0 + nb in the
    columns' order; dbias_acc (C_out,) float64 += the sum of dz per channel. The derivative is taken
    from the OUTPUT y (relu: y > 0, tanh: 1 - y², sigmoid: y(1 - y)). `reassoc` lets LLVM sum in vector
    lanes; the order is fixed by the code, not by the thread count."""
    Co, N = dy.shape[1], dy.shape[2]
    L = dz.shape[1]
    gf = dy.reshape(-1)
    af = y.reshape(-1)
    df = dz.reshape(-1)
    un = _U(N)
    for bl in range(nb):
        for co in range(Co):
            acc = 0.0
            s = _U(((b0 + bl) * Co + co) * N)
            d = _U(co * L + bl * N)
            if act == RELU:
                for t in range(un):
                    v = gf[s + t] if af[s + t] > 0 else 0
                    df[d + t] = v
                    acc += v
            elif act == TANH:
                for t in range(un):
                    v = gf[s + t] * (1 - af[s + t] * af[s + t])
                    df[d + t] = v
                    acc += v
            elif act == SIGMOID:
                for t in range(un):
                    v = gf[s + t] * (af[s + t] * (1 - af[s + t]))
                    df[d + t] = v
                    acc += v
            else:
                for t in range(un):
                    v = gf[s + t]
                    df[d + t] = v
                    acc += v
            dbias_acc[co] += acc


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def weight_grad_planes(cols, dz, L, out):
    """out (C·kh·kw, C_out) := cols[:, :L] @ dz[:, :L]ᵀ, the weight gradient (transposed) of one chunk;
    cols (C·kh·kw, >= L), dz (C_out, >= L). Tiles of 4 rows × 4 channels: 16 accumulators along the
    pixels, which LLVM vectorises (`reassoc`: summed in vector lanes, an order fixed by the code), each
    pixel's 4 + 4 loads feeding 16 FMAs; the rows and channels past the last whole tile are single dot
    products. Measured (one thread, 64-byte-aligned rows): (144 × 1024) @ (1024 × 16) 85 GFLOP/s against
    OpenBLAS's 68 (it packs the 590 KB of columns first), (80 × 768) @ (768 × 16) 81 against 59; but
    with 32 channels OpenBLAS wins, 87 against 76 for (288 × 192) @ (192 × 32): nn/conv.py calls this
    for C_out <= 16."""
    Kd = cols.shape[0]
    Co = dz.shape[0]
    cf = cols.reshape(-1)
    zf = dz.reshape(-1)
    P = _U(cols.shape[1])
    Pz = _U(dz.shape[1])
    uL = _U(L)
    K4 = Kd - Kd % 4
    C4 = Co - Co % 4
    zero = np.zeros(1, cols.dtype)[0]
    for k0 in range(0, K4, 4):
        a0 = _U(k0) * P
        a1 = a0 + P
        a2 = a1 + P
        a3 = a2 + P
        for c0 in range(0, C4, 4):
            b0 = _U(c0) * Pz
            b1 = b0 + Pz
            b2 = b1 + Pz
            b3 = b2 + Pz
            s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = zero
            s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = zero
            for p in range(uL):
                x0 = cf[a0 + p]
                x1 = cf[a1 + p]
                x2 = cf[a2 + p]
                x3 = cf[a3 + p]
                y0 = zf[b0 + p]
                y1 = zf[b1 + p]
                y2 = zf[b2 + p]
                y3 = zf[b3 + p]
                s00 += x0 * y0
                s01 += x0 * y1
                s02 += x0 * y2
                s03 += x0 * y3
                s10 += x1 * y0
                s11 += x1 * y1
                s12 += x1 * y2
                s13 += x1 * y3
                s20 += x2 * y0
                s21 += x2 * y1
                s22 += x2 * y2
                s23 += x2 * y3
                s30 += x3 * y0
                s31 += x3 * y1
                s32 += x3 * y2
                s33 += x3 * y3
            out[k0, c0] = s00
            out[k0, c0 + 1] = s01
            out[k0, c0 + 2] = s02
            out[k0, c0 + 3] = s03
            out[k0 + 1, c0] = s10
            out[k0 + 1, c0 + 1] = s11
            out[k0 + 1, c0 + 2] = s12
            out[k0 + 1, c0 + 3] = s13
            out[k0 + 2, c0] = s20
            out[k0 + 2, c0 + 1] = s21
            out[k0 + 2, c0 + 2] = s22
            out[k0 + 2, c0 + 3] = s23
            out[k0 + 3, c0] = s30
            out[k0 + 3, c0 + 1] = s31
            out[k0 + 3, c0 + 2] = s32
            out[k0 + 3, c0 + 3] = s33
    for k in range(Kd):
        a = _U(k) * P
        for co in range(C4 if k < K4 else 0, Co):
            b = _U(co) * Pz
            acc = zero
            for p in range(uL):
                acc += cf[a + p] * zf[b + p]
            out[k, co] = acc


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
def batchnorm_normalize(x, a, c, act, y):
    """x, y (B, C, S); a, c (C,) in x's dtype: y = act(x·a + c), one fused pass (a = weight·rstd,
    c = bias - mean·a: the normalisation folded into one multiply-add). act: identity, relu, tanh or
    sigmoid (their derivative is taken from y)."""
    B, C, S = x.shape
    for bi in range(B):
        for ch in range(C):
            ac = a[ch]
            cc = c[ch]
            if act == RELU:
                for k in range(S):
                    v = x[bi, ch, k] * ac + cc
                    y[bi, ch, k] = v if v > 0 else 0
            elif act == TANH:
                for k in range(S):
                    y[bi, ch, k] = math.tanh(x[bi, ch, k] * ac + cc)
            elif act == SIGMOID:
                for k in range(S):
                    y[bi, ch, k] = 1 / (1 + math.exp(-(x[bi, ch, k] * ac + cc)))
            else:
                for k in range(S):
                    y[bi, ch, k] = x[bi, ch, k] * ac + cc


@njit(cache=True)
def batchnorm_backward_sums(dy, x, mean, sums):
    """dy, x (B, C, S); mean (C,) float64 -> sums (2, C) float64: [sum dy, sum dy·(x - mean)] over (B, S),
    summable over ranks (times rstd, the second is sum dy·xhat: the weight's gradient; the first is the
    bias's). xhat is never stored: it is recomputed from x here and in batchnorm_backward_apply."""
    B, C, S = dy.shape
    for ch in range(C):
        m = mean[ch]
        s = 0.0
        q = 0.0
        for b in range(B):
            for k in range(S):
                g = np.float64(dy[b, ch, k])
                s += g
                q += g * (x[b, ch, k] - m)
        sums[0, ch] = s
        sums[1, ch] = q


@njit(cache=True)
def batchnorm_backward_apply(dy, x, a, b, c, dx):
    """dx (B, C, S) := a·dy + b·x + c per channel (a, b, c (C,) in x's dtype): the batch-norm input
    gradient w·rstd·(dy - sum dy/n - xhat·sum dy·xhat/n) with xhat = (x - mean)·rstd expanded."""
    B, C, S = dy.shape
    for bi in range(B):
        for ch in range(C):
            ac = a[ch]
            bc = b[ch]
            cc = c[ch]
            for k in range(S):
                dx[bi, ch, k] = ac * dy[bi, ch, k] + bc * x[bi, ch, k] + cc


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
