"""Host memory for the big flat buffers (parameters, gradients, optimizer state) on transparent huge pages.

The optimizer kernels and the gradient exchange stream through these buffers once per step, so they are
bound by memory bandwidth, and with 4 KiB pages a 128 MB array spans 32,768 pages: the TLB misses cost a
fifth of the step or more (measured: an Adam step at 32M parameters, 28.8 ms on 4 KiB pages vs 22.0 ms
on 2 MiB pages, docs/performance.md). Linux backs anonymous memory with 2 MiB pages when it is asked
to (`madvise(MADV_HUGEPAGE)`, transparent huge pages in mode "madvise" or "always"), so buffers of
2 MiB and more are mapped anonymously, 2 MiB-aligned, and advised. Smaller ones, and every buffer where
the kernel has no such advice or refuses it, are plain numpy arrays: the result is the same memory
contract either way (a zero-filled, writable, C-contiguous 1-D array), only faster.

`HPCOPT_HUGE_PAGES=0` in the environment turns it off (the numbers above are how to see what it buys).
"""
from __future__ import annotations

import mmap
import os

import numpy as np

HUGE_PAGE = 2 * 2**20


def huge_pages_enabled() -> bool:
    return hasattr(mmap, "MADV_HUGEPAGE") and os.environ.get("HPCOPT_HUGE_PAGES", "1") not in ("0", "false", "no")


def zeros(n: int, dtype=np.float32) -> np.ndarray:
    """A zero-filled 1-D array of n elements; on 2 MiB-aligned, huge-page-advised memory when it is large."""
    dtype = np.dtype(dtype)
    nbytes = int(n) * dtype.itemsize
    if nbytes < HUGE_PAGE or not huge_pages_enabled():
        return np.zeros(n, dtype)
    # One huge page more than needed, so the array can start on a 2 MiB boundary; anonymous memory is
    # zero-filled by the kernel, and untouched pages cost nothing.
    m = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = np.frombuffer(m, np.uint8, count=1).ctypes.data
    offset = -start % HUGE_PAGE
    try:
        m.madvise(mmap.MADV_HUGEPAGE, offset, nbytes)
    except OSError:  # transparent huge pages off ("never") or not in this kernel: 4 KiB pages then
        pass
    return np.frombuffer(m, dtype, count=n, offset=offset)  # the array holds the mapping alive


def full(n: int, value: float, dtype=np.float32) -> np.ndarray:
    out = zeros(n, dtype)
    if value != 0:
        out.fill(value)
    return out
