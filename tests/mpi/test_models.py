"""Models beyond the MLP under mpirun: a residual CNN with batch norm and dropout trains the same
parameters (and running statistics) on 1, 2 and 4 data-parallel ranks, as a 2-stage 1F1B pipeline and as
a dp=2 x pp=2 hybrid; a checkpoint taken as pp=2 resumes as dp=4 and on 1 rank; local SGD and the async
parameter server train it; the digits CNN job learns."""
import json
import os

import numpy as np
import pytest

from hpcopt import checkpoint
from tests.conftest import REPO, hpcopt

pytestmark = pytest.mark.mpi
JOB = os.path.join(REPO, "jobs/digits_cnn.toml")
# A small residual CNN with every parallel-sensitive part: batch norm (statistics summed over dp),
# dropout (keyed by the global row), a residual block with a strided 1x1 projection.
LAYERS = ('model.layer=['
          '{type="conv2d", channels=8, kernel=3, padding=1}, {type="batchnorm"}, {type="activation", function="relu"},'
          '{type="residual", layers=[{type="conv2d", channels=8, kernel=3, padding=1, activation="relu"},'
          ' {type="conv2d", channels=16, kernel=3, padding=1, stride=2}, {type="batchnorm"}]},'
          '{type="activation", function="relu"}, {type="maxpool2d", kernel=2}, {type="flatten"},'
          '{type="dropout", p=0.2}, {type="dense", units=10}]')
NO_BN = LAYERS.replace(', {type="batchnorm"}', "")
COMMON = ["data.batch_size=64", "optimizer.name=momentum", "optimizer.lr=0.05", "optimizer.momentum=0.9",
          "optimizer.weight_decay=0", "schedule.name=constant", "schedule.warmup_steps=0", "run.log_every=5"]


def train(digits, out, n, layout=(), steps=20, layers=LAYERS, extra=(), resume=False):
    args = ["train", JOB, f"data.path={digits}", f"run.out_dir={out}", f"run.steps={steps}", "--quiet",
            layers, *COMMON, *layout, *extra] + (["--resume", "auto"] if resume else [])
    return hpcopt(*args, n=n if n > 1 else None, timeout=240, check=True)


def export(out, step=20):
    npz = out / f"params_{step}.npz"
    hpcopt("ckpt", "export", str(out / "checkpoints" / checkpoint.file_name(step)), str(npz), check=True)
    return dict(np.load(npz))


def last_record(out):
    return [r for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r][-1]


def assert_same(got, ref, what):
    assert got.keys() == ref.keys(), what
    assert any(k.endswith("running_var") for k in ref)   # the running statistics are compared too
    for k in ref:
        # The same global batch summed in another order (ranks, micro-batches): float32 rounding only.
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=f"{k}, {what}")


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, digits):
    out = tmp_path_factory.mktemp("cnn") / "one"
    train(digits, out, 1, extra=["checkpoint.every_steps=10"])
    return out


LAYOUTS = {
    "dp2": (2, []),
    "dp4": (4, []),
    "dp2-zero1": (2, ["parallel.zero=1"]),
    # a bucket per unit, started during backward: a residual block's nested tensors belong to its unit
    "dp2-buckets": (2, ["parallel.bucket_mb=0.0001", "parallel.overlap=true"]),
    "pp2-1f1b": (2, ["parallel.strategy=pipeline", "parallel.pp=2", "parallel.schedule=1f1b"]),
    "dp2-pp2-hybrid": (4, ["parallel.strategy=hybrid", "parallel.dp=2", "parallel.pp=2"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_residual_cnn_with_batchnorm_and_dropout_equals_one_process(tmp_path, digits, one_rank, layout):
    n, args = LAYOUTS[layout]
    out = tmp_path / layout
    train(digits, out, n, args)
    assert_same(export(out), export(one_rank), layout)
    a, b = last_record(one_rank), last_record(out)
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["test_acc"] == a["test_acc"]


@pytest.mark.slow
def test_pipeline_micro_batches_carry_dropout_by_global_row(tmp_path, digits):
    """1F1B with 4 micro-batches per replica: each micro-batch's dropout mask is that of its global rows,
    so the pipeline equals one process (batch norm left out: it normalises each micro-batch)."""
    ref, got = tmp_path / "one", tmp_path / "pp2"
    train(digits, ref, 1, layers=NO_BN)
    train(digits, got, 2, ["parallel.strategy=pipeline", "parallel.pp=2", "parallel.micro_batches=4"], layers=NO_BN)
    a, b = export(ref), export(got)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.slow
def test_checkpoint_from_a_pipeline_resumes_on_dp4_and_on_one_rank(tmp_path, digits, one_rank):
    """Stopped at step 10 as pp=2, continued to 20 as dp=4 and as 1 rank: the run one rank made
    without stopping (parameters, optimizer state, running statistics all came through)."""
    first = tmp_path / "pp2"
    train(digits, first, 2, ["parallel.strategy=pipeline", "parallel.pp=2"], steps=10,
          extra=["checkpoint.every_steps=10"])
    ref = export(one_rank)
    for n, name in ((4, "dp4"), (1, "one")):
        out = tmp_path / name
        args = ["train", JOB, f"data.path={digits}", f"run.out_dir={out}", "run.steps=20", "--quiet", LAYERS,
                *COMMON, "--resume", str(first / "checkpoints" / checkpoint.file_name(10))]
        hpcopt(*args, n=n if n > 1 else None, timeout=240, check=True)
        assert_same(export(out), ref, f"pp2 -> {name}")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["local_sgd", "async"])
def test_local_sgd_and_async_train_the_cnn(tmp_path, digits, strategy):
    out = tmp_path / strategy
    p = train(digits, out, 2, [f"parallel.strategy={strategy}"], steps=40)
    rec = [r for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]
    assert rec[-1]["loss"] < 0.5 * rec[0]["loss"], p.stdout
    got = export(out, 40)
    mean = [v for k, v in got.items() if k.endswith("running_mean")]
    assert mean and all(np.isfinite(m).all() and np.abs(m).sum() > 0 for m in mean)  # statistics were kept
    assert last_record(out)["test_acc"] > 0.5


def test_a_different_layer_list_is_refused_on_resume(tmp_path, digits):
    out = tmp_path / "run"
    train(digits, out, 1, steps=2, extra=["checkpoint.every_steps=2"])
    other = LAYERS.replace("channels=16", "channels=12")
    args = ["train", JOB, f"data.path={digits}", f"run.out_dir={out}", "run.steps=4", "--quiet", other, *COMMON,
            "--resume", "auto"]
    p = hpcopt(*args)
    assert p.returncode == 2, p.stderr
    line = p.stderr.strip().splitlines()[-1]
    assert "model differs" in line and "layer 3" in line and '"channels":12' in line, p.stderr


@pytest.mark.slow
def test_digits_cnn_job_learns_on_two_ranks(tmp_path, digits):
    out = tmp_path / "job"
    # 10 of the job's 20 epochs (the cosine schedule follows the shorter run): 99.4% here
    p = hpcopt("train", JOB, f"data.path={digits}", f"run.out_dir={out}", "run.epochs=10", "--quiet", n=2,
               timeout=600, check=True)
    acc = last_record(out)["test_acc"]
    assert acc >= 0.985, p.stdout
