"""Reproducible reductions (hpcopt/parallel/reprosum.py, issue 16): the fixed-order product, the exact
fixed-point sums and the dense backward, in one process. Ranks are emulated by splitting the rows (or
the summands) into parts; tests/mpi/test_reprosum_mpi.py runs the same under mpirun."""
from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numba
import numpy as np
import pytest

from hpcopt.parallel import reprosum as R

threadpoolctl = pytest.importorskip("threadpoolctl")
THREADS = (1, 2)


def numba_threads(n: int) -> None:
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


@pytest.fixture(autouse=True)
def _restore_numba_threads():
    before = numba.get_num_threads()
    yield
    numba.set_num_threads(before)


def same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def random_splits(rng, n: int, max_parts: int = 8, count: int = 6):
    """Random contiguous splits of range(n) into 1..max_parts non-empty parts (cut points)."""
    out = [[0, n]]
    for _ in range(count):
        p = int(rng.integers(2, min(max_parts, n) + 1))
        cuts = np.sort(rng.choice(np.arange(1, n), p - 1, replace=False))
        out.append([0, *cuts.tolist(), n])
    return out


# ---- the fixed-order product ----------------------------------------------------------------------
def rn32(fr: Fraction) -> np.float32:
    """Fraction -> the nearest float32 (ties to even), exactly."""
    f = np.float32(float(fr))
    best = None
    for c in (np.nextafter(f, np.float32(-np.inf)), f, np.nextafter(f, np.float32(np.inf))):
        d = abs(Fraction(float(c)) - fr)
        key = (d, int(np.array(c).view(np.uint32)) & 1)
        if best is None or key < best[0]:
            best = (key, c)
    return best[1]


def test_chain_is_the_fma_chain_by_definition():
    """chain_matmul = per element: c = RN32(a_k b_k + c) for k in a chunk from 0; chunks added in
    float32 left to right. Checked exactly with Fractions."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 7), dtype=np.float32)
    b = rng.standard_normal((7, 4), dtype=np.float32)
    got = R.chain_matmul(a, b, kc=3)           # chunks of k: [0,2) [2,4) [4,7)  (ceil(7/3)=3, balanced)
    bounds = R.k_chunks(7, 3)
    assert bounds.tolist() == [0, 2, 4, 7]
    for i, j in itertools.product(range(3), range(4)):
        total = None
        for c in range(3):
            acc = np.float32(0)
            for k in range(bounds[c], bounds[c + 1]):
                acc = rn32(Fraction(float(a[i, k])) * Fraction(float(b[k, j])) + Fraction(float(acc)))
            total = acc if total is None else rn32(Fraction(float(total)) + Fraction(float(acc)))
        assert same_bits(got[i, j], total)


@pytest.mark.parametrize("K,kc", [(1, 256), (255, 256), (256, 256), (257, 256), (784, 256), (1024, 448), (48, 16)])
def test_k_chunks(K, kc):
    b = R.k_chunks(K, kc)
    sizes = np.diff(b)
    assert b[0] == 0 and b[-1] == K and len(sizes) == -(-K // kc)
    assert sizes.max() <= kc and sizes.max() - sizes.min() <= 1


@pytest.mark.parametrize("K,want", [(100, [0, 100]), (448, [0, 448]), (784, [0, 400, 784]),
                                    (1024, [0, 448, 736, 1024]), (2000, [0, 448, 896, 1344, 1680, 2000])])
def test_k_chunks_openblas_rule(K, want):
    """OpenBLAS's one-thread level-3 k-blocking with GEMM_Q = 448, unroll 16 (driver/level3/level3.c)."""
    assert R.k_chunks(K, 448, "openblas").tolist() == want


@pytest.mark.parametrize("M,N,K", [(2, 10, 784), (64, 1024, 784), (256, 10, 1024), (5, 2, 500), (17, 300, 1024)])
def test_fixed_matmul_openblas_rule(M, N, K):
    """Whichever backend the check picks ("plain" where OpenBLAS's blocking is the rule), the bits are
    the chain's, for 1 and 2 threads."""
    rng = np.random.default_rng([M, N, K, 1])
    a = rng.standard_normal((M, K), dtype=np.float32)
    b = rng.standard_normal((K, N), dtype=np.float32)
    ref = R.chain_matmul(a, b, kc=448, rule="openblas")
    for th in THREADS:
        with threadpoolctl.threadpool_limits(th):
            for A, Bm in ((a, b), (a, np.asfortranarray(b)), (np.asfortranarray(a), b)):
                assert same_bits(R.fixed_matmul(A, Bm, kc=448, rule="openblas"), ref), th


SHAPES = [(1, 5, 3), (2, 2, 33), (5, 2, 300), (2, 10, 64), (64, 10, 300), (17, 300, 100), (3, 1024, 64),
          (64, 100, 300), (40, 1, 20), (33, 64, 520)]


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_fixed_matmul_is_the_chain_for_any_layout_and_thread_count(M, N, K):
    """OpenBLAS takes other kernels for many of these shapes (gemv for 1 row, its small-matrix and
    direct kernels, k blocked differently by thread count above 448): fixed_matmul must not."""
    rng = np.random.default_rng([M, N, K])
    a = rng.standard_normal((M, K), dtype=np.float32)
    b = rng.standard_normal((K, N), dtype=np.float32)
    ref = R.chain_matmul(a, b, kc=256)
    for th in THREADS:
        with threadpoolctl.threadpool_limits(th):
            numba_threads(th)
            for A, Bm in ((a, b), (np.asfortranarray(a), b), (a, np.asfortranarray(b)),
                          (np.asfortranarray(a), np.asfortranarray(b))):
                assert same_bits(R.fixed_matmul(A, Bm, kc=256), ref), (th, A.flags.f_contiguous, Bm.flags.f_contiguous)
            assert same_bits(R.chain_matmul(a, b, kc=256), ref)


def test_a_row_does_not_depend_on_the_other_rows():
    """The forward's and dx's hazard: the same row computed in calls of 1..256 rows, 1 or 2 threads."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((256, 784), dtype=np.float32)
    W = rng.standard_normal((784, 40), dtype=np.float32)
    ref = R.chain_matmul(x, W)
    for th in THREADS:
        with threadpoolctl.threadpool_limits(th):
            for lo, hi in ((0, 1), (5, 7), (0, 8), (100, 133), (0, 64), (64, 256), (0, 256)):
                assert same_bits(R.fixed_matmul(x[lo:hi], W), ref[lo:hi]), (th, lo, hi)
                assert same_bits(R.fixed_matmul(x[lo:hi], np.asfortranarray(W)), ref[lo:hi]), (th, lo, hi)


def test_backends_are_cached_per_shape_and_threads():
    R.forget_verification()
    a = np.ones((2, 3), np.float32)
    R.fixed_matmul(a, np.ones((3, 4), np.float32))
    assert len(R._verified) == 1
    R.fixed_matmul(a, np.ones((3, 4), np.float32))
    assert len(R._verified) == 1 and set(R._verified.values()) <= {"plain", "cblas", "blas", "fortran", "numba"}


def test_fixed_matmul_edge_cases():
    z = R.fixed_matmul(np.ones((3, 0), np.float32), np.ones((0, 2), np.float32))
    assert z.shape == (3, 2) and not z.any()
    with pytest.raises(TypeError):
        R.fixed_matmul(np.ones((2, 2)), np.ones((2, 2)))
    nan = np.ones((4, 5), np.float32)
    nan[1, 2] = np.nan
    out = R.fixed_matmul(nan, np.ones((5, 3), np.float32))
    assert np.isnan(out[1]).all() and np.isfinite(np.delete(out, 1, axis=0)).all()


# ---- exact sums: order and partition independence ---------------------------------------------------
def wide(rng, shape, spread=30):
    """float32 values of random sign over 2^spread orders of magnitude (plus exact zeros)."""
    v = rng.standard_normal(shape) * np.exp2(rng.integers(-spread, 1, shape))
    v[rng.random(shape) < 0.05] = 0
    return v.astype(np.float32)


def test_fixed_point_sum_is_the_same_for_every_order_and_partition():
    rng = np.random.default_rng(2)
    terms = [wide(rng, 1000) for _ in range(8)]
    E = max(R.max_exponent(t) for t in terms)
    lsb = R.lsb_exponent(E, len(terms))
    ref = None
    for th in THREADS:
        numba_threads(th)
        for order in [list(range(8)), list(range(7, -1, -1))] + [rng.permutation(8).tolist() for _ in range(4)]:
            for cuts in random_splits(rng, 8):
                q = np.zeros(1000, np.int64)
                for lo, hi in zip(cuts[:-1], cuts[1:]):          # a "rank" holds terms order[lo:hi]
                    part = np.zeros(1000, np.int64)
                    for k in order[lo:hi]:
                        R.to_fixed(terms[k], lsb, part, accumulate=True)
                    q += part                                     # the Allreduce: integer addition
                out = R.from_fixed(q, lsb, np.empty(1000, np.float32))
                ref = out if ref is None else ref
                assert same_bits(out, ref)


def exact_f32_sum(rows: np.ndarray) -> np.ndarray:
    """The exact column sums (float32 summands within float64's exact range here), correctly rounded to
    float64 by math.fsum."""
    return np.array([math.fsum(rows[:, j].astype(np.float64).tolist()) for j in range(rows.shape[1])])


def test_fixed_point_sum_accuracy_bound():
    """|result - exact| <= 0.5 ulp32(result) + terms * 2^(lsb - 1): correctly rounded whenever every
    term is representable on the grid (the usual case), the rounding of tiny terms bounded otherwise."""
    rng = np.random.default_rng(3)
    for spread, terms in ((8, 2), (30, 8), (60, 5)):
        rows = wide(rng, (terms, 4000), spread)
        lsb = R.lsb_exponent(R.max_exponent(rows), terms)
        q = np.zeros(4000, np.int64)
        for t in rows:
            R.to_fixed(t, lsb, q, accumulate=True)
        got = R.from_fixed(q, lsb, np.empty(4000, np.float32)).astype(np.float64)
        exact = exact_f32_sum(rows)
        g32 = got.astype(np.float32)
        ulp = np.abs(np.nextafter(g32, np.float32(np.inf)) - g32).astype(np.float64)
        assert np.all(np.abs(got - exact) <= 0.5 * ulp + terms * 2.0 ** (lsb - 1)), spread
        plain = rows.sum(axis=0, dtype=np.float32).astype(np.float64)
        assert np.abs(got - exact).sum() <= np.abs(plain - exact).sum()   # at least as close as float32


def test_headroom_excludes_overflow():
    """terms values all at the largest magnitude below 2^E, same sign: the int64 sum stays below 2^63."""
    for terms in (1, 2, 3, 5, 7, 8, 1000, 2 ** 20):
        for E in (-100, 0, 30, 128):
            v = np.float32(np.nextafter(np.float32(2.0 ** E) if E < 128 else np.float32(np.inf), np.float32(0)))
            assert R.max_exponent(np.array([v])) == E
            lsb = R.lsb_exponent(E, terms)
            q1 = int(R.to_fixed(np.array([v]), lsb)[0])
            assert terms * abs(q1) < 2 ** 63
            total = q1 * terms                                    # what the Allreduce would hold
            got = R.from_fixed(np.array([total], np.int64), lsb, np.empty(1, np.float32))[0]
            with np.errstate(over="ignore"):
                want = np.float32(float(v) * terms)               # exact product, rounded once
            assert same_bits(got, want), (terms, E)               # float32 max * 2 -> inf, never a wrap


def test_zeros_denormals_and_signed_zero():
    den = np.array([1e-45, 3e-45, -1e-45, 1.4e-40, 0.0], np.float32)   # float32 subnormals
    E = R.max_exponent(den)
    assert E == -126
    lsb = R.lsb_exponent(E, 3)
    q = np.zeros(5, np.int64)
    for _ in range(3):
        R.to_fixed(den, lsb, q, accumulate=True)
    got = R.from_fixed(q, lsb, np.empty(5, np.float32))
    assert same_bits(got, (den.astype(np.float64) * 3).astype(np.float32))   # exact: subnormals are on the grid
    assert R.max_exponent(np.zeros(7, np.float32)) == R.EMPTY
    out = np.full(7, 5, np.float32)
    assert R.allreduce_exact(None, np.zeros(7, np.float32), out) == R.EMPTY and not out.any()


def test_nonfinite_propagates_never_wraps():
    x = np.array([1.0, np.inf, 3.0, np.nan, -np.inf, 2.5], np.float32)
    assert R.max_exponent(x) == R.NONFINITE
    out = np.empty_like(x)
    assert R.allreduce_exact(None, x, out) == R.NONFINITE
    assert same_bits(out, x)
    assert math.isnan(R.exact_sum(np.array([1.0, np.nan])))
    assert R.exact_sum(np.array([1.0, np.inf])) == math.inf
    assert R.exact_sum_sq(np.array([1, np.inf], np.float32)) == math.inf
    assert math.isnan(R.exact_sum_sq(np.array([1, np.nan], np.float32)))
    # a huge finite value next to a guess that is too small: flagged, not converted
    q = np.empty(3, np.int64)
    assert R._to_fixed_checked(np.array([1.0, 3e38, np.nan], np.float32), 2.0 ** 10, 2.0 ** 50, q) == 2
    assert q[1] == q[2] == 0
    # the dense backward: a nan in dy gives non-finite gradients, never finite garbage
    rng = np.random.default_rng(4)
    x, dy = rng.standard_normal((8, 6), dtype=np.float32), rng.standard_normal((8, 5), dtype=np.float32)
    dy[3, 2] = np.nan
    for mode in ("gather", "chunks"):
        dW, db, dx = R.reproducible_dense_backward(x, dy, np.ones((6, 5), np.float32), mode=mode, chunk=2)
        assert np.isnan(dW[:, 2]).all() and np.isnan(db[2]) and np.isfinite(np.delete(dW, 2, axis=1)).all()
        assert np.isnan(dx[3]).all()


def test_exact_colsum_any_row_split_and_threads():
    rng = np.random.default_rng(5)
    y = wide(rng, (96, 130), 25)
    ref = R.exact_colsum(y, local=True)
    E = R.max_exponent(y)
    lsb = R.lsb_exponent(E, 96)
    for th in THREADS:
        numba_threads(th)
        for cuts in random_splits(rng, 96):
            q = np.zeros(130, np.int64)
            for lo, hi in zip(cuts[:-1], cuts[1:]):
                part = np.zeros(130, np.int64)
                R._colsum_fixed(y[lo:hi], 2.0 ** -lsb, part)
                q += part
            assert same_bits(R.from_fixed(q, lsb, np.empty(130, np.float32)), ref)
    assert np.allclose(ref, exact_f32_sum(y), rtol=1e-6, atol=0)


def test_exact_sum_partition_and_accuracy():
    rng = np.random.default_rng(6)
    v = rng.random(300) * np.exp2(rng.integers(-40, 10, 300)) * rng.choice([-1, 1], 300)
    whole = R.exact_sum(v)
    E, terms = R.max_exponent(v), 300
    w = 62 - R.ceil_log2(terms)
    k = w - E
    for cuts in random_splits(rng, 300, 8, 10):
        acc = np.zeros(3, np.int64)
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            part = np.zeros(3, np.int64)
            R._limbs3(v[lo:hi], 2.0 ** (k // 2), 2.0 ** (k - k // 2), w, part)
            acc += part
        assert R._limbs_value(acc, w, E - w) == whole
    exact = sum(Fraction(float(t)) for t in v)
    assert abs(Fraction(whole) - exact) <= Fraction(math.ulp(whole)) / 2   # correctly rounded here
    assert R.exact_sum(np.zeros(4)) == 0.0


def test_exact_sum_sq_threads_and_accuracy():
    rng = np.random.default_rng(7)
    g = wide(rng, 300_001, 20) * np.float32(1e-3)
    ref = math.fsum((g.astype(np.float64) ** 2).tolist())
    got = set()
    for th in THREADS:
        numba_threads(th)
        got.add(R.exact_sum_sq(g))
        # a buffer split into shards (ZeRO): the squares' limbs summed as ints, the exponent of the whole
        E, w = R.max_exponent(g), 62 - R.ceil_log2(g.size)
        for cuts in random_splits(rng, g.size, 8, 3):
            acc = np.zeros(2, np.int64)
            for lo, hi in zip(cuts[:-1], cuts[1:]):
                part = g[lo:hi]
                acc += np.array(R._sq_limbs(part, part.view(np.uint32), 2.0 ** (w - 2 * E), 2.0 ** w)[:2], np.int64)
            got.add(R._limbs_value(acc, w, 2 * E - w))
    assert len(got) == 1
    s = got.pop()
    assert abs(s - ref) <= 2 * math.ulp(ref)
    assert R.exact_sum_sq(np.zeros(5, np.float32)) == 0.0
    # an exponent given: one pass; a bound a few bits above the max stays accurate; one below is not used
    E = R.max_exponent(g)
    assert R.exact_sum_sq(g, exponent=E) == s
    assert R.exact_sum_sq(g, exponent=E - 2) == s
    assert abs(R.exact_sum_sq(g, exponent=E + 12) - ref) <= 2 * math.ulp(ref)
    assert R.exact_sum_sq(np.array([1, np.inf], np.float32), exponent=3) == math.inf


def test_backward_exponent_bound_holds():
    rng = np.random.default_rng(11)
    for mode in ("gather", "chunks"):
        for scale in (1e-30, 1e-3, 1.0, 1e20):
            x = (rng.standard_normal((64, 30)) * scale).astype(np.float32)
            dy = rng.standard_normal((64, 20)).astype(np.float32)
            info = {}
            dW, db, _ = R.reproducible_dense_backward(x, dy, np.ones((30, 20), np.float32), mode=mode,
                                                      chunk=8, info=info)
            assert max(R.max_exponent(dW), R.max_exponent(db)) <= info["exponent"] <= \
                max(R.max_exponent(dW), R.max_exponent(db)) + 16, (mode, scale)
    info = {}
    R.reproducible_dense_backward(np.zeros((8, 3), np.float32), np.zeros((8, 2), np.float32),
                                  np.ones((3, 2), np.float32), mode="gather", info=info)
    assert info["exponent"] == R.EMPTY


# ---- the dense backward ---------------------------------------------------------------------------
def emulate_ranks(x, dy, W, p, mode, kc, chunk):
    """What p ranks compute, in one process: gather mode = dW row blocks of the global rows computed
    separately and concatenated (the Allgatherv); chunks mode = each rank's chunk partials in fixed
    point (the exponent agreed over all chunks), integer sum over ranks."""
    B = x.shape[0]
    if mode == "gather":
        bounds = R._row_bounds(x.shape[1], p)
        dW = np.concatenate([R.fixed_matmul(x[:, lo:hi].T, dy, kc=kc) for lo, hi in zip(bounds[:-1], bounds[1:])])
        return dW, R.exact_colsum(dy, local=True)
    parts = [R.fixed_matmul(x[c:c + chunk].T, dy[c:c + chunk], kc=kc) for c in range(0, B, chunk)]
    lsb = R.lsb_exponent(max(R.max_exponent(q) for q in parts), B // chunk)
    per_rank = B // chunk // p
    q = np.zeros(W.size, np.int64)
    for r in range(p):
        mine = np.zeros(W.size, np.int64)
        for c in parts[r * per_rank:(r + 1) * per_rank]:
            R.to_fixed(c, lsb, mine, accumulate=True)
        q += mine
    return R.from_fixed(q, lsb, np.empty_like(W)), R.exact_colsum(dy, local=True)


@pytest.mark.parametrize("mode", ["gather", "chunks"])
def test_dense_backward_is_a_function_of_the_global_batch(mode):
    rng = np.random.default_rng(8)
    B, n_in, n_out, kc, chunk = 48, 40, 30, 16, 2
    x = np.maximum(rng.standard_normal((B, n_in), dtype=np.float32), 0)
    dy = (rng.standard_normal((B, n_out)) * 1e-2).astype(np.float32)
    W = rng.standard_normal((n_in, n_out), dtype=np.float32)
    dW0, db0, dx0 = R.reproducible_dense_backward(x, dy, W, mode=mode, kc=kc, chunk=chunk)
    for th in THREADS:
        with threadpoolctl.threadpool_limits(th):
            numba_threads(th)
            for p in (1, 2, 3, 4, 6, 8):
                dW, db = emulate_ranks(x, dy, W, p, mode, kc, chunk)
                assert same_bits(dW, dW0) and same_bits(db, db0), (th, p)
                rows = R._row_bounds(B, p)
                dx = np.concatenate([R.fixed_matmul(dy[lo:hi], W.T, kc=kc) for lo, hi in zip(rows[:-1], rows[1:])])
                assert same_bits(dx, dx0), (th, p)
    # plain float32 with a row split is NOT the same (what this module is for)
    plain = x[:24].T @ dy[:24] + x[24:].T @ dy[24:]
    assert not same_bits(plain, x.T @ dy)


def test_dense_backward_accuracy_against_float64():
    """Documented bound: any summation of B products has |err| <= (B - 1) u sum|x dy| (u = 2^-24, here
    with FMA chains); measured: the same order as the plain float32 path, chunks mode closer."""
    rng = np.random.default_rng(9)
    B, n_in, n_out = 256, 64, 48
    u = 2.0 ** -24
    errs = {"plain2": [], "gather": [], "chunks": []}
    for _ in range(20):
        x = np.maximum(rng.standard_normal((B, n_in), dtype=np.float32), 0)
        dy = (rng.standard_normal((B, n_out)) * 1e-3).astype(np.float32)
        ref = x.astype(np.float64).T @ dy.astype(np.float64)
        mag = x.astype(np.float64).T @ np.abs(dy.astype(np.float64))
        W = np.zeros((n_in, n_out), np.float32)
        for name, dW in (("plain2", x[:128].T @ dy[:128] + x[128:].T @ dy[128:]),
                         ("gather", R.reproducible_dense_backward(x, dy, W, mode="gather", kc=128)[0]),
                         ("chunks", R.reproducible_dense_backward(x, dy, W, mode="chunks", chunk=32)[0])):
            e = np.abs(dW - ref) / (u * mag)
            assert e.max() <= B - 1, name
            errs[name].append(e)
    med = {k: float(np.median(np.concatenate(v))) for k, v in errs.items()}
    assert med["gather"] <= med["plain2"] * 1.05 and med["chunks"] <= med["plain2"]


def test_choose_mode_does_not_depend_on_ranks():
    assert R.choose_mode(1024, 10, 32) == "chunks"
    assert R.choose_mode(1024, 1024, 32) == "gather" and R.choose_mode(784, 1024, 32) == "gather"


def test_allreduce_exact_exponent_given():
    """With an agreed exponent: one collective; a value beyond it makes the call redo the sum with the
    MAX-agreed exponent (never a wrapped int); a non-finite one gives the IEEE sum."""
    from mpi4py import MPI
    g = np.random.default_rng(10).standard_normal(1000, dtype=np.float32)
    for comm in (None, MPI.COMM_SELF):
        out = np.empty_like(g)
        lsb = R.allreduce_exact(comm, g, out, exponent=R.max_exponent(g) + 1)
        assert lsb == R.lsb_exponent(R.max_exponent(g) + 1, 1) and same_bits(out, g)
        big = g.copy()
        big[5] = 1e6
        lsb = R.allreduce_exact(comm, big, exponent=R.max_exponent(g))
        assert lsb == R.lsb_exponent(20, 1) and big[5] == np.float32(1e6)
        bad = g.copy()
        bad[7] = np.nan
        assert R.allreduce_exact(comm, bad, exponent=3) == R.NONFINITE
        assert np.isnan(bad[7]) and same_bits(np.delete(bad, 7), np.delete(g, 7))


def test_the_norms_fixed_tree_is_the_same_for_any_thread_count_and_accurate():
    """reproducible.NormSums (the gradient norm of a reproducible run): per tensor, blocks of bounds fixed
    by its length, each in 8 interleaved lanes, the tensors added in buffer order: the same bits with 1
    and 2 Numba threads, with and without clip_value; within float64 rounding of the exact sums; the
    order really is the one written down."""
    import numba

    from hpcopt.parallel.reproducible import BLOCK, LANES, PAR_BLOCKS, NormSums

    rng = np.random.default_rng(5)
    lengths = (7, 2 * BLOCK + 3, 100_003, 1, 40 * BLOCK + 11)   # 58 blocks: the threaded kernel
    segments = list(zip(np.cumsum((0,) + lengths[:-1]).tolist(), lengths))
    g = (rng.standard_normal(sum(lengths)) * rng.choice([1e-3, 1.0, 30.0], sum(lengths))).astype(np.float32)
    norm = NormSums(segments)
    assert norm.los.size >= PAR_BLOCKS
    got = {}
    for threads in (1, 2):
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        got[threads] = [norm(g, clip) for clip in (0.0, 0.5)]
    numba.set_num_threads(1)
    assert got[1] == got[2]
    (sq, sq_c0), (sq1, sq_c) = got[1]
    g64 = g.astype(np.float64)
    exact = math.fsum(g64 * g64)
    clamped = np.clip(g64, -0.5, 0.5)
    assert sq == sq_c0 == sq1 and abs(sq - exact) <= 1e-12 * exact
    assert abs(sq_c - math.fsum(clamped * clamped)) <= 1e-12 * sq_c
    # the definition, written out: a tensor of 3 BLOCKs of 8-lane sums, then a tensor of 7 (its running sum)
    x = np.arange(1, 3 * BLOCK + 8, dtype=np.float32) / 1000
    blocks = []
    for b in range(3):
        lane = np.zeros(LANES)
        for row in x[b * BLOCK:(b + 1) * BLOCK].astype(np.float64).reshape(-1, LANES) ** 2:
            lane = lane + row
        blocks.append(((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7])))
    first = (blocks[0] + blocks[1]) + blocks[2]
    second = 0.0
    for v in x[3 * BLOCK:].astype(np.float64):
        second += v * v
    assert NormSums([(0, 3 * BLOCK), (3 * BLOCK, 7)])(x, 0.0)[0] == first + second


def test_the_norm_is_the_same_bits_when_stages_hold_the_tensors():
    """A pipeline's stages each hold some of the tensors (stage P-1 the first ones in buffer order): their
    per-tensor sums gathered and added in the model's order are the whole buffer's bits."""
    from hpcopt.parallel.reproducible import NormSums

    rng = np.random.default_rng(6)
    lengths = (10, 10_000, 20_001, 5, 70_000, 3)
    offsets = np.cumsum((0,) + lengths[:-1]).tolist()
    g = (rng.standard_normal(sum(lengths)) * 3).astype(np.float32)
    whole = NormSums(list(zip(offsets, lengths)))(g, 0.25)
    cut = 2   # stage 1 holds tensors 0-1, stage 0 tensors 2-5, each in a buffer of its own
    own = [(g[offsets[cut]:].copy(), lengths[cut:]), (g[:offsets[cut]].copy(), lengths[:cut])]   # by stage

    def alone(buf, lens):
        n = NormSums(list(zip(np.cumsum((0,) + lens[:-1]).tolist(), lens)))
        n(buf, 0.25)
        return n.parts.copy()

    parts = [alone(*own[0]), alone(*own[1])]

    class Stages:   # pp_comm as NormSums uses it: the stages' arrays in rank (= stage) order
        def Get_size(self):
            return 2

        def allgather(self, mine):
            return parts

    for stage in (0, 1):
        buf, lens = own[stage]
        assert NormSums(list(zip(np.cumsum((0,) + lens[:-1]).tolist(), lens)), Stages())(buf, 0.25) == whole


def test_exact_colsums_are_correctly_rounded_and_order_free():
    """exact_colsums (the test metrics of a reproducible run): each column's sum is the exactly rounded
    one (math.fsum) for rows spanning 2^60, whatever the row order; zeros give 0, an inf inf."""
    from hpcopt.parallel.reprosum import exact_colsums

    rng = np.random.default_rng(9)
    x = rng.standard_normal((500, 4)) * np.exp2(rng.integers(-30, 30, (500, 4)))
    x[:, 2] = 0.0
    x[17, 3] = np.inf
    got = exact_colsums(x)
    assert got[0] == math.fsum(x[:, 0]) and got[1] == math.fsum(x[:, 1])
    assert got[2] == 0.0 and got[3] == np.inf
    perm = exact_colsums(x[rng.permutation(500)])
    assert np.array_equal(got, perm)


def test_row_scores_are_the_scores_per_row():
    """losses.row_scores (a reproducible run's evaluation): each row's terms, which add up to scores'
    sums, for classes and for regression targets."""
    from hpcopt.nn.losses import LOSSES, row_scores, scores

    rng = np.random.default_rng(10)
    logits = rng.standard_normal((50, 7)).astype(np.float32)
    labels = rng.integers(0, 7, 50)
    out = rng.standard_normal((50, 3, 4)).astype(np.float32)
    target = rng.standard_normal((50, 3, 4)).astype(np.float32)
    for o, t, loss in ((logits, labels, "softmax_ce"), (out, target, "mse")):
        rows = np.empty(50)
        total = LOSSES[loss](o, t, 1, np.empty_like(o), rows)
        per_row = row_scores(o, t, rows)
        assert per_row.shape == (50, len(scores(o, t, total)))
        assert np.allclose(per_row.sum(axis=0), scores(o, t, total), rtol=1e-12, atol=0)
    assert set(row_scores(logits, labels, rows[:50])[:, 1]) <= {0.0, 1.0}
