"""2-D convolution forward and backward (conv1d is conv2d over (B, C, 1, L)): channel-major im2col + BLAS.

    conv2d_forward(x, weight, bias, stride, padding, dilation, act, scratch) -> y
    conv2d_backward(x, y, dy, weight, dweight, dbias, stride, padding, dilation, act, need_dx, scratch)
        -> dx | None

x (B, C, H, W), weight (C_out, C, kh, kw) as torch stores it, bias (C_out,), y and dy (B, C_out, OH, OW);
stride/padding/dilation an int or an (h, w) pair, any values (torch's output-size formula); act an
activation code of kernels/cpu.py that takes its derivative from the output (identity, relu, tanh,
sigmoid: fused here; gelu/silu are the caller's, as for Dense). float32 and float64. `scratch` is a
dict the caller keeps per layer: the buffers reused from call to call live there (None: allocate). y
and dx are new arrays (a pipeline holds several forwards' outputs at once); dweight and dbias are
overwritten (adding a later micro-batch's gradient is the caller's).

The method (kernels/conv.py, "plane layout"): the batch is cut into chunks of nb images, each small
enough that its columns stay in L2 (_COLS_BYTES). Per chunk:

    forward    cols (C·kh·kw, nb·OH·OW) := im2col_planes(x)       kh·kw shifted copies of each plane
               z (C_out, nb·OH·OW) := W @ cols                     BLAS, in column blocks (below)
               y[images] := act(z + bias)                          channel-major already: NCHW
    backward   dz (C_out, nb·OH·OW) := dy·act'(y), db += Σ dz      one pass, from the OUTPUT y
               cols := im2col_planes(x) again                     no forward state is kept
               dWᵀ[chunk] := cols @ dzᵀ                            per chunk; summed in chunk order
                                                                   (weight_grad_planes when C_out <= 16)
               dcols := Wᵀ @ dz  (into cols), dx[images] := col2im_planes(dcols)

Measured on this project's machine (2 cores, AVX-512, numpy's OpenBLAS 0.3.31; x (64, 16, 32, 32),
16 3 × 3 filters, padding 1, relu, float32, one thread, the whole batch, each step alone and cache-warm):
im2col 0.85 ms, forward GEMM 2.9 ms, bias + relu 0.18 ms, act' 0.25 ms, dW 3.3 ms, dx GEMM 2.8 ms,
col2im 1.1 ms; in sequence, forward 5.3-5.6 ms and forward + backward 17.5-19 ms, where torch 2.13
(oneDNN's direct convolution) takes 5.6-6.2 and 17.5-21 ms (`hpcopt bench conv`; torch's backward
took 26 ms instead until the process had allocated and freed a 16 MB array, presumably glibc's malloc
then keeping its large temporaries instead of mapping them afresh). The
layout this replaces (one im2col row per output pixel, layers2d.py) took 37-60 and 75-120 ms. Design
choices, each measured on that shape:
  * GEMM column blocks: OpenBLAS runs a GEMM of M·N·K <= 1e6 through its small-matrix kernels (no
    packing of the operands); W (16, 144) @ cols in blocks of 432 columns runs at 104-110 GFLOP/s
    against 72-76 for whole 1024-column images, Wᵀ (144, 16) @ dz at 109-114 against 61-63 (blocks of
    64-384 measured too: the largest under 1e6 is as fast as any). dW (cols @ dzᵀ, the long axis its
    K) is fastest whole in OpenBLAS, 68 GFLOP/s (dz @ colsᵀ 40); kernels/conv.py's weight_grad_planes
    (4 × 4 register tiles along the pixels) does it at 85, so it takes dW up to C_out = 16 (at 32
    channels OpenBLAS is ahead, 87 to 76).
  * 64-byte alignment: the blocks' rows must start on cache lines (buffers aligned, row pitch and
    block starts multiples of 16 floats): the blocked W @ cols above runs at 54 GFLOP/s when every
    row is 16 bytes off.
  * Chunks of one 32 × 32 image (590 KB of columns) beat 2 and 4 images (the columns spill out of the
    1.25 MB L2); half images (295 KB, as 128 × 16 × 32 inputs) were no faster.
  * Threads: the chunks are shared among `numba.get_num_threads()` Python threads, with BLAS held at
    one thread meanwhile (threadpoolctl; without it, no split and BLAS threads each GEMM). The kernels
    release the GIL and so does numpy's matmul. 2 threads, forward + backward (best of 11, load average
    about 1): 11.3-12.6 ms split, 18.8-19.1 ms with BLAS threading each (small) GEMM instead;
    torch 15-17.5 ms (10.9 in one run). Calls under _SPLIT_FLOPS of GEMM work stay on one thread (the
    8 × 8 digits layer: 0.16 ms alone, 0.33 split). The chunks do not depend on the thread count and
    the per-chunk dW, db are summed in chunk order, so results are the same bits on any thread count.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from ..kernels import conv as KC
from ..kernels import cpu as K

_COLS_BYTES = 256 * 1024    # columns of one chunk at most (but one image at least): stays in L2
_MIN_CHUNKS = 4             # at least this many chunks (when B allows), so 2-4 threads all get a share
_SPLIT_FLOPS = 3e7          # GEMM work of a call below which the thread split costs more than it saves
_SMALL_MNK = 1_000_000      # OpenBLAS's small-matrix GEMM path (no packing) takes M·N·K <= 1e6
_ALIGN = 16                 # row pitches and GEMM blocks in multiples of 16 elements (64-byte rows)
_DW_KERNEL_CO = 16          # dW by kernels/conv.py's weight_grad_planes up to this C_out, else by BLAS


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if np.isscalar(v) else (int(v[0]), int(v[1]))


def _buf(scratch: dict | None, key, shape: tuple[int, ...], dtype) -> np.ndarray:
    """A C-contiguous array of `shape` starting on a 64-byte boundary: a view of scratch[key] when that is
    large enough (else made, and kept there)."""
    n = 1
    for s in shape:
        n *= s
    a = None if scratch is None else scratch.get(key)
    if a is None or a.dtype != dtype or a.size < n + _ALIGN:
        a = np.empty(n + _ALIGN, dtype)
        if scratch is not None:
            scratch[key] = a
    off = (-a.ctypes.data % 64) // a.itemsize
    return a[off:off + n].reshape(shape)


def _check_act(act: int) -> None:
    if act not in (K.IDENTITY, K.RELU, K.TANH, K.SIGMOID):
        raise ValueError(f"conv2d fuses identity/relu/tanh/sigmoid (codes 0-3), got activation code {act}; "
                         "an activation that needs its input (gelu, silu) is applied by the caller")


class _Plan:
    """Geometry of one call and its split into chunks of nb images (the last ones one image shorter)."""

    def __init__(self, x_shape, w_shape, stride, padding, dilation, itemsize):
        self.B, self.C, self.H, self.W = x_shape
        self.Co, _, self.kh, self.kw = w_shape
        (self.sh, self.sw), (self.ph, self.pw), (self.dh, self.dw) = _pair(stride), _pair(padding), _pair(dilation)
        self.OH = KC.conv_out_size(self.H, self.kh, self.sh, self.ph, self.dh)
        self.OW = KC.conv_out_size(self.W, self.kw, self.sw, self.pw, self.dw)
        if self.OH < 1 or self.OW < 1:
            raise ValueError(f"conv2d: input {tuple(x_shape)} is smaller than the dilated kernel {w_shape[2:]}")
        self.N, self.Kd = self.OH * self.OW, self.C * self.kh * self.kw
        self.flops = 2.0 * self.B * self.N * self.Co * self.Kd      # one GEMM's worth
        B = self.B
        nb = max(1, min(_COLS_BYTES // (self.Kd * self.N * itemsize), -(-B // _MIN_CHUNKS)))
        n_chunks = -(-B // nb)
        base, extra = divmod(B, n_chunks)       # n_chunks sizes differing by at most one
        self.chunks = []
        b0 = 0
        for c in range(n_chunks):
            n = base + (1 if c < extra else 0)
            self.chunks.append((b0, n))
            b0 += n
        self.nb = base + (1 if extra else 0)
        self.pitch = -(-self.nb * self.N // _ALIGN) * _ALIGN     # columns' row pitch: 64-byte rows

    def blocks(self, L: int) -> list[slice]:
        """Column blocks of a chunk's L columns for the W @ cols and Wᵀ @ dz GEMMs: the longest multiple of
        _ALIGN columns with C_out·C·kh·kw·block <= _SMALL_MNK (one block when that is all of L or under
        _ALIGN columns)."""
        pmax = _SMALL_MNK // (self.Co * self.Kd) // _ALIGN * _ALIGN
        if pmax == 0 or L <= pmax:
            return [slice(0, L)]
        return [slice(i, min(L, i + pmax)) for i in range(0, L, pmax)]

    def views(self, cols: np.ndarray, z: np.ndarray, n: int):
        """For a chunk of n images: (cols[:, :L], z[:, :L], [(cols block, z block), ...]) over its L = n·N
        columns of the (rows, pitch) buffers, the blocks those of blocks(L)."""
        L = n * self.N
        return cols[:, :L], z[:, :L], [(cols[:, c], z[:, c]) for c in self.blocks(L)]

    def geometry(self):
        return self.kh, self.kw, self.sh, self.sw, self.ph, self.pw, self.dh, self.dw, self.OH, self.OW


# ---------------------------------------------------------------- threads: chunk ranges on Python threads

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_blas = None          # threadpoolctl's BLAS controllers, or False where threadpoolctl is missing
_lock = threading.Lock()


def _blas_controllers():
    """threadpoolctl's controllers of the BLAS libraries loaded (numpy's OpenBLAS), made once; False
    where threadpoolctl is missing."""
    global _blas
    if _blas is None:
        try:
            from threadpoolctl import ThreadpoolController
            _blas = ThreadpoolController().select(user_api="blas").lib_controllers
        except Exception:       # not installed, or no BLAS it knows: no split, BLAS threads the GEMMs
            _blas = False
    return _blas


def _run(tasks, threads, flops):
    """Run tasks[i](worker=i): on a pool of threads - 1 workers plus this thread, BLAS held at one thread
    meanwhile, when there are threads and work enough (`flops`) and threadpoolctl can hold BLAS; else
    one after the other on this thread (BLAS as configured)."""
    blas = _blas_controllers() if threads > 1 and len(tasks) > 1 and flops >= _SPLIT_FLOPS else False
    if not blas:
        for t in tasks:
            t(0)
        return
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size != threads - 1:
            _pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="hpcopt-conv")
            _pool_size = threads - 1
        saved = [lib.num_threads for lib in blas]
        for lib in blas:
            lib.set_num_threads(1)
        try:
            futures = [_pool.submit(t, i) for i, t in enumerate(tasks[1:], 1)]
            try:
                tasks[0](0)
            finally:
                errors = [f.exception() for f in futures]     # wait for all before anything returns
            for e in errors:
                if e is not None:
                    raise e
        finally:
            for lib, n in zip(blas, saved):
                lib.set_num_threads(n)


def _shares(n_chunks: int, threads: int) -> list[range]:
    """The chunk indices of each thread: contiguous ranges of equal length (± 1)."""
    t = max(1, min(threads, n_chunks))
    return [range(i * n_chunks // t, (i + 1) * n_chunks // t) for i in range(t)]


def conv2d_forward(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, stride=1, padding=0, dilation=1,
                   act: int = K.IDENTITY, scratch: dict | None = None) -> np.ndarray:
    """x (B, C, H, W), weight (C_out, C, kh, kw), bias (C_out,) -> a new y = act(conv(x) + b)
    (B, C_out, OH, OW). Per chunk of images: im2col_planes, W @ cols in column blocks, bias_act_planes."""
    _check_act(act)
    x = np.ascontiguousarray(x)
    p = _Plan(x.shape, weight.shape, stride, padding, dilation, x.itemsize)
    g = p.geometry()
    w2 = np.ascontiguousarray(weight.reshape(p.Co, p.Kd))
    bias = np.ascontiguousarray(bias)
    y = np.empty((p.B, p.Co, p.OH, p.OW), x.dtype)
    y3 = y.reshape(p.B, p.Co, p.N)
    threads = numba.get_num_threads()
    shares = _shares(len(p.chunks), threads)

    def task(share):
        def run(worker):
            cols = _buf(scratch, ("cols", worker), (p.Kd, p.pitch), x.dtype)    # (C·kh·kw, ≥ nb·N)
            z = _buf(scratch, ("z", worker), (p.Co, p.pitch), x.dtype)          # (C_out, ≥ nb·N)
            views = {}
            for ci in share:
                b0, n = p.chunks[ci]
                if n not in views:
                    views[n] = p.views(cols, z, n)
                KC.im2col_planes(x, b0, n, *g, cols)
                for cb, zb in views[n][2]:
                    np.matmul(w2, cb, out=zb)
                KC.bias_act_planes(z, bias, act, b0, n, y3)
        return run

    _run([task(s) for s in shares], threads, p.flops)
    return y


def conv2d_backward(x: np.ndarray, y: np.ndarray, dy: np.ndarray, weight: np.ndarray, dweight: np.ndarray,
                    dbias: np.ndarray, stride=1, padding=0, dilation=1, act: int = K.IDENTITY,
                    need_dx: bool = True, scratch: dict | None = None) -> np.ndarray | None:
    """x (B, C, H, W), y and dy (B, C_out, OH, OW) (y: the forward's output, read for act' unless act is
    identity) -> dweight (C_out, C, kh, kw) and dbias (C_out,) written; returns a new dx (B, C, H, W), or
    None when need_dx is False (then the Wᵀ @ dz GEMM and col2im are skipped)."""
    _check_act(act)
    x, dy = np.ascontiguousarray(x), np.ascontiguousarray(dy)
    y = dy if act == K.IDENTITY else np.ascontiguousarray(y)
    p = _Plan(x.shape, weight.shape, stride, padding, dilation, x.itemsize)
    g = p.geometry()
    dy3, y3 = dy.reshape(p.B, p.Co, p.N), y.reshape(p.B, p.Co, p.N)
    wT = np.ascontiguousarray(weight.reshape(p.Co, p.Kd).T)          # (C·kh·kw, C_out)
    n_chunks = len(p.chunks)
    dWT_parts = _buf(scratch, "dWT_parts", (n_chunks, p.Kd, p.Co), x.dtype)   # per chunk, summed in order
    db_parts = np.zeros((n_chunks, p.Co))
    dx = np.empty(x.shape, x.dtype) if need_dx else None
    threads = numba.get_num_threads()
    shares = _shares(n_chunks, threads)

    def task(share):
        def run(worker):
            cols = _buf(scratch, ("cols", worker), (p.Kd, p.pitch), x.dtype)
            dz = _buf(scratch, ("z", worker), (p.Co, p.pitch), x.dtype)
            views = {}
            for ci in share:
                b0, n = p.chunks[ci]
                if n not in views:
                    views[n] = p.views(cols, dz, n)
                cols_n, dz_n, blocks = views[n]
                KC.act_backward_planes(dy3, y3, act, b0, n, dz, db_parts[ci])
                KC.im2col_planes(x, b0, n, *g, cols)
                if p.Co <= _DW_KERNEL_CO:
                    KC.weight_grad_planes(cols, dz, n * p.N, dWT_parts[ci])
                else:
                    np.matmul(cols_n, dz_n.T, out=dWT_parts[ci])
                if need_dx:
                    for cb, zb in blocks:                            # dcols (C·kh·kw, n·N): cols is spent
                        np.matmul(wT, zb, out=cb)
                    KC.col2im_planes(cols, b0, n, *g, dx)
        return run

    _run([task(s) for s in shares], threads, (2 if need_dx else 1) * p.flops)
    dweight[...] = dWT_parts.sum(axis=0, dtype=np.float64).T.reshape(dweight.shape)   # chunk order, float64
    dbias[...] = db_parts.sum(axis=0)
    return dx
