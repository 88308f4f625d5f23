"""Bad input: each malformed job or data file gives ONE line naming the file and field, exit 2
(config) or 3 (data), no traceback, and nothing in an existing run directory changes."""
import os

import h5py
import numpy as np
import pytest

from hpcopt import cli
from tests.conftest import hpcopt

GOOD = """
[run]
steps = 2
[data]
path = "{data}"
batch_size = 16
[model]
layers = [64, 16, 10]
[optimizer]
name = "sgd"
lr = 0.1
"""

# (name, TOML to append or replace, override args, expected substring of the one line)
BAD_JOBS = [
    ("unknown section", "[foo]\nx = 1\n", [], "unknown section [foo]"),
    ("unknown key", "[checkpoint]\nevery = 3\n", [], "unknown key checkpoint.every"),
    ("wrong type", "[schedule]\nwarmup_steps = \"ten\"\n", [], "schedule.warmup_steps must be an integer"),
    ("negative lr", "", ["optimizer.lr=-1"], "optimizer.lr must be > 0 (got -1.0)"),
    ("unknown optimizer", "", ["optimizer.name=adamz"], "optimizer.name must be one of"),
    ("one layer", "", ["model.layers=[64]"], "model.layers needs at least 2 entries"),
    ("zero width", "", ["model.layers=[64, 0, 10]"], "model.layers must be >= 1"),
    ("zero batch", "", ["data.batch_size=0"], "data.batch_size must be >= 1"),
    ("batch word", "", ["data.batch_size=\"half\""], "data.batch_size must be a positive integer or \"all\""),
    ("world mismatch", "", ["parallel.dp=3"], "parallel.dp * pp * tp = 3*1*1 = 3 but the job has 1 ranks"),
    ("short betas", "", ["optimizer.betas=[0.9]"], "optimizer.betas needs at least 2 entries"),
    ("beta >= 1", "", ["optimizer.betas=[0.9, 1.5]"], "optimizer.betas must be < 1"),
    ("features mismatch", "", ["model.layers=[32, 10]"], "model.layers[0] = 32 but"),
    ("top-level key", "PREPEND:lr = 1\n", [], "lr must be a [section] table"),
    ("negative steps", "", ["run.steps=-5"], "run.steps must be >= 0"),
    ("unknown device", "", ["backend.device=\"tpu\""], "backend.device must be one of cpu, cuda"),
    ("batch > data", "", ["data.batch_size=5000"], "data.batch_size = 5000 is larger than the 1438"),
    ("not a bool", "", ["parallel.overlap=1"], "parallel.overlap must be true or false"),
    ("override syntax", "", ["optimizer.lr"], "must look like section.key=value"),
    ("unknown schedule", "", ["schedule.name=cyclic"], "schedule.name must be one of"),
    ("too few outputs", "", ["model.layers=[64, 5]"], "model.layers[-1] = 5 outputs but"),
    ("nan not a number", "", ["optimizer.lr=nan"], "optimizer.lr must be a number"),
]


def make_bad_data(kind: str, path: str) -> None:
    if kind == "not hdf5":
        open(path, "w").write("x,y\n1,2\n")
        return
    x, y = np.random.default_rng(0).random((40, 64), dtype=np.float32), np.arange(40) % 10
    parts = {"train/x": x, "train/y": y, "test/x": x[:8], "test/y": y[:8]}
    if kind == "missing labels":
        del parts["train/y"]
    elif kind == "1-D x":
        parts["train/x"] = x[:, 0]
    elif kind == "int x":
        parts["train/x"] = (x * 10).astype(np.int32)
    elif kind == "nan":
        parts["train/x"] = x.copy()
        parts["train/x"][17, 3] = np.nan
    elif kind == "inf in test":
        parts["test/x"] = x[:8].copy()
        parts["test/x"][2, 0] = np.inf
    elif kind == "no samples":
        parts["train/x"], parts["train/y"] = x[:0], y[:0]
    elif kind == "label range":
        parts["train/y"] = y.copy()
        parts["train/y"][5] = 12
    elif kind == "length mismatch":
        parts["train/y"] = y[:30]
    with h5py.File(path, "w") as f:
        f.attrs["classes"] = 10
        for k, v in parts.items():
            f[k] = v


BAD_DATA = [
    ("not hdf5", "not an HDF5 file"),
    ("missing labels", "missing dataset /train/y"),
    ("1-D x", "/train/x must be (samples, features) or (samples, *shape)"),
    ("int x", "/train/x must hold floats, got int32"),
    ("nan", "/train/x has a NaN or inf value (sample 17)"),
    ("inf in test", "/test/x has a NaN or inf value (sample 2)"),
    ("no samples", "/train has no samples"),
    ("label range", "/train/y label 12 at sample 5 is outside [0, 10)"),
    ("length mismatch", "/train/x has 40 samples but /train/y has 30"),
    ("missing file", "no such data file"),
]


@pytest.fixture()
def existing_run(tmp_path):
    """A run directory with files whose bytes must survive every bad invocation."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    files = {run / "metrics.jsonl": b'{"step": 1}\n', run / "config.toml": b"# old\n",
             run / "checkpoints" / "step_00000001.h5": b"old checkpoint bytes"}
    for p, b in files.items():
        p.write_bytes(b)
    return run, files


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


@pytest.mark.parametrize("name,toml,overrides,expected", BAD_JOBS, ids=[c[0] for c in BAD_JOBS])
def test_bad_job(name, toml, overrides, expected, tmp_path, digits, existing_run, capsys):
    run, files = existing_run
    job = tmp_path / "job.toml"
    good = GOOD.format(data=digits)
    job.write_text(toml[len("PREPEND:"):] + good if toml.startswith("PREPEND:") else good + toml)
    code = cli.main(["train", str(job), f"run.out_dir={run}", "--quiet", *overrides])
    line = one_error_line(capsys)
    assert code == 2, line
    assert expected in line
    assert line.startswith(f"hpcopt: {job}:") or line.startswith("hpcopt: command line:")
    assert all(p.read_bytes() == b for p, b in files.items())


def test_missing_and_invalid_job_files(tmp_path, capsys):
    assert cli.main(["train", str(tmp_path / "nope.toml")]) == 2
    assert one_error_line(capsys) == f"hpcopt: {tmp_path / 'nope.toml'}: no such job file"
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nsteps = 1\n")
    assert cli.main(["train", str(bad)]) == 2
    assert f"{bad}: not valid TOML" in one_error_line(capsys)


def test_existing_run_is_not_overwritten(tmp_path, digits, existing_run, capsys):
    run, files = existing_run
    job = tmp_path / "job.toml"
    job.write_text(GOOD.format(data=digits))
    assert cli.main(["train", str(job), f"run.out_dir={run}", "--quiet"]) == 2
    assert "already holds a run; resume it with --resume auto" in one_error_line(capsys)
    assert all(p.read_bytes() == b for p, b in files.items())


@pytest.mark.parametrize("kind,expected", BAD_DATA, ids=[c[0] for c in BAD_DATA])
def test_bad_data(kind, expected, tmp_path, existing_run, capsys):
    run, files = existing_run
    data = tmp_path / "bad.h5"
    if kind != "missing file":
        make_bad_data(kind, str(data))
    job = tmp_path / "job.toml"
    job.write_text(GOOD.format(data=data).replace("batch_size = 16", "batch_size = 8"))
    code = cli.main(["train", str(job), f"run.out_dir={run}", "--quiet"])
    line = one_error_line(capsys)
    assert code == 3, line
    assert line.startswith(f"hpcopt: {data}: ") and expected in line
    assert all(p.read_bytes() == b for p, b in files.items())


def test_real_process_exit_codes(tmp_path, digits):
    """The same through a real `hpcopt` process: exit status and a single stderr line."""
    job = tmp_path / "job.toml"
    job.write_text(GOOD.format(data=digits))
    p = hpcopt("train", str(job), "optimizer.lr=-1", timeout=60)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        f"hpcopt: command line: optimizer.lr must be > 0 (got -1.0)"]
    p = hpcopt("train", str(job), "data.path=" + str(tmp_path / "none.h5"), timeout=60)
    assert p.returncode == 3 and len(p.stderr.strip().splitlines()) == 1 and "no such data file" in p.stderr


@pytest.mark.parametrize("argv,code,expected", [
    (["data", "make", "synthetic", "{tmp}/s.h5", "--samples", "0"], 2, "synthetic: need samples >= 1"),
    (["data", "make", "digits", "/proc/x/digits.h5"], 3, "/proc/x/digits.h5: cannot write"),
    (["ckpt", "ls", "{tmp}/none"], 2, "{tmp}/none: no such run directory"),
    (["ckpt", "verify", "{tmp}/none.h5"], 3, "{tmp}/none.h5: no such checkpoint"),
    (["ckpt", "export", "{tmp}/none.h5", "{tmp}/o.npz"], 3, "{tmp}/none.h5: no such checkpoint"),
    (["train", "JOB", "run.out_dir={tmp}/job.toml/run"], 2, "{tmp}/job.toml/run: cannot create the run directory"),
])
def test_other_commands_give_one_line(argv, code, expected, tmp_path, digits, capsys):
    job = tmp_path / "job.toml"
    job.write_text(GOOD.format(data=digits))
    argv = [a.replace("{tmp}", str(tmp_path)).replace("JOB", str(job)) for a in argv]
    assert cli.main(argv) == code
    assert expected.replace("{tmp}", str(tmp_path)) in one_error_line(capsys)
