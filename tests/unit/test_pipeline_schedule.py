"""Pipeline schedules as data, stage partitioning, tensor-parallel shards and model-parallel config
errors, in one process (the MPI runs are in tests/mpi/test_model_parallel.py)."""
import threading

import numpy as np
import pytest
from mpi4py import MPI

from hpcopt import cli, config
from hpcopt.comm import Grid
from hpcopt.errors import ConfigError
from hpcopt.nn import MLP
from hpcopt.nn.stage import COLUMN, FULL, ROW, Stage
from hpcopt.parallel import build
from hpcopt.parallel.pipeline import layer_costs, partition
from hpcopt.parallel.schedule import (BACKWARD, FORWARD, RECV_ACT, RECV_GRAD, SEND_ACT, SEND_GRAD, STEP,
                                      build_schedule, buffer_slots, peak_activations, simulate,
                                      slots_are_safe, theoretical_bubble)
from hpcopt.parallel.tensor import layer_splits

GRID = [(P, M) for P in (1, 2, 3, 4, 5) for M in (1, 2, 3, 4, 7, 8, 16)]


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("P,M", GRID)
def test_schedule_is_complete_consistent_and_deadlock_free(name, P, M):
    sched = build_schedule(name, P, M)
    assert len(sched) == P
    for s, acts in enumerate(sched):
        for op in (FORWARD, BACKWARD):
            assert sorted(a.mb for a in acts if a.op == op) == list(range(M))
        for k in range(M):  # a micro-batch's backward after its forward, on every stage
            assert acts.index(next(a for a in acts if a.op == BACKWARD and a.mb == k)) > \
                acts.index(next(a for a in acts if a.op == FORWARD and a.mb == k))
        assert acts[-1].op == STEP
        # every send has its receive on the neighbour, and vice versa
        if s < P - 1:
            assert {a.mb for a in acts if a.op == SEND_ACT} == {a.mb for a in sched[s + 1] if a.op == RECV_ACT}
            assert {a.mb for a in acts if a.op == RECV_GRAD} == {a.mb for a in sched[s + 1] if a.op == SEND_GRAD}
        slots = buffer_slots(acts)
        assert slots_are_safe(acts, slots) and slots <= M + 1
    tl = simulate(sched)  # raises on deadlock or on a receive consumed before it is posted
    for s in range(P):
        # equal stages: every stage idles (P-1)/(M+P-1) of the step, GPipe and 1F1B alike
        assert tl.bubble(s) == pytest.approx(theoretical_bubble(P, M), abs=1e-12)


@pytest.mark.parametrize("P,M", GRID)
def test_1f1b_holds_at_most_P_micro_batches_gpipe_holds_M(P, M):
    ours, gp = build_schedule("1f1b", P, M), build_schedule("gpipe", P, M)
    for s in range(P):
        assert peak_activations(ours[s]) == min(P - s, M)
        assert peak_activations(gp[s]) == M
    assert peak_activations(ours[0]) <= P


def test_a_broken_schedule_is_caught():
    sched = build_schedule("1f1b", 2, 2)
    sched[1] = [a for a in sched[1] if a.op != RECV_ACT]  # forwards without their receives
    with pytest.raises(ValueError, match="before its receive is posted"):
        simulate(sched)
    sched = build_schedule("gpipe", 2, 2)
    sched[0] = [a for a in sched[0] if a.op != SEND_ACT] + []  # stage 1 waits forever
    with pytest.raises(ValueError, match="deadlocks"):
        simulate(sched)


def test_dry_run_prints_the_table(capsys):
    assert cli.main(["schedule", "--pp", "4", "--micro-batches", "8", "--schedule", "1f1b"]) == 0
    out = capsys.readouterr().out
    assert "theoretical bubble (P-1)/(M+P-1) = 0.273" in out
    assert "stage 0: F0 sA0 rG0 F1" in out and out.count("stage 3 ") == 1
    rows = [l.split() for l in out.splitlines() if l.strip()[:1].isdigit() and len(l.split()) == 4]
    assert [int(r[1]) for r in rows] == [4, 3, 2, 1]  # peak activations per stage


def test_partition_balances_and_is_exact():
    assert partition([1, 1, 1, 1], 2) == [(0, 2), (2, 4)]
    assert partition([10, 1, 1, 1, 1, 1], 2) == [(0, 1), (1, 6)]
    assert partition([5, 5, 5], 3) == [(0, 1), (1, 2), (2, 3)]
    costs = layer_costs([64, 64, 64, 64, 10], "params")
    assert costs == [64 * 64 + 64] * 3 + [64 * 10 + 10]
    assert partition(costs, 2) == [(0, 2), (2, 4)]
    assert layer_costs([8, 4], "flops") == [6 * 32 + 4 * 4 + 5 * 4]


def test_layer_splits_pair_columns_with_rows():
    assert layer_splits(4, 1) == [FULL] * 4
    assert layer_splits(4, 2) == [COLUMN, ROW, COLUMN, ROW]
    assert layer_splits(3, 2) == [COLUMN, ROW, FULL]


def run_shards(widths, tp, x, labels, splits):
    """The tp shards of a model in tp threads; tp_sum is a sum across the threads. Returns
    (output, [grad buffers], allreduce calls per shard)."""
    shards = [Stage(widths, 0, len(widths) - 1, "tanh", "softmax_ce", "float64", 7, "he", splits, tp, r)
              for r in range(tp)]
    barrier, box = threading.Barrier(tp), {}
    calls = [0] * tp
    out = [None] * tp

    def work(r):
        def tp_sum(a):
            calls[r] += 1
            box[r] = a.copy()
            barrier.wait()
            total = sum(box[i] for i in range(tp))
            barrier.wait()
            a[...] = total

        acts = shards[r].forward(x, tp_sum=tp_sum)
        dout = np.empty_like(acts[-1])
        shards[r].loss(acts[-1], labels, len(x), dout)
        shards[r].backward(acts, dout, need_dx=False, tp_sum=tp_sum)
        out[r] = acts[-1]

    threads = [threading.Thread(target=work, args=(r,)) for r in range(tp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out, shards, calls


@pytest.mark.parametrize("widths", [[6, 8, 5, 4, 3], [6, 8, 5, 4], [5, 4, 3]])
def test_tensor_parallel_shards_equal_the_whole_model(widths):
    rng = np.random.default_rng(0)
    x, labels = rng.standard_normal((9, widths[0])), rng.integers(0, widths[-1], 9)
    ref = MLP(widths, "tanh", "softmax_ce", "float64", seed=7)
    acts = ref.forward(x)
    ref.loss_and_grad(x, labels, len(x))
    splits = layer_splits(len(widths) - 1, 2)
    if any(widths[i + 1] % 2 for i, s in enumerate(splits) if s == COLUMN):
        splits = [FULL] * (len(widths) - 1)
    out, shards, calls = run_shards(widths, 2, x, labels, splits)
    for r in range(2):
        np.testing.assert_allclose(out[r], acts[-1], rtol=1e-12)  # float64: rounding of a 2-term sum only
        for k in shards[r].flat.keys():
            layer, which = shards[r].layer(k), k.split(".")[1]
            blk = layer.block(which)
            np.testing.assert_array_equal(shards[r].flat.param(k), ref.flat.param(k)[blk])  # same init
            np.testing.assert_allclose(shards[r].flat.grad_of(k), ref.flat.grad_of(k)[blk], rtol=1e-10, atol=1e-14)
    pairs = splits.count(ROW)
    # one Allreduce forward per pair; one backward per pair, except the first (dense0 needs no dx)
    assert calls == [pairs + pairs - (splits[0] == COLUMN)] * 2


def test_micro_batch_gradients_accumulate():
    rng = np.random.default_rng(1)
    widths = [5, 7, 3]
    x, labels = rng.standard_normal((8, 5)), rng.integers(0, 3, 8)
    ref = MLP(widths, "relu", "softmax_ce", "float64", seed=2)
    ref.loss_and_grad(x, labels, 8)
    st = Stage(widths, 0, 2, "relu", "softmax_ce", "float64", seed=2)
    for k in range(4):
        acts = st.forward(x[2 * k:2 * k + 2])
        dout = np.empty_like(acts[-1])
        st.loss(acts[-1], labels[2 * k:2 * k + 2], 8, dout)
        st.backward(acts, dout, need_dx=False, accumulate=k > 0)
    np.testing.assert_allclose(st.flat.grad, ref.flat.grad, rtol=1e-12, atol=1e-15)


def fake_grid(dp=1, pp=1, tp=1):
    """A grid of the given shape for constructors, which must not communicate."""
    c = MPI.COMM_SELF
    return Grid(c, dp, pp, tp, 0, 0, 0, c, c, c)


@pytest.mark.parametrize("overrides,grid,message", [
    (["parallel.strategy=pipeline", "parallel.pp=5"], dict(pp=5),
     "parallel.pp = 5 stages but model.layers has only 4 layers"),
    (["parallel.strategy=pipeline", "parallel.pp=2", "parallel.micro_batches=5"], dict(pp=2),
     "parallel.micro_batches = 5 does not divide the per-replica batch data.batch_size / dp = 64/2 = 32"),
    (["parallel.strategy=tensor", "parallel.tp=2", "model.layers=[64, 63, 64, 10]"], dict(tp=2),
     "model.layers[1] = 63 does not divide by parallel.tp = 2"),
    (["parallel.strategy=pipeline", "parallel.pp=2", "parallel.stage_layers=[1, 2]"], dict(pp=2),
     "parallel.stage_layers = [1, 2] must have parallel.pp = 2 entries summing to the 4 layers"),
    (["parallel.strategy=tensor", "parallel.tp=2", "optimizer.name=lars"], dict(tp=2),
     "optimizer.name = \"lars\" takes per-tensor norms"),
    (["parallel.strategy=pipeline", "parallel.tp=2"], dict(tp=2),
     "parallel.tp = 2 needs parallel.strategy = \"tensor\" or \"hybrid\""),
    (["parallel.strategy=tensor", "parallel.pp=2"], dict(pp=2),
     "parallel.pp = 2 needs parallel.strategy = \"pipeline\" or \"hybrid\""),
    (["parallel.pp=2"], dict(pp=2), "parallel.pp/tp > 1 need parallel.strategy"),
])
def test_config_errors_name_the_keys(overrides, grid, message):
    cfg = config.load(None, ["model.layers=[64, 64, 64, 64, 10]", *overrides])
    dp = 2 if "micro_batches=5" in " ".join(overrides) else 1
    with pytest.raises(ConfigError) as e:
        build(cfg, fake_grid(dp=dp, **grid), 64)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_stage_layers_cut_where_told():
    cfg = config.load(None, ["model.layers=[64, 64, 64, 64, 10]", "parallel.strategy=pipeline",
                             "parallel.pp=2", "parallel.stage_layers=[1, 3]"])
    s = build(cfg, fake_grid(pp=2), 64)
    assert s.partition.bounds == [(0, 1), (1, 4)] and [l.name for l in s.stage.layers] == ["dense0"]
    cfg = config.load(None, ["model.layers=[64, 64, 64, 64, 10]", "parallel.strategy=pipeline", "parallel.pp=2"])
    assert build(cfg, fake_grid(pp=2), 64).partition.bounds == [(0, 2), (2, 4)]
