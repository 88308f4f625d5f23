"""Worker for tests/mpi/test_reprosum_mpi.py: the same global batch through a small MLP on however many
ranks mpirun started; rank 0 writes what must not depend on the rank count to OUT/result.npz.

    python tests/mpi/reprosum_worker.py OUT [--threads T] [--steps S]

Per mode (gather, chunks, auto): the first step's dW, db and dx (all rows) of every layer, the loss and
squared norm of every step, and the parameters after `steps` SGD steps with norm clipping. Plus the
plain float32 path's first-layer dW (Allreduce of partials), which DOES depend on the rank count.
"""
from __future__ import annotations

import argparse
import os
import sys

args = argparse.ArgumentParser()
args.add_argument("out")
args.add_argument("--threads", type=int, default=1)
args.add_argument("--steps", type=int, default=3)
args.add_argument("--batch", type=int, default=96)
args.add_argument("--kc", type=int, default=40)
args.add_argument("--chunk", type=int, default=2)
opt = args.parse_args()
# before numpy and numba are imported: they read their thread counts once
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[var] = str(opt.threads)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402

from hpcopt.kernels import cpu as K  # noqa: E402
from hpcopt.parallel import reprosum as R  # noqa: E402

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
B = opt.batch
assert B % size == 0, "the ranks must divide the global batch"
B_r = B // size
# small, with k chunks of 33..40: OpenBLAS's small-matrix kernels for these shapes are not the FMA
# chain (fixed_matmul falls back to A in Fortran order or to Numba); dW's k = 96 rows: 3 chunks
DIMS = (40, 72, 36, 5)

rng = np.random.default_rng(123)
X = rng.random((B, DIMS[0]), dtype=np.float32)
Y = rng.integers(0, DIMS[-1], B)
rows = slice(rank * B_r, (rank + 1) * B_r)
x_r, y_r = X[rows].copy(), Y[rows].astype(np.int64)
init = [((rng.standard_normal((i, o)) * np.sqrt(2 / i)).astype(np.float32), np.zeros(o, np.float32))
        for i, o in zip(DIMS[:-1], DIMS[1:])]


def gather_rows(a: np.ndarray) -> np.ndarray:
    full = np.empty((B,) + a.shape[1:], a.dtype)
    comm.Allgather(np.ascontiguousarray(a), full)
    return full


def step(params, mode: str, lr: float = 0.1, clip: float = 0.5):
    """One reproducible SGD step; returns (loss, squared norm, per-layer (dW, db, dx rows of all ranks))."""
    acts = [x_r]
    for li, (W, b) in enumerate(params):
        z = R.fixed_matmul(acts[-1], W, kc=opt.kc)
        K.bias_act_forward(z, b, K.RELU if li < len(params) - 1 else K.IDENTITY)
        acts.append(z)
    d = np.empty_like(acts[-1])
    losses = np.empty(B_r)
    R.softmax_ce_rows(acts[-1], y_r, 1.0 / B, d, losses)
    loss = R.exact_sum(losses, comm)
    n = sum(W.size + b.size for W, b in params)
    flat = np.empty(n, np.float32)
    grads, off, out = [], 0, []
    for li in range(len(params) - 1, -1, -1):
        W, b = params[li]
        if li < len(params) - 1:
            K.bias_act_backward(d, acts[li + 1], K.RELU, np.empty(W.shape[1], np.float32))
        gW = flat[off:off + W.size].reshape(W.shape)
        gb = flat[off + W.size:off + W.size + W.shape[1]]
        off += W.size + W.shape[1]
        dx = R.reproducible_dense_backward(acts[li], d, W, comm, kc=opt.kc, mode=mode, chunk=opt.chunk,
                                           need_dx=li > 0, dW=gW, db=gb)[2]
        grads.append((li, gW, gb))
        out.append((li, gW.copy(), gb.copy(), gather_rows(dx) if dx is not None else np.zeros(0, np.float32)))
        d = dx
    sq = R.exact_sum_sq(flat)          # every rank holds the whole summed gradient
    scale = np.float32(min(1.0, clip / (np.sqrt(sq) + 1e-6)))
    for li, gW, gb in grads:
        W, b = params[li]
        W -= np.float32(lr) * (scale * gW)
        b -= np.float32(lr) * (scale * gb)
    return loss, sq, out


result = {}
for mode in ("gather", "chunks", "auto"):
    params = [(W.copy(), b.copy()) for W, b in init]
    for s in range(opt.steps):
        loss, sq, layers = step(params, mode)
        result[f"{mode}/loss{s}"] = np.float64(loss)
        result[f"{mode}/sqnorm{s}"] = np.float64(sq)
        if s == 0:
            for li, dW, db, dx in layers:
                result[f"{mode}/dW{li}"], result[f"{mode}/db{li}"], result[f"{mode}/dx{li}"] = dW, db, dx
    for li, (W, b) in enumerate(params):
        result[f"{mode}/W{li}"], result[f"{mode}/b{li}"] = W, b

# the plain path, for contrast: float32 partials of the first layer, Allreduce
plain = np.ascontiguousarray(x_r.T @ (x_r @ init[0][0]))
comm.Allreduce(MPI.IN_PLACE, plain, op=MPI.SUM)
result["plain/dW0"] = plain

# exact column sums (the test metrics): rows of wildly different magnitudes, one column with an inf,
# one all zeros, split over the ranks by blocks: the same bits for every rank count
S = np.random.default_rng(7).standard_normal((B, 5)) * np.exp2(np.random.default_rng(8).integers(-30, 30, (B, 5)))
S[:, 3] = 0.0
S[5, 4] = np.inf
result["colsums"] = R.exact_colsums(S[rows], comm, terms=B)

# exact Allreduce: the same bits whatever the order of the ranks in the communicator
r_ = np.random.default_rng(rank)
g = (r_.standard_normal(5000) * np.exp2(r_.integers(-20, 0, 5000))).astype(np.float32)
a, b_ = g.copy(), g.copy()
R.allreduce_exact(comm, a)
rev = comm.Split(0, size - 1 - rank)
R.allreduce_exact(rev, b_)
E = R.agree_exponent(comm, R.max_exponent(g))
c = g.copy()
R.allreduce_exact(comm, c, exponent=E + 1)   # one collective, and a different lsb: compare with a
d = g.copy()
R.allreduce_exact(rev, d, exponent=E + 1)    # reversed rank order
ok = bool(np.array_equal(a.view(np.uint32), b_.view(np.uint32))
          and np.array_equal(c.view(np.uint32), d.view(np.uint32)))
oks = comm.gather(ok, root=0)
if rank == 0:
    result["allreduce_order_independent"] = np.array(all(oks))
    result["allreduce_sum"] = a
    os.makedirs(opt.out, exist_ok=True)
    np.savez(os.path.join(opt.out, "result.npz"), **result)
    print(f"ranks={size} threads={opt.threads} backends={R._stats}")
