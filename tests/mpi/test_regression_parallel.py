"""Regression under mpirun: a field-to-field CNN trained with rel_l2 on normalised targets gives the
same parameters and test metrics on 1 rank, 2 data-parallel ranks and a 2-stage pipeline; `data stats`
on 2 ranks writes the statistics one process computes; block shuffle with read-ahead is rank-count
independent too."""
import json

import h5py
import numpy as np
import pytest

from hpcopt import checkpoint
from hpcopt.data.importer import import_arrays, read_stats
from tests.conftest import hpcopt

pytestmark = pytest.mark.mpi
LAYERS = ('model.layer=[{type="conv2d", channels=6, kernel=3, padding=1, activation="gelu"},'
          ' {type="residual", layers=[{type="conv2d", channels=6, kernel=3, padding=1, activation="silu"}]},'
          ' {type="conv2d", channels=1, kernel=3, padding=1}]')


@pytest.fixture(scope="module")
def fields(tmp_path_factory):
    d = tmp_path_factory.mktemp("fields")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((160, 1, 6, 6)).astype(np.float32)
    k = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float32)
    lap = sum(k[i, j] * np.roll(np.roll(x[:, 0], i - 1, 1), j - 1, 2) for i in range(3) for j in range(3))
    y = (3 * x[:, 0] + lap + 10).astype(np.float32)            # a local operator on the field, offset
    np.savez(d / "f.npz", x=x, y=y)
    path = str(d / "f.h5")
    import_arrays(str(d / "f.npz"), path, "x", "y", test_fraction=0.2, seed=0)
    job = d / "job.toml"
    job.write_text("[run]\nname = \"fields\"\n")
    return path, str(job)


def train(fields, out, n, extra=()):
    data, job = fields
    args = ["train", job, f"data.path={data}", f"run.out_dir={out}", "run.steps=12", "run.log_every=4",
            "--quiet", "data.batch_size=32", "model.input=[1, 6, 6]", LAYERS, "model.loss=rel_l2",
            "data.normalize_targets=true", "data.shuffle=block", "data.window_chunks=2", "data.read_ahead=true",
            "optimizer.name=adam", "optimizer.lr=0.01", *extra]
    return hpcopt(*args, n=n if n > 1 else None, timeout=240, check=True)


def result(out):
    npz = out / "p.npz"
    hpcopt("ckpt", "export", str(out / "checkpoints" / checkpoint.file_name(12)), str(npz), check=True)
    last = [r for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r][-1]
    return dict(np.load(npz)), last


@pytest.mark.slow
def test_regression_is_layout_independent(tmp_path, fields):
    runs = {}
    for name, n, extra in (("one", 1, ()), ("dp2", 2, ()),
                           ("pp2", 2, ("parallel.strategy=pipeline", "parallel.pp=2", "parallel.micro_batches=2"))):
        train(fields, tmp_path / name, n, extra)
        runs[name] = result(tmp_path / name)
    ref, ref_last = runs["one"]
    assert 0 < ref_last["test_rel_l2"] < 1 and "test_r2" in ref_last
    for name in ("dp2", "pp2"):
        got, last = runs[name]
        for k in ref:
            np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=f"{k}, {name}")
        assert last["test_rel_l2"] == pytest.approx(ref_last["test_rel_l2"], rel=1e-4)
        assert last["test_r2"] == pytest.approx(ref_last["test_r2"], rel=1e-4)


def test_data_stats_on_two_ranks_equal_one_process(tmp_path, fields):
    path = str(tmp_path / "copy.h5")
    with h5py.File(fields[0]) as src, h5py.File(path, "w") as dst:
        for k, v in src.attrs.items():
            dst.attrs[k] = v
        for split in ("train", "test"):
            for part in ("x", "y"):
                dst[f"{split}/{part}"] = src[f"{split}/{part}"][()]
    p = hpcopt("data", "stats", path, n=2, timeout=120)
    assert p.returncode == 0 and "(128 training samples, 2 ranks)" in p.stdout, p.stdout + p.stderr
    mean, std = read_stats(path)
    ref_mean, ref_std = read_stats(fields[0])
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-12)
    np.testing.assert_allclose(std, ref_std, rtol=1e-9)
