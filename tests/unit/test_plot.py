"""`hpcopt plot`: the figure's plotted values are the files' values (loss, test metric, cumulative wall
time over a resume, a sweep's final metric per swept key), the picture is written atomically, and each
mistake is one line with exit 2 or 3. Metrics files are written here by hand; one test plots a real run."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")

from hpcopt import cli, plot  # noqa: E402
from tests.conftest import REPO, hpcopt  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_jsonl(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def rec(step, loss, time, **extra):
    return dict(step=step, epoch=0, loss=loss, lr=0.01, grad_norm=1.0, skipped=0, samples_per_s=100.0,
                time=time, **extra)


def start(step):
    return {"event": "start", "step": step, "world": 1, "resumed_from": None}


def make_run(path, steps=(10, 20, 30, 40), acc_every=20, loss0=2.0):
    records = [start(0)]
    for i, s in enumerate(steps):
        extra = dict(test_acc=0.5 + 0.01 * s, test_loss=1.0 / s) if s % acc_every == 0 else {}
        records.append(rec(s, loss0 / (i + 1), 0.5 * (i + 1), **extra))
    write_jsonl(os.path.join(path, "metrics.jsonl"), records)
    return str(path)


def make_resumed(path):
    """Steps 10, 20 (test), 30 logged; checkpoint at 20; killed; resumed from 20: 30 again, 40 (test).
    The resumed process's clock restarts at 0."""
    records = [start(0), {"event": "first_step", "step": 1, "start_to_first_step_s": 1.0},
               rec(10, 2.0, 1.0), rec(20, 1.0, 2.0, test_acc=0.6, test_loss=0.9),
               {"event": "checkpoint", "step": 20, "reason": "every_steps", "path": "x"},
               rec(30, 0.9, 3.0),
               start(20), rec(30, 0.8, 0.5), rec(40, 0.4, 1.5, test_acc=0.8, test_loss=0.5)]
    write_jsonl(os.path.join(path, "metrics.jsonl"), records)
    return str(path)


def make_regression(path):
    records = [start(0), rec(5, 0.5, 0.1), rec(10, 0.25, 0.2, test_rel_l2=0.3, test_r2=0.5),
               rec(15, 0.125, 0.3), rec(20, 0.0625, 0.4, test_rel_l2=0.1, test_r2=0.9)]
    write_jsonl(os.path.join(path, "metrics.jsonl"), records)
    return str(path)


TRIALS = [  # (trial, optimizer, lr, batch, status, metric); trial 1 is first "running", then "done"
    (0, "adam", 0.001, 32, "done", 0.91),
    (1, "sgd", 0.1, 64, "running", None),
    (2, "adam", 0.03, 64, "failed", None),
    (3, "sgd", 0.0003, 32, "pruned", 0.40),
    (1, "sgd", 0.1, 64, "done", 0.95),
    (4, "adam", 0.01, 128, "done", 0.97),
]


def make_sweep(path):
    lines = []
    for n, opt, lr, bs, status, metric in TRIALS:
        lines.append(dict(trial=n, dir=f"trial_{n:04d}", status=status, metric_name="test_acc", metric=metric,
                          values={"optimizer.name": opt, "optimizer.lr": lr, "data.batch_size": bs},
                          steps=40, seconds=1.0, reason="diverged" if status == "failed" else None))
    write_jsonl(os.path.join(path, "results.jsonl"), lines)
    for n in (0, 1, 3, 4):  # trial 2 failed before it logged anything: no metrics.jsonl
        make_run(os.path.join(path, f"trial_{n:04d}"), loss0=1.0 + n)
    os.makedirs(os.path.join(path, "trial_0002"))
    return str(path)


def axis(fig, title):
    found = [ax for ax in fig.axes if ax.get_title().split("\n")[0] == title]
    assert len(found) == 1, [ax.get_title() for ax in fig.axes]
    return found[0]


def file_records(path):
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "event" not in r]


def plot_cli(capsys, *args):
    code = cli.main(["plot", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


# -- what is drawn ---------------------------------------------------------------------------------------
def test_runs_written_and_values_match(tmp_path, capsys):
    a = make_run(tmp_path / "a")
    r = make_resumed(tmp_path / "resumed")
    g = make_regression(tmp_path / "reg")
    out = tmp_path / "out.png"
    code, stdout, err = plot_cli(capsys, a, r, g, "-o", out)
    assert code == 0, err
    assert stdout == f"wrote {out}: 3 runs, 6 panels\n"
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left

    fig = plot.figure([a, r, g])
    loss = axis(fig, "loss vs step")
    assert [ln.get_label() for ln in loss.lines] == ["a", "resumed", "reg"]
    recs = file_records(a)
    assert list(loss.lines[0].get_xdata()) == [x["step"] for x in recs]
    assert list(loss.lines[0].get_ydata()) == [x["loss"] for x in recs]
    assert loss.get_yscale() == "log"
    assert loss.get_legend() is not None

    acc = axis(fig, "test accuracy (%) vs step")  # the regression run has no line here
    assert [ln.get_label() for ln in acc.lines] == ["a", "resumed"]
    assert list(acc.lines[0].get_xdata()) == [x["step"] for x in recs if "test_acc" in x]
    assert list(acc.lines[0].get_ydata()) == [100 * x["test_acc"] for x in recs if "test_acc" in x]
    assert acc.get_yscale() == "linear"

    rel = axis(fig, "test relative L2 vs step")
    (line,) = rel.lines
    assert line.get_label() == "reg"
    assert list(line.get_xdata()) == [10, 20] and list(line.get_ydata()) == [0.3, 0.1]
    assert rel.get_yscale() == "log"
    rel_t = axis(fig, "test relative L2 vs wall time")
    assert list(rel_t.lines[0].get_xdata()) == [0.2, 0.4]

    wall = axis(fig, "loss vs wall time")
    assert list(wall.lines[0].get_xdata()) == [x["time"] for x in recs]
    acc_t = axis(fig, "test accuracy (%) vs wall time")
    assert list(acc_t.lines[0].get_xdata()) == [x["time"] for x in recs if "test_acc" in x]


def test_resume_keeps_later_steps_and_cumulates_time(tmp_path):
    r = make_resumed(tmp_path / "resumed")
    run = plot.load_run(r)
    assert run.steps == [10, 20, 30, 40]
    assert run.loss == [2.0, 1.0, 0.8, 0.4]  # step 30 of the resumed process, not the one before
    assert run.time == [1.0, 2.0, 3.5, 4.5]  # resumed segment offset by 3.0, the last time before it
    assert run.segments == 2

    fig = plot.figure([r])
    wall = axis(fig, "loss vs wall time")
    assert list(wall.lines[0].get_xdata()) == [1.0, 2.0, 3.5, 4.5]
    assert list(wall.lines[0].get_ydata()) == [2.0, 1.0, 0.8, 0.4]
    acc_t = axis(fig, "test accuracy (%) vs wall time")
    assert list(acc_t.lines[0].get_xdata()) == [2.0, 4.5]
    assert list(acc_t.lines[0].get_ydata()) == [60.0, 80.0]


def test_null_values_left_out(tmp_path):
    """metrics.jsonl writes a non-finite loss as null: that point is left out, the others drawn."""
    write_jsonl(tmp_path / "r" / "metrics.jsonl", [start(0), rec(1, 1.0, 0.1), rec(2, None, 0.2),
                                                   rec(3, 0.5, 0.3)])
    fig = plot.figure([tmp_path / "r"])
    line = axis(fig, "loss vs step").lines[0]
    assert list(line.get_xdata()) == [1, 3] and list(line.get_ydata()) == [1.0, 0.5]
    assert len(fig.axes) == 2  # no test scores: no metric panels


def test_sweep_values_match(tmp_path, capsys):
    sw = make_sweep(tmp_path / "sweep")
    out = tmp_path / "sweep.png"
    code, stdout, err = plot_cli(capsys, sw, "-o", out)
    assert code == 0, err
    assert stdout == f"wrote {out}: 4 runs, 7 panels\n"  # 4 curve panels + 3 swept keys
    assert out.read_bytes().startswith(PNG_MAGIC)

    fig = plot.figure([sw])
    loss = axis(fig, "loss vs step")
    labels = [ln.get_label() for ln in loss.lines]
    assert labels == ["trial_0000 adam lr=0.001 batch_size=32", "trial_0001 sgd lr=0.1 batch_size=64",
                      "trial_0003 sgd lr=0.0003 batch_size=32", "trial_0004 adam lr=0.01 batch_size=128"]
    recs = file_records(os.path.join(sw, "trial_0003"))
    assert list(loss.lines[2].get_ydata()) == [x["loss"] for x in recs]

    done = {1: ("sgd", 0.1, 64, 0.95), 0: ("adam", 0.001, 32, 0.91), 4: ("adam", 0.01, 128, 0.97)}
    order = sorted(done)  # by trial number
    lr = axis(fig, "final test_acc vs optimizer.lr")
    (pts,) = lr.collections
    xy = pts.get_offsets()
    assert [tuple(p) for p in xy] == [(done[n][1], 100 * done[n][3]) for n in order]
    assert lr.get_xscale() == "log"  # 0.001 .. 0.1: two decades
    assert "not shown: 1 failed, 1 pruned" in lr.get_title()

    bs = axis(fig, "final test_acc vs data.batch_size")
    assert [tuple(p) for p in bs.collections[0].get_offsets()] == [(done[n][2], 100 * done[n][3]) for n in order]
    assert bs.get_xscale() == "linear"  # 32 .. 128: less than a decade

    opt = axis(fig, "final test_acc vs optimizer.name")
    assert [t.get_text() for t in opt.get_xticklabels()] == ["adam", "sgd"]
    cat = {"adam": 0.0, "sgd": 1.0}
    assert [tuple(p) for p in opt.collections[0].get_offsets()] == [(cat[done[n][0]], 100 * done[n][3]) for n in order]


def test_many_trials_no_legend(tmp_path):
    sw = tmp_path / "big"
    lines = []
    for n in range(32):
        lines.append(dict(trial=n, dir=f"trial_{n:04d}", status="done", metric_name="test_acc", metric=0.5 + n / 100,
                          values={"optimizer.lr": 10 ** (-4 + n / 8)}, steps=40, seconds=1.0, reason=None))
        make_run(sw / f"trial_{n:04d}", loss0=1.0 + n)
    write_jsonl(sw / "results.jsonl", lines)
    fig = plot.figure([sw])
    loss = axis(fig, "loss vs step")
    assert len(loss.lines) == 32 and loss.get_legend() is None
    assert "no legend: 32 lines" in fig.get_suptitle()
    assert len(axis(fig, "final test_acc vs optimizer.lr").collections[0].get_offsets()) == 32


def test_other_formats(tmp_path, capsys):
    a = make_run(tmp_path / "a")
    for ext, magic in ((".svg", b"<?xml"), (".pdf", b"%PDF")):
        out = tmp_path / f"out{ext}"
        code, _, err = plot_cli(capsys, a, "-o", out)
        assert code == 0, err
        assert out.read_bytes().startswith(magic)


def test_unfinished_last_line_skipped(tmp_path, capsys):
    path = tmp_path / "r" / "metrics.jsonl"
    write_jsonl(path, [start(0), rec(1, 1.0, 0.1), rec(2, 0.5, 0.2)])
    with open(path, "a") as f:
        f.write('{"step": 3, "lo')  # a writer killed mid-line
    code, _, err = plot_cli(capsys, tmp_path / "r", "-o", tmp_path / "o.png")
    assert code == 0
    assert f"{path} line 4: unfinished last line ignored" in err


# -- mistakes: one line, exit 2 or 3 ---------------------------------------------------------------------
def one_line_error(capsys, code_expected, *args):
    code, out, err = plot_cli(capsys, *args)
    assert code == code_expected, err
    assert out == "" and err.count("\n") == 1 and err.startswith("hpcopt: ")
    return err


def test_bad_paths(tmp_path, capsys):
    out = tmp_path / "o.png"
    err = one_line_error(capsys, 2, tmp_path / "nope", "-o", out)
    assert "nope: no such run or sweep directory" in err
    (tmp_path / "empty").mkdir()
    err = one_line_error(capsys, 2, tmp_path / "empty", "-o", out)
    assert "neither a run directory (no metrics.jsonl) nor a sweep directory (no results.jsonl)" in err
    write_jsonl(tmp_path / "new" / "metrics.jsonl", [start(0)])
    err = one_line_error(capsys, 2, tmp_path / "new", "-o", out)
    assert "metrics.jsonl: no step records yet" in err
    assert not out.exists()


def test_corrupt_line(tmp_path, capsys):
    write_jsonl(tmp_path / "r" / "metrics.jsonl", [start(0), rec(1, 1.0, 0.1), "{not json", rec(3, 0.5, 0.3)])
    err = one_line_error(capsys, 3, tmp_path / "r", "-o", tmp_path / "o.png")
    assert f"{tmp_path / 'r' / 'metrics.jsonl'} line 3: not JSON" in err


def test_matplotlib_missing(tmp_path, capsys, monkeypatch):
    a = make_run(tmp_path / "a")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    err = one_line_error(capsys, 2, a, "-o", tmp_path / "o.png")
    assert "pip install 'hpcopt[plot]'" in err


def test_output_never_an_input(tmp_path, capsys):
    a = make_run(tmp_path / "a")
    metrics = tmp_path / "a" / "metrics.jsonl"
    before = metrics.read_bytes()
    err = one_line_error(capsys, 2, a, "-o", metrics)
    assert "unknown picture format .jsonl" in err
    png = tmp_path / "a" / "x.png"
    os.symlink(metrics, png)  # a name that leads to an input
    err = one_line_error(capsys, 2, a, "-o", png)
    assert "is an input of this plot" in err
    assert metrics.read_bytes() == before
    one_line_error(capsys, 2, a, "-o", tmp_path / "noext")
    one_line_error(capsys, 3, a, "-o", tmp_path / "missing_dir" / "o.png")


def test_cli_imports_nothing_heavy():
    code = ("import sys; from hpcopt import cli; cli.build_parser(); "
            "print(sorted(m for m in ('numpy', 'matplotlib') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


# -- a real run ------------------------------------------------------------------------------------------
JOB = """
[run]
steps = 20
log_every = 5
eval_every = 10
[data]
path = "{data}"
batch_size = 32
[model]
layers = [16, 32, 4]
[optimizer]
name = "adam"
lr = 0.01
"""


def test_real_training_run(tmp_path, capsys):
    data = tmp_path / "d.h5"
    assert cli.main(["data", "make", "synthetic", str(data), "--samples", "512", "--features", "16",
                     "--classes", "4"]) == 0
    job = tmp_path / "job.toml"
    job.write_text(JOB.format(data=data))
    run_dir = tmp_path / "run"
    hpcopt("train", str(job), f"run.out_dir={run_dir}", "--quiet", check=True, timeout=60)
    capsys.readouterr()
    out = tmp_path / "run.png"
    code, stdout, err = plot_cli(capsys, run_dir, "-o", out)
    assert code == 0, err
    assert stdout == f"wrote {out}: 1 run, 4 panels\n"
    assert out.read_bytes().startswith(PNG_MAGIC)

    recs = file_records(run_dir)
    assert [r["step"] for r in recs] == [5, 10, 15, 20]
    fig = plot.figure([run_dir])
    loss = axis(fig, "loss vs step").lines[0]
    assert list(loss.get_xdata()) == [5, 10, 15, 20]
    assert list(loss.get_ydata()) == [r["loss"] for r in recs]
    acc = axis(fig, "test accuracy (%) vs step").lines[0]
    assert list(acc.get_xdata()) == [10, 20]
    assert list(acc.get_ydata()) == [100 * r["test_acc"] for r in recs if "test_acc" in r]
    assert list(axis(fig, "loss vs wall time").lines[0].get_xdata()) == [r["time"] for r in recs]
