"""Metrics on rank 0: `metrics.jsonl` (one JSON object per logged step), a progress bar, a summary."""
from __future__ import annotations

import json
import math
import os
import sys
import time

from .errors import DataError


def process_start_time() -> float:
    """Unix time at which this process started (Linux /proc, to ~10 ms), else the time of this call."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


class MetricsLog:
    """Appends one JSON line per record to OUT_DIR/metrics.jsonl (append: a resumed run continues it)."""

    def __init__(self, out_dir: str):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        try:
            self.file = open(self.path, "a", buffering=1)
        except OSError as e:
            raise DataError(f"{self.path}: cannot write ({e.strerror or e})") from None

    def write(self, record: dict) -> None:
        record = dict(record, wall=round(time.time(), 3))
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        try:
            self.file.write(json.dumps(clean) + "\n")
        except OSError as e:  # a full disk, say: one line, not a traceback
            raise DataError(f"{self.path}: cannot write ({e.strerror or e})") from None

    def close(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass


class Progress:
    """A tqdm bar on stderr when tqdm is installed and not quiet; otherwise a plain line per log step."""

    def __init__(self, total: int, initial: int, quiet: bool):
        self.quiet = quiet
        self.bar = None
        if not quiet:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, initial=initial, unit="step", file=sys.stderr,
                                dynamic_ncols=True, mininterval=0.5, leave=True)

    def advance(self, n: int, fields: dict | None = None) -> None:
        if self.bar is not None:
            if fields:
                self.bar.set_postfix(fields, refresh=False)
            self.bar.update(n)
        elif fields and not self.quiet:
            print("  ".join(f"{k} {v}" for k, v in fields.items()), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
