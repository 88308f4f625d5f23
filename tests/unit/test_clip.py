"""hpcopt.optim.clip: clipping against torch.nn.utils, non-finite detection, the all-reduce hook.

Tolerances: the norm is accumulated in float64 here and in float32 by torch, so norms and norm-clipped
gradients agree to rtol 1e-6 (float32 resolution); value clipping is exact (a clamp rounds nothing).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from hpcopt.optim.clip import clip_and_check, grad_sq_norm

N = 100_003  # odd, so the parallel chunks are uneven


def grads(seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(N) * scale).astype(np.float32)


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason="torch is not installed: no reference to compare against")


def torch_clip(torch, g: np.ndarray, clip_norm: float, clip_value: float):
    p = torch.nn.Parameter(torch.zeros(g.size))
    p.grad = torch.from_numpy(g.copy())
    if clip_value > 0:
        torch.nn.utils.clip_grad_value_([p], clip_value)
    norm = float(torch.nn.utils.clip_grad_norm_([p], clip_norm)) if clip_norm > 0 else None
    return p.grad.numpy(), norm


def test_sq_norm_is_float64_sum():
    g = grads()
    assert grad_sq_norm(g) == pytest.approx(float(np.sum(g.astype(np.float64) ** 2)), rel=1e-12)
    big = np.full(10, 1e30, np.float32)  # squares overflow float32 but not the float64 accumulator
    assert math.isfinite(grad_sq_norm(big))


def test_clip_value_matches_torch(torch):
    g = grads()
    ref, _ = torch_clip(torch, g, 0.0, 0.5)
    norm, finite = clip_and_check(g, 0.0, 0.5)
    assert finite
    np.testing.assert_array_equal(g, ref)  # exact: clamping rounds nothing
    assert norm == pytest.approx(math.sqrt(np.sum(grads().astype(np.float64) ** 2)), rel=1e-12)  # before clipping


@pytest.mark.parametrize("clip_norm", [10.0, 1e4])  # clips / does not clip (the norm is ~316)
def test_clip_norm_matches_torch(torch, clip_norm):
    g = grads()
    ref, ref_norm = torch_clip(torch, g, clip_norm, 0.0)
    norm, finite = clip_and_check(g, clip_norm, 0.0)
    assert finite
    assert norm == pytest.approx(ref_norm, rel=1e-6)
    np.testing.assert_allclose(g, ref, rtol=1e-6, atol=0)


def test_value_then_norm_matches_torch(torch):
    g = grads(scale=3.0)
    ref, _ = torch_clip(torch, g, 5.0, 1.0)
    norm, finite = clip_and_check(g, 5.0, 1.0)
    assert finite and norm == pytest.approx(math.sqrt(np.sum(grads(scale=3.0).astype(np.float64) ** 2)))
    np.testing.assert_allclose(g, ref, rtol=1e-6, atol=0)


def test_no_clipping_leaves_grads_and_reports_norm():
    g = grads()
    before = g.copy()
    norm, finite = clip_and_check(g, 0.0, 0.0)
    assert finite and norm == pytest.approx(math.sqrt(np.sum(before.astype(np.float64) ** 2)), rel=1e-12)
    np.testing.assert_array_equal(g, before)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("clip_norm,clip_value", [(0.0, 0.0), (1.0, 0.0), (1.0, 0.5), (0.0, 0.5)])
def test_non_finite_is_detected_and_grads_left_alone(bad, clip_norm, clip_value):
    g = grads()
    g[12345] = bad
    before = g.copy()
    norm, finite = clip_and_check(g, clip_norm, clip_value)
    assert finite is False and not math.isfinite(norm)
    np.testing.assert_array_equal(g, before)  # NaNs compare equal here
    assert not math.isfinite(grad_sq_norm(g))


def test_norm_is_combined_through_allreduce():
    calls = []

    def two_ranks(x: float) -> float:  # as if a second rank held identical gradients
        calls.append(x)
        return 2.0 * x

    g = grads()
    local = math.sqrt(np.sum(g.astype(np.float64) ** 2))
    norm, finite = clip_and_check(g, 10.0, 0.0, allreduce_sum=two_ranks)
    assert finite and len(calls) == 1
    assert norm == pytest.approx(math.sqrt(2.0) * local, rel=1e-12)
    # clipped to the GLOBAL norm: the local part of the clipped gradient has norm 10 / sqrt(2)
    assert math.sqrt(np.sum(g.astype(np.float64) ** 2)) == pytest.approx(10.0 / math.sqrt(2.0), rel=1e-5)

    calls.clear()
    clip_and_check(grads(), 10.0, 0.5, allreduce_sum=two_ranks)
    assert len(calls) == 2  # value clip then norm clip: the clipped norm is a second global sum

    calls.clear()
    g = grads()
    g[0] = np.nan
    _, finite = clip_and_check(g, 10.0, 0.5, allreduce_sum=lambda x: calls.append(x) or x)
    assert finite is False and len(calls) == 1  # every rank sees the same non-finite sum and stops here
