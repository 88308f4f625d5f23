"""run.reproducible = true: the parameters after every step are the same bits for any number of
data-parallel ranks (dividing the global batch), any thread count per rank and any bucket/overlap
setting (docs/reproducible.md; the primitives and their measurements: reprosum.py).

How, for the data-parallel strategy over a model of dense layers:
    forward      x @ W by reprosum.fixed_matmul: each row's product a fixed-order float32 chain,
                 whatever the rows in the call and the threads (BLAS where it was checked to compute
                 exactly that, else a Numba kernel)
    backward     each dense layer's dW = sum over the GLOBAL batch's rows, in one fixed order: the
                 ranks gather the layer's input rows and output gradients (Allgather, rank order =
                 the global batch's row order), each computes a block of dW's rows from all of them
                 with fixed_matmul, and an Allgatherv assembles dW on every rank; db is an exact
                 fixed-point column sum; dx per row, fixed order. The gradients are then the same
                 global sums on every rank: no bucket exchange follows (parallel.bucket_mb and
                 parallel.overlap do not change a reproducible run).
    update       the gradient norm (clipping, the non-finite check, metrics) a float64 sum in a fixed
                 tree per tensor, the tensors added in the model's order (NormSums) over the global
                 gradient every rank holds; every optimizer is elementwise: the same bits on every rank.
    ZeRO-1       (parallel.zero = 1) each rank updates its shard of that global gradient with its 1/N
                 of the optimizer state, the norm taken over the whole gradient, then an Allgatherv of
                 the shards (ShardGather): elementwise, the same bits as without shards.
    pipeline     each stage's dense layers keep the step's micro-batches' rows and compute dW, db from
                 all of them at the last backward (MicroBatched): the data strategy's chain over the
                 global batch; the norm's per-tensor sums gathered over the stages.
    local SGD    each replica steps alone with these kernels (Reproducible(COMM_SELF)), and the
                 averages are exact fixed-point sums (local_sgd.Averaging(exact=True)): the same bits
                 for any thread count, whatever order the MPI library reduces in. Across rank counts
                 local SGD is another algorithm (N replicas averaged), so not equal there.
    evaluation   each row's loss and scores summed exactly (losses.row_scores, reprosum.exact_colsums).
Not covered (one line when asked for): the tensor, hybrid and async strategies, compression, layers
other than dense/activation/flatten/dropout, float64 models, the GPU.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..errors import ConfigError
from . import reprosum
from .strategy import Exchange

LAYERS = ("dense", "activation", "flatten", "dropout")
STRATEGIES = ("data", "pipeline", "local_sgd")
# The products' k chunks: OpenBLAS's own one-thread blocking with GEMM_Q = 448 (SkylakeX), so that a
# one-thread call IS the fixed-order product (docs/reproducible.md §6: the cheapest of the rules
# measured). Part of the definition of a reproducible run: changing it changes the bits.
KC, RULE = 448, "openblas"


LANES = 8      # each block: 8 interleaved float64 sums (lane l: elements 8j + l), added pairwise at the end
BLOCK = 8192   # the norm's fixed tree: a tensor of n values is ceil(n / BLOCK) blocks (a function of n only)


@njit(cache=True, error_model="numpy", boundscheck=False)
def _block_sum_sq(g, lo, hi, clip, clipped):
    """sum of g[lo:hi]² (each value first clamped to [-clip, clip] if clipped) in a fixed order: LANES
    interleaved float64 sums, ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)), then the tail in order.
    The order is fixed by (lo, hi) alone; the independent lanes let the CPU overlap the additions (3.3x
    faster than one running sum, measured on 1.9M gradients)."""
    end = lo + (hi - lo) // LANES * LANES
    x = g[lo:end].reshape(-1, LANES)
    acc = np.zeros(LANES)
    if clipped:
        for j in range(x.shape[0]):
            for k in range(LANES):
                v = min(max(np.float64(x[j, k]), -clip), clip)
                acc[k] += v * v
    else:
        for j in range(x.shape[0]):
            for k in range(LANES):
                v = np.float64(x[j, k])
                acc[k] += v * v
    s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
    for i in range(end, hi):
        v = np.float64(g[i])
        if clipped:
            v = min(max(v, -clip), clip)
        s += v * v
    return s


def _block_sums_(g, los, his, clip, s, c):
    """s[b], c[b] = sum g², sum clamp(g)² of block b (g[los[b]:his[b]], _block_sum_sq): each block alone,
    so any thread may compute it and the results are the same bits."""
    clipped = clip < np.inf
    for b in prange(los.size):
        s[b] = _block_sum_sq(g, los[b], his[b], clip, False)
        c[b] = _block_sum_sq(g, los[b], his[b], clip, True) if clipped else s[b]


_block_sums = njit(cache=True, parallel=True)(_block_sums_)   # large buffers: the blocks over the threads
_block_sums_1 = njit(cache=True)(_block_sums_)                 # small ones: no thread start-up
PAR_BLOCKS = 32


@njit(cache=True)
def _tensor_totals(s, c, first, out):
    """out[t] = tensor t's blocks (first[t]:first[t + 1]) added in order."""
    for t in range(first.size - 1):
        ss = 0.0
        cc = 0.0
        for b in range(first[t], first[t + 1]):
            ss += s[b]
            cc += c[b]
        out[t, 0] = ss
        out[t, 1] = cc


@njit(cache=True)
def _in_order(parts):
    """The tensors' sums added one after another in the model's buffer order."""
    s = 0.0
    c = 0.0
    for t in range(parts.shape[0]):
        s += parts[t, 0]
        c += parts[t, 1]
    return s, c


class NormSums:
    """clip_and_check's sum_sq under run.reproducible: (sum g², sum clamp(g)²) of the WHOLE model's
    gradient, the same bits for any layout holding it. Each tensor's sums are a float64 tree fixed by its
    length alone (its blocks, each by _block_sum_sq, on any threads, then added in order), and the
    tensors' sums are added in the model's buffer order (backward
    order: the last layer's tensors first). segments: this rank's tensors (offset, length) in its buffer,
    in that order; stages: the pipeline communicator whose rank p holds stage p (its tensors follow
    stage p + 1's in the model's order): the stages' per-tensor sums are gathered (one small allgather)
    and every rank adds all of them in the same order. Thread-independent (a block's sum is one thread's
    work: 1.9 -> 1.0 ms with 2 threads for 1.86M gradients); cheaper than the exact fixed-point sum a
    sum over ranks of partial totals would need (docs/reproducible.md §0)."""

    def __init__(self, segments, stages=None):
        los, his, first = [], [], [0]
        for o, n in segments:   # tensor (o, n): ceil(n / BLOCK) blocks [b n / nb, (b + 1) n / nb)
            nb = max(1, -(-n // BLOCK))
            los += [o + b * n // nb for b in range(nb)]
            his += [o + (b + 1) * n // nb for b in range(nb)]
            first.append(len(los))
        self.los, self.his = np.array(los, np.int64), np.array(his, np.int64)
        self.first = np.array(first, np.int64)
        self.s, self.c = np.empty(len(los)), np.empty(len(los))
        self.parts = np.empty((len(segments), 2))
        self.stages = stages if stages is not None and stages.Get_size() > 1 else None

    def __call__(self, grads: np.ndarray, clip_value: float) -> tuple[float, float]:
        clip = clip_value if clip_value > 0 else np.inf
        (_block_sums if self.los.size >= PAR_BLOCKS else _block_sums_1)(grads, self.los, self.his, clip, self.s, self.c)
        _tensor_totals(self.s, self.c, self.first, self.parts)
        parts = self.parts
        if self.stages is not None:   # stage P-1's tensors come first in the model's buffer order
            parts = np.concatenate(self.stages.allgather(parts)[::-1])
        return _in_order(parts)


def check(cfg, spec) -> None:
    """What run.reproducible covers; ConfigError naming the first thing it does not."""
    src, p = cfg.source, cfg.parallel
    why = None
    if p.strategy not in STRATEGIES:
        why = (f"parallel.strategy = \"{p.strategy}\" (it covers "
               f"{', '.join(chr(34) + n + chr(34) for n in STRATEGIES)})")
    elif p.compression != "none":
        why = f"parallel.compression = \"{p.compression}\""
    elif cfg.model.dtype != "float32":
        why = "model.dtype = \"float64\""
    elif cfg.backend.device != "cpu":
        why = "backend.device = \"cuda\""
    else:
        other = next((u for unit in spec.units for u in unit.walk() if u.type not in LAYERS), None)
        if other is not None:
            why = f"the {other.type} layer {other.name} (it covers {', '.join(LAYERS)})"
    if why:
        raise ConfigError(f"{src}: run.reproducible = true does not cover {why}; docs/reproducible.md says "
                          f"what it covers")


class GatheredGradients(Exchange):
    """The data strategy under run.reproducible: backward leaves each dense layer's dW blocks gathering
    (Iallgatherv, reprosum gather mode) while the layers below it run; reduce() waits for them."""

    def __init__(self, repro: "Reproducible"):
        super().__init__()
        self.repro = repro

    def reduce(self) -> None:
        from mpi4py import MPI

        if self.repro.pending:
            MPI.Request.Waitall(self.repro.pending)
            self.repro.pending.clear()


class ShardGather(GatheredGradients):
    """ZeRO-1 under run.reproducible: nothing to exchange after backward (each rank holds the global
    gradient, summed in a fixed order), each rank's optimizer updates its shard with 1/N of the state;
    then the shards are gathered. Every element's update is the same arithmetic as without sharding,
    and the norm is taken over the whole gradient: the same bits as the unsharded run."""

    def __init__(self, repro: "Reproducible", shard):
        super().__init__(repro)
        self.shard = shard

    def after_update(self, t: int, applied: bool) -> None:
        if applied:
            self.shard.gather_params()

    def extra_metrics(self) -> dict:
        return dict(state_elements=self.shard.hi - self.shard.lo)


class Reproducible:
    """The fixed-order kernels a Ctx hands to the dense layers, bound to the data-parallel communicator."""

    def __init__(self, comm):
        self.comm = comm if comm.Get_size() > 1 else None
        self.pending: list = []   # dW gathers in flight (GatheredGradients.reduce waits for them)

    def matmul(self, a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return reprosum.fixed_matmul(a, b, out=out, kc=KC, rule=RULE)

    def dense_backward(self, x, dz, W, need_dx, dW, db, dx):
        return reprosum.reproducible_dense_backward(np.ascontiguousarray(x), dz, W, self.comm, mode="gather",
                                                    kc=KC, rule=RULE, need_dx=need_dx, dW=dW, db=db, dx=dx,
                                                    pending=self.pending)

    def ctx_fields(self, training: bool) -> dict:
        return dict(matmul=self.matmul, dense_backward=self.dense_backward if training else None)


class MicroBatched:
    """A pipeline stage's dense layers under run.reproducible: each micro-batch's dx at once (per row,
    fixed order: the stage before needs it), while its rows of the layer's input and dL/dz are copied
    into the step's (micro_batches x micro_batch)-row buffers; the last micro-batch's backward (backwards
    run in micro-batch order in every schedule) computes dW and db from all of them with the data
    strategy's kernel (gather mode over the dp ranks). The replica's rows in micro-batch order are its
    rows of the global batch in order, so dW is the same fixed-order chain over the global batch as in
    the data strategy: the same bits for any stage count, micro-batch count and schedule."""

    def __init__(self, repro: Reproducible, micro_batches: int, micro_batch: int):
        self.repro, self.M, self.mb = repro, micro_batches, micro_batch
        self.rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}   # dW's address -> (inputs, dL/dz)

    def ctx_fields(self, training: bool, k: int = 0) -> dict:
        if not training:
            return self.repro.ctx_fields(False)
        return dict(matmul=self.repro.matmul, dense_backward=lambda *a: self.dense_backward(k, *a))

    def dense_backward(self, k, x, dz, W, need_dx, dW, db, dx):
        dx = reprosum.fixed_matmul(dz, W.T, out=dx, kc=KC, rule=RULE) if need_dx else None
        key = dW.__array_interface__["data"][0]
        bufs = self.rows.get(key)
        if bufs is None:
            n = self.M * self.mb
            bufs = self.rows[key] = (np.empty((n, x.shape[1]), np.float32), np.empty((n, dz.shape[1]), np.float32))
        X, DZ = bufs
        X[k * self.mb:(k + 1) * self.mb] = x
        DZ[k * self.mb:(k + 1) * self.mb] = dz
        if k == self.M - 1:
            reprosum.reproducible_dense_backward(X, DZ, W, self.repro.comm, mode="gather", kc=KC, rule=RULE,
                                                 need_dx=False, dW=dW, db=db, pending=self.repro.pending)
        return dW, db, dx
