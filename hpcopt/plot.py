"""`hpcopt plot RUN_DIR_OR_SWEEP... -o OUT.png`: loss and test metric of runs and sweep trials against
step and wall time, and for a sweep the final metric of its finished trials against each swept key.

Reads only: a run directory's `metrics.jsonl`, a sweep directory's `results.jsonl` and its `trial_NNNN/`
run directories (docs/plot.md). Needs matplotlib (pip install 'hpcopt[plot]'), imported when the command
runs, never when the CLI builds its parser: nothing heavy at the top of this module.
"""
from __future__ import annotations

import json
import math
import os
import re
import secrets
import sys
from dataclasses import dataclass, field

from .errors import ConfigError, DataError

DESCRIPTION = ("Draw runs and sweeps into one picture: loss and test metric (test accuracy in %, or test "
               "relative L2) against step and against cumulative wall time, one line per run or trial; for a "
               "sweep also the final metric of each finished trial against each swept key. Each PATH is a run "
               "directory (metrics.jsonl) or a sweep directory (results.jsonl and trial_NNNN/). "
               "Needs matplotlib: pip install 'hpcopt[plot]'.")

EXTRA = "pip install 'hpcopt[plot]'"
LEGEND_MAX = 12        # more lines than this: no legend, a note in the figure title instead
LABEL_MAX = 48         # a trial's label is cut to this many characters
TRIAL_DIR = re.compile(r"trial_(\d+)$")
METRICS = {            # test score key -> (axis label, scale applied to the logged value)
    "test_acc": ("test accuracy (%)", 100.0),
    "test_rel_l2": ("test relative L2", 1.0),
}
LOG_METRICS = ("test_rel_l2", "test_loss", "loss")   # log-scale y when all plotted values are positive


@dataclass
class Run:
    """One run's step records, cleaned: repeated steps after a resume dropped (the later ones kept),
    `time` made cumulative over resumed segments. `tests[key]` = (steps, times, values) of the records
    that carry that test score (values as logged: test_acc a fraction)."""

    path: str
    label: str
    steps: list = field(default_factory=list)
    loss: list = field(default_factory=list)
    time: list = field(default_factory=list)
    tests: dict = field(default_factory=dict)
    segments: int = 1                  # 1 + number of resumes
    trial: dict | None = None          # the sweep's results.jsonl entry, for a trial


@dataclass
class Sweep:
    path: str
    name: str
    trials: dict                       # trial number -> last results.jsonl entry
    runs: list                         # Run of each trial that logged a step, by trial number


# -- reading ---------------------------------------------------------------------------------------------
def _num(v) -> float:
    """A logged number, or nan for a missing one (metrics.jsonl writes non-finite values as null)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return math.nan
    return float(v)


def read_jsonl(path: str) -> list[tuple[int, dict]]:
    """(line number, object) of each non-blank line. A line that is not a JSON object is a DataError naming
    the file and line, except an unfinished last line (no newline: a writer killed mid-line), which is
    skipped with a warning."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    lines = text.split("\n")
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            if i == len(lines):  # the last piece, with no newline after it
                print(f"hpcopt: warning: {path} line {i}: unfinished last line ignored", file=sys.stderr)
                continue
            raise DataError(f"{path} line {i}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path} line {i}: not a JSON object")
        out.append((i, obj))
    return out


def load_run(path: str, label: str | None = None, need_steps: bool = True) -> Run:
    """A run directory's metrics.jsonl as a Run. need_steps: a run with no step records is a ConfigError
    (else an empty Run is returned)."""
    mpath = os.path.join(path, "metrics.jsonl")
    run = Run(path=path, label=label or _dir_name(path))
    kept: list[dict] = []              # step records, in step order, with "_t" the cumulative time
    offset = last_t = 0.0              # cumulative-time offset of the current segment; last time seen
    seen_start = False
    for lineno, rec in read_jsonl(mpath):
        if "event" in rec:
            if rec["event"] == "start":
                if seen_start or kept:  # a resume: its loop clock restarts from 0
                    run.segments += 1
                    offset = last_t
                    s = rec.get("step")
                    if isinstance(s, (int, float)) and not isinstance(s, bool):
                        kept = [r for r in kept if r["step"] <= s]  # logged after the checkpoint: redone
                seen_start = True
            continue
        step = rec.get("step")
        if isinstance(step, bool) or not isinstance(step, (int, float)):
            raise DataError(f"{mpath} line {lineno}: a step record without a numeric 'step'")
        t = _num(rec.get("time"))
        if not math.isnan(t):
            if t + offset < last_t:
                offset = last_t  # the clock restarted with no start event (a log from before them)
            last_t = t + offset
        if kept and step <= kept[-1]["step"]:
            kept = [r for r in kept if r["step"] < step]  # a repeated step: the later record wins
        kept.append(dict(rec, _t=t + offset))
    if not kept:
        if need_steps:
            raise ConfigError(f"{mpath}: no step records yet (nothing to plot)")
        return run
    for r in kept:
        run.steps.append(r["step"])
        run.loss.append(_num(r.get("loss")))
        run.time.append(r["_t"])
        for key in METRICS:
            if key in r:
                s, t, v = run.tests.setdefault(key, ([], [], []))
                s.append(r["step"])
                t.append(r["_t"])
                v.append(_num(r[key]))
    return run


def load_sweep(path: str) -> Sweep:
    """A sweep directory: results.jsonl (the last line of a trial wins) and the runs of its trials."""
    rpath = os.path.join(path, "results.jsonl")
    trials: dict = {}
    for lineno, rec in read_jsonl(rpath):
        n = rec.get("trial")
        if isinstance(n, bool) or not isinstance(n, int):
            raise DataError(f"{rpath} line {lineno}: no integer 'trial'")
        if not isinstance(rec.get("values", {}), dict):
            raise DataError(f"{rpath} line {lineno}: 'values' is not an object")
        trials[n] = rec
    dirs = {}
    for n, rec in trials.items():
        dirs[n] = os.path.join(path, str(rec.get("dir") or f"trial_{n:04d}"))
    try:
        for name in os.listdir(path):  # trials with a directory but no results line yet
            m = TRIAL_DIR.match(name)
            if m and int(m.group(1)) not in dirs and os.path.isdir(os.path.join(path, name)):
                dirs[int(m.group(1))] = os.path.join(path, name)
    except OSError as e:
        raise DataError(f"{path}: cannot list ({e.strerror or e})") from None
    runs = []
    for n in sorted(dirs):
        if not os.path.isfile(os.path.join(dirs[n], "metrics.jsonl")):
            continue  # failed before its first line, or not started
        rec = trials.get(n)
        label = _trial_label(_dir_name(dirs[n]), rec.get("values", {}) if rec else {})
        run = load_run(dirs[n], label, need_steps=False)
        if run.steps:
            run.trial = rec
            runs.append(run)
    return Sweep(path=path, name=_dir_name(path), trials=trials, runs=runs)


def load(paths) -> tuple[list[Run], list[Sweep]]:
    """Each path as a run directory (metrics.jsonl) or a sweep directory (results.jsonl): the runs given
    directly, and the sweeps. Anything else is a ConfigError."""
    runs, sweeps = [], []
    for p in paths:
        p = os.fspath(p)
        if os.path.isfile(os.path.join(p, "results.jsonl")):
            sweeps.append(load_sweep(p))
        elif os.path.isfile(os.path.join(p, "metrics.jsonl")):
            runs.append(load_run(p))
        elif not os.path.exists(p):
            raise ConfigError(f"{p}: no such run or sweep directory")
        else:
            raise ConfigError(f"{p}: neither a run directory (no metrics.jsonl) nor a sweep directory "
                              f"(no results.jsonl)")
    _disambiguate(runs)
    return runs, sweeps


def _dir_name(path: str) -> str:
    return os.path.basename(os.path.normpath(os.path.abspath(path)))


def _disambiguate(runs: list[Run]) -> None:
    """Runs given with the same directory name (runs/a/x, runs/b/x) are labelled parent/name."""
    names = [r.label for r in runs]
    for r in runs:
        if names.count(r.label) > 1:
            parent = _dir_name(os.path.dirname(os.path.normpath(os.path.abspath(r.path))))
            r.label = f"{parent}/{r.label}"


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _short_keys(keys) -> dict:
    """Each swept key by its last part (optimizer.lr -> lr), the full key where two would collide."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _trial_label(name: str, values: dict) -> str:
    """`trial_0003 adam lr=0.003 batch_size=64`, cut to LABEL_MAX characters. An optimizer name is shown
    bare (it reads as itself)."""
    short = _short_keys(list(values))
    parts = [name]
    for k, v in values.items():
        parts.append(_fmt(v) if short[k] == "name" and isinstance(v, str) else f"{short[k]}={_fmt(v)}")
    label = " ".join(parts)
    return label if len(label) <= LABEL_MAX else label[:LABEL_MAX - 1] + "\u2026"


# -- drawing ---------------------------------------------------------------------------------------------
def _import_matplotlib():
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError(f"plot needs matplotlib ({EXTRA})") from None
    return matplotlib, Figure


def _metric_label(key: str) -> str:
    return METRICS.get(key, (key.replace("_", " "), 1.0))[0]


def _metric_scale(key: str) -> float:
    return METRICS.get(key, ("", 1.0))[1]


def _finite_pairs(xs, ys):
    pts = [(x, y) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _log_if_positive(ax, key: str, ys) -> None:
    if key in LOG_METRICS and ys and all(y > 0 for y in ys):
        ax.set_yscale("log")


def _colors(n: int):
    import matplotlib

    if n <= 10:
        cmap = matplotlib.colormaps["tab10"]
        return [cmap(i) for i in range(n)]
    cmap = matplotlib.colormaps["viridis"]
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


def _key_panels(sweeps: list[Sweep]) -> list[tuple[str, str]]:
    """(swept key, metric name) of each per-key panel, in order of first appearance."""
    panels = []
    for sw in sweeps:
        for n in sorted(sw.trials):
            rec = sw.trials[n]
            metric = str(rec.get("metric_name") or "metric")
            for k in rec.get("values", {}):
                if (k, metric) not in panels:
                    panels.append((k, metric))
    return panels


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _draw_key_panel(ax, sweeps: list[Sweep], key: str, metric: str) -> None:
    """Final metric of each done trial against its value of `key`: one scatter per sweep (in the order of
    `sweeps`, those with at least one point). Categorical values at positions 0, 1, ... (sorted by text)."""
    points = []  # (sweep index, value, metric)
    counts = {}
    for i, sw in enumerate(sweeps):
        for n in sorted(sw.trials):
            rec = sw.trials[n]
            if str(rec.get("metric_name") or "metric") != metric or key not in rec.get("values", {}):
                continue
            status = str(rec.get("status"))
            counts[status] = counts.get(status, 0) + 1
            v, m = rec["values"][key], _num(rec.get("metric"))
            if status == "done" and v is not None and math.isfinite(m):
                points.append((i, v, m * _metric_scale(metric)))
    numeric = bool(points) and all(_is_number(p[1]) for p in points)
    cats = [] if numeric else sorted({_fmt(p[1]) for p in points})
    for i, sw in enumerate(sweeps):
        mine = [p for p in points if p[0] == i]
        if not mine:
            continue
        xs = [float(p[1]) if numeric else float(cats.index(_fmt(p[1]))) for p in mine]
        ys = [p[2] for p in mine]
        ax.scatter(xs, ys, s=28, alpha=0.8, label=sw.name, zorder=3)
    if numeric:
        xs = [float(p[1]) for p in points]
        if min(xs) > 0 and max(xs) / min(xs) > 10:
            ax.set_xscale("log")
    else:
        crowded = sum(len(c) for c in cats) > 40
        ax.set_xticks(range(len(cats)))
        ax.set_xticklabels(cats, rotation=30 if crowded else 0, ha="right" if crowded else "center")
        ax.set_xlim(-0.5, max(len(cats), 1) - 0.5)
    _log_if_positive(ax, metric, [p[2] for p in points])
    done = counts.get("done", 0)
    hidden = ", ".join(f"{c} {s}" for s, c in sorted(counts.items()) if s != "done")
    ax.set_title(f"final {metric} vs {key}\n({done} done" + (f"; not shown: {hidden})" if hidden else ")"),
                 fontsize=9)
    ax.set_xlabel(key)
    ax.set_ylabel(_metric_label(metric))
    ax.grid(True, alpha=0.3)
    if len(sweeps) > 1 and len({p[0] for p in points}) > 1:
        ax.legend(fontsize=7)


def figure(paths):
    """The figure of these run and sweep directories (a matplotlib Figure, not shown or saved).

    Panels, in order (each axis titled so): "loss vs step", "<metric> vs step" for each test metric the
    runs logged (test accuracy (%) or test relative L2), "loss vs wall time", "<metric> vs wall time",
    then for the sweeps one "final <metric> vs <key>" per swept key. Lines are in the same order in every
    curve panel: the runs given directly, then each sweep's trials by number; points that are missing or
    non-finite are left out."""
    return draw(*load(paths))


def draw(runs: list[Run], sweeps: list[Sweep]):
    """The figure of runs and sweeps already loaded (figure() = draw(*load(paths)))."""
    _, Figure = _import_matplotlib()
    lines = runs + [r for sw in sweeps for r in sw.runs]
    metrics = [k for k in METRICS if any(k in r.tests for r in lines)]
    keys = _key_panels(sweeps)
    if not lines and not keys:
        raise ConfigError(f"{', '.join(sw.path for sw in sweeps)}: nothing to plot (no trial has logged a "
                          f"step and results.jsonl swept no key)")
    curve_panels = []
    if lines:
        curve_panels = [("loss", "step")] + [(m, "step") for m in metrics] + \
                       [("loss", "time")] + [(m, "time") for m in metrics]
    ncols = max(1 + len(metrics), 2 if keys else 1) if lines else min(3, len(keys))
    nrows_curves = 2 if lines else 0
    nrows_keys = -(-len(keys) // ncols)
    fig = Figure(figsize=(5.2 * ncols, 3.6 * (nrows_curves + nrows_keys) + 0.6), layout="constrained")
    grid = fig.add_gridspec(nrows_curves + nrows_keys, ncols)
    colors = _colors(len(lines))

    for idx, (what, x) in enumerate(curve_panels):
        row, col = (0, idx) if x == "step" else (1, idx - 1 - len(metrics))
        ax = fig.add_subplot(grid[row, col])
        ys_all = []
        for run, color in zip(lines, colors):
            if what == "loss":
                xs, ys = _finite_pairs(run.steps if x == "step" else run.time, run.loss)
                marker = None
            else:
                if what not in run.tests:
                    continue
                s, t, v = run.tests[what]
                xs, ys = _finite_pairs(s if x == "step" else t, [y * _metric_scale(what) for y in v])
                marker = "o" if len(xs) < 30 else None
            ax.plot(xs, ys, color=color, label=run.label, lw=1.2, marker=marker, ms=3)
            ys_all += ys
        _log_if_positive(ax, what, ys_all)
        name = "loss" if what == "loss" else _metric_label(what)
        ax.set_title(f"{name} vs {'step' if x == 'step' else 'wall time'}")
        ax.set_xlabel("step" if x == "step" else "wall time (s, cumulative over resumes)")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
        if idx == 0 and len(lines) <= LEGEND_MAX:
            ax.legend(fontsize=7)

    for j, (key, metric) in enumerate(keys):
        ax = fig.add_subplot(grid[nrows_curves + j // ncols, j % ncols])
        _draw_key_panel(ax, sweeps, key, metric)

    what = []
    if runs:
        what.append(f"{len(runs)} run{'s' if len(runs) != 1 else ''}")
    for sw in sweeps:
        what.append(f"sweep {sw.name}: {len(sw.trials)} trial{'s' if len(sw.trials) != 1 else ''}")
    title = "; ".join(what)
    if len(lines) > LEGEND_MAX:
        title += (f"\n(no legend: {len(lines)} lines, more than {LEGEND_MAX}; color goes from dark to light "
                  f"in run/trial order)")
    fig.suptitle(title, fontsize=10)
    return fig


def save(fig, out: str, protect=()) -> None:
    """Write the figure to `out` atomically: a hidden temporary name beside it, then os.replace. The format
    is `out`'s extension (any matplotlib writes). `protect`: files that must not be overwritten."""
    fmt = os.path.splitext(out)[1].lstrip(".").lower()
    supported = fig.canvas.get_supported_filetypes()
    if not fmt or fmt not in supported:
        raise ConfigError(f"{out}: unknown picture format {('.' + fmt) if fmt else '(no extension)'}; "
                          f"use one of {', '.join('.' + f for f in sorted(supported))}")
    if os.path.isdir(out):
        raise ConfigError(f"{out}: is a directory")
    real = os.path.realpath(out)
    for p in protect:
        if os.path.realpath(p) == real:
            raise ConfigError(f"{out}: is an input of this plot; choose another output name")
    d, base = os.path.split(out)
    tmp = os.path.join(d, f".{base}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                fig.savefig(f, format=fmt, dpi=110)
            os.replace(tmp, out)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    except OSError as e:
        raise DataError(f"{out}: cannot write ({e.strerror or e})") from None


def _inputs(paths) -> list[str]:
    """Every file and directory this plot reads (the output must be none of them)."""
    out = []
    for p in paths:
        out.append(p)
        for name in ("metrics.jsonl", "results.jsonl"):
            out.append(os.path.join(p, name))
        if os.path.isdir(p):
            try:
                for name in os.listdir(p):
                    if TRIAL_DIR.match(name):
                        out.append(os.path.join(p, name, "metrics.jsonl"))
            except OSError:
                pass
    return out


# -- the command -----------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("paths", nargs="+", metavar="RUN_DIR_OR_SWEEP",
                   help="run directory (metrics.jsonl) or sweep directory (results.jsonl, trial_NNNN/)")
    p.add_argument("-o", "--out", required=True, metavar="OUT.png",
                   help="picture to write (.png, .pdf, .svg: any format matplotlib writes)")


def run(args) -> int:
    matplotlib, _ = _import_matplotlib()
    matplotlib.use("Agg")
    runs, sweeps = load(args.paths)
    fig = draw(runs, sweeps)
    save(fig, args.out, protect=_inputs(args.paths))
    n = len(runs) + sum(len(sw.runs) for sw in sweeps)
    print(f"wrote {args.out}: {n} run{'s' if n != 1 else ''}, {len(fig.axes)} panels")
    return 0
