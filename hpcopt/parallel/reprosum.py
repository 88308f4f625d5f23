"""Bitwise-reproducible reductions for data-parallel training (issue 16): the primitives.

`run.reproducible = true` asks that the parameters after every step be the same bits for any number of
data-parallel ranks (dividing the global batch), any thread count per rank and any bucket/overlap
setting. In a float32 MLP step three things break that today (measured; docs/reproducible.md):

  * BLAS.  OpenBLAS computes an element of C = A @ B as ONE in-order FMA chain over k
    (c = fma(a_k, b_k, c), k = 0..K-1, from 0) only in its blocked driver with K <= GEMM_Q (448 for
    sgemm on SkylakeX). For larger K it blocks k by rules that differ between its 1-thread and threaded
    drivers, and for small M*N*K it takes "direct"/"small-matrix" kernels whose order differs (a
    16-lane dot product). Which path runs depends on the row count and the thread count, so the same
    row of x @ W can come out different on 1, 2 or 4 ranks.
  * the cross-rank sum. Each rank's partial dW = x_r^T dy_r, summed by Allreduce: a different split of
    the rows is a different float32 sum.
  * threaded float reductions (the gradient norm's prange sum, the loss sum over ranks).

What this module defines instead:

1. `fixed_matmul(a, b)`: the FIXED-ORDER product. Every element is, by definition, the float32 FMA
   chain over k within fixed chunks of k (`k_chunks(K, kc, rule)`, a function of K alone: "balanced",
   ceil(K / kc) equal chunks, or "openblas", OpenBLAS's own one-thread k-blocking with GEMM_Q = kc),
   the chunk results added left to right in float32. A backend is used for a shape only after it was
   checked to produce exactly that (random data, edge and sampled rows and columns against the Numba
   reference `chain_matmul`; per shape, operand layouts and BLAS thread count; cached): one plain
   numpy call where OpenBLAS's blocking is the rule ("plain", free), numpy's OpenBLAS cblas_sgemm per
   chunk with beta = 1 ("cblas"), numpy per chunk ("blas", "fortran" with A in Fortran order:
   OpenBLAS's TT / NT small kernels are chains), else the Numba kernel ("numba": any thread count,
   100-300x slower; warns). So a row's result depends neither on the other rows in the call, nor on
   threads, nor on which backend ran.

2. Exact, order-independent sums in fixed point: a value v becomes the int64 q = rint(v / 2^lsb)
   with ONE lsb agreed by every rank (`agree_exponent`: MAX Allreduce of the local exponents, or derived
   from partition-independent data); integer addition is associative, so the int64 Allreduce (or a
   threaded int reduction) gives the same q whatever the order, and `from_fixed` rounds q * 2^lsb back
   once (correctly rounded to float32 outside float32's subnormal range). Overflow is excluded by
   headroom: lsb = E - 62 + ceil(log2(terms)), where |v| < 2^E for every term and `terms` bounds how
   many values are summed per element, so |sum| <= 2^62. Error: each term is rounded to the lsb grid,
   |result - exact sum| <= 0.5 ulp(result) + terms * 2^(lsb-1) <= 0.5 ulp + 2^(E-63+2 ceil(log2 terms));
   a float32 term is ON the grid (exact) when |v| >= 2^(E-39+ceil(log2 terms)): only terms more than
   2^35 (8 terms) below the largest one in the buffer are rounded at all.
   Non-finite values are never converted: the exponent agreement sees them (NONFINITE) and the sum
   falls back to a plain IEEE float Allreduce, so inf/nan propagate per element as before.
   The exponent and the summands must both be partition-independent for the result to be: per chunk
   of rows or per row (the MAX over the chunks of all ranks is the MAX over the global batch's chunks),
   never a rank's float partial sum. `allreduce_exact` (flat buffer), `exact_colsum` (db),
   `exact_sum` (float64 scalars: the loss; 3 limbs), `exact_sum_sq` (the squared norm; 2 limbs).

3. `reproducible_dense_backward(x, dy, W, comm)`: the dense layer's (dW, db, dx) bitwise equal for any
   split of the global batch's rows over `comm` (rows in rank order: rank r holds the r-th block).
     dx   per row: fixed_matmul(dy, W^T).
     dW   mode "gather" (large layers): Allgather the rows of [x | dy] (B (n_in + n_out) floats), each
          rank computes a block of dW's rows from ALL B rows with fixed_matmul (k = the global row
          index: one fixed order), Allgatherv of the blocks. No extra flops; fewer bytes than the
          Allreduce of dW when B < n_in n_out / (n_in + n_out) (512 for 1024x1024).
          mode "chunks" (small layers): fixed virtual chunks of `chunk` rows (whole chunks per rank;
          independent of the rank count), each chunk's x_c^T dy_c by fixed_matmul, converted to fixed
          point and summed exactly (int64 Allreduce). Costs one full-size conversion per chunk: cheap
          only while n_in n_out <= chunk (n_in + n_out) (`choose_mode`).
     db   exact fixed-point column sum of dy (the same bits in both modes).

Everything here is a function of the GLOBAL batch (and of `kc`, `rule`, `chunk`, the mode: settings a
job fixes): never of the rank count, the thread count or the order in which ranks or threads finish.
`python -m hpcopt.parallel.reprosum probe|accuracy|bench|bench-mpi` runs the measurements quoted in
docs/reproducible.md.
"""
from __future__ import annotations

import math
import time

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

from ..kernels.cpu import softmax_ce_rows

_K = dict(cache=True, error_model="numpy")

KC = 256                 # default k-chunk of fixed_matmul: <= OpenBLAS's sgemm GEMM_Q on x86 (256-448)
NONFINITE = 1 << 20      # exponent of a buffer holding inf or nan
EMPTY = -(1 << 20)       # exponent of a buffer of zeros
F32, F64 = np.dtype(np.float32), np.dtype(np.float64)


# ====================================================================================================
# 1. the fixed-order product
# ====================================================================================================
@intrinsic
def fma32(typingctx, a, b, c):
    """a * b + c with ONE rounding (llvm.fma: the hardware FMA, or libm's exact fma)."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        return builder.fma(*args)
    return sig, codegen


def k_chunks(K: int, kc: int = KC, rule: str = "balanced") -> np.ndarray:
    """The fixed chunks of the reduction index (their n+1 boundaries), a function of K, kc and the rule:
      "balanced"  ceil(K / kc) chunks of balanced sizes;
      "openblas"  OpenBLAS's own k-blocking in its one-thread level-3 driver with GEMM_Q = kc (unroll 16):
                  kc while 2 kc or more remain, then two halves rounded up to 16. Where OpenBLAS takes
                  that driver (one thread; or more threads where its threaded rule gives the same
                  chunks, e.g. K = 1024 with kc = 448) ONE plain call is the fixed-order product: free.
    Chunks must not exceed the BLAS's GEMM_Q (x86 OpenBLAS: 256-448), or only Numba computes them."""
    if rule == "openblas":
        b, ls = [0], 0
        while ls < K:
            m = K - ls
            if m >= 2 * kc:
                m = kc
            elif m > kc:
                m = ((m // 2 + 15) // 16) * 16
            ls += m
            b.append(ls)
        return np.array(b if K else [0, 0], dtype=np.int64)
    n = max(1, -(-K // kc))
    return np.array([i * K // n for i in range(n + 1)], dtype=np.int64)


@njit(parallel=True, **_K)
def _chain_kernel(a, b, bounds, out):
    """out[i, j] = sum over chunks c (in order, float32 adds) of the FMA chain over k in chunk c."""
    M = a.shape[0]
    N = b.shape[1]
    for i in prange(M):
        acc = np.empty(N, np.float32)
        for c in range(bounds.size - 1):
            for j in range(N):
                acc[j] = 0
            for k in range(bounds[c], bounds[c + 1]):
                aik = a[i, k]
                for j in range(N):
                    acc[j] = fma32(aik, b[k, j], acc[j])
            if c == 0:
                for j in range(N):
                    out[i, j] = acc[j]
            else:
                for j in range(N):
                    out[i, j] = out[i, j] + acc[j]


def chain_matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None, kc: int = KC,
                 rule: str = "balanced") -> np.ndarray:
    """The reference of fixed_matmul in Numba (any strides; rows in parallel: one thread per row,
    so the result does not depend on the thread count)."""
    if out is None:
        out = np.empty((a.shape[0], b.shape[1]), np.float32)
    _chain_kernel(a, b, k_chunks(a.shape[1], kc, rule), out)
    return out


_blas_threads = None


def blas_threads() -> int | None:
    """BLAS's thread count now (part of the verification key: OpenBLAS's path depends on it), or
    None when threadpoolctl is missing."""
    global _blas_threads
    if _blas_threads is None:
        try:
            from threadpoolctl import ThreadpoolController
            ctl = ThreadpoolController().select(user_api="blas")
            lib = ctl.lib_controllers[0] if ctl.lib_controllers else None
            _blas_threads = lib.get_num_threads if lib is not None else (lambda: None)
        except Exception:  # noqa: BLE001 (no threadpoolctl, or a BLAS it does not know)
            _blas_threads = lambda: None  # noqa: E731
    return _blas_threads()


_scratch_bufs: dict[tuple, np.ndarray] = {}


def scratch(tag: str, shape: tuple, dtype=np.float32) -> np.ndarray:
    """A reusable work array (fresh 1-4 MB arrays every step cost page faults: ~0.3 ms per MB here)."""
    key = (tag, tuple(shape), np.dtype(dtype).str)
    a = _scratch_bufs.get(key)
    if a is None:
        a = _scratch_bufs[key] = np.empty(shape, dtype)
    return a


_verified: dict[tuple, str] = {}   # (layouts of a, b, M, N, K, kc, rule, blas threads, out C) -> backend
_stats = {"plain": 0, "cblas": 0, "blas": 0, "fortran": 0, "numba": 0}
_cblas = None


def cblas_sgemm():
    """numpy's own OpenBLAS cblas_sgemm through ctypes (ILP64 symbols of numpy's wheels), or None. It
    lets chunk c > 0 be added by BLAS itself (beta = 1: C = RN(C + chain), the same one rounding as the
    float32 add) instead of a temporary and an extra pass over C."""
    global _cblas
    if _cblas is None:
        _cblas = False
        try:
            import ctypes

            from threadpoolctl import ThreadpoolController
            for lib in ThreadpoolController().select(internal_api="openblas").lib_controllers:
                dll = ctypes.CDLL(lib.filepath)
                for name in ("scipy_cblas_sgemm64_", "cblas_sgemm64_"):
                    f = getattr(dll, name, None)
                    if f is not None:
                        i, p = ctypes.c_int64, ctypes.c_void_p
                        f.restype = None
                        f.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, i, i, i, ctypes.c_float, p, i,
                                      p, i, ctypes.c_float, p, i]
                        _cblas = f
                        break
                if _cblas:
                    break
        except Exception:  # noqa: BLE001 (no threadpoolctl, another BLAS, no such symbol)
            _cblas = False
    return _cblas or None


def _layout(a: np.ndarray) -> str:
    if a.ndim != 2 or min(a.strides) <= 0 and a.size > 1:
        return "X"
    if a.strides[1] == a.itemsize and a.strides[0] >= a.shape[1] * a.itemsize:
        return "C"
    if a.strides[0] == a.itemsize and a.strides[1] >= a.shape[0] * a.itemsize:
        return "F"
    return "X"


def _sample(n: int, rng, edge: int, extra: int) -> np.ndarray:
    if n <= 2 * edge + extra:
        return np.arange(n)
    return np.unique(np.concatenate([np.arange(edge), np.arange(n - edge, n), rng.integers(0, n, extra)]))


def _cblas_chunks(a, b, bounds, out) -> None:
    f = cblas_sgemm()
    (ta, lda), (tb, ldb) = [(111, m.strides[0] // 4) if _layout(m) == "C" else (112, m.strides[1] // 4)
                            for m in (a, b)]
    M, N = out.shape
    pa, pb, pc, ldc = a.ctypes.data, b.ctypes.data, out.ctypes.data, out.strides[0] // 4
    for c in range(bounds.size - 1):
        k0, k1 = int(bounds[c]), int(bounds[c + 1])
        f(101, ta, tb, M, N, k1 - k0, 1.0, pa + k0 * a.strides[1], max(lda, 1), pb + k0 * b.strides[0],
          max(ldb, 1), 0.0 if c == 0 else 1.0, pc, max(ldc, 1))


def _blas_chunks(a, b, bounds, out, fortran: bool) -> None:
    """The chunked product through numpy's matmul (A copied to Fortran order if `fortran`)."""
    tmp = None
    for c in range(bounds.size - 1):
        k0, k1 = bounds[c], bounds[c + 1]
        ac = a[:, k0:k1]
        if fortran:
            ac = np.asfortranarray(ac)
        if c == 0:
            np.matmul(ac, b[k0:k1], out=out)
        else:
            if tmp is None:
                tmp = scratch("matmul", out.shape)
            np.matmul(ac, b[k0:k1], out=tmp)
            out += tmp


def _run(how: str, a, b, bounds, out) -> None:
    if how == "plain":
        np.matmul(a, b, out=out)
    elif how == "cblas":
        _cblas_chunks(a, b, bounds, out)
    elif how == "numba":
        _chain_kernel(a, b, bounds, out)
    else:
        _blas_chunks(a, b, bounds, out, how == "fortran")


class _Check:
    """Random operands of one shape and layout, and the fixed-order product of some of their rows and
    columns (all near the edges, where kernels switch to tail code, and a random sample), computed once
    by the Numba reference; `passes(how)` runs a backend on them and compares."""

    def __init__(self, la: str, lb: str, M: int, N: int, K: int, kc: int, rule: str):
        rng = np.random.default_rng([M, N, K, kc])
        a = rng.standard_normal((M, K), dtype=np.float32)
        b = rng.standard_normal((K, N), dtype=np.float32)
        self.a = np.asfortranarray(a) if la == "F" else a
        self.b = np.asfortranarray(b) if lb == "F" else b
        self.bounds = k_chunks(K, kc, rule)
        self.rows, self.cols = _sample(M, rng, 17, 16), _sample(N, rng, 33, 32)
        self.ref_rows = chain_matmul(self.a[self.rows], self.b, kc=kc, rule=rule)
        self.ref_cols = chain_matmul(self.a, np.ascontiguousarray(self.b[:, self.cols]), kc=kc, rule=rule)

    def passes(self, how: str) -> bool:
        got = np.empty((self.a.shape[0], self.b.shape[1]), np.float32)
        _run(how, self.a, self.b, self.bounds, got)
        return np.array_equal(got[self.rows], self.ref_rows) and np.array_equal(got[:, self.cols], self.ref_cols)


def backend_for(a: np.ndarray, b: np.ndarray, out: np.ndarray, kc: int = KC, rule: str = "balanced") -> str:
    """The first of these that computes the fixed-order product for this shape, layout and BLAS thread
    count (checked once on random data, then cached): "plain" (one numpy matmul: where OpenBLAS's own
    blocking is the chunk rule), "cblas" (numpy's OpenBLAS per chunk, chunks added by BLAS with
    beta = 1), "blas" (numpy matmul per chunk, float32 adds), "fortran" (the same with A copied to
    Fortran order: OpenBLAS's TT / NT small kernels are chains), "numba" (chain_matmul)."""
    key = (_layout(a), _layout(b), a.shape[0], b.shape[1], a.shape[1], kc, rule, blas_threads(),
           _layout(out) == "C")
    got = _verified.get(key)
    if got is None:
        M, K = a.shape
        N = b.shape[1]
        got = "numba"
        if "X" not in key[:2]:
            numpy_ok = min(M, N) >= 2                                 # numpy: 1 row or column -> gemv
            tries = (["plain"] if numpy_ok and key[8] else []) + \
                    (["cblas"] if cblas_sgemm() is not None and key[8] else []) + \
                    (["blas", "fortran"] if numpy_ok else [])
            check = _Check(key[0], key[1], M, N, K, kc, rule) if tries else None
            for how in tries:
                if check.passes(how):
                    got = how
                    break
        if got == "numba" and M * N * K > 1 << 20:
            import warnings
            warnings.warn(f"fixed_matmul: BLAS does not compute the fixed-order product for {M}x{K} @ {K}x{N} "
                          f"(kc={kc}, {rule}); the Numba kernel does, 100-300x slower. A smaller kc (<= the "
                          f"BLAS's GEMM_Q) may let BLAS do it.", RuntimeWarning, stacklevel=3)
        _verified[key] = got
    return got


def fixed_matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None, kc: int = KC,
                 rule: str = "balanced") -> np.ndarray:
    """C = A @ B (float32), each element the fixed-order chain (module docstring, 1; chunks k_chunks(K,
    kc, rule)): the same bits for a row whatever the other rows in the call, the thread count, or the
    backend that computed it."""
    if a.dtype != F32 or b.dtype != F32:
        raise TypeError("fixed_matmul takes float32 operands")
    if out is None:
        out = np.empty((a.shape[0], b.shape[1]), np.float32)
    if a.shape[0] == 0 or b.shape[1] == 0:
        return out
    if a.shape[1] == 0:
        out[...] = 0
        return out
    how = backend_for(a, b, out, kc, rule)
    _stats[how] += 1
    _run(how, a, b, k_chunks(a.shape[1], kc, rule), out)
    return out


def forget_verification() -> None:
    """Drop the cached shape checks (after the BLAS library or its thread settings changed)."""
    global _blas_threads
    _verified.clear()
    _blas_threads = None


# ====================================================================================================
# 2. exact sums in fixed point
# ====================================================================================================
_PAR = 1 << 18   # elements: below this, one thread (kernels between GEMMs: kernels/cpu.py's rule)


def _max_bits32_(u):
    m = np.uint32(0)
    for i in prange(u.size):
        m = max(m, u[i] & np.uint32(0x7FFFFFFF))
    return m


def _max_bits64_(u):
    m = np.uint64(0)
    for i in prange(u.size):
        m = max(m, u[i] & np.uint64(0x7FFFFFFFFFFFFFFF))
    return m


def _to_fixed_(x, scale, q, accumulate):
    """q (+)= rint(x * scale) (scale a power of two: the product is exact)."""
    for i in prange(x.size):
        v = np.int64(np.rint(np.float64(x[i]) * scale))
        if accumulate:
            q[i] += v
        else:
            q[i] = v


def _from_fixed32_(q, scale, out):
    """out = float32(q * 2^lsb): int64 -> float32 is ONE correct rounding (sitofp); the power-of-two
    scaling in float64 is exact, and exact again into float32 unless the result is subnormal there."""
    for i in prange(q.size):
        out[i] = np.float32(np.float64(np.float32(q[i])) * scale)


def _from_fixed64_(q, scale, out):
    for i in prange(q.size):
        out[i] = np.float64(q[i]) * scale


def _pair(f):
    """(one-thread kernel, threaded kernel) of the same loop: integer results, so the same bits."""
    return njit(**_K)(f), njit(parallel=True, **_K)(f)


_MAXB32, _MAXB64, _TOFIX, _FROM32, _FROM64 = (_pair(f) for f in (_max_bits32_, _max_bits64_, _to_fixed_,
                                                                  _from_fixed32_, _from_fixed64_))


def _pick(pair, n: int):
    return pair[n >= _PAR]


def _exponent_of_bits(m: int, dtype) -> int:
    if dtype == F32:
        if m >= 0x7F800000:
            return NONFINITE
        e = m >> 23
        bias = 126
    else:
        if m >= 0x7FF0000000000000:
            return NONFINITE
        e = m >> 52
        bias = 1022
    if m == 0:
        return EMPTY
    return e - bias                    # normal: |v| < 2^(e - bias); subnormal (e = 0): |v| < 2^-bias


def max_exponent(x: np.ndarray) -> int:
    """The smallest E with |v| < 2^E for every v in x (float32 or float64, any shape, contiguous);
    NONFINITE if x holds inf or nan, EMPTY if it is all zeros (or empty)."""
    flat = x.reshape(-1)
    if flat.size == 0:
        return EMPTY
    if x.dtype == F32:
        return _exponent_of_bits(int(_pick(_MAXB32, flat.size)(flat.view(np.uint32))), F32)
    if x.dtype == F64:
        return _exponent_of_bits(int(_pick(_MAXB64, flat.size)(flat.view(np.uint64))), F64)
    raise TypeError(f"max_exponent: {x.dtype}")


def ceil_log2(n: int) -> int:
    return max(0, int(n - 1).bit_length())


def lsb_exponent(E: int, terms: int) -> int:
    """The exponent of the fixed point's last bit for values |v| < 2^E summed `terms` at a time:
    each |q| <= 2^(62 - ceil(log2 terms)), so any sum of `terms` of them is <= 2^62 < 2^63."""
    return E - 62 + ceil_log2(terms)


def _pow2(e: int) -> float:
    return math.ldexp(1.0, e)


@njit(parallel=True, **_K)
def _to_fixed_checked(x, limit, scale, q):
    """q = rint(x * scale) where |x| < limit; returns how many elements are not (too large, inf, nan):
    their q is 0."""
    bad = 0
    for i in prange(x.size):
        v = np.float64(x[i])
        if abs(v) < limit:
            q[i] = np.int64(np.rint(v * scale))
        else:
            q[i] = 0
            bad += 1
    return bad


def to_fixed(x: np.ndarray, lsb: int, out: np.ndarray | None = None, accumulate: bool = False) -> np.ndarray:
    """int64 q = rint(x / 2^lsb) elementwise (float32 or float64 x, finite, |x| < 2^(lsb + 62));
    accumulate: ADD to `out` (integer addition: any order gives the same q)."""
    flat = x.reshape(-1)
    if out is None:
        out = np.zeros(flat.size, np.int64)
        accumulate = False
    if abs(lsb) > 1000:   # float64 values near the ends of the range: keep 2^-lsb inside float64
        h = -lsb // 2
        flat = flat * _pow2(h)
        lsb += h
    _pick(_TOFIX, flat.size)(flat, _pow2(-lsb), out.reshape(-1), accumulate)
    return out


def from_fixed(q: np.ndarray, lsb: int, out: np.ndarray) -> np.ndarray:
    """out = q * 2^lsb rounded once to out's dtype (float32: correctly rounded except in the subnormal
    range; float64: correctly rounded)."""
    if not out.flags.c_contiguous:
        raise ValueError("from_fixed writes into a C-contiguous array")
    flat = out.reshape(-1)
    _pick(_FROM32 if out.dtype == F32 else _FROM64, flat.size)(q.reshape(-1), _pow2(lsb), flat)
    return out


# ---- exponent agreement and the flat-buffer Allreduce ------------------------------------------------
def agree_exponent(comm, E_local, op_max=None):
    """MAX of the local exponents over comm (an int, or a list of ints: one collective either way)."""
    if comm is None or comm.Get_size() == 1:
        return E_local
    from mpi4py import MPI
    vals = np.atleast_1d(np.asarray(E_local, dtype=np.int64)).copy()
    comm.Allreduce(MPI.IN_PLACE, vals, op=MPI.MAX)
    return int(vals[0]) if np.ndim(E_local) == 0 else [int(v) for v in vals]


def allreduce_exact(comm, x: np.ndarray, out: np.ndarray | None = None, *, terms: int | None = None,
                    exponent: int | None = None, scratch: np.ndarray | None = None) -> int:
    """out := the SUM of x over comm's ranks, exact in int64 fixed point, rounded once (float32 or float64
    flat buffer; out=None: in place). The same bits whatever the rank order, the reduction algorithm
    (ring, tree, recursive doubling) or the bucketing.

    NOT by itself independent of the rank COUNT: that needs summands that do not depend on it. Per-rank
    float partial gradients do (each is a float sum over that rank's rows), and so does the MAX of their
    exponents; use it on per-chunk or per-row quantities (reproducible_dense_backward's "chunks" mode
    does, in ints), or on buffers that are the same for every layout.

    terms: how many values are summed per element (default: the rank count): the headroom. exponent:
    an agreed E with |x| < 2^E on every rank (saves the MAX collective; if an element is beyond it, every
    rank redoes the sum with the agreed exponent: never a wrapped result). Returns the lsb exponent used
    (or NONFINITE / EMPTY). Non-finite anywhere: a plain IEEE Allreduce of x instead."""
    from mpi4py import MPI
    out = x if out is None else out
    n, size = x.size, (1 if comm is None else comm.Get_size())
    terms = terms or size
    q = scratch if scratch is not None else np.empty(n + 1, np.int64)
    if exponent is not None:
        lsb = lsb_exponent(exponent, terms)
        q[n] = _to_fixed_checked(x.reshape(-1), _pow2(exponent), _pow2(-lsb), q[:n])
        if size > 1:
            comm.Allreduce(MPI.IN_PLACE, q[:n + 1], op=MPI.SUM)
        if q[n] == 0:
            from_fixed(q[:n], lsb, out)
            return lsb
    E = agree_exponent(comm, max_exponent(x))
    if E == NONFINITE:
        if out is not x:
            out[...] = x
        if size > 1:
            comm.Allreduce(MPI.IN_PLACE, out, op=MPI.SUM)
        return NONFINITE
    if E == EMPTY:
        out[...] = 0
        return EMPTY
    lsb = lsb_exponent(E, terms)
    to_fixed(x, lsb, q[:n])
    if size > 1:
        comm.Allreduce(MPI.IN_PLACE, q[:n], op=MPI.SUM)
    from_fixed(q[:n], lsb, out)
    return lsb


# ---- multi-limb fixed point for float64 scalars (the loss) and the squared norm ----------------------
@njit(**_K)
def _limbs3(x, f1, f2, w, acc):
    """acc[0..2] += the three w-bit limbs of x * f1 * f2 (|x f1 f2| < 2^w), truncated toward zero."""
    p = 2.0 ** w
    for i in range(x.size):
        a = (x[i] * f1) * f2
        q0 = np.int64(a)
        r = (a - np.float64(q0)) * p
        q1 = np.int64(r)
        r = (r - np.float64(q1)) * p
        acc[0] += q0
        acc[1] += q1
        acc[2] += np.int64(r)


@njit(parallel=True, **_K)
def _sq_limbs(x, u, c, p):
    """Two limbs of sum(x^2 c), c = 2^(w - 2E) (x^2 c < 2^w when |x| < 2^E): x^2 is exact in float64
    (48 bits), the scaling too; limbs truncated at 1 and 1/p (p = 2^w); int sums, so any thread split
    gives the same totals. Also the largest |x| as bits (u: x's uint32 view), to check |x| < 2^E."""
    s0 = 0
    s1 = 0
    m = np.uint32(0)
    for i in prange(x.size):
        m = max(m, u[i] & np.uint32(0x7FFFFFFF))
        v = np.float64(x[i])
        a = min(v * v * c, p)
        q0 = np.int64(a)
        s0 += q0
        s1 += np.int64((a - np.float64(q0)) * p)
    return s0, s1, m


@njit(parallel=True, **_K)
def _plain_sum_sq(x):
    s = 0.0
    for i in prange(x.size):
        s += np.float64(x[i]) * np.float64(x[i])
    return s


def _limbs_value(limbs, w: int, lsb0: int) -> float:
    """sum_i limbs[i] * 2^(lsb0 - i w), exact in Python ints, rounded once to float64."""
    total = 0
    for v in limbs:
        total = (total << w) + int(v)
    e = lsb0 - (len(limbs) - 1) * w
    return math.ldexp(float(total), e) if total.bit_length() < 1000 else float(total) * 2.0 ** e


def exact_sum(values: np.ndarray, comm=None, terms: int | None = None) -> float:
    """The sum of float64 (or float32) values over comm, exact in fixed point then rounded once to
    float64: the same bits for any split of the values over ranks. terms: how many values in all
    (default: len(values) * ranks). Three limbs of w = 62 - ceil(log2 terms) bits below the agreed
    exponent E: error <= terms * 2^(E - 3w), far below float64's half ulp. Non-finite: IEEE sum."""
    from mpi4py import MPI
    x = np.ascontiguousarray(values, dtype=np.float64).reshape(-1)
    size = 1 if comm is None else comm.Get_size()
    E = agree_exponent(comm, max_exponent(x))
    if E == NONFINITE:
        s = float(np.sum(x))
        return comm.allreduce(s, op=MPI.SUM) if size > 1 else s
    if E == EMPTY:
        return 0.0
    terms = terms or x.size * size
    w = 62 - ceil_log2(terms)
    acc = np.zeros(3, np.int64)
    k = w - E
    _limbs3(x, _pow2(k // 2), _pow2(k - k // 2), w, acc)
    if size > 1:
        comm.Allreduce(MPI.IN_PLACE, acc, op=MPI.SUM)
    return _limbs_value(acc, w, E - w)


def exact_colsums(values: np.ndarray, comm=None, terms: int | None = None) -> np.ndarray:
    """exact_sum of every column of a (rows, S) float64 array over comm: (S,) float64, each column's sum
    exact in fixed point (its own agreed exponent, three limbs) then rounded once: the same bits for any
    split of the rows over ranks. One MAX and one SUM Allreduce for all columns. terms: the rows in all
    (default: this rank's rows x ranks). A column holding inf or nan: its IEEE sum over ranks."""
    from mpi4py import MPI
    x = np.ascontiguousarray(values, dtype=np.float64)
    S = x.shape[1]
    size = 1 if comm is None else comm.Get_size()
    with np.errstate(invalid="ignore"):
        top = np.abs(x).max(axis=0) if len(x) else np.zeros(S)
    E_local = [NONFINITE if not math.isfinite(m) else EMPTY if m == 0 else math.frexp(m)[1] for m in top.tolist()]
    E = agree_exponent(comm, E_local)   # a list: one exponent per column
    w = 62 - ceil_log2(terms or len(x) * size)
    acc = np.zeros((S, 3), np.int64)     # three limbs per column (non-finite columns: `plain`)
    plain = np.zeros(S)
    for j in range(S):
        if E[j] == NONFINITE:
            plain[j] = float(np.sum(x[:, j]))
        elif E[j] != EMPTY:
            k = w - E[j]
            _limbs3(np.ascontiguousarray(x[:, j]), _pow2(k // 2), _pow2(k - k // 2), w, acc[j])
    if size > 1:
        comm.Allreduce(MPI.IN_PLACE, acc, op=MPI.SUM)
        if NONFINITE in E:
            comm.Allreduce(MPI.IN_PLACE, plain, op=MPI.SUM)
    return np.array([plain[j] if E[j] == NONFINITE else 0.0 if E[j] == EMPTY else _limbs_value(acc[j], w, E[j] - w)
                     for j in range(S)])


def exact_sum_sq(x: np.ndarray, comm=None, terms: int | None = None, exponent: int | None = None) -> float:
    """sum(x^2) of a float32 buffer (summed over comm when given: ZeRO shards, tp partitions), the same
    bits for any thread count and any split of a fixed buffer.

    E: an exponent with |x| < 2^E everywhere, the same on every rank: `exponent` if given and valid (a
    bound from reproducible_dense_backward's `info`: one pass over x, checked in the same pass), else
    the buffer's largest (a max pass first, MAX over comm: the max over a buffer's shards is the
    buffer's). w = 62 - ceil(log2 terms); each square (exact in float64) is cut into two w-bit limbs
    below 2^(2E) and the limbs summed as integers: error <= terms * 2^(2E - 2w) (terms 2^21, w = 41, E
    the max: at most 2^-59 of the largest square; E k bits above the max: 2^(2k) times that), then one
    rounding to float64. The result depends on E: a given exponent must be a function of the global batch (the
    backward's bounds are), never of the layout or of history. inf/nan: returns inf/nan."""
    from mpi4py import MPI
    flat = x.reshape(-1)
    size = 1 if comm is None else comm.Get_size()
    terms = terms or flat.size * size
    w = 62 - ceil_log2(terms)
    u = flat.view(np.uint32)
    if exponent is not None and exponent not in (NONFINITE, EMPTY):
        s0, s1, m = _sq_limbs(flat, u, _pow2(w - 2 * exponent), _pow2(w))
        bad = _exponent_of_bits(int(m), F32)
        acc = np.array([s0, s1, int(bad > exponent)], np.int64)
        if size > 1:
            comm.Allreduce(MPI.IN_PLACE, acc, op=MPI.SUM)
        if acc[2] == 0:
            return _limbs_value(acc[:2], w, 2 * exponent - w)
    E = agree_exponent(comm, max_exponent(flat))
    if E == NONFINITE:
        s = _plain_sum_sq(flat)
        return comm.allreduce(s, op=MPI.SUM) if size > 1 else s
    if E == EMPTY:
        return 0.0
    s0, s1, _ = _sq_limbs(flat, u, _pow2(w - 2 * E), _pow2(w))
    acc = np.array([s0, s1], np.int64)
    if size > 1:
        comm.Allreduce(MPI.IN_PLACE, acc, op=MPI.SUM)
    return _limbs_value(acc, w, 2 * E - w)


# ====================================================================================================
# 3. the dense layer, reproducibly
# ====================================================================================================
@njit(**_K)
def _colsum_fixed(y, scale, q):
    """q[j] += sum_i rint(y[i, j] * scale): the column sums of y in fixed point (exact)."""
    B, N = y.shape
    for i in range(B):
        for j in range(N):
            q[j] += np.int64(np.rint(np.float64(y[i, j]) * scale))


def _bound(*pairs) -> int:
    """An exponent above sums of n values each below 2^E, for (E, n) pairs (+1 for the rounding of a
    float32 result); EMPTY pairs (zeros) are left out."""
    es = [E + ceil_log2(n) + 1 for E, n in pairs if E != EMPTY]
    return max(es) if es else EMPTY


def choose_mode(n_in: int, n_out: int, chunk: int) -> str:
    """"chunks" when one chunk's full-size conversion costs no more than gathering its rows would
    (n_in n_out <= chunk (n_in + n_out)), else "gather". Depends on the layer and chunk only: the same
    choice for every rank count."""
    return "chunks" if n_in * n_out <= chunk * (n_in + n_out) else "gather"


def _allgather_rows(comm, x: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's rows of x and dy, in rank order (= global row order): ONE Allgather of [x | dy]."""
    if comm is None or comm.Get_size() == 1:
        return x, dy
    n_in = x.shape[1]
    mine = scratch("rows_mine", (x.shape[0], n_in + dy.shape[1]))
    mine[:, :n_in], mine[:, n_in:] = x, dy
    full = scratch("rows_all", (x.shape[0] * comm.Get_size(), mine.shape[1]))
    comm.Allgather(mine, full)
    return full[:, :n_in], full[:, n_in:]


def _row_bounds(n: int, size: int) -> list[int]:
    return [r * n // size for r in range(size + 1)]


def exact_colsum(y: np.ndarray, comm=None, out: np.ndarray | None = None, terms: int | None = None,
                 local: bool = False) -> np.ndarray:
    """out = sum over ALL rows (every rank's) of y, exact in fixed point, rounded once to float32.
    local=True: y already holds every row (no collective). terms: the global row count."""
    from mpi4py import MPI
    size = 1 if (comm is None or local) else comm.Get_size()
    n = y.shape[1]
    out = np.empty(n, np.float32) if out is None else out
    E = max_exponent(y) if local else agree_exponent(comm, max_exponent(y))
    if E in (NONFINITE, EMPTY):
        out[...] = y.sum(axis=0, dtype=np.float32) if E == NONFINITE else 0
        if E == NONFINITE and size > 1:
            comm.Allreduce(MPI.IN_PLACE, out, op=MPI.SUM)
        return out
    lsb = lsb_exponent(E, terms or y.shape[0] * size)
    q = np.zeros(n, np.int64)
    _colsum_fixed(y, _pow2(-lsb), q)
    if size > 1:
        comm.Allreduce(MPI.IN_PLACE, q, op=MPI.SUM)
    return from_fixed(q, lsb, out)


def reproducible_dense_backward(x: np.ndarray, dy: np.ndarray, W: np.ndarray, comm=None, *,
                                kc: int = KC, rule: str = "balanced", mode: str = "auto", chunk: int = 32,
                                need_dx: bool = True,
                                dW: np.ndarray | None = None, db: np.ndarray | None = None,
                                dx: np.ndarray | None = None, info: dict | None = None, pending: list | None = None):
    """(dW, db, dx) of y = x W + b, bitwise the same for any split of the global batch's rows over comm.

    x (B_r, n_in), dy (B_r, n_out) float32: this rank's rows, which are the r-th block of the global
    batch (every rank the same count). dy is dL/dz (activation derivative applied). dW (n_in, n_out)
    and db (n_out,) are the sums over ALL rows (every rank gets them), dx (B_r, n_in) this rank's rows
    (None unless need_dx). dW, db, dx given: written there (views of the flat gradient buffer).
    kc, rule: fixed_matmul's k chunks. mode: "gather", "chunks" or "auto" (choose_mode); chunk: rows per
    virtual chunk ("chunks": must divide B_r on every layout used; a fixed number, NOT B_r). info: a
    dict to receive "exponent", an E with |dW|, |db| < 2^E derived from the global batch (the same on
    every layout): exact_sum_sq's `exponent` for a one-pass norm (the max over the layers). pending (gather
    mode): a list to receive the request of dW's Iallgatherv instead of waiting for it here (the caller
    waits before it reads dW: the next layer's backward runs meanwhile)."""
    from mpi4py import MPI
    size = 1 if comm is None else comm.Get_size()
    B_r, n_in = x.shape
    n_out = W.shape[1]
    B = B_r * size
    mode = choose_mode(n_in, n_out, chunk) if mode == "auto" else mode
    dx = fixed_matmul(dy, W.T, out=dx, kc=kc, rule=rule) if need_dx else None
    dW = np.empty((n_in, n_out), np.float32) if dW is None else dW
    db = np.empty(n_out, np.float32) if db is None else db
    if mode == "gather":
        X, DY = _allgather_rows(comm, x, dy)
        bounds = _row_bounds(n_in, size)
        r = 0 if comm is None else comm.Get_rank()
        lo, hi = bounds[r], bounds[r + 1]
        if hi > lo:
            fixed_matmul(X[:, lo:hi].T, DY, out=dW[lo:hi], kc=kc, rule=rule)
        if size > 1:
            counts = [(bounds[i + 1] - bounds[i]) * n_out for i in range(size)]
            displs = [bounds[i] * n_out for i in range(size)]
            if pending is None:
                comm.Allgatherv(MPI.IN_PLACE, [dW.reshape(-1), counts, displs, MPI.FLOAT])
            else:
                pending.append(comm.Iallgatherv(MPI.IN_PLACE, [dW.reshape(-1), counts, displs, MPI.FLOAT]))
        exact_colsum(DY, out=db, local=True, terms=B)
        if info is not None:   # |chain| <= (1 + u)^B sum|x||dy| < 2 B 2^Ex 2^Edy; |db| < 2 B 2^Edy
            Ex, Edy = max_exponent(X), max_exponent(DY)
            info["exponent"] = _bound((Ex + Edy if EMPTY not in (Ex, Edy) else EMPTY, B),
                                      (Edy, B)) if NONFINITE not in (Ex, Edy) else NONFINITE
        return dW, db, dx
    if mode != "chunks":
        raise ValueError(f"mode {mode!r}")
    if B_r % chunk:
        raise ValueError(f"chunk {chunk} does not divide this rank's {B_r} rows")
    nch = B_r // chunk
    parts = scratch("chunk_parts", (nch, n_in, n_out))
    for c in range(nch):
        rows = slice(c * chunk, (c + 1) * chunk)
        fixed_matmul(x[rows].T, dy[rows], out=parts[c], kc=kc, rule=rule)
    E_W, E_b = agree_exponent(comm, [max_exponent(parts), max_exponent(dy)])
    if NONFINITE in (E_W, E_b):   # IEEE propagation; the step will be skipped anyway
        dW[...] = parts.sum(axis=0)
        db[...] = dy.sum(axis=0)
        if size > 1:
            comm.Allreduce(MPI.IN_PLACE, dW, op=MPI.SUM)
            comm.Allreduce(MPI.IN_PLACE, db, op=MPI.SUM)
        if info is not None:
            info["exponent"] = NONFINITE
        return dW, db, dx
    q = scratch("chunk_q", (n_in * n_out + n_out,), np.int64)
    q[...] = 0
    lsb_W = lsb_exponent(E_W, B // chunk) if E_W != EMPTY else 0
    lsb_b = lsb_exponent(E_b, B) if E_b != EMPTY else 0
    if E_W != EMPTY:
        for c in range(nch):
            to_fixed(parts[c], lsb_W, q[:n_in * n_out], accumulate=True)
    if E_b != EMPTY:
        _colsum_fixed(dy, _pow2(-lsb_b), q[n_in * n_out:])
    if size > 1:
        comm.Allreduce(MPI.IN_PLACE, q, op=MPI.SUM)
    from_fixed(q[:n_in * n_out], lsb_W, dW)
    from_fixed(q[n_in * n_out:], lsb_b, db)
    if info is not None:       # |sum of nch chunks| < nch 2^E_W, |db| < B 2^E_b
        info["exponent"] = _bound((E_W, B // chunk), (E_b, B))
    return dW, db, dx


# ====================================================================================================
# measurements (docs/reproducible.md): python -m hpcopt.parallel.reprosum probe|accuracy|bench|bench-mpi
# ====================================================================================================
MLP = (784, 1024, 1024, 10)


def _set_threads(n: int) -> None:
    import numba
    from threadpoolctl import threadpool_limits
    threadpool_limits(n)
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


def probe(out=print) -> dict:
    """Which parts of the float32 MLP step depend on the row count or the thread count (plain numpy/
    OpenBLAS), and does fixed_matmul remove it. Prints the fraction of elements that differ."""
    from threadpoolctl import threadpool_limits

    from ..kernels import cpu as K
    rng = np.random.default_rng(0)
    B = 256
    res = {}
    for n_in, n_out in zip(MLP[:-1], MLP[1:]):
        x = np.maximum(rng.standard_normal((B, n_in), dtype=np.float32), 0)
        W = (rng.standard_normal((n_in, n_out)) * np.sqrt(2 / n_in)).astype(np.float32)
        dy = (rng.standard_normal((B, n_out)) * 1e-3).astype(np.float32)
        with threadpool_limits(1):
            ref = {"fwd": x @ W, "dx": dy @ W.T, "dW": x.T @ dy}
            fref = {"fwd": fixed_matmul(x, W), "dx": fixed_matmul(dy, W.T)}
        for th in (1, 2):
            with threadpool_limits(th):
                for what, f, fx in (("fwd", lambda m: x[:m] @ W, lambda m: fixed_matmul(x[:m], W)),
                                    ("dx", lambda m: dy[:m] @ W.T, lambda m: fixed_matmul(dy[:m], W.T))):
                    ms = (1, 2, 8, 32, 64, 96, 128, 256)
                    frac = {m: float(np.mean(f(m) != ref[what][:m])) for m in ms}
                    fworst = max(float(np.mean(fx(m) != fref[what][:m])) for m in ms)
                    res[(n_in, n_out, what, th)] = (frac, fworst)
                    diff = " ".join(f"{m}:{v:.2f}" for m, v in frac.items() if v) or "none"
                    out(f"{n_in}x{n_out} {what:4s} threads={th}: elements of the first m rows differing from "
                        f"the 256-row 1-thread call, numpy (m:fraction) {diff}; fixed_matmul: worst {fworst:.3f}")
                part = sum(x[s].T @ dy[s] for s in (slice(0, 128), slice(128, 256)))
                fr = [fixed_matmul(x[:, lo:hi].T, dy) for lo, hi in ((0, n_in // 2), (n_in // 2, n_in))]
                res[(n_in, n_out, "dW", th)] = float(np.mean(part != ref["dW"]))
                out(f"{n_in}x{n_out} dW   threads={th}: 2-way row split + float32 sum differs in "
                    f"{np.mean(part != ref['dW']):.3f} of elements; fixed_matmul over all rows, dW rows "
                    f"split in 2 calls vs 1: {np.mean(np.concatenate(fr) != fixed_matmul(x.T, dy)):.3f}")
        d = (rng.standard_normal((B, n_out)) * 1e-3).astype(np.float32)
        a = np.ones_like(d)
        db1, db2, dbf = np.empty(n_out, np.float32), np.empty(n_out, np.float32), np.empty(n_out, np.float32)
        K.bias_act_backward(d.copy(), a, K.IDENTITY, dbf)
        K.bias_act_backward(d[:128].copy(), a[:128], K.IDENTITY, db1)
        K.bias_act_backward(d[128:].copy(), a[128:], K.IDENTITY, db2)
        db_split = float(np.mean((db1 + db2) != dbf))
        out(f"{n_in}x{n_out} db (bias_act_backward, fixed order per call): 2-way split + sum differs in "
            f"{db_split:.3f} of elements")
    losses = rng.random(B) * 3
    s1 = float(np.sum(losses))
    s2 = float(np.sum(losses[:128])) + float(np.sum(losses[128:]))
    s3 = sum(float(np.sum(losses[i:i + 64])) for i in range(0, B, 64))
    out(f"loss sum (float64), 1 vs 2 vs 4 parts: equal={s1 == s2 == s3} ({s1!r}, {s2!r}, {s3!r}); "
        f"exact_sum: {exact_sum(losses)!r}")
    g = rng.standard_normal(1_863_690, dtype=np.float32) * 1e-3
    import numba

    from ..kernels import optim_cpu
    sq = {}
    for th in (1, 2):
        numba.set_num_threads(min(th, numba.config.NUMBA_NUM_THREADS))
        sq[th] = (optim_cpu.sum_sq(g), exact_sum_sq(g))
    out(f"squared norm of 1.86M float32 (optim_cpu.sum_sq, prange): 1 thread {sq[1][0]!r}, 2 threads "
        f"{sq.get(2, sq[1])[0]!r} (NUMBA_NUM_THREADS={numba.config.NUMBA_NUM_THREADS}); exact_sum_sq: "
        f"{sq[1][1]!r} / {sq.get(2, sq[1])[1]!r}")
    out(f"fixed_matmul backends used: {_stats}")
    return res


def accuracy(batches: int = 20, B: int = 256, out=print) -> dict:
    """Error against a float64 reference on `batches` random batches (784x1024 layer shapes, relu-like
    x, dy ~ 1e-3 N(0,1)): the plain float32 path on 2 ranks (two sgemm partials + a float32 sum) and on 1,
    the reproducible dense backward ("gather" = chain over all B rows; "chunks" = exact sum of chunk
    chains), db, the fixed-point sum of 2 float32 buffers, the loss sum and the squared norm.

    Measure: |got - ref| / (u * sum_k |term_k|), u = 2^-24 (the error of a sum in units of float32's
    unit roundoff times the sum of the magnitudes: a dot product of length K in float32 is bounded by
    about K of these); median and max over all elements and batches; and ||got - ref|| / ||ref||."""
    rng = np.random.default_rng(1)
    n_in, n_out = 784, 1024
    u = 2.0 ** -24
    acc: dict[str, list] = {}

    def add(name, got, ref, mag):
        e = np.abs(got.astype(np.float64) - ref)
        acc.setdefault(name, []).append((e.reshape(-1) / (u * mag.reshape(-1)),
                                          float(np.linalg.norm(e) / np.linalg.norm(ref))))

    for _ in range(batches):
        x = np.maximum(rng.standard_normal((B, n_in), dtype=np.float32), 0)
        dy = (rng.standard_normal((B, n_out)) * 1e-3).astype(np.float32)
        x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
        ref, mag = x64.T @ dy64, x64.T @ np.abs(dy64)
        h = B // 2
        W = np.zeros((n_in, n_out), np.float32)
        add("dW plain float32, 2 ranks", (x[:h].T @ dy[:h]) + (x[h:].T @ dy[h:]), ref, mag)
        add("dW plain float32, 1 rank", x.T @ dy, ref, mag)
        add("dW reproducible gather (kc=256)",
            reproducible_dense_backward(x, dy, W, mode="gather", need_dx=False)[0], ref, mag)
        add("dW reproducible gather (kc=64)",
            reproducible_dense_backward(x, dy, W, mode="gather", kc=64, need_dx=False)[0], ref, mag)
        add("dW reproducible chunks of 32 rows",
            reproducible_dense_backward(x, dy, W, mode="chunks", chunk=32, need_dx=False)[0], ref, mag)
        refb, magb = dy64.sum(axis=0), np.abs(dy64).sum(axis=0)
        db1, db2 = np.empty(n_out, np.float32), np.empty(n_out, np.float32)
        from ..kernels import cpu as K
        K.bias_act_backward(dy[:h].copy(), dy[:h], K.IDENTITY, db1)
        K.bias_act_backward(dy[h:].copy(), dy[h:], K.IDENTITY, db2)
        add("db plain float32 (bias_act_backward), 2 ranks", db1 + db2, refb, magb)
        add("db exact (exact_colsum)", exact_colsum(dy, local=True), refb, magb)
        g1 = rng.standard_normal(1 << 16, dtype=np.float32) * np.float32(1e-3)
        g2 = rng.standard_normal(1 << 16, dtype=np.float32) * np.float32(1e-3)
        refg, magg = g1.astype(np.float64) + g2, np.abs(g1.astype(np.float64)) + np.abs(g2)
        add("sum of 2 buffers: float32 (Allreduce)", g1 + g2, refg, magg)
        lsb = lsb_exponent(max(max_exponent(g1), max_exponent(g2)), 2)
        q = to_fixed(g1, lsb)
        to_fixed(g2, lsb, q, accumulate=True)
        add("sum of 2 buffers: fixed point (allreduce_exact)", from_fixed(q, lsb, np.empty_like(g1)), refg, magg)
    res = {}
    for name, parts in acc.items():
        e = np.concatenate([p[0] for p in parts])
        nrm = max(p[1] for p in parts)
        res[name] = (float(np.median(e)), float(np.max(e)), nrm)
        out(f"{name:50s} |err|/(u sum|t|): median {np.median(e):6.3f} max {np.max(e):7.3f}; "
            f"max ||err||/||ref|| {nrm:.2e}")
    import fractions
    lossv = rng.random(256) * 5
    exact = sum(fractions.Fraction(float(v)) for v in lossv)
    ulp = math.ulp(float(exact))
    e_np = float(abs(fractions.Fraction(float(np.sum(lossv))) - exact)) / ulp
    e_ex = float(abs(fractions.Fraction(exact_sum(lossv)) - exact)) / ulp
    out(f"loss sum of 256 float64 in [0,5): |np.sum - exact| = {e_np:.2f} ulp, |exact_sum - exact| = {e_ex:.2f} ulp")
    g = rng.standard_normal(1 << 20, dtype=np.float32) * np.float32(1e-3)
    ref = math.fsum((g.astype(np.float64) ** 2).tolist())   # exact squares, correctly rounded sum
    from ..kernels import optim_cpu
    e_pl, e_ex = (abs(f(g) - ref) / math.ulp(ref) for f in (optim_cpu.sum_sq, exact_sum_sq))
    out(f"squared norm of 1M float32: |err| in float64 ulps: sum_sq {e_pl:.1f}, exact_sum_sq {e_ex:.1f} "
        f"(reference: math.fsum of the exact squares)")
    return res


class _MLPStep:
    """Forward + loss + backward + squared norm (+ an Adam update, adam=True) of the MLP on one rank's
    rows, plain or reproducible, with the gradient exchange over comm (plain: one float32 Allreduce of
    the flat buffer). The update is the same in both paths (reproducibility changes nothing there)."""

    def __init__(self, B_r: int, comm=None, reproducible: bool = False, kc: int = KC, chunk: int = 32,
                 seed: int = 0, mode: str = "auto", adam: bool = True, rule: str = "balanced"):
        from ..kernels import cpu as K
        self.K, self.comm, self.rep, self.kc, self.chunk, self.mode = K, comm, reproducible, kc, chunk, mode
        self.rule = rule
        self.size = 1 if comm is None else comm.Get_size()
        self.B = B_r * self.size
        rng = np.random.default_rng(seed)
        self.Ws = [(rng.standard_normal((i, o)) * np.sqrt(2 / i)).astype(np.float32) for i, o in zip(MLP[:-1], MLP[1:])]
        self.bs = [np.zeros(o, np.float32) for o in MLP[1:]]
        n = sum(W.size + b.size for W, b in zip(self.Ws, self.bs))
        self.flat = np.zeros(n, np.float32)
        r = 0 if comm is None else comm.Get_rank()
        data = np.random.default_rng(seed + 1)
        X = data.random((self.B, MLP[0]), dtype=np.float32)
        Y = data.integers(0, MLP[-1], self.B)
        self.x, self.y = X[r * B_r:(r + 1) * B_r].copy(), Y[r * B_r:(r + 1) * B_r].astype(np.int64)
        self.t: dict[str, list[float]] = {}
        self.adam = tuple(np.zeros(n, np.float32) for _ in range(3)) + (np.zeros(1, np.float32),) if adam else None
        self.steps = 0

    def __call__(self):
        """One step; appends its phases' seconds to self.t: forward (incl. loss), backward (incl. the
        gradient exchange), norm."""
        from mpi4py import MPI
        K = self.K
        t0 = time.perf_counter()
        acts = [self.x]
        for li, (W, b) in enumerate(zip(self.Ws, self.bs)):
            z = fixed_matmul(acts[-1], W, kc=self.kc, rule=self.rule) if self.rep else acts[-1] @ W
            K.bias_act_forward(z, b, K.RELU if li < len(self.Ws) - 1 else K.IDENTITY)
            acts.append(z)
        d = np.empty_like(acts[-1])
        losses = np.empty(len(self.y))
        if self.rep:
            softmax_ce_rows(acts[-1], self.y, 1.0 / self.B, d, losses)
            loss = exact_sum(losses, self.comm)
        else:
            loss = K.softmax_ce(acts[-1], self.y, 1.0 / self.B, d)
            if self.size > 1:
                loss = self.comm.allreduce(loss, op=MPI.SUM)
        t1 = time.perf_counter()
        off = 0
        scratch = None
        E = EMPTY
        for li in range(len(self.Ws) - 1, -1, -1):
            W = self.Ws[li]
            if li < len(self.Ws) - 1:
                if scratch is None or scratch.shape[0] < W.shape[1]:
                    scratch = np.empty(W.shape[1], np.float32)
                K.bias_act_backward(d, acts[li + 1], K.RELU, scratch[:W.shape[1]])
            gW = self.flat[off:off + W.size].reshape(W.shape)
            gb = self.flat[off + W.size:off + W.size + W.shape[1]]
            off += W.size + W.shape[1]
            if self.rep:
                info = {}
                dx = reproducible_dense_backward(acts[li], d, W, self.comm, kc=self.kc, rule=self.rule,
                                                 chunk=self.chunk, mode=self.mode, need_dx=li > 0, dW=gW, db=gb,
                                                 info=info)[2]
                E = max(E, info["exponent"])
            else:
                if li == len(self.Ws) - 1:
                    K.bias_act_backward(d, acts[li + 1], K.IDENTITY, gb)
                else:
                    gb[...] = scratch[:W.shape[1]]
                np.matmul(acts[li].T, d, out=gW)
                dx = d @ W.T if li > 0 else None
            d = dx
        if not self.rep and self.size > 1:
            self.comm.Allreduce(MPI.IN_PLACE, self.flat, op=MPI.SUM)
        t2 = time.perf_counter()
        if self.rep:
            sq = exact_sum_sq(self.flat, exponent=E)
        else:
            from ..kernels import optim_cpu
            sq = optim_cpu.sum_sq(self.flat)
        t3 = time.perf_counter()
        if self.adam is not None:   # the update (the same in both paths): Adam on a copy of the weights
            from ..kernels import optim_cpu
            p, m, v, vmax = self.adam
            self.steps += 1
            optim_cpu.adam_step(p, self.flat, m, v, vmax, 1e-3, 0.9, 0.999, 1e-8, 0.0, False, False, self.steps)
        t4 = time.perf_counter()
        for k, v in (("forward", t1 - t0), ("backward", t2 - t1), ("norm", t3 - t2), ("update", t4 - t3),
                     ("step", t4 - t0)):
            self.t.setdefault(k, []).append(v)
        return loss, sq


def _interleaved(steps: dict, reps: int, comm=None) -> dict:
    """Run the steps in turn (A, B, C, A, B, C, ...) so that a change of load hits all alike; medians
    (ms) of each phase, after 3 warm-up rounds (first-call shape checks, page faults). With comm: each
    round starts at a barrier and a phase's time is the slowest rank's."""
    from mpi4py import MPI
    for st in steps.values():
        for _ in range(3):
            st()
        st.t = {}
    for _ in range(reps):
        for st in steps.values():
            if comm is not None:
                comm.Barrier()
            st()
    out = {}
    for name, st in steps.items():
        t = {k: np.array(v) for k, v in st.t.items()}
        if comm is not None:
            for v in t.values():
                comm.Allreduce(MPI.IN_PLACE, v, op=MPI.MAX)
        out[name] = {k: 1e3 * float(np.median(v)) for k, v in t.items()}
    return out


def _report(out, title: str, t: dict) -> None:
    p = t["plain"]
    for name, v in t.items():
        if name == "plain":
            out(f"{title} plain:            step {v['step']:7.2f}  backward {v['backward']:7.2f}  forward "
                f"{v['forward']:6.2f}  norm {v['norm']:5.2f}  update {v['update']:5.2f} ms")
        else:
            out(f"{title} {name:17s} step {v['step']:7.2f} ({100 * (v['step'] / p['step'] - 1):+5.1f}%)  backward "
                f"{v['backward']:7.2f} ({100 * (v['backward'] / p['backward'] - 1):+5.1f}%)  forward "
                f"{v['forward']:6.2f} ({100 * (v['forward'] / p['forward'] - 1):+5.1f}%)  norm {v['norm']:5.2f} ms")


def bench(reps: int = 30, out=print, threads=(1, 2)) -> dict:
    """One process: the MLP 784-1024-1024-10 step (forward + loss, backward, squared norm, Adam update),
    plain float32 numpy vs reproducible (balanced k chunks of 256 and 448, OpenBLAS's blocking with
    GEMM_Q 448; "auto": the two big layers "gather", the last "chunks" of 32 rows; or all "gather"),
    batch 64 and 256, 1 and 2 threads (BLAS and Numba). Interleaved, medians."""
    import os
    res = {}
    for th in threads:
        _set_threads(th)
        for B in (64, 256):
            steps = {"plain": _MLPStep(B), "rep kc=256": _MLPStep(B, reproducible=True),
                     "rep kc=448": _MLPStep(B, reproducible=True, kc=448),
                     "rep openblas448": _MLPStep(B, reproducible=True, kc=448, rule="openblas"),
                     "rep ob448 gather": _MLPStep(B, reproducible=True, kc=448, rule="openblas", mode="gather")}
            load = os.getloadavg()[0]
            t = res[(th, B)] = _interleaved(steps, reps)
            _report(out, f"threads={th} batch={B:3d} load={load:.1f}->{os.getloadavg()[0]:.1f}", t)
    out(f"fixed_matmul backends used: {_stats}")
    return res


def bench_mpi(reps: int = 40, out=print) -> dict:
    """Under mpirun -n 2 (1 thread per rank): the step on 2 ranks, plain (float32 Allreduce of the flat
    gradient, one call) vs reproducible, batch 64 and 256 (global); then the exact Allreduce vs a float32
    Allreduce of the MLP's 1,863,690-element buffer."""
    import os

    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    say = out if rank == 0 else (lambda *a, **k: None)
    res = {}
    for B in (64, 256):
        steps = {"plain": _MLPStep(B // size, comm), "rep kc=256": _MLPStep(B // size, comm, True),
                 "rep openblas448": _MLPStep(B // size, comm, True, kc=448, rule="openblas"),
                 "rep ob448 gather": _MLPStep(B // size, comm, True, kc=448, rule="openblas", mode="gather")}
        load = os.getloadavg()[0]
        t = res[("step", B)] = _interleaved(steps, reps, comm)
        _report(say, f"{size} ranks batch={B:3d} load={load:.1f}->{os.getloadavg()[0]:.1f}", t)
    n = sum(i * o + o for i, o in zip(MLP[:-1], MLP[1:]))
    g = np.random.default_rng(rank).standard_normal(n, dtype=np.float32) * np.float32(1e-3)
    buf, q = g.copy(), np.empty(n + 1, np.int64)
    E = agree_exponent(comm, max_exponent(g)) + 1
    ts: dict[str, list] = {}

    def timed(name, f):
        buf[...] = g
        comm.Barrier()
        t0 = time.perf_counter()
        f()
        ts.setdefault(name, []).append(comm.allreduce(time.perf_counter() - t0, op=MPI.MAX))
    def gather_exchange(B):
        """What gather mode sends for the MLP instead of the Allreduce of its gradient: each layer's x
        and dy rows (Allgather) and dW's row blocks (Allgatherv)."""
        def f():
            for n_in, n_out in zip(MLP[:-1], MLP[1:]):
                rows = scratch(f"bx{n_in + n_out}", (B // size, n_in + n_out))
                comm.Allgather(rows, scratch(f"bX{n_in + n_out}", (B, n_in + n_out)))
                bounds = _row_bounds(n_in, size)
                dW = scratch(f"bW{n_in}x{n_out}", (n_in * n_out,))
                comm.Allgatherv(MPI.IN_PLACE, [dW, [(bounds[i + 1] - bounds[i]) * n_out for i in range(size)],
                                               [bounds[i] * n_out for i in range(size)], MPI.FLOAT])
        return f
    fns = {"float32 Allreduce": lambda: comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM),
           "gather-mode exchange, batch 64": gather_exchange(64),
           "gather-mode exchange, batch 256": gather_exchange(256),
           "allreduce_exact (MAX + int64)": lambda: allreduce_exact(comm, buf, scratch=q),
           "allreduce_exact, exponent given": lambda: allreduce_exact(comm, buf, scratch=q, exponent=E),
           "  of which: int64 Allreduce": lambda: comm.Allreduce(MPI.IN_PLACE, q[:n], op=MPI.SUM),
           "  of which: max_exponent": lambda: max_exponent(buf),
           "  of which: to_fixed": lambda: to_fixed(buf, -70, q[:n]),
           "  of which: from_fixed": lambda: from_fixed(q[:n], -70, buf)}
    for r in range(reps + 3):
        for name, f in fns.items():
            timed(name, f)
    res["allreduce"] = {k: 1e3 * float(np.median(v[3:])) for k, v in ts.items()}
    for k, v in res["allreduce"].items():
        say(f"{n} elements, {size} ranks: {k:34s} {v:7.2f} ms")
    say(f"load: {os.getloadavg()}")
    return res


def main(argv=None) -> int:
    import os
    import sys
    args = sys.argv[1:] if argv is None else argv
    if argv is None and "OPENBLAS_THREAD_TIMEOUT" not in os.environ:
        # as every hpcopt run (threads.pin_threads): threads that finish sleep soon instead of spinning;
        # they must be set before numpy is loaded, so start again with them
        os.environ.update(OMP_WAIT_POLICY="PASSIVE", OPENBLAS_THREAD_TIMEOUT="4")
        os.execv(sys.executable, [sys.executable, "-m", "hpcopt.parallel.reprosum", *args])
    what = args[0] if args else "probe"
    if what == "bench" and len(args) > 1:      # bench 1 / bench 2: one thread count only
        bench(threads=tuple(int(a) for a in args[1:]))
        return 0
    {"probe": probe, "accuracy": accuracy, "bench": bench, "bench-mpi": bench_mpi}[what]()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
