"""hpcopt.optim.schedules.lr_at against torch.optim.lr_scheduler where torch has the schedule.

Tolerance: rtol 1e-9. Both sides compute in float64; torch's schedulers update the lr recursively
(lr_{t+1} from lr_t), which accumulates a few ulp over these 100-300 steps (~1e-14), far below 1e-9.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from hpcopt.config import ScheduleConfig
from hpcopt.errors import ConfigError
from hpcopt.optim.schedules import batch_scale, lr_at

RTOL = 1e-9
BASE = 0.1


def ours(cfg: ScheduleConfig, steps: int, total: int = 0, scale: float = 1.0) -> np.ndarray:
    return np.array([lr_at(s, BASE, cfg, total, scale) for s in range(steps)])


def theirs(make_scheduler, steps: int, base: float = BASE) -> np.ndarray:
    torch = pytest.importorskip("torch", reason="torch is not installed: no reference schedulers")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = make_scheduler(torch.optim.lr_scheduler, opt)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])  # the lr this update uses
        opt.step()
        sched.step()
    return np.array(lrs)


def test_constant():
    np.testing.assert_array_equal(ours(ScheduleConfig(name="constant"), 50), np.full(50, BASE))


def test_step_matches_steplr():
    cfg = ScheduleConfig(name="step", step_size=30, gamma=0.5)
    np.testing.assert_allclose(ours(cfg, 200), theirs(lambda S, o: S.StepLR(o, step_size=30, gamma=0.5), 200),
                               rtol=RTOL)


def test_exponential_matches_exponentiallr():
    cfg = ScheduleConfig(name="exponential", gamma=0.97)
    np.testing.assert_allclose(ours(cfg, 200), theirs(lambda S, o: S.ExponentialLR(o, gamma=0.97), 200),
                               rtol=RTOL)


@pytest.mark.parametrize("min_lr", [0.0, 1e-3])
def test_cosine_matches_cosineannealinglr(min_lr):
    cfg = ScheduleConfig(name="cosine", min_lr=min_lr)
    ref = theirs(lambda S, o: S.CosineAnnealingLR(o, T_max=150, eta_min=min_lr), 151)
    np.testing.assert_allclose(ours(cfg, 151, total=150), ref, rtol=RTOL, atol=1e-15)
    assert lr_at(400, BASE, cfg, 150) == min_lr  # stays at min_lr after the horizon (torch's restarts)


def test_linear_matches_linearlr():
    cfg = ScheduleConfig(name="linear", min_lr=0.02, total_steps=120)
    ref = theirs(lambda S, o: S.LinearLR(o, start_factor=1.0, end_factor=0.02 / BASE, total_iters=120), 200)
    np.testing.assert_allclose(ours(cfg, 200, total=999), ref, rtol=RTOL)  # schedule.total_steps wins


def test_warmup_matches_linearlr_ramp():
    cfg = ScheduleConfig(name="constant", warmup_steps=10)
    ref = theirs(lambda S, o: S.LinearLR(o, start_factor=1 / 10, end_factor=1.0, total_iters=9), 40)
    np.testing.assert_allclose(ours(cfg, 40), ref, rtol=RTOL)
    assert lr_at(0, BASE, cfg, 0) == pytest.approx(BASE / 10)  # the first update already moves


def test_warmup_then_cosine_matches_sequentiallr():
    cfg = ScheduleConfig(name="cosine", warmup_steps=20, min_lr=1e-4)

    def make(S, o):
        return S.SequentialLR(o, [S.LinearLR(o, start_factor=1 / 20, end_factor=1.0, total_iters=19),
                                  S.CosineAnnealingLR(o, T_max=100 - 20, eta_min=1e-4)], milestones=[20])
    np.testing.assert_allclose(ours(cfg, 100, total=100), theirs(make, 100), rtol=RTOL)


def test_warmup_then_step_decay_counts_from_warmup_end():
    cfg = ScheduleConfig(name="step", warmup_steps=5, step_size=10, gamma=0.1)
    assert lr_at(4, BASE, cfg, 0) == pytest.approx(BASE)
    assert lr_at(14, BASE, cfg, 0) == pytest.approx(BASE)
    assert lr_at(15, BASE, cfg, 0) == pytest.approx(BASE * 0.1)


def test_scale_multiplies_peak_not_min_lr():
    cfg = ScheduleConfig(name="cosine", warmup_steps=4, min_lr=1e-3)
    np.testing.assert_allclose(ours(ScheduleConfig(name="constant", warmup_steps=4), 20, scale=8.0),
                               8.0 * ours(ScheduleConfig(name="constant", warmup_steps=4), 20), rtol=1e-15)
    assert lr_at(3, BASE, cfg, 100, scale=8.0) == pytest.approx(8 * BASE)
    assert lr_at(100, BASE, cfg, 100, scale=8.0) == pytest.approx(1e-3)


def test_batch_scale_linear_scaling_rule():
    assert batch_scale(ScheduleConfig(), 1024, 8) == 1.0  # off by default
    on = ScheduleConfig(scale_lr_with_batch=True, base_batch_size=256)
    assert batch_scale(on, 1024, 8) == 4.0
    assert batch_scale(ScheduleConfig(scale_lr_with_batch=True), 1024, 8) == 8.0  # base: per-replica batch


def test_cosine_without_horizon_is_a_config_error():
    with pytest.raises(ConfigError, match="schedule.total_steps"):
        lr_at(0, BASE, ScheduleConfig(name="cosine"), 0)


def test_every_schedule_is_finite_and_positive():
    for name in ("constant", "step", "exponential", "cosine", "linear"):
        cfg = ScheduleConfig(name=name, warmup_steps=3, min_lr=1e-5)
        lrs = ours(cfg, 300, total=250)
        assert all(math.isfinite(x) and x > 0 for x in lrs), name
