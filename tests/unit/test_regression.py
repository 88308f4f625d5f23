"""Regression: losses against PyTorch (mse, l1, huber) and autograd (rel_l2) in float64, the evaluation
sums (relative L2, R²) against a direct computation, regression data files read and refused with one
line, and a tiny field-to-field job trained through `hpcopt train` (1 process)."""
import h5py
import numpy as np
import pytest
import torch

from hpcopt.data import ShardedLoader, inspect
from hpcopt.errors import DataError
from hpcopt.nn import losses
from tests.conftest import hpcopt


def _torch_loss(name, o, t):
    if name == "mse":
        return torch.nn.functional.mse_loss(o, t, reduction="none").mean(1).sum()
    if name == "l1":
        return torch.nn.functional.l1_loss(o, t, reduction="none").mean(1).sum()
    if name == "huber":
        return torch.nn.functional.huber_loss(o, t, reduction="none", delta=1.0).mean(1).sum()
    return (torch.linalg.vector_norm(o - t, dim=1) / torch.linalg.vector_norm(t, dim=1)).sum()


@pytest.mark.parametrize("name", losses.REGRESSION)
def test_regression_losses_equal_torch(name):
    rng = np.random.default_rng(3)
    out, t = rng.standard_normal((7, 3, 4)) * 1.5, rng.standard_normal((7, 3, 4))   # |d| spans huber's kink
    dout = np.empty_like(out)
    got = losses.LOSSES[name](out, t, 14, dout)          # sum over rows; gradient of the mean over 14
    ot = torch.tensor(out.reshape(7, -1), requires_grad=True)
    ref = _torch_loss(name, ot, torch.tensor(t.reshape(7, -1)))
    (ref / 14).backward()
    assert got == pytest.approx(ref.item(), rel=1e-12)
    np.testing.assert_allclose(dout.reshape(7, -1), ot.grad.numpy(), rtol=1e-10, atol=1e-15)


def test_classification_mse_keeps_one_hot_targets():
    out, labels = np.array([[0.2, 0.9, -0.1]]), np.array([1])
    dout = np.empty_like(out)
    assert losses.LOSSES["mse"](out, labels, 1, dout) == pytest.approx((0.04 + 0.01 + 0.01) / 3)


def test_scores_give_relative_l2_and_r2():
    rng = np.random.default_rng(4)
    t = rng.standard_normal((20, 5)) + 2
    out = t + 0.1 * rng.standard_normal(t.shape)
    halves = losses.scores(out[:8], t[:8], 0.0) + losses.scores(out[8:], t[8:], 0.0)   # sums add over ranks
    m = losses.summarise(halves, 20, regression=True)
    rel = np.mean(np.linalg.norm(out - t, axis=1) / np.linalg.norm(t, axis=1))
    r2 = 1 - np.sum((out - t) ** 2) / np.sum((t - t.mean(0)) ** 2)
    assert m["test_rel_l2"] == pytest.approx(rel, rel=1e-12) and m["test_r2"] == pytest.approx(r2, rel=1e-12)


def write_regression(path, n=96, shape=(4, 4), task="regression", y=None, x=None):
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((n, 1, *shape)).astype(np.float32) if x is None else x
    ys = (2 * xs[:, 0] + 0.5).astype(np.float32) if y is None else y     # a field to a field
    with h5py.File(path, "w") as f:
        f.attrs.update(name="toy", task=task)
        for split, rows in (("train", slice(0, n * 3 // 4)), ("test", slice(n * 3 // 4, n))):
            f[f"{split}/x"], f[f"{split}/y"] = xs[rows], ys[rows]
    return path


def test_regression_file_is_read_with_its_shapes(tmp_path):
    path = str(write_regression(tmp_path / "r.h5"))
    info = inspect(path)
    assert (info.task, info.x_shape, info.targets, info.y_shape, info.classes) == ("regression", (1, 4, 4), 16,
                                                                                  (4, 4), 0)
    x, y = ShardedLoader(path, "train", 8, 1, 2, seed=0).batch(0)
    assert x.shape == (4, 1, 4, 4) and y.shape == (4, 4, 4) and y.dtype == np.float32


@pytest.mark.parametrize("kind,message", [
    ("nan target", "/train/y has a NaN or inf target (sample 5)"),
    ("zero target", "/train/y sample 3 is all zeros: model.loss = \"rel_l2\" divides by the target's norm"),
    ("int targets", "/train/y must hold float targets for regression, got int64"),
    ("float labels", "/train/y must hold integer labels, got float32 (float targets need the root attribute"),
])
def test_bad_regression_files_are_one_line(tmp_path, kind, message):
    rng = np.random.default_rng(1)
    y = rng.standard_normal((96, 4, 4)).astype(np.float32)
    task = "regression"
    if kind == "nan target":
        y[5, 1, 1] = np.nan
    elif kind == "zero target":
        y[3] = 0
    elif kind == "int targets":
        y = np.ones((96, 4, 4), np.int64)
    else:
        task, y = "classification", np.zeros(96, np.float32)
    path = str(write_regression(tmp_path / "bad.h5", y=y, task=task))
    with pytest.raises(DataError) as e:
        inspect(path, nonzero_targets=True)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_field_to_field_job_trains_and_reports_relative_l2(tmp_path):
    path = str(write_regression(tmp_path / "r.h5"))
    job = tmp_path / "job.toml"
    job.write_text("[run]\nname = \"toy\"\n")
    base = ["train", str(job), "--quiet", f"data.path={path}", "data.batch_size=24", "model.input=[1, 4, 4]",
            'model.layer=[{type="conv2d", channels=4, kernel=3, padding=1, activation="tanh"},'
            ' {type="conv2d", channels=1, kernel=3, padding=1}]', "optimizer.name=adam", "optimizer.lr=0.02",
            "run.steps=150", "run.log_every=50"]
    p = hpcopt(*base, "model.loss=rel_l2", f"run.out_dir={tmp_path / 'run'}")
    assert p.returncode == 0, p.stderr
    line = p.stdout.strip().splitlines()[-1]
    rel = float(line.split("test relative L2 ")[1].split(",")[0])
    assert rel < 0.1, line     # y = 2x + 0.5 is within reach of two convolutions
    p = hpcopt(*base, "model.loss=softmax_ce", f"run.out_dir={tmp_path / 'run2'}")
    assert p.returncode == 2 and "needs class labels but" in p.stderr.strip().splitlines()[-1], p.stderr
    p = hpcopt(*base[:6], 'model.layer=[{type="flatten"}, {type="dense", units=8}]', "model.loss=mse",
               f"run.out_dir={tmp_path / 'run3'}")
    assert p.returncode == 2 and "outputs 8 values per sample ([8]) but" in p.stderr, p.stderr
