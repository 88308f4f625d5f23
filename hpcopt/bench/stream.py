"""Training from a file larger than the reads can hide: steps/s of a small MLP fed by the loader from
a synthetic file of --gib GiB, with the file's pages dropped from the page cache before each timed run
(posix_fadvise DONTNEED: no root needed) and, as the peer, from the page cache (the file read once).

Rows: block shuffle + read-ahead cold vs the same warm (target >= 0.9: the stream keeps up); global
shuffle cold vs block + read-ahead cold (what scattered row reads cost); the loader's peak memory
(the process's resident memory during the run, above what it held before the loader) against 256 MiB + one read window.
What this machine cannot show: a parallel file system's latency and bandwidth (a local disk here).
"""
from __future__ import annotations

import os
import time

import numpy as np


def add_arguments(p) -> None:
    p.add_argument("--gib", type=float, default=4.0, help="size of the training data (default 4 GiB)")
    p.add_argument("--features", type=int, default=1024, help="float32 values per sample")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=200, help="timed steps per run")
    p.add_argument("--window", type=int, default=8, help="data.window_chunks")
    p.add_argument("--file", default="", help="data file to use or make (default: bench-stream-<gib>g.h5 here)")


def _drop(path: str) -> bool:
    """Drop the file's pages from the page cache; False where the OS does not allow it."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return True
    except (OSError, AttributeError):
        return False


def _warm(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def _rss_mib() -> float:
    """The process's resident memory now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def _run(path, args, shuffle, read_ahead, step_fn):
    from ..data import ShardedLoader

    before = _rss_mib()
    loader = ShardedLoader(path, "train", args.batch, 0, 1, seed=0, shuffle=shuffle, window=args.window,
                           read_ahead=read_ahead)
    first = loader.steps_per_epoch // 3          # somewhere in the middle of the file, then in order
    x, y = loader.batch(first)
    step_fn(x, y)
    peak = _rss_mib()
    t0 = time.perf_counter()
    for s in range(first + 1, first + 1 + args.steps):
        x, y = loader.batch(s)
        step_fn(x, y)
        peak = max(peak, _rss_mib())
    dt = time.perf_counter() - t0
    loader.close()
    return args.steps / dt, peak - before, loader.chunk


def run(args) -> list[dict]:
    from ..config import OptimizerConfig
    from ..data import inspect, make_synthetic
    from ..nn import MLP
    from ..parallel.update import Update

    path = args.file or f"bench-stream-{args.gib:g}g.h5"
    samples = int(args.gib * 2**30 / (4 * args.features))
    if not os.path.exists(path) or inspect(path, check_values=False).sizes["train"] != samples:
        make_synthetic(path, samples, args.features, 10, seed=0, test_samples=1024)
    model = MLP([args.features, 256, 10], "relu", "softmax_ce", "float32", seed=0)
    f = model.flat
    update = Update(OptimizerConfig(name="adam", lr=1e-3), f.data, f.grad, f.segments())
    t = [0]

    def step(x, y):
        model.loss_and_grad(x, y, len(x))
        t[0] += 1
        update.apply(t[0], 1e-3)

    dropped = _drop(path)
    block_cold, mem, chunk = _run(path, args, "block", True, step)
    _drop(path)
    global_cold, _, _ = _run(path, args, "global", False, step)
    _warm(path)
    block_warm, _, _ = _run(path, args, "block", True, step)
    window_mib = args.window * chunk * args.features * 4 / 2**20
    cache = "cold (pages dropped)" if dropped else "NOT dropped (posix_fadvise refused)"
    common = dict(unit="steps/s", limit=None, threads=args.threads, file_gib=args.gib, batch=args.batch)
    return [
        dict(name=f"block shuffle + read-ahead, {cache}", hpcopt=block_cold, peer_name="the same, page cache warm",
             peer=block_warm, ratio=block_cold / block_warm, **common),
        dict(name=f"global shuffle, {cache}", hpcopt=global_cold, peer_name="block + read-ahead, same cache state",
             peer=block_cold, ratio=global_cold / block_cold, **common),
        dict(name="loader + step peak memory growth", unit="MiB", hpcopt=mem, peer_name="256 MiB + one window",
             peer=256 + window_mib, ratio=(256 + window_mib) / max(mem, 1e-9), limit=256 + window_mib,
             threads=args.threads, file_gib=args.gib, batch=args.batch),
    ]
