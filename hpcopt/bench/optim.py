"""`hpcopt bench optim`: time per optimizer step at --params float32 parameters, next to torch.optim's
fastest CPU variant of the same optimizer (fused=True where torch has it on CPU, else foreach=True) and
the machine's memory-bandwidth limit, all measured in the same run with the same thread count.

Bandwidth limit: STREAM's triad a[i] = b[i] + s*c[i] (Numba, float32 arrays of --params elements),
counted as 16 bytes per element: STREAM's convention counts 12 (b, c read; a written), but storing to
`a` first reads its cache line (write-allocate), so the memory moves 16. Every array an optimizer writes
it has read first, so it makes no such hidden traffic: it is counted as params and grads read, params
written, each state array read and written, 4 * (3 + 2 * states) bytes per element (adam: 28), and the
triad's real traffic makes the comparable limit. (The triad row also shows STREAM's 12-byte figure.)
lars and lamb make a second pass for their per-layer norms and are counted with the traffic they really
make (lars 28, lamb 40). "limit" = that traffic at triad bandwidth; frac_of_limit = limit / hpcopt.
Memory: hpcopt's arrays (and the triad's) come from `hpcopt.memory`, as in training: 2 MiB pages where
the kernel allows (HPCOPT_HUGE_PAGES=0 for 4 KiB pages); torch's from its own allocator, as a torch user
gets them (torch's opt-in THP_MEM_ALLOC_ENABLE=1 is not set).
Timing: per optimizer, --repeats rounds after two warm-up steps, each round timing one triad, one
hpcopt step and one torch step back to back, so all three see the same machine load; medians are shown
(this is a benchmark: nothing asserts).

Standalone: python -m hpcopt.bench.optim [--params N] [--repeats R] [--optimizers adam,sgd]
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import statistics
import time

import numba
import numpy as np
from numba import njit, prange

from .. import memory, optim
from ..config import OptimizerConfig

TORCH_CLASS = {"sgd": "SGD", "momentum": "SGD", "nesterov": "SGD", "adagrad": "Adagrad", "rmsprop": "RMSprop",
               "adadelta": "Adadelta", "adam": "Adam", "adamw": "AdamW", "adamax": "Adamax", "nadam": "NAdam"}
TRIAD_BYTES = 16  # 2 reads + 1 write + the write-allocate read (STREAM counts 12)
LAYERS = 8  # lars/lamb: the buffer is cut into this many equal layers


@njit(parallel=True, cache=True)
def _triad(a, b, c, s):  # a, b, c: float32[n]; s: float32
    for i in prange(a.size):
        a[i] = b[i] + s * c[i]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", type=int, default=32_000_000, help="float32 parameters (default 32M)")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per optimizer; the median is shown")
    parser.add_argument("--optimizers", default=",".join(optim.REGISTRY),
                        help="comma-separated names (default: all)")


def _interleaved_medians(fns: list, repeats: int, warmup: int = 2) -> list[float]:
    """Median seconds per call of each function, timed round-robin so all see the same machine load."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def _bytes_per_element(name: str, n_states: int) -> int:
    return {"lars": 28, "lamb": 40}.get(name, 4 * (3 + 2 * n_states))


def _torch_step(torch, name: str, hp, params: np.ndarray, grads: np.ndarray):
    """A torch optimizer on copies of params/grads; returns (step function, variant name)."""
    p = torch.nn.Parameter(torch.from_numpy(params.copy()))
    p.grad = torch.from_numpy(grads.copy())
    cls = getattr(torch.optim, TORCH_CLASS[name])
    kwargs = dataclasses.asdict(hp)
    try:
        opt, variant = cls([p], fused=True, **kwargs), "torch fused"
        opt.step()
    except (TypeError, RuntimeError):
        opt, variant = cls([p], foreach=True, **kwargs), "torch foreach"
    return opt.step, variant


def run(args) -> list[dict]:
    n, repeats = int(args.params), int(args.repeats)
    names = [s.strip() for s in str(args.optimizers).split(",") if s.strip()]
    unknown = [s for s in names if s not in optim.REGISTRY]
    if unknown:
        raise ValueError(f"--optimizers: unknown {', '.join(unknown)} (known: {', '.join(optim.REGISTRY)})")
    threads = numba.get_num_threads()
    try:
        import torch
        torch.set_num_threads(threads)
    except ImportError:
        torch = None

    rng = np.random.default_rng(0)
    # hpcopt's side and the triad on the memory training uses (memory.py: 2 MiB pages where the kernel
    # allows); torch's tensors on torch's own allocator, as a torch user gets them
    params0, grads, a = memory.zeros(n), memory.zeros(n), memory.zeros(n)
    params0[...] = rng.standard_normal(n, dtype=np.float32)
    grads[...] = rng.standard_normal(n, dtype=np.float32)

    def triad():
        _triad(a, params0, grads, np.float32(0.5))

    step = n // LAYERS
    segments = [(i * step, step if i < LAYERS - 1 else n - i * step) for i in range(LAYERS)]
    common = dict(params=n, threads=threads)
    rows, triad_times = [], []
    for name in names:
        opt = optim.build(OptimizerConfig(name=name), segments)
        params = memory.zeros(n)
        params[...] = params0
        state = opt.init_state(n)
        t = [0]

        def ours():
            t[0] += 1
            opt.step(params, grads, state, t[0], opt.hp.lr)

        fns, variant = [triad, ours], None
        if torch is not None and name in TORCH_CLASS:
            torch_step, variant = _torch_step(torch, name, opt.hp, params0, grads)
            fns.append(torch_step)
        medians = _interleaved_medians(fns, repeats)
        triad_s, ours_s = medians[0], medians[1]
        triad_times.append(triad_s)
        nbytes = _bytes_per_element(name, len(state))
        limit = nbytes * n / (TRIAD_BYTES * n / triad_s)
        row = dict(name=name, hpcopt=ours_s, peer=None, peer_name=variant, ratio=None, limit=limit, unit="s/step",
                   bytes_per_element=nbytes, gb_per_s=nbytes * n / ours_s / 1e9, frac_of_limit=limit / ours_s,
                   triad_gb_per_s=TRIAD_BYTES * n / triad_s / 1e9, **common)
        if len(medians) == 3:
            row.update(peer=medians[2], ratio=medians[2] / ours_s)
        rows.append(row)
        params = state = fns = torch_step = None  # free the 32M-element arrays before the next one
    triad_s = statistics.median(triad_times)
    rows.insert(0, dict(name="triad", hpcopt=triad_s, peer=None, peer_name=None, ratio=None, limit=triad_s,
                        unit="s/step", bytes_per_element=TRIAD_BYTES, gb_per_s=TRIAD_BYTES * n / triad_s / 1e9,
                        frac_of_limit=1.0, stream_gb_per_s=12 * n / triad_s / 1e9, **common))
    return rows


def machine() -> dict:
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return dict(date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), nproc=os.cpu_count(), cpu=model,
                threads=numba.get_num_threads(), threading_layer=numba.config.THREADING_LAYER)


def format_table(rows: list[dict]) -> str:
    head = (f"{'optimizer':10s} {'hpcopt s/step':>13s} {'peer s/step':>12s} {'peer':14s} {'speed-up':>8s} "
            f"{'B/elem':>6s} {'GB/s':>6s} {'of limit':>8s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        peer = f"{r['peer']:12.4f}" if r["peer"] is not None else f"{'-':>12s}"
        ratio = f"{r['ratio']:8.2f}" if r["ratio"] is not None else f"{'-':>8s}"
        lines.append(f"{r['name']:10s} {r['hpcopt']:13.4f} {peer} {(r['peer_name'] or '-'):14s} {ratio} "
                     f"{r['bytes_per_element']:6d} {r['gb_per_s']:6.1f} {r['frac_of_limit']:8.2f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hpcopt.bench.optim", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    info = machine()
    rows = run(args)
    print(f"hpcopt bench optim  {info['date']}  nproc={info['nproc']}  cpu={info['cpu']}  "
          f"threads={info['threads']}  params={args.params:,}  repeats={args.repeats} (medians)")
    if not any(r["peer"] is not None for r in rows):
        print("torch is not installed: hpcopt alone (no peer column)")
    print(format_table(rows))
    print(f"speed-up = torch s/step / hpcopt s/step; of limit = (B/elem at triad bandwidth) / hpcopt s/step; "
          f"triad {rows[0]['gb_per_s']:.1f} GB/s counting write-allocate ({rows[0]['stream_gb_per_s']:.1f} GB/s "
          f"in STREAM's 12 B convention)")


if __name__ == "__main__":
    main()
