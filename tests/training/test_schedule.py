"""The report's schedule shapes, in tokens."""

from __future__ import annotations

import pytest

from v3flow.training.schedule import ScheduleConfig

T = 14_800_000_000_000


def test_report_learning_rate_schedule():
    s = ScheduleConfig()
    assert s.lr(0, 0) == pytest.approx(2.2e-4 / 2000)
    assert s.lr(1999, 0) == pytest.approx(2.2e-4)
    assert s.lr(5000, 9.9e12) == pytest.approx(2.2e-4)  # constant until 10T
    mid = s.lr(10**5, int((0.676 + 0.9662) / 2 * T))
    assert 2.2e-5 < mid < 2.2e-4
    assert s.lr(10**5, int(0.97 * T)) == pytest.approx(2.2e-5)
    assert s.lr(10**5, int(0.995 * T)) == pytest.approx(7.3e-6, rel=1e-3)
    lrs = [s.lr(10**5, int(f * T)) for f in (0.68, 0.75, 0.85, 0.95)]
    assert lrs == sorted(lrs, reverse=True)


def test_batch_ramp_and_switches():
    s = ScheduleConfig()
    assert s.batch_size(0) == 3072 and s.batch_size(int(0.5 * T)) == 15360
    assert 3072 < s.batch_size(int(0.0158 * T)) < 15360
    assert s.batch_size(int(0.01 * T), multiple=64) % 64 == 0
    assert s.mtp_lambda(int(0.5 * T)) == 0.3 and s.mtp_lambda(int(0.7 * T)) == 0.1
    assert s.gamma(int(0.9 * T)) == 0.001 and s.gamma(int(0.98 * T)) == 0.0
