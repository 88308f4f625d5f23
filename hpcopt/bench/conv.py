"""`hpcopt bench conv`: the convolution (nn/conv.py) forward and forward + backward next to PyTorch CPU's
(torch.nn.functional.conv2d / conv1d + relu, autograd for the backward), with the same thread count, and
the machine's float32 GEMM rate as the limit, all measured in the same run.

Shapes (batch --batch, float32, relu fused, stride 1):
    16 -> 16 channels, 3 × 3, 32 × 32, padding 1     the reference shape
    1 -> 32 channels, 3 × 3, 8 × 8, padding 1        the first layer on the digits images (C_in = 1)
    32 -> 32 channels, 3 × 3, 8 × 8, padding 1       a second layer there
    conv1d 16 -> 16 channels, k = 5, L = 256, padding 2   (conv2d over (B, C, 1, L))
Forward + backward computes dx, dW and db (hpcopt: conv2d_forward then conv2d_backward with need_dx;
torch: relu(conv(x)).backward(dy) on leaves x, W, b). torch's forward runs under no_grad (no graph), the
faster of its two forwards.

Timing: --repeats rounds, each timing hpcopt forward, torch forward, hpcopt forward + backward and torch
forward + backward back to back (so all four see the same machine load); a sample is `inner` calls,
enough for ~20 ms, and the medians are shown. ratio = torch time / hpcopt time (above 1: hpcopt faster).
GFLOP/s counts 2·B·OH·OW·C_out·C_in·kh·kw for the forward and three times that for forward + backward
(dx, dW: one more GEMM's worth each); limit = numpy's float32 matmul of two --gemm-size square matrices
on the same threads, the rate the convolution's GEMMs could at best reach. It runs first, and so also
does torch a favour: once a process has freed arrays that large, torch's backward at the reference
shape takes 18-19 ms instead of 26 (one thread; presumably glibc's malloc then keeping its large
temporaries), so the peer is measured at its best. On a shared 2-core machine the ratios move by
10-15 % from run to run (more at 2 threads, where another process takes a core): run it a few times.

Standalone: python -m hpcopt bench conv [--json] [--threads N] [--repeats R] [--batch B]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numba
import numpy as np

# (label, per-sample input shape, C_out, kernel, padding); 2-D input shape (C, L): conv1d
SHAPES = [
    ("conv2d 16->16 3x3 32x32 p1", (16, 32, 32), 16, 3, 1),
    ("conv2d 1->32 3x3 8x8 p1", (1, 8, 8), 32, 3, 1),
    ("conv2d 32->32 3x3 8x8 p1", (32, 8, 8), 32, 3, 1),
    ("conv1d 16->16 k5 L256 p2", (16, 256), 16, 5, 2),
]
SAMPLE_S = 0.02   # seconds of calls per timing sample


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repeats", type=int, default=9, help="interleaved rounds; medians are shown (default 9)")
    p.add_argument("--batch", type=int, default=64, help="images per call (default 64)")
    p.add_argument("--gemm-size", type=int, default=2048, help="square float32 GEMM for the limit (default 2048)")


def gemm_gflops(n: int, repeats: int) -> float:
    """numpy float32 matmul of two n × n matrices, GFLOP/s (median of repeats, after one warm-up)."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty_like(a)
    np.matmul(a, b, out=c)
    times = []
    for _ in range(max(repeats, 3)):
        t0 = time.perf_counter()
        np.matmul(a, b, out=c)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def _inner(fn) -> int:
    """Calls per sample: enough for SAMPLE_S seconds (after two warm-up calls, the second one timed)."""
    fn()
    t0 = time.perf_counter()
    fn()
    return max(1, int(SAMPLE_S / max(time.perf_counter() - t0, 1e-7)))


def interleaved_medians(fns: list, repeats: int) -> list[float]:
    """Median seconds per call of each function, timed round-robin so all see the same machine load."""
    inner = [_inner(f) for f in fns]
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for f, k, s in zip(fns, inner, samples):
            t0 = time.perf_counter()
            for _ in range(k):
                f()
            s.append((time.perf_counter() - t0) / k)
    return [statistics.median(s) for s in samples]


def _cases(torch, in_shape, c_out, k, pad, batch, rng):
    """(flops, hpcopt fwd, torch fwd, hpcopt fwd+bwd, torch fwd+bwd) for one shape."""
    from ..kernels import cpu as K
    from ..nn.conv import conv2d_backward, conv2d_forward

    F = torch.nn.functional
    conv1d = len(in_shape) == 2
    x = rng.standard_normal((batch, *in_shape), dtype=np.float32)
    c_in = in_shape[0]
    wshape = (c_out, c_in, k) if conv1d else (c_out, c_in, k, k)
    w = (rng.standard_normal(wshape) / np.sqrt(c_in * k ** (len(wshape) - 2))).astype(np.float32)
    b = (0.1 * rng.standard_normal(c_out)).astype(np.float32)
    if conv1d:   # hpcopt: conv2d over (B, C, 1, L) with a (1, k) kernel
        x4, w4, stride, padding, torch_conv = x[:, :, None, :], w[:, :, None, :], (1, 1), (0, pad), F.conv1d
    else:
        x4, w4, stride, padding, torch_conv = x, w, 1, pad, F.conv2d
    scratch: dict = {}
    y = conv2d_forward(x4, w4, b, stride, padding, 1, K.RELU, scratch)
    dy = rng.standard_normal(y.shape, dtype=np.float32)
    dw, db = np.empty_like(w4), np.empty_like(b)
    _, _, OH, OW = y.shape
    flops = 2.0 * batch * OH * OW * c_out * int(np.prod(wshape[1:]))

    def ours_fwd():
        conv2d_forward(x4, w4, b, stride, padding, 1, K.RELU, scratch)

    def ours_fb():
        yy = conv2d_forward(x4, w4, b, stride, padding, 1, K.RELU, scratch)
        conv2d_backward(x4, yy, dy, w4, dw, db, stride, padding, 1, K.RELU, True, scratch)

    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    dyt = torch.tensor(dy.reshape(-1, c_out, OW) if conv1d else dy)

    def torch_fwd():
        with torch.no_grad():
            torch.relu(torch_conv(xt, wt, bt, 1, pad))

    def torch_fb():
        xt.grad = wt.grad = bt.grad = None
        torch.relu(torch_conv(xt, wt, bt, 1, pad)).backward(dyt)

    return flops, ours_fwd, torch_fwd, ours_fb, torch_fb


def run(args) -> list[dict]:
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    try:
        import torch
    except ImportError as e:
        raise SystemExit("hpcopt bench conv needs torch (pip install 'hpcopt[dev]')") from e
    torch.set_num_threads(args.threads)
    limit = gemm_gflops(args.gemm_size, args.repeats)
    rng = np.random.default_rng(0)
    rows = []
    for label, in_shape, c_out, k, pad in SHAPES:
        flops, ours_fwd, torch_fwd, ours_fb, torch_fb = _cases(torch, in_shape, c_out, k, pad, args.batch, rng)
        t = interleaved_medians([ours_fwd, torch_fwd, ours_fb, torch_fb], args.repeats)
        for what, f, ours, theirs in (("fwd", flops, t[0], t[1]), ("fwd+bwd", 3 * flops, t[2], t[3])):
            rows.append(dict(name=f"{label} B{args.batch} {what}", unit="GFLOP/s", hpcopt=f / ours / 1e9,
                             peer_name=f"torch {torch.__version__}", peer=f / theirs / 1e9, ratio=theirs / ours,
                             limit=limit, hpcopt_ms=1e3 * ours, peer_ms=1e3 * theirs, threads=args.threads))
    return rows
