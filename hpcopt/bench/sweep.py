"""Algorithm parallelism, measured: a sweep of --trials digits trials on --ranks ranks in groups of 1
against (a) the longest group's summed trial time (what a perfect scheduler with no coordinator cost
would take) and (b) the same trials one after another with `hpcopt train` on 1 rank each (the bash loop
a user would write; each run gets the machine's cores, as it would alone).

With --search (minutes): the search methods on the issue's digits space (8 optimizers x lr x batch):
asha against the full grid (lr on 4 points) — best test accuracy and the steps each spent; and pbt
with 8 members against 8 random trials of the same total steps, over --seeds seeds (median).

What this 2-core machine cannot show: groups on separate cores or nodes. Here 4 ranks share 2 cores,
so the sweep's gain over the loop is the start-up it pays once (Python, numpy, numba, MPI: ~1-2 s a
process) plus 2 cores against the loop's BLAS threads on tiny matrices.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

SPACE = '''"optimizer.name" = ["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adadelta", "adam", "adamax"]
"optimizer.lr" = { log_uniform = [1e-4, 1e-1], grid = 4 }
"data.batch_size" = [32, 64, 128]
'''


def add_arguments(p) -> None:
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--steps", type=int, default=600, help="steps per trial")
    p.add_argument("--data", default="data/digits.h5", help="the digits file (made if missing)")
    p.add_argument("--search", action="store_true", help="also the search-quality runs (asha vs grid, pbt vs "
                   "random; minutes)")
    p.add_argument("--search-steps", type=int, default=1000, help="--search: steps per trial")
    p.add_argument("--seeds", type=int, default=3, help="--search: seeds of the pbt/random comparison")
    p.add_argument("--dir", default="", help="where the runs go (default: a temporary folder, removed)")


def _mpirun(n: int, args: list[str]) -> list[str]:
    cmd = ["mpirun", "-n", str(n), "--oversubscribe", "--bind-to", "none"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    return cmd + [sys.executable, "-m", "hpcopt", *args]


def _run(cmd: list[str], env=None) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return time.perf_counter() - t0


def _results(d: str) -> dict[int, dict]:
    out = {}
    with open(os.path.join(d, "results.jsonl")) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                out[r["trial"]] = r
    return out


def _sweep_file(folder: str, name: str, job: str, body: str, space: str) -> str:
    path = os.path.join(folder, f"{name}.toml")
    with open(path, "w") as f:
        f.write(f'job = "{job}"\n[sweep]\nname = "{name}"\nout_dir = "{os.path.join(folder, name)}"\n{body}\n'
                f'[space]\n{space}')
    return path


def _job(folder: str, data: str) -> str:
    """The digits job with the data path made absolute, evaluation only at the end."""
    from .. import config

    cfg = config.load(os.path.join(os.path.dirname(__file__), "..", "..", "jobs", "digits_mlp.toml"),
                      [f"data.path={os.path.abspath(data)}", "run.eval_every=0", "run.log_every=50"])
    path = os.path.join(folder, "digits.toml")
    with open(path, "w") as f:
        f.write(config.to_toml(cfg))
    return path


def run(args) -> list[dict]:
    if not os.path.exists(args.data):
        _run([sys.executable, "-m", "hpcopt", "data", "make", "digits", args.data])
    folder = args.dir or tempfile.mkdtemp(prefix="hpcopt-bench-sweep-")
    os.makedirs(folder, exist_ok=True)
    env = dict(os.environ)
    for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env.pop(v, None)   # each side picks its threads as a user's run would
    try:
        job = _job(folder, args.data)
        rows = _throughput(args, folder, job, env)
        if args.search:
            rows += _search(args, folder, job, env)
        return rows
    finally:
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)


def _throughput(args, folder, job, env) -> list[dict]:
    space = ('"optimizer.name" = ["momentum", "rmsprop", "adam", "adamax"]\n'
             '"optimizer.lr" = { log_uniform = [1e-3, 1e-2] }\n')
    path = _sweep_file(folder, "throughput", job, f'method = "random"\ntrials = {args.trials}\nranks_per_trial = 1\n'
                       f'budget_steps = {args.steps}', space)
    wall = _run(_mpirun(args.ranks, ["sweep", path, "--quiet"]), env)
    res = _results(os.path.join(folder, "throughput"))
    span = max(r["end"] for r in res.values()) - min(r["start"] for r in res.values())
    groups: dict[int, float] = {}
    for r in res.values():
        groups[r["group"]] = groups.get(r["group"], 0.0) + r["seconds"]
    longest = max(groups.values())
    loop = 0.0
    for t in sorted(res):
        cfg = os.path.join(folder, "throughput", f"trial_{t:04d}", "config.toml")
        loop += _run([sys.executable, "-m", "hpcopt", "train", cfg, f"run.out_dir={os.path.join(folder, f'loop{t}')}",
                      "--quiet"], env)
    return [
        dict(name=f"sweep of {args.trials} trials, {args.ranks} ranks in groups of 1", unit="s", hpcopt=wall,
             peer_name=f"{args.trials} x hpcopt train, 1 rank, one after another", peer=loop, ratio=loop / wall,
             limit=None, target=">= 3"),
        dict(name="sweep span (first trial start to last result)", unit="s", hpcopt=span,
             peer_name="longest group's summed trial time", peer=longest, ratio=longest / span, limit=1.0,
             target=">= 1/1.15 = 0.87", groups=len(groups)),
    ]


def _best(res: dict[int, dict]) -> float:
    return max((r["metric"] for r in res.values() if r["status"] == "done" and r.get("metric") is not None),
               default=float("nan"))


def _steps(res: dict[int, dict]) -> int:
    return sum(int(r.get("steps") or 0) for r in res.values())


def _search(args, folder, job, env) -> list[dict]:
    n, steps = args.ranks, args.search_steps
    grid = _sweep_file(folder, "grid", job, f'method = "grid"\nranks_per_trial = 1\nbudget_steps = {steps}', SPACE)
    t_grid = _run(_mpirun(n, ["sweep", grid, "--quiet"]), env)
    g = _results(os.path.join(folder, "grid"))
    asha_space = SPACE.replace(", grid = 4", "")
    asha = _sweep_file(folder, "asha", job, f'method = "asha"\ntrials = {len(g)}\nranks_per_trial = 1\n'
                       f'budget_steps = {steps}\nreduction_factor = 3', asha_space)
    t_asha = _run(_mpirun(n, ["sweep", asha, "--quiet"]), env)
    a = _results(os.path.join(folder, "asha"))
    rows = [dict(name="asha vs full grid: best test accuracy", unit="%", hpcopt=100 * _best(a),
                 peer_name=f"grid of {len(g)} trials", peer=100 * _best(g), ratio=_best(a) / _best(g), limit=None,
                 target="within 0.5 points"),
            dict(name="asha vs full grid: steps spent", unit="steps", hpcopt=_steps(a), peer_name="grid",
                 peer=_steps(g), ratio=_steps(g) / max(_steps(a), 1), limit=None, target="asha <= 40% of grid",
                 share=_steps(a) / _steps(g), seconds=round(t_asha, 1), grid_seconds=round(t_grid, 1))]
    pbt_space = '"optimizer.lr" = { log_uniform = [1e-4, 1e-1] }\n"optimizer.weight_decay" = { log_uniform = [1e-6, 1e-2] }\n'
    pbt_best, rnd_best = [], []
    for seed in range(args.seeds):
        p = _sweep_file(folder, f"pbt{seed}", job, f'method = "pbt"\ntrials = 8\nranks_per_trial = 1\nbudget_steps = '
                        f'{steps}\ninterval_steps = {max(1, steps // 10)}\nseed = {seed}', pbt_space)
        _run(_mpirun(n, ["sweep", p, "--quiet"]), env)
        r = _sweep_file(folder, f"random{seed}", job, f'method = "random"\ntrials = 8\nranks_per_trial = 1\n'
                        f'budget_steps = {steps}\nseed = {seed}', pbt_space)
        _run(_mpirun(n, ["sweep", r, "--quiet"]), env)
        pbt_best.append(_best(_results(os.path.join(folder, f"pbt{seed}"))))
        rnd_best.append(_best(_results(os.path.join(folder, f"random{seed}"))))
    mp, mr = statistics.median(pbt_best), statistics.median(rnd_best)
    rows.append(dict(name=f"pbt (8 members) vs 8 random trials: best test accuracy, median of {args.seeds} seeds",
                     unit="%", hpcopt=100 * mp, peer_name="random search, same total steps", peer=100 * mr,
                     ratio=mp / mr, limit=None, target=">= 1", pbt=[round(100 * x, 2) for x in pbt_best],
                     random=[round(100 * x, 2) for x in rnd_best]))
    return rows
