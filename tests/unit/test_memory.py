"""hpcopt.memory: big buffers are zero-filled, writable, 2 MiB-aligned and advised for huge pages; small
ones and HPCOPT_HUGE_PAGES=0 give plain numpy arrays. The contract is the same either way."""
import numpy as np
import pytest

from hpcopt import memory
from hpcopt.nn.params import FlatParams, ParamSpec


def test_large_buffer_is_aligned_zeroed_and_writable():
    n = 3 * memory.HUGE_PAGE // 4 + 5  # a little over 3 huge pages of float32
    a = memory.zeros(n)
    assert a.shape == (n,) and a.dtype == np.float32 and a.flags.c_contiguous and a.flags.writeable
    assert not a.any()
    if memory.huge_pages_enabled():
        assert a.base is not None and a.ctypes.data % memory.HUGE_PAGE == 0
    a[:] = np.arange(n, dtype=np.float32)
    assert a[-1] == n - 1 and a.sum(dtype=np.float64) == pytest.approx(n * (n - 1) / 2)
    b = memory.full(n, 0.25, np.float64)
    assert b.dtype == np.float64 and (b == 0.25).all()


def test_small_buffers_and_the_switch_give_numpy_arrays(monkeypatch):
    small = memory.zeros(10)
    assert small.base is None and not small.any()
    monkeypatch.setenv("HPCOPT_HUGE_PAGES", "0")
    big = memory.zeros(memory.HUGE_PAGE)
    assert big.base is None and big.size == memory.HUGE_PAGE and not big.any()


def test_flat_buffers_of_a_model_use_it():
    flat = FlatParams([ParamSpec("dense0", "weight", (1024, 1024)), ParamSpec("dense0", "bias", (1024,))])
    for buf in (flat.data, flat.grad):
        assert buf.size == 1024 * 1025 and not buf.any()
        if memory.huge_pages_enabled():
            assert buf.ctypes.data % memory.HUGE_PAGE == 0
