"""`hpcopt data import` and `data stats`: a user's arrays become a data file (classification or
regression, any per-sample shape) or are refused with one line and nothing written; target statistics
are the training split's; data.normalize_targets trains on them and reports metrics in original units."""
import os

import h5py
import numpy as np
import pytest

from hpcopt.data import inspect
from hpcopt.data.importer import import_arrays, read_stats
from hpcopt.errors import ConfigError, DataError
from tests.conftest import hpcopt


def arrays(n=50, rng=None):
    rng = rng or np.random.default_rng(0)
    return rng.standard_normal((n, 2, 3, 3)).astype(np.float64), rng.standard_normal((n, 3, 3)) * 4 + 1


def test_npz_regression_import_with_stats(tmp_path):
    x, y = arrays()
    np.savez(tmp_path / "a.npz", fields=x, solutions=y)
    out = str(tmp_path / "d.h5")
    r = import_arrays(str(tmp_path / "a.npz"), out, "fields", "solutions", test_fraction=0.2, seed=1)
    assert r == dict(task="regression", train=40, test=10, x_shape=[2, 3, 3], y_shape=[3, 3], classes=0)
    info = inspect(out)
    assert (info.task, info.x_shape, info.y_shape) == ("regression", (2, 3, 3), (3, 3))
    with h5py.File(out) as f:
        train_y = f["train/y"][()]
        assert f["train/x"].attrs["chunk_samples"] == f["train/x"].chunks[0]
    mean, std = read_stats(out)
    np.testing.assert_allclose(mean, train_y.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(std, train_y.astype(np.float64).std(0), rtol=1e-10)


def test_npy_and_h5_classification_import(tmp_path):
    rng = np.random.default_rng(1)
    x, labels = rng.random((30, 8)), rng.integers(0, 3, 30)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", labels)
    r = import_arrays(str(tmp_path / "x.npy"), str(tmp_path / "c.h5"), "", str(tmp_path / "y.npy"))
    assert (r["task"], r["classes"], r["train"] + r["test"]) == ("classification", 3, 30)
    with h5py.File(tmp_path / "src.h5", "w") as f:
        f["g/x"], f["g/y"] = x, labels
    hp = hpcopt("data", "import", str(tmp_path / "src.h5"), str(tmp_path / "c2.h5"), "--x", "g/x", "--y", "g/y")
    assert hp.returncode == 0 and "classification, 24 train + 6 test samples" in hp.stdout, hp.stderr
    assert inspect(str(tmp_path / "c2.h5")).classes == 3


@pytest.mark.parametrize("case,message", [
    ("nan x", "has a NaN or inf value (sample 7)"),
    ("nan y", "has a NaN or inf target (sample 3)"),
    ("short y", "has 49 samples but x has 50"),
    ("1-D x", "has shape [50]: need (samples, features) or (samples, *shape)"),
    ("float labels", "holds non-integer values: not class labels"),
    ("missing key", "no array 'nope'"),
])
def test_bad_imports_are_one_line_and_write_nothing(tmp_path, case, message):
    x, y = arrays()
    task, ykey = None, "y"
    if case == "nan x":
        x[7, 1, 0, 0] = np.nan
    elif case == "nan y":
        y[3, 2, 2] = np.inf
    elif case == "short y":
        y = y[:49]
    elif case == "1-D x":
        x = x[:, 0, 0, 0]
    elif case == "float labels":
        y, task = y[:, 0, 0], "classification"
    else:
        ykey = "nope"
    np.savez(tmp_path / "a.npz", x=x, y=y)
    with pytest.raises(DataError) as e:
        import_arrays(str(tmp_path / "a.npz"), str(tmp_path / "d.h5"), "x", ykey, task=task)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert os.listdir(tmp_path) == ["a.npz"]


def test_an_existing_output_is_never_overwritten(tmp_path):
    x, y = arrays()
    np.savez(tmp_path / "a.npz", x=x, y=y)
    (tmp_path / "d.h5").write_bytes(b"precious")
    p = hpcopt("data", "import", str(tmp_path / "a.npz"), str(tmp_path / "d.h5"), "--x", "x", "--y", "y")
    assert p.returncode == 2 and "exists" in p.stderr and (tmp_path / "d.h5").read_bytes() == b"precious"
    with pytest.raises(ConfigError):
        import_arrays(str(tmp_path / "a.npz"), str(tmp_path / "d.h5"), "x", "y")


def test_normalized_targets_train_and_report_original_units(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((120, 6)).astype(np.float32)
    y = (x @ rng.standard_normal((6, 2)) * 50 + 300).astype(np.float32)    # far from unit scale
    np.savez(tmp_path / "a.npz", x=x, y=y)
    data = str(tmp_path / "d.h5")
    import_arrays(str(tmp_path / "a.npz"), data, "x", "y")
    job = tmp_path / "job.toml"
    job.write_text("[run]\nname = \"lin\"\n")
    base = ["train", str(job), "--quiet", f"data.path={data}", "data.batch_size=32", "model.layers=[6, 2]",
            "model.loss=mse", "optimizer.name=adam", "optimizer.lr=0.05", "run.steps=120"]
    p = hpcopt(*base, "data.normalize_targets=true", f"run.out_dir={tmp_path / 'n'}")
    assert p.returncode == 0, p.stderr
    rel = float(p.stdout.strip().splitlines()[-1].split("test relative L2 ")[1].split(",")[0])
    assert rel < 0.01, p.stdout     # a linear map, learned in normalised units, scored in original ones
    with h5py.File(data, "a") as f:
        del f["stats"]
    p = hpcopt(*base, "data.normalize_targets=true", f"run.out_dir={tmp_path / 'm'}")
    assert p.returncode == 3 and "hpcopt data stats" in p.stderr.strip().splitlines()[-1], p.stderr
    q = hpcopt("data", "stats", data)
    assert q.returncode == 0 and "120" not in q.stdout and "96 training samples" in q.stdout, q.stdout + q.stderr
    assert read_stats(data)[0].shape == (2,)
