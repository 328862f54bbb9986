"""The run's bandwidth budget: a reservation token bucket, on a fake clock.

The rate on the real stack is measured in integration/test_many_domains.py;
here only the bucket's arithmetic, with time that moves when the bucket sleeps.
"""
from __future__ import annotations

import pytest

from vmsnapbackup.errors import UsageError
from vmsnapbackup.workflows.ratebudget import (
    RateBudget,
    parse_rate,
    throttled,
)

MiB = 1 << 20


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_a_long_transfer_takes_bytes_over_rate_seconds() -> None:
    t = FakeTime()
    budget = RateBudget(10 * MiB, clock=t.clock, sleep=t.sleep)
    start = t.now
    for _ in range(100):          # 100 MiB in 1 MiB chunks
        budget.take(MiB)
    elapsed = t.now - start
    # the burst (a tenth of a second of the rate) is all it may run ahead
    assert 10.0 - 0.1 - 1e-9 <= elapsed <= 10.0
    assert budget.taken == 100 * MiB


def test_time_spent_elsewhere_counts_but_never_more_than_the_burst() -> None:
    t = FakeTime()
    budget = RateBudget(MiB, clock=t.clock, sleep=t.sleep)
    budget.take(MiB)              # 0.1 MiB of burst, then 0.9 s of debt
    assert t.slept == [pytest.approx(0.9)]
    t.now += 60.0                 # a minute idle: only the burst is saved up
    assert budget.take(MiB) == pytest.approx(0.9)


def test_parse_rate() -> None:
    assert parse_rate("100M") == 100 * MiB
    assert parse_rate("100MiB/s") == 100 * MiB
    assert parse_rate("1.5g") == int(1.5 * 1024 * MiB)
    assert parse_rate("65536") == 65536
    for bad in ("fast", "", "1K", "-5M"):
        with pytest.raises(UsageError):
            parse_rate(bad)


def test_throttled_takes_each_piece_before_letting_it_through() -> None:
    t = FakeTime()
    budget = RateBudget(MiB, burst=0, clock=t.clock, sleep=t.sleep)
    out = list(throttled([(0, MiB), (MiB, MiB // 2)], budget))
    assert out == [(0, MiB), (MiB, MiB // 2)]
    assert budget.taken == MiB + MiB // 2
    assert t.now - 100.0 == pytest.approx(1.5)
    assert list(throttled([(0, 5)], None)) == [(0, 5)]

