"""The optimizer and clipping kernels of `optim_cpu`, as numba.cuda kernels with the same contract.

Arrays are CUDA device arrays (params, grads, state: float32[n]; pieces: int64; scratch: float64),
updated in place; the public wrappers have the same names and signatures as in `optim_cpu`. The
per-element math is `optim_cpu`'s own `_<name>_elem` functions compiled as device functions, so a CUDA
step computes what a CPU step computes (up to FMA contraction and reduction order).
Elementwise kernels use grid-stride loops; reductions are per block in shared memory, then a second
one-block pass (deterministic: no atomics). lars/lamb: one block per piece, one thread per segment
for the trust ratios, so nothing leaves the device during a step; only the clipping sums return to the
host, as the caller needs them there.
Importing this module needs numba.cuda (a GPU, or NUMBA_ENABLE_CUDASIM=1 set before numba is imported);
the CPU path never imports it.
"""
from __future__ import annotations

import math

import numba
import numpy as np
from numba import cuda, float64

from . import optim_cpu as _cpu

F32 = np.float32
# Threads per block: a power of two (the shared-memory reductions halve it). The simulator runs each
# thread as a Python thread and each block costs tens of ms, so there it gets few, small blocks
# (grid-stride loops make any grid size correct).
_SIM = bool(numba.config.ENABLE_CUDASIM)
THREADS = 32 if _SIM else 256
MAX_BLOCKS = 4 if _SIM else 4096
REDUCE_BLOCKS = 4 if _SIM else 1024

_dev = cuda.jit(device=True)
_sgd_e = _dev(_cpu._sgd_elem)
_adagrad_e = _dev(_cpu._adagrad_elem)
_rmsprop_e = _dev(_cpu._rmsprop_elem)
_adadelta_e = _dev(_cpu._adadelta_elem)
_adam_e = _dev(_cpu._adam_elem)
_adamax_e = _dev(_cpu._adamax_elem)
_nadam_e = _dev(_cpu._nadam_elem)
_lars_e = _dev(_cpu._lars_elem)
_lamb_moments_e = _dev(_cpu._lamb_moments_elem)
_lamb_update_e = _dev(_cpu._lamb_update_elem)
_lars_coef_e = _dev(_cpu._lars_coef_seg)
_lamb_coef_e = _dev(_cpu._lamb_coef_seg)


def _grid(n: int) -> tuple[int, int]:
    return max(1, min((n + THREADS - 1) // THREADS, MAX_BLOCKS)), THREADS


# ---------------------------------------------------------------------------------------------
# Elementwise optimizer kernels (grid-stride loops over n).

@cuda.jit
def _sgd_kernel(params, grads, buf, lr, weight_decay, momentum, one_minus_dampening, nesterov, first):
    for i in range(cuda.grid(1), params.size, cuda.gridsize(1)):
        _sgd_e(i, params, grads, buf, lr, weight_decay, momentum, one_minus_dampening, nesterov, first)


@cuda.jit
def _adagrad_kernel(params, grads, state_sum, clr, weight_decay, eps):
    for i in range(cuda.grid(1), params.size, cuda.gridsize(1)):
        _adagrad_e(i, params, grads, state_sum, clr, weight_decay, eps)


@cuda.jit
def _rmsprop_kernel(params, grads, square_avg, grad_avg, momentum_buffer, lr, alpha, one_minus_alpha, eps,
                    weight_decay, momentum, centered):
    for i in range(cuda.grid(1), params.size, cuda.gridsize(1)):
        _rmsprop_e(i, params, grads, square_avg, grad_avg, momentum_buffer, lr, alpha, one_minus_alpha, eps,
                   weight_decay, momentum, centered)


@cuda.jit
def _adadelta_kernel(params, grads, square_avg, acc_delta, lr, rho, one_minus_rho, eps, weight_decay):
    for i in range(cuda.grid(1), params.size, cuda.gridsize(1)):
        _adadelta_e(i, params, grads, square_avg, acc_delta, lr, rho, one_minus_rho, eps, weight_decay)


@cuda.jit
def _adam_kernel(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, step_size, beta1_weight, beta2,
                 one_minus_beta2, bias_correction2_sqrt, eps, weight_decay, decay_factor, amsgrad):
    for i in range(cuda.grid(1), params.size, cuda.gridsize(1)):
        _adam_e(i, params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, step_size, beta1_weight, beta2,
                one_minus_beta2, bias_correction2_sqrt, eps, weight_decay, decay_factor, amsgrad)


@cuda.jit
def _adamax_kernel(params, grads, exp_avg, exp_inf, clr, beta1_weight, beta2, eps, weight_decay):
    for i in range(cuda.grid(1), params.size, cuda.gridsize(1)):
        _adamax_e(i, params, grads, exp_avg, exp_inf, clr, beta1_weight, beta2, eps, weight_decay)


@cuda.jit
def _nadam_kernel(params, grads, exp_avg, exp_avg_sq, coef_grad, coef_avg, beta1_weight, beta2,
                  one_minus_beta2, bias_correction2, eps, weight_decay):
    for i in range(cuda.grid(1), params.size, cuda.gridsize(1)):
        _nadam_e(i, params, grads, exp_avg, exp_avg_sq, coef_grad, coef_avg, beta1_weight, beta2,
                 one_minus_beta2, bias_correction2, eps, weight_decay)


# ---------------------------------------------------------------------------------------------
# Block reductions. Each thread holds two float64 partial sums; the block halves them in shared memory.

@cuda.jit(device=True)
def _block_sum2(a, b):
    sa = cuda.shared.array(THREADS, float64)
    sb = cuda.shared.array(THREADS, float64)
    tid = cuda.threadIdx.x
    sa[tid] = a
    sb[tid] = b
    cuda.syncthreads()
    half = THREADS // 2
    while half > 0:
        if tid < half:
            sa[tid] += sa[tid + half]
            sb[tid] += sb[tid + half]
        cuda.syncthreads()
        half //= 2
    return sa[0], sb[0]


@cuda.jit
def _piece_sq_kernel(x, y, piece_start, piece_len, piece_sq):
    # One block per piece: piece_sq[k] = (sum x^2, sum y^2) over piece k.
    k = cuda.blockIdx.x
    a = 0.0
    b = 0.0
    start = piece_start[k]
    for i in range(start + cuda.threadIdx.x, start + piece_len[k], THREADS):
        xv = float64(x[i])
        yv = float64(y[i])
        a += xv * xv
        b += yv * yv
    a, b = _block_sum2(a, b)
    if cuda.threadIdx.x == 0:
        piece_sq[k, 0] = a
        piece_sq[k, 1] = b


@cuda.jit
def _lars_coef_kernel(piece_sq, seg_pieces, seg_coef, lr, trust_coefficient, weight_decay):
    s = cuda.grid(1)
    if s < seg_coef.size:
        _lars_coef_e(s, piece_sq, seg_pieces, seg_coef, lr, trust_coefficient, weight_decay)


@cuda.jit
def _lamb_coef_kernel(piece_sq, seg_pieces, seg_coef, lr):
    s = cuda.grid(1)
    if s < seg_coef.size:
        _lamb_coef_e(s, piece_sq, seg_pieces, seg_coef, lr)


@cuda.jit
def _lars_update_kernel(params, grads, momentum_buffer, piece_start, piece_len, piece_seg, seg_coef, momentum,
                        weight_decay):
    k = cuda.blockIdx.x
    coef = F32(seg_coef[piece_seg[k]])
    start = piece_start[k]
    for i in range(start + cuda.threadIdx.x, start + piece_len[k], THREADS):
        _lars_e(i, params, grads, momentum_buffer, coef, momentum, weight_decay)


@cuda.jit
def _lamb_moments_kernel(params, grads, exp_avg, exp_avg_sq, piece_start, piece_len, piece_sq, beta1,
                         one_minus_beta1, beta2, one_minus_beta2, inv_bias_correction1, bias_correction2, eps,
                         weight_decay):
    k = cuda.blockIdx.x
    a = 0.0
    b = 0.0
    start = piece_start[k]
    for i in range(start + cuda.threadIdx.x, start + piece_len[k], THREADS):
        u = float64(_lamb_moments_e(i, params, grads, exp_avg, exp_avg_sq, beta1, one_minus_beta1, beta2,
                                    one_minus_beta2, inv_bias_correction1, bias_correction2, eps, weight_decay))
        pv = float64(params[i])
        a += pv * pv
        b += u * u
    a, b = _block_sum2(a, b)
    if cuda.threadIdx.x == 0:
        piece_sq[k, 0] = a
        piece_sq[k, 1] = b


@cuda.jit
def _lamb_update_kernel(params, exp_avg, exp_avg_sq, piece_start, piece_len, piece_seg, seg_coef,
                        inv_bias_correction1, bias_correction2, eps, weight_decay):
    k = cuda.blockIdx.x
    coef = F32(seg_coef[piece_seg[k]])
    start = piece_start[k]
    for i in range(start + cuda.threadIdx.x, start + piece_len[k], THREADS):
        _lamb_update_e(i, params, exp_avg, exp_avg_sq, coef, inv_bias_correction1, bias_correction2, eps,
                       weight_decay)


@cuda.jit
def _sum_sq_partial_kernel(x, clip_value, partial):
    # partial[block] = (sum x^2, sum clamp(x, -v, v)^2) over this block's grid-stride share.
    a = 0.0
    b = 0.0
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        v = float64(x[i])
        w = float64(min(max(x[i], -clip_value), clip_value))
        a += v * v
        b += w * w
    a, b = _block_sum2(a, b)
    if cuda.threadIdx.x == 0:
        partial[cuda.blockIdx.x, 0] = a
        partial[cuda.blockIdx.x, 1] = b


@cuda.jit
def _sum_partial_kernel(partial, out):
    # One block: out = column sums of partial [blocks, 2].
    a = 0.0
    b = 0.0
    for k in range(cuda.threadIdx.x, partial.shape[0], THREADS):
        a += partial[k, 0]
        b += partial[k, 1]
    a, b = _block_sum2(a, b)
    if cuda.threadIdx.x == 0:
        out[0] = a
        out[1] = b


@cuda.jit
def _clip_scale_kernel(x, clip_value, scale):
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        x[i] = min(max(x[i], -clip_value), clip_value) * scale


# ---------------------------------------------------------------------------------------------
# Launch wrappers: same names and signatures as optim_cpu's.

def sgd_step(params, grads, momentum_buffer, lr, weight_decay, momentum, dampening, nesterov, first):
    _sgd_kernel[_grid(params.size)](params, grads, momentum_buffer, F32(lr), F32(weight_decay), F32(momentum),
                                    F32(1.0 - dampening), bool(nesterov), bool(first))


def adagrad_step(params, grads, state_sum, lr, weight_decay, eps, lr_decay, t):
    clr = lr / (1.0 + (t - 1) * lr_decay)
    _adagrad_kernel[_grid(params.size)](params, grads, state_sum, F32(clr), F32(weight_decay), F32(eps))


def rmsprop_step(params, grads, square_avg, grad_avg, momentum_buffer, lr, alpha, eps, weight_decay, momentum,
                 centered):
    _rmsprop_kernel[_grid(params.size)](params, grads, square_avg, grad_avg, momentum_buffer, F32(lr), F32(alpha),
                                        F32(1.0 - alpha), F32(eps), F32(weight_decay), F32(momentum),
                                        bool(centered))


def adadelta_step(params, grads, square_avg, acc_delta, lr, rho, eps, weight_decay):
    _adadelta_kernel[_grid(params.size)](params, grads, square_avg, acc_delta, F32(lr), F32(rho), F32(1.0 - rho),
                                         F32(eps), F32(weight_decay))


def adam_step(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, lr, beta1, beta2, eps, weight_decay, amsgrad,
              decoupled, t):
    step_size = lr / (1.0 - beta1 ** t)
    bc2_sqrt = math.sqrt(1.0 - beta2 ** t)
    decay_factor = 1.0 - lr * weight_decay if decoupled else 1.0
    l2 = 0.0 if decoupled else weight_decay
    _adam_kernel[_grid(params.size)](params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, F32(step_size),
                                     F32(1.0 - beta1), F32(beta2), F32(1.0 - beta2), F32(bc2_sqrt), F32(eps),
                                     F32(l2), F32(decay_factor), bool(amsgrad))


def adamax_step(params, grads, exp_avg, exp_inf, lr, beta1, beta2, eps, weight_decay, t):
    clr = lr / (1.0 - beta1 ** t)
    _adamax_kernel[_grid(params.size)](params, grads, exp_avg, exp_inf, F32(clr), F32(1.0 - beta1), F32(beta2),
                                       F32(eps), F32(weight_decay))


def nadam_step(params, grads, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, momentum_decay, t,
               mu_product):
    mu = beta1 * (1.0 - 0.5 * 0.96 ** (t * momentum_decay))
    mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * momentum_decay))
    coef_grad = lr * (1.0 - mu) / (1.0 - mu_product)
    coef_avg = (lr * mu_next) / (1.0 - mu_product * mu_next)
    _nadam_kernel[_grid(params.size)](params, grads, exp_avg, exp_avg_sq, F32(coef_grad), F32(coef_avg),
                                      F32(1.0 - beta1), F32(beta2), F32(1.0 - beta2), F32(1.0 - beta2 ** t),
                                      F32(eps), F32(weight_decay))


def lars_step(params, grads, momentum_buffer, pieces, piece_sq, seg_coef, lr, momentum, weight_decay,
              trust_coefficient):
    piece_start, piece_len, piece_seg, seg_pieces = pieces
    n_pieces, n_seg = piece_start.size, seg_coef.size
    _piece_sq_kernel[n_pieces, THREADS](params, grads, piece_start, piece_len, piece_sq)
    _lars_coef_kernel[(n_seg + THREADS - 1) // THREADS, THREADS](piece_sq, seg_pieces, seg_coef, float(lr),
                                                                 float(trust_coefficient), float(weight_decay))
    _lars_update_kernel[n_pieces, THREADS](params, grads, momentum_buffer, piece_start, piece_len, piece_seg,
                                           seg_coef, F32(momentum), F32(weight_decay))


def lamb_step(params, grads, exp_avg, exp_avg_sq, pieces, piece_sq, seg_coef, lr, beta1, beta2, eps, weight_decay, t):
    piece_start, piece_len, piece_seg, seg_pieces = pieces
    n_pieces, n_seg = piece_start.size, seg_coef.size
    inv_bc1 = F32(1.0 / (1.0 - beta1 ** t))
    bc2 = F32(1.0 - beta2 ** t)
    _lamb_moments_kernel[n_pieces, THREADS](params, grads, exp_avg, exp_avg_sq, piece_start, piece_len, piece_sq,
                                            F32(beta1), F32(1.0 - beta1), F32(beta2), F32(1.0 - beta2), inv_bc1,
                                            bc2, F32(eps), F32(weight_decay))
    _lamb_coef_kernel[(n_seg + THREADS - 1) // THREADS, THREADS](piece_sq, seg_pieces, seg_coef, float(lr))
    _lamb_update_kernel[n_pieces, THREADS](params, exp_avg, exp_avg_sq, piece_start, piece_len, piece_seg,
                                           seg_coef, inv_bc1, bc2, F32(eps), F32(weight_decay))


def sum_sq_clipped(x, clip_value) -> tuple[float, float]:
    blocks = max(1, min((x.size + THREADS - 1) // THREADS, REDUCE_BLOCKS))
    partial = cuda.device_array((blocks, 2), dtype=np.float64)
    out = cuda.device_array(2, dtype=np.float64)
    _sum_sq_partial_kernel[blocks, THREADS](x, F32(clip_value), partial)
    _sum_partial_kernel[1, THREADS](partial, out)
    s, c = out.copy_to_host()
    return float(s), float(c)


def sum_sq(x) -> float:
    return sum_sq_clipped(x, math.inf)[0]


def clip_scale(x, clip_value, scale):
    _clip_scale_kernel[_grid(x.size)](x, F32(clip_value), F32(scale))
