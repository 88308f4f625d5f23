"""Benchmark suites behind `hpcopt bench SUITE`: each prints hpcopt's figure next to a named peer
measured in the same run, and the ratio. Benchmarks report; they never assert a time.

A suite module has `add_arguments(parser)` and `run(args) -> list[dict]`; each row has at least
`name`, `unit`, `hpcopt`, `peer_name`, `peer`, `ratio` (higher is better for hpcopt) and `limit`
(a hardware bound where there is one, else None).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

SUITES = {  # name -> (module, one-line description); modules load only when their suite runs
    "step": ("hpcopt.bench.step", "one training step of the MLP 784-1024-1024-10 vs PyTorch CPU"),
    "optim": ("hpcopt.bench.optim", "optimizer kernels at 32M parameters vs torch.optim and the triad bound"),
    "ckpt": ("hpcopt.bench.ckpt", "checkpoint save/load of 256 MB with 2 ranks vs numpy.save and torch.save"),
    "dp": ("hpcopt.bench.dp", "data-parallel MLP 784-1024-1024-10 on 2 ranks vs PyTorch DDP (gloo); gradient "
           "sync vs a bare Allreduce; overlap; scaling 1 -> 2 ranks"),
    "pipeline": ("hpcopt.bench.pipeline", "pipeline bubble for P = 2, 4 and M = 4, 8, 16 vs (P-1)/(M+P-1); "
                 "1F1B vs GPipe step time"),
    "surrogate": ("hpcopt.bench.surrogate", "a Darcy-flow CNN surrogate trained by hpcopt and PyTorch from the same "
                  "weights and batches: test relative L2 of both, time"),
    "stream": ("hpcopt.bench.stream", "training from a 4 GiB file with the page cache dropped: block shuffle + "
               "read-ahead vs warm cache, vs global shuffle; loader memory"),
    "data": ("hpcopt.bench.data", "generating 2,048 Darcy samples at G = 64 on 1 and 2 ranks: samples/s, parallel "
             "efficiency; the file's write bandwidth vs numpy.save of the same bytes"),
    "sweep": ("hpcopt.bench.sweep", "a sweep of 8 digits trials on 4 ranks in groups of 1 vs the same trials one after "
              "another with hpcopt train, and vs its longest group; --search: asha vs grid, pbt vs random"),
    "reproducible": ("hpcopt.bench.reproducible", "run.reproducible's step (MLP 784-1024-1024-10) vs the default "
                     "step on 1 and 2 ranks; the exact-sum collective vs a float32 Allreduce"),
    "conv": ("hpcopt.bench.conv", "conv2d/conv1d forward and forward+backward vs PyTorch CPU, GFLOP/s next to "
             "the float32 GEMM rate"),
}


def add_parser(sub) -> argparse.ArgumentParser:
    b = sub.add_parser("bench", help="run a benchmark suite against its peer",
                       description="Benchmarks print a table (or JSON lines with --json) with the peer "
                       "measured in the same run and the ratio. Suites: " +
                       "; ".join(f"{k}: {v[1]}" for k, v in SUITES.items()) +
                       ". `hpcopt bench SUITE --help` lists a suite's options.")
    b.add_argument("suite", choices=list(SUITES), metavar="SUITE", help=", ".join(SUITES))
    b.add_argument("suite_args", nargs=argparse.REMAINDER, help="the suite's own options")
    return b


def run_suite(args) -> int:
    import os

    from ..threads import pin_threads

    modname, desc = SUITES[args.suite]
    p = argparse.ArgumentParser(prog=f"hpcopt bench {args.suite}", description=desc)
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="threads for hpcopt AND the peer (BLAS, Numba, torch); default: all cores")
    threads = p.parse_known_args(args.suite_args)[0].threads
    pin_threads(threads)  # before numpy loads: BLAS reads it once
    mod = importlib.import_module(modname)
    mod.add_arguments(p)
    opts = p.parse_args(args.suite_args)
    report(args.suite, mod.run(opts), opts.json)
    return 0


def report(suite: str, rows: list[dict], as_json: bool) -> None:
    if as_json:
        for r in rows:
            print(json.dumps(dict(suite=suite, **r)), flush=True)
    else:
        print_table(rows)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    return str(v)


def print_table(rows: list[dict], file=sys.stdout) -> None:
    cols = ["name", "unit", "hpcopt", "peer_name", "peer", "ratio", "limit"]
    extra = [k for r in rows for k in r if k not in cols]
    cols += list(dict.fromkeys(extra))
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)), file=file)
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)), file=file)
