"""Fused optimizer and gradient-clipping kernels over flat float32 buffers (CPU, Numba).

Every optimizer is ONE parallel pass over memory that reads each element of params, grads and the
state arrays once and writes params and state once, in place, with no temporaries. lars/lamb need
per-layer norms first, so they make a reduction pass over "pieces" (contiguous chunks of one segment),
then the update pass.

The per-element math lives in plain Python functions (`_<name>_elem`); this module compiles them with
`njit` and loops over them with `prange`, and `optim_cuda` compiles the very same functions as CUDA
device functions, so the two back ends cannot drift apart.

Precision: all element math is float32, like torch.optim's CPU kernels. Callers pass every scalar as
`np.float32` (the public wrappers below do the casting): a Python float would make Numba compute in
float64 and compile a second specialisation. Reductions accumulate in float64.
fastmath, per kernel: the elementwise kernels are strict IEEE, never `contract` (FMA): whether LLVM
fuses a multiply-add depends on whether a helper was inlined, which differs between a fresh compile and
code loaded from Numba's cache, and a resumed run must be bitwise equal to the uninterrupted one (it
was not, with FMA in sgd). (AdamW shows the cost of contracting: `p * (1 - lr*wd)` fused into the next
subtraction skips a rounding that torch makes, and the difference drifts the same way every step.)
Reductions allow `reassoc` (and `contract`) so the sum vectorises; they feed norms (clipping, lars/lamb
trust ratios) computed in one function each, so fresh and cached code agree.
No kernel lets LLVM assume finite values, so NaN/inf propagate and are detected. These choices keep
200-step trajectories within a few float32 ulp of torch's (tested at rtol 1e-5); memory-bound kernels
run at the same speed either way.
Wrappers return nothing; arrays are updated in place. Shapes: n = number of parameters.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

_ELEM = dict(error_model="numpy", cache=True)                           # strict IEEE float32
_REDUCE = dict(fastmath={"contract", "reassoc"}, error_model="numpy", cache=True)

F32 = np.float32


# ---------------------------------------------------------------------------------------------
# Per-element update rules, shared with optim_cuda. `i` is the element index. Comments give torch's
# op order where it matters for float32 rounding (grad.add(param, alpha=wd) is g + wd*p, etc.).

def _sgd_elem(i, params, grads, buf, lr, weight_decay, momentum, one_minus_dampening, nesterov, first):
    p = params[i]
    g = grads[i]
    if weight_decay != 0:
        g = g + weight_decay * p
    if momentum != 0:
        if first:
            b = g                                   # torch: buf = grad.clone() on the first step
        else:
            b = buf[i] * momentum + one_minus_dampening * g
        buf[i] = b
        if nesterov:
            g = g + momentum * b
        else:
            g = b
    params[i] = p - lr * g


def _adagrad_elem(i, params, grads, state_sum, clr, weight_decay, eps):
    p = params[i]
    g = grads[i]
    if weight_decay != 0:
        g = g + weight_decay * p
    s = state_sum[i] + g * g
    state_sum[i] = s
    params[i] = p - (clr * g) / (math.sqrt(s) + eps)


def _rmsprop_elem(i, params, grads, square_avg, grad_avg, momentum_buffer, lr, alpha, one_minus_alpha,
                  eps, weight_decay, momentum, centered):
    p = params[i]
    g = grads[i]
    if weight_decay != 0:
        g = g + weight_decay * p
    sa = square_avg[i] * alpha + one_minus_alpha * g * g
    square_avg[i] = sa
    if centered:
        ga = grad_avg[i]
        ga = ga + one_minus_alpha * (g - ga)        # torch: grad_avg.lerp_(grad, 1 - alpha)
        grad_avg[i] = ga
        avg = math.sqrt(sa - ga * ga) + eps
    else:
        avg = math.sqrt(sa) + eps
    if momentum > 0:
        b = momentum_buffer[i] * momentum + g / avg
        momentum_buffer[i] = b
        params[i] = p - lr * b
    else:
        params[i] = p - (lr * g) / avg


def _adadelta_elem(i, params, grads, square_avg, acc_delta, lr, rho, one_minus_rho, eps, weight_decay):
    p = params[i]
    g = grads[i]
    if weight_decay != 0:
        g = g + weight_decay * p
    sa = square_avg[i] * rho + one_minus_rho * g * g
    square_avg[i] = sa
    ad = acc_delta[i]
    delta = math.sqrt(ad + eps) / math.sqrt(sa + eps) * g
    acc_delta[i] = ad * rho + one_minus_rho * delta * delta
    params[i] = p - lr * delta


def _adam_elem(i, params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, step_size, beta1_weight, beta2,
               one_minus_beta2, bias_correction2_sqrt, eps, weight_decay, decay_factor, amsgrad):
    # beta1_weight = 1 - beta1; decay_factor = 1 - lr*weight_decay for adamw (decoupled), else 1.
    p = params[i] * decay_factor
    g = grads[i]
    if weight_decay != 0:
        g = g + weight_decay * p
    m = exp_avg[i]
    m = m + beta1_weight * (g - m)                  # torch: exp_avg.lerp_(grad, 1 - beta1)
    exp_avg[i] = m
    v = exp_avg_sq[i] * beta2 + one_minus_beta2 * g * g
    exp_avg_sq[i] = v
    if amsgrad:
        v = max(max_exp_avg_sq[i], v)
        max_exp_avg_sq[i] = v
    denom = math.sqrt(v) / bias_correction2_sqrt + eps
    params[i] = p - (step_size * m) / denom


def _adamax_elem(i, params, grads, exp_avg, exp_inf, clr, beta1_weight, beta2, eps, weight_decay):
    p = params[i]
    g = grads[i]
    if weight_decay != 0:
        g = g + weight_decay * p
    m = exp_avg[i]
    m = m + beta1_weight * (g - m)
    exp_avg[i] = m
    u = max(exp_inf[i] * beta2, abs(g) + eps)
    exp_inf[i] = u
    params[i] = p - (clr * m) / u


def _nadam_elem(i, params, grads, exp_avg, exp_avg_sq, coef_grad, coef_avg, beta1_weight, beta2,
                one_minus_beta2, bias_correction2, eps, weight_decay):
    # coef_grad = lr*(1-mu_t)/(1-prod mu_1..t), coef_avg = lr*mu_{t+1}/(1-prod mu_1..t+1).
    p = params[i]
    g = grads[i]
    if weight_decay != 0:
        g = g + weight_decay * p
    m = exp_avg[i]
    m = m + beta1_weight * (g - m)
    exp_avg[i] = m
    v = exp_avg_sq[i] * beta2 + one_minus_beta2 * g * g
    exp_avg_sq[i] = v
    denom = math.sqrt(v / bias_correction2) + eps
    p = p - (coef_grad * g) / denom                 # torch: two addcdiv_ in this order
    params[i] = p - (coef_avg * m) / denom


def _lars_elem(i, params, grads, momentum_buffer, coef, momentum, weight_decay):
    # coef = lr * local_lr of this element's segment.
    p = params[i]
    b = momentum * momentum_buffer[i] + coef * (grads[i] + weight_decay * p)
    momentum_buffer[i] = b
    params[i] = p - b


def _lamb_moments_elem(i, params, grads, exp_avg, exp_avg_sq, beta1, one_minus_beta1, beta2, one_minus_beta2,
                      inv_bias_correction1, bias_correction2, eps, weight_decay):
    # Updates m, v and returns u = r + wd*x, r = m_hat / (sqrt(v_hat) + eps): the layer's direction.
    g = grads[i]
    m = beta1 * exp_avg[i] + one_minus_beta1 * g
    v = beta2 * exp_avg_sq[i] + one_minus_beta2 * g * g
    exp_avg[i] = m
    exp_avg_sq[i] = v
    return (m * inv_bias_correction1) / (math.sqrt(v / bias_correction2) + eps) + weight_decay * params[i]


def _lamb_update_elem(i, params, exp_avg, exp_avg_sq, coef, inv_bias_correction1, bias_correction2, eps,
                      weight_decay):
    # x -= lr*ratio * u, with u recomputed from the stored m, v (same expression as above).
    p = params[i]
    u = (exp_avg[i] * inv_bias_correction1) / (math.sqrt(exp_avg_sq[i] / bias_correction2) + eps) + weight_decay * p
    params[i] = p - coef * u


# ---------------------------------------------------------------------------------------------
# Compiled elementwise helpers and the parallel loops over them.

_sgd_e = njit(**_ELEM)(_sgd_elem)
_adagrad_e = njit(**_ELEM)(_adagrad_elem)
_rmsprop_e = njit(**_ELEM)(_rmsprop_elem)
_adadelta_e = njit(**_ELEM)(_adadelta_elem)
_adam_e = njit(**_ELEM)(_adam_elem)
_adamax_e = njit(**_ELEM)(_adamax_elem)
_nadam_e = njit(**_ELEM)(_nadam_elem)
_lars_e = njit(**_ELEM)(_lars_elem)
_lamb_moments_e = njit(**_ELEM)(_lamb_moments_elem)
_lamb_update_e = njit(**_ELEM)(_lamb_update_elem)


@njit(parallel=True, **_ELEM)
def _sgd_kernel(params, grads, buf, lr, weight_decay, momentum, one_minus_dampening, nesterov, first):
    for i in prange(params.size):
        _sgd_e(i, params, grads, buf, lr, weight_decay, momentum, one_minus_dampening, nesterov, first)


@njit(parallel=True, **_ELEM)
def _adagrad_kernel(params, grads, state_sum, clr, weight_decay, eps):
    for i in prange(params.size):
        _adagrad_e(i, params, grads, state_sum, clr, weight_decay, eps)


@njit(parallel=True, **_ELEM)
def _rmsprop_kernel(params, grads, square_avg, grad_avg, momentum_buffer, lr, alpha, one_minus_alpha, eps,
                    weight_decay, momentum, centered):
    for i in prange(params.size):
        _rmsprop_e(i, params, grads, square_avg, grad_avg, momentum_buffer, lr, alpha, one_minus_alpha, eps,
                   weight_decay, momentum, centered)


@njit(parallel=True, **_ELEM)
def _adadelta_kernel(params, grads, square_avg, acc_delta, lr, rho, one_minus_rho, eps, weight_decay):
    for i in prange(params.size):
        _adadelta_e(i, params, grads, square_avg, acc_delta, lr, rho, one_minus_rho, eps, weight_decay)


@njit(parallel=True, **_ELEM)
def _adam_kernel(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, step_size, beta1_weight, beta2,
                 one_minus_beta2, bias_correction2_sqrt, eps, weight_decay, decay_factor, amsgrad):
    for i in prange(params.size):
        _adam_e(i, params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, step_size, beta1_weight, beta2,
                one_minus_beta2, bias_correction2_sqrt, eps, weight_decay, decay_factor, amsgrad)


@njit(parallel=True, **_ELEM)
def _adamax_kernel(params, grads, exp_avg, exp_inf, clr, beta1_weight, beta2, eps, weight_decay):
    for i in prange(params.size):
        _adamax_e(i, params, grads, exp_avg, exp_inf, clr, beta1_weight, beta2, eps, weight_decay)


@njit(parallel=True, **_ELEM)
def _nadam_kernel(params, grads, exp_avg, exp_avg_sq, coef_grad, coef_avg, beta1_weight, beta2,
                  one_minus_beta2, bias_correction2, eps, weight_decay):
    for i in prange(params.size):
        _nadam_e(i, params, grads, exp_avg, exp_avg_sq, coef_grad, coef_avg, beta1_weight, beta2,
                 one_minus_beta2, bias_correction2, eps, weight_decay)


# ---------------------------------------------------------------------------------------------
# Layer-wise (lars/lamb) kernels over pieces. A piece is a contiguous chunk of ONE segment:
# piece_start, piece_len, piece_seg: int64[n_pieces]; the pieces of segment s are
# seg_pieces[s]:seg_pieces[s+1] (CSR, int64[n_seg+1]). piece_sq: float64[n_pieces, 2] partial sums.
# Inner loops run over slices from 0: with `range(start, stop)` Numba cannot prove the index is
# non-negative, keeps its negative-index wraparound and the loop does not vectorise (4x slower).

@njit(parallel=True, **_REDUCE)
def _piece_sq_kernel(x, y, piece_start, piece_len, piece_sq):
    for k in prange(piece_start.size):
        xs = x[piece_start[k]:piece_start[k] + piece_len[k]]
        ys = y[piece_start[k]:piece_start[k] + piece_len[k]]
        a = 0.0
        b = 0.0
        for i in range(xs.size):
            xv = np.float64(xs[i])
            yv = np.float64(ys[i])
            a += xv * xv
            b += yv * yv
        piece_sq[k, 0] = a
        piece_sq[k, 1] = b


def _lars_coef_seg(s, piece_sq, seg_pieces, seg_coef, lr, trust_coefficient, weight_decay):
    # You et al. 2017: local_lr = eta*||w|| / (||g|| + beta*||w||); 1 where either norm is 0. float64,
    # summing segment s's pieces in piece order (the CUDA twin sums in the same order).
    w2 = 0.0
    g2 = 0.0
    for k in range(seg_pieces[s], seg_pieces[s + 1]):
        w2 += piece_sq[k, 0]
        g2 += piece_sq[k, 1]
    w = math.sqrt(w2)
    g = math.sqrt(g2)
    ratio = 1.0
    if w > 0.0 and g > 0.0:
        ratio = trust_coefficient * w / (g + weight_decay * w)
    seg_coef[s] = lr * ratio


def _lamb_coef_seg(s, piece_sq, seg_pieces, seg_coef, lr):
    # You et al. 2019: ratio = phi(||x||) / ||r + lambda*x||, phi = identity; 1 where either norm is 0.
    x2 = 0.0
    u2 = 0.0
    for k in range(seg_pieces[s], seg_pieces[s + 1]):
        x2 += piece_sq[k, 0]
        u2 += piece_sq[k, 1]
    x = math.sqrt(x2)
    u = math.sqrt(u2)
    ratio = 1.0
    if x > 0.0 and u > 0.0:
        ratio = x / u
    seg_coef[s] = lr * ratio


_lars_coef_e = njit(**_ELEM)(_lars_coef_seg)
_lamb_coef_e = njit(**_ELEM)(_lamb_coef_seg)


@njit(**_ELEM)
def _lars_coef_kernel(piece_sq, seg_pieces, seg_coef, lr, trust_coefficient, weight_decay):
    for s in range(seg_coef.size):
        _lars_coef_e(s, piece_sq, seg_pieces, seg_coef, lr, trust_coefficient, weight_decay)


@njit(**_ELEM)
def _lamb_coef_kernel(piece_sq, seg_pieces, seg_coef, lr):
    for s in range(seg_coef.size):
        _lamb_coef_e(s, piece_sq, seg_pieces, seg_coef, lr)


@njit(parallel=True, **_ELEM)
def _lars_update_kernel(params, grads, momentum_buffer, piece_start, piece_len, piece_seg, seg_coef, momentum,
                        weight_decay):
    for k in prange(piece_start.size):
        lo, hi = piece_start[k], piece_start[k] + piece_len[k]
        ps, gs, bs = params[lo:hi], grads[lo:hi], momentum_buffer[lo:hi]
        coef = np.float32(seg_coef[piece_seg[k]])
        for i in range(ps.size):
            _lars_e(i, ps, gs, bs, coef, momentum, weight_decay)


@njit(parallel=True, **_REDUCE)
def _lamb_moments_kernel(params, grads, exp_avg, exp_avg_sq, piece_start, piece_len, piece_sq, beta1, one_minus_beta1,
                         beta2, one_minus_beta2, inv_bias_correction1, bias_correction2, eps, weight_decay):
    # Pass 1: update m, v; accumulate per piece sum(x^2) and sum(u^2), u = r + wd*x (not stored).
    for k in prange(piece_start.size):
        lo, hi = piece_start[k], piece_start[k] + piece_len[k]
        ps, gs, ms, vs = params[lo:hi], grads[lo:hi], exp_avg[lo:hi], exp_avg_sq[lo:hi]
        a = 0.0
        b = 0.0
        for i in range(ps.size):
            u = np.float64(_lamb_moments_e(i, ps, gs, ms, vs, beta1, one_minus_beta1, beta2, one_minus_beta2,
                                           inv_bias_correction1, bias_correction2, eps, weight_decay))
            pv = np.float64(ps[i])
            a += pv * pv
            b += u * u
        piece_sq[k, 0] = a
        piece_sq[k, 1] = b


@njit(parallel=True, **_ELEM)
def _lamb_update_kernel(params, exp_avg, exp_avg_sq, piece_start, piece_len, piece_seg, seg_coef,
                        inv_bias_correction1, bias_correction2, eps, weight_decay):
    # Pass 2: x -= lr * ratio(segment) * u, u recomputed from the stored m, v.
    for k in prange(piece_start.size):
        lo, hi = piece_start[k], piece_start[k] + piece_len[k]
        ps, ms, vs = params[lo:hi], exp_avg[lo:hi], exp_avg_sq[lo:hi]
        coef = np.float32(seg_coef[piece_seg[k]])
        for i in range(ps.size):
            _lamb_update_e(i, ps, ms, vs, coef, inv_bias_correction1, bias_correction2, eps, weight_decay)


# ---------------------------------------------------------------------------------------------
# Clipping: reductions (float64 accumulators: a non-finite element makes the sum inf/nan, and no
# finite float32 can overflow a float64 square) and the elementwise clip/scale pass.

@njit(parallel=True, **_REDUCE)
def _sum_sq_kernel(x):
    s = 0.0
    for i in prange(x.size):
        v = np.float64(x[i])
        s += v * v
    return s


@njit(parallel=True, **_REDUCE)
def _sum_sq_clipped_kernel(x, clip_value):
    s = 0.0
    c = 0.0
    for i in prange(x.size):
        v = np.float64(x[i])
        s += v * v
        w = np.float64(min(max(x[i], -clip_value), clip_value))
        c += w * w
    return s, c


@njit(parallel=True, **_ELEM)
def _clip_scale_kernel(x, clip_value, scale):
    for i in prange(x.size):
        x[i] = min(max(x[i], -clip_value), clip_value) * scale


# ---------------------------------------------------------------------------------------------
# Public wrappers (same names and signatures in optim_cuda). Hyperparameters arrive as Python
# numbers; derived per-step scalars are computed here in float64 and rounded to float32 once,
# as torch does when it passes a Python scalar to a float32 kernel.

def sgd_step(params, grads, momentum_buffer, lr, weight_decay, momentum, dampening, nesterov, first):
    """p -= lr * (heavy-ball / nesterov direction of g + wd*p). momentum_buffer: [n], or [1] if momentum == 0."""
    _sgd_kernel(params, grads, momentum_buffer, F32(lr), F32(weight_decay), F32(momentum), F32(1.0 - dampening),
                bool(nesterov), bool(first))


def adagrad_step(params, grads, state_sum, lr, weight_decay, eps, lr_decay, t):
    clr = lr / (1.0 + (t - 1) * lr_decay)
    _adagrad_kernel(params, grads, state_sum, F32(clr), F32(weight_decay), F32(eps))


def rmsprop_step(params, grads, square_avg, grad_avg, momentum_buffer, lr, alpha, eps, weight_decay, momentum,
                 centered):
    """grad_avg / momentum_buffer: [n], or [1] placeholders when centered / momentum are off."""
    _rmsprop_kernel(params, grads, square_avg, grad_avg, momentum_buffer, F32(lr), F32(alpha), F32(1.0 - alpha),
                    F32(eps), F32(weight_decay), F32(momentum), bool(centered))


def adadelta_step(params, grads, square_avg, acc_delta, lr, rho, eps, weight_decay):
    _adadelta_kernel(params, grads, square_avg, acc_delta, F32(lr), F32(rho), F32(1.0 - rho), F32(eps),
                     F32(weight_decay))


def adam_step(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, lr, beta1, beta2, eps, weight_decay, amsgrad,
              decoupled, t):
    """Adam (L2 weight decay) or AdamW (decoupled=True). max_exp_avg_sq: [n], or [1] if not amsgrad."""
    step_size = lr / (1.0 - beta1 ** t)
    bc2_sqrt = math.sqrt(1.0 - beta2 ** t)
    decay_factor = 1.0 - lr * weight_decay if decoupled else 1.0
    l2 = 0.0 if decoupled else weight_decay
    _adam_kernel(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, F32(step_size), F32(1.0 - beta1), F32(beta2),
                 F32(1.0 - beta2), F32(bc2_sqrt), F32(eps), F32(l2), F32(decay_factor), bool(amsgrad))


def adamax_step(params, grads, exp_avg, exp_inf, lr, beta1, beta2, eps, weight_decay, t):
    clr = lr / (1.0 - beta1 ** t)
    _adamax_kernel(params, grads, exp_avg, exp_inf, F32(clr), F32(1.0 - beta1), F32(beta2), F32(eps),
                   F32(weight_decay))


def nadam_step(params, grads, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, momentum_decay, t,
               mu_product):
    """mu_product = mu_1 * ... * mu_t, kept by the caller (see optim.adam.nadam_mu_product)."""
    mu = beta1 * (1.0 - 0.5 * 0.96 ** (t * momentum_decay))
    mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * momentum_decay))
    coef_grad = lr * (1.0 - mu) / (1.0 - mu_product)
    coef_avg = (lr * mu_next) / (1.0 - mu_product * mu_next)
    _nadam_kernel(params, grads, exp_avg, exp_avg_sq, F32(coef_grad), F32(coef_avg), F32(1.0 - beta1), F32(beta2),
                  F32(1.0 - beta2), F32(1.0 - beta2 ** t), F32(eps), F32(weight_decay))


def lars_step(params, grads, momentum_buffer, pieces, piece_sq, seg_coef, lr, momentum, weight_decay,
              trust_coefficient):
    """pieces = (piece_start, piece_len, piece_seg, seg_pieces); piece_sq [n_pieces, 2], seg_coef [n_seg] float64
    are scratch. Two passes: per-piece sum(w^2), sum(g^2); then the momentum update with each layer's lr."""
    piece_start, piece_len, piece_seg, seg_pieces = pieces
    _piece_sq_kernel(params, grads, piece_start, piece_len, piece_sq)
    _lars_coef_kernel(piece_sq, seg_pieces, seg_coef, float(lr), float(trust_coefficient), float(weight_decay))
    _lars_update_kernel(params, grads, momentum_buffer, piece_start, piece_len, piece_seg, seg_coef, F32(momentum),
                        F32(weight_decay))


def lamb_step(params, grads, exp_avg, exp_avg_sq, pieces, piece_sq, seg_coef, lr, beta1, beta2, eps, weight_decay, t):
    """Two passes: moments + per-piece sum(x^2), sum(u^2); then x -= lr * ratio * u (u recomputed)."""
    piece_start, piece_len, piece_seg, seg_pieces = pieces
    inv_bc1 = F32(1.0 / (1.0 - beta1 ** t))
    bc2 = F32(1.0 - beta2 ** t)
    _lamb_moments_kernel(params, grads, exp_avg, exp_avg_sq, piece_start, piece_len, piece_sq, F32(beta1),
                         F32(1.0 - beta1), F32(beta2), F32(1.0 - beta2), inv_bc1, bc2, F32(eps), F32(weight_decay))
    _lamb_coef_kernel(piece_sq, seg_pieces, seg_coef, float(lr))
    _lamb_update_kernel(params, exp_avg, exp_avg_sq, piece_start, piece_len, piece_seg, seg_coef, inv_bc1, bc2,
                        F32(eps), F32(weight_decay))


def sum_sq(x) -> float:
    """sum(x^2) in float64; inf or nan when any element is non-finite."""
    return float(_sum_sq_kernel(x))


def sum_sq_clipped(x, clip_value) -> tuple[float, float]:
    """(sum(x^2), sum(clamp(x, -v, v)^2)) in one read pass."""
    s, c = _sum_sq_clipped_kernel(x, F32(clip_value))
    return float(s), float(c)


def clip_scale(x, clip_value, scale):
    """x = clamp(x, -clip_value, clip_value) * scale in place; clip_value = inf: no clamp."""
    _clip_scale_kernel(x, F32(clip_value), F32(scale))
