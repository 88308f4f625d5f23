"""Gradient codecs (parallel/compress.py), gradient buckets (parallel/data.py) and ZeRO shard boundaries
(parallel/zero.py), in one process (MPI.COMM_SELF: the codecs' exchange with a world of one)."""
import numpy as np
import pytest
from mpi4py import MPI

from hpcopt.nn import MLP
from hpcopt.parallel import compress
from hpcopt.parallel.data import grad_buckets
from hpcopt.parallel.zero import row_block, shard_bounds


def test_bf16_encode_rounds_like_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = np.concatenate([(rng.standard_normal(10000) * 10.0 ** rng.integers(-30, 30, 10000)).astype(np.float32),
                        np.array([0.0, -0.0, np.inf, -np.inf, 3.3895314e38, 1e-40, -1e-45, 1.0 + 2**-8,
                                  1.0 + 3 * 2**-8], np.float32)])
    ours = np.empty(x.size, np.uint16)
    compress.bf16_encode(x, ours)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)  # round to nearest even, bit for bit
    back = np.empty(x.size, np.float32)
    compress.bf16_decode(ours, back)
    np.testing.assert_array_equal(back, torch.from_numpy(x).to(torch.bfloat16).float().numpy())
    nan = np.array([np.nan, -np.nan], np.float32)
    compress.bf16_encode(nan, ours[:2])
    compress.bf16_decode(ours[:2], back[:2])
    assert np.isnan(back[:2]).all()


@pytest.mark.parametrize("kind", ["fp16", "bf16"])
def test_cast16_alone_is_the_16_bit_rounding(kind):
    g = np.random.default_rng(1).standard_normal(1001).astype(np.float32) * 1e-2
    codec = compress.build(kind, MPI.COMM_SELF, [1001])
    out = g.copy()
    codec.start(0, out)
    codec.finish(0, out)
    if kind == "fp16":
        expected = g.astype(np.float16).astype(np.float32)
    else:
        words = np.empty(g.size, np.uint16)
        compress.bf16_encode(g, words)
        expected = np.empty_like(g)
        compress.bf16_decode(words, expected)
    np.testing.assert_array_equal(out, expected)
    assert np.abs(out - g).max() <= np.abs(g).max() * (2**-11 if kind == "fp16" else 2**-8)


def test_topk_sends_the_largest_and_keeps_the_rest():
    rng = np.random.default_rng(2)
    n, density, steps = 5000, 0.01, 30
    codec = compress.build("topk", MPI.COMM_SELF, [n], density)
    k = codec.k[0]
    assert k == 50
    sent_total = np.zeros(n, np.float64)
    grads_total = np.zeros(n, np.float64)
    for _ in range(steps):
        g = rng.standard_normal(n).astype(np.float32)
        grads_total += g
        acc = codec.residual[0] + g
        out = g.copy()
        codec.start(0, out)
        codec.finish(0, out)
        assert np.count_nonzero(out) == k
        top = np.sort(np.abs(acc))[-k:]
        np.testing.assert_array_equal(np.sort(np.abs(out[out != 0])), top)  # the k largest of grad + residual
        sent_total += out
    # error feedback: nothing is lost, what was not sent yet is in the residual
    np.testing.assert_allclose(sent_total + codec.residual[0], grads_total, rtol=1e-5, atol=1e-4)
    codec.on_skip()
    assert not codec.residual[0].any()


def test_bytes_per_step():
    sizes = [1000, 3001]
    assert compress.build("none", MPI.COMM_SELF, sizes).bytes_per_step() == 0  # a world of one sends nothing
    assert compress.build("topk", MPI.COMM_SELF, sizes, 0.01).k == [10, 31]


def test_buckets_follow_backward_order():
    model = MLP([64, 128, 128, 10])
    f = model.flat
    index = {layer.name: i for i, layer in enumerate(model.layers)}
    tiny = grad_buckets(f, index, 1)  # every layer its own bucket
    assert [b.ready_layer for b in tiny] == [2, 1, 0]
    assert [(b.lo, b.hi) for b in tiny] == [(0, 1290), (1290, 1290 + 16512), (1290 + 16512, f.size)]
    assert [(b.lo, b.hi, b.ready_layer) for b in grad_buckets(f, index, 1e9)] == [(0, f.size, 0)]
    # 20,000 bytes: dense2 (5,160 B) is too small alone, dense2 + dense1 close the first bucket
    assert [(b.hi, b.ready_layer) for b in grad_buckets(f, index, 20000)] == [(1290 + 16512, 1), (f.size, 0)]


@pytest.mark.parametrize("widths,nranks", [([64, 128, 128, 10], 4), ([784, 1024, 1024, 10], 2),
                                           ([3, 5, 2], 4), ([64, 10], 3)])
def test_zero_shards_are_row_blocks_of_about_one_nth(widths, nranks):
    f = MLP(widths).flat
    bounds = shard_bounds(f, nranks)
    assert bounds[0] == 0 and bounds[-1] == f.size and bounds == sorted(bounds)
    longest_row = max(s.size // s.shape[0] for s in f.specs)
    for r in range(nranks):
        lo, hi = bounds[r], bounds[r + 1]
        assert abs((hi - lo) - f.size / nranks) <= longest_row
        covered = 0
        for k in f.keys():
            r0, r1, a, b = row_block(f, k, lo, hi)  # asserts the cut falls between rows
            covered += b - a
        assert covered == hi - lo
