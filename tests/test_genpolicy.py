from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmsnapbackup.core.genpolicy import (
    CAP_FRACTION,
    DAYS_PER_MONTH,
    GenerationCosts,
    PointCost,
    base_weight,
    decide,
    predicted_next,
)
from vmsnapbackup.core.retention import Policy
from vmsnapbackup.errors import UsageError

D = 1 << 30                      # the data: 1 GiB
YEAR = Policy(keep_daily=7, keep_weekly=4, keep_monthly=6)


def costs(*sizes: int, base: int = D, data: int | None = None,
          interval: float = 1.0) -> GenerationCosts:
    """A generation whose later points 1, 2, … all still exist, with these sizes."""
    return GenerationCosts(base, [PointCost(i + 1, s) for i, s in enumerate(sizes)],
                           data_bytes=data, interval_days=interval)


# --- edge cases ---------------------------------------------------------------------------

def test_a_generation_with_only_its_base_goes_on() -> None:
    v = decide(GenerationCosts(D), YEAR)
    assert not v.start
    assert "no point besides its base" in v.reason


def test_an_empty_disk_goes_on_and_does_not_divide_by_zero() -> None:
    v = decide(costs(0, 0, 0, base=0, data=0), YEAR)
    assert not v.start
    assert v.predicted_bytes == 0


def test_a_disk_that_filled_up_since_an_empty_base_starts_one() -> None:
    v = decide(costs(D // 10, D // 5, base=0, data=D // 5), None)
    assert v.start


def test_a_huge_change_starts_one_at_once() -> None:
    # the first point after the base rewrote everything: the next holds at least as much
    v = decide(costs(D), YEAR)
    assert v.start
    assert "of the data" in v.reason


def test_the_cap_is_half_the_data_a_new_base_would_store() -> None:
    # points growing 0.2 of the data per backup, under a heavy base weight: only the cap
    # can end it, once the next point passes half of the data (not of the old base)
    grow = int(0.2 * D)
    assert not decide(costs(grow, base=D, data=D), YEAR).start            # next ~0.4
    assert decide(costs(grow, 2 * grow, base=D, data=D), YEAR).start      # next ~0.6
    # the data shrank to a third of the old base: 0.4 of the old base is over half of it
    assert decide(costs(grow, base=D, data=D // 3), YEAR).start
    assert CAP_FRACTION == 0.5


def test_keep_last_1_only_the_newest_point_is_left() -> None:
    # after a prune --keep-last 1 the pool holds the base and point 6 (index 5) only:
    # growth from the base, 0.3 D over 5 backups = 0.06 D per backup -> next 0.36 D;
    # the 4 pruned points are interpolated: 0.06+0.12+0.18+0.24 = 0.6 D, plus 0.3 D:
    # average (1 + 0.9) / 6 = 0.317 D < 0.36 D -> start
    c = GenerationCosts(D, [PointCost(5, int(0.3 * D))])
    v = decide(c, Policy(keep_last=1))
    assert v.base_weight == 1.0
    assert v.predicted_bytes == pytest.approx(0.36 * D, rel=1e-6)
    assert v.average_bytes == pytest.approx(1.9 * D / 6, rel=1e-6)
    assert v.start
    # one backup earlier (index 4, 0.24 D): next 0.30 D, average (1 + 0.6) / 5 = 0.32 D
    assert not decide(GenerationCosts(D, [PointCost(4, int(0.24 * D))]),
                      Policy(keep_last=1)).start


# --- the renewal rule ---------------------------------------------------------------------

def first_start(percent: int, retention: Policy | None) -> int:
    """Index of the backup that starts a new generation when point k stores k % of D."""
    sizes: list[int] = []
    while not decide(costs(*sizes), retention).start:
        sizes.append(percent * (len(sizes) + 1) * D // 100)
        assert len(sizes) < 10_000
    return len(sizes) + 1


def test_linear_growth_ends_where_the_average_cost_is_lowest() -> None:
    # with equal holding (w = 1) the average (D + sum r k D) / i is lowest where
    # i (i + 1) > 2 / r: r = 2 % -> i = 10 (9 * 10 = 90 < 100 < 110)
    assert first_start(2, None) == 10
    assert first_start(2, Policy(keep_last=7)) == 10
    # a base kept ~10.7 times longer than a point (the year's retention) weighs more:
    # r i (i + 1) / 2 > w -> i (i + 1) > 2 * 10.74 / 0.01 = 2148 -> i = 46 (45 * 46 = 2070)
    assert first_start(1, YEAR) == 46
    # at 2 % the same rule would wait to i = 33; the cap ends it when the next point
    # passes half the data: 0.02 * 26 > 0.5
    assert first_start(2, YEAR) == 26


def test_a_union_that_stops_growing_never_ends_the_generation() -> None:
    # a hot spot of a tenth of the data rewritten again and again: every point stores
    # the same tenth; a new base would only add cost
    assert not decide(costs(*([D // 10] * 300)), None).start


def test_the_growth_is_taken_from_the_two_newest_points_and_never_negative() -> None:
    c = GenerationCosts(D, [PointCost(7, 700), PointCost(2, 200), PointCost(10, 1000)])
    assert predicted_next(c) == (11, 1100)                 # (1000 - 700) / 3 per backup
    shrank = GenerationCosts(D, [PointCost(1, 500), PointCost(2, 300)])
    assert predicted_next(shrank) == (3, 300)              # trimmed blocks: no growth


def test_pruned_points_count_as_interpolated() -> None:
    full = decide(costs(100, 200, 300, 400, 500, base=1000), None)
    gappy = decide(GenerationCosts(1000, [PointCost(5, 500), PointCost(1, 100)]), None)
    assert gappy.average_bytes == pytest.approx(full.average_bytes)
    assert gappy.predicted_bytes == full.predicted_bytes == 600


# --- the retention's weight ---------------------------------------------------------------

def test_base_weight_of_equal_holding_is_one() -> None:
    assert base_weight(None) == 1.0
    assert base_weight(Policy(keep_last=1)) == 1.0
    assert base_weight(Policy(keep_last=7)) == 1.0
    assert base_weight(Policy(keep_daily=7)) == 1.0
    # weekly backups under keep-daily 7: one point a week, kept 7 weeks, like keep-last 7
    assert base_weight(Policy(keep_daily=7), interval_days=7) == 1.0
    assert base_weight(Policy(keep_last=0, keep_daily=0)) == 1.0
    # rules that overlap count their points twice (7 + 1 for 7 days): never below 1
    assert base_weight(Policy(keep_last=7, keep_daily=1)) == 1.0


def test_base_weight_of_a_long_tail() -> None:
    assert base_weight(YEAR) == pytest.approx(6 * DAYS_PER_MONTH / 17)
    assert base_weight(Policy(keep_last=2, keep_weekly=8)) == pytest.approx(56 / 10)
    # hourly backups, keep-last 24 + keep-daily 7: 7 days against 31 points of 1 hour
    assert base_weight(Policy(keep_last=24, keep_daily=7), interval_days=1 / 24) == \
        pytest.approx(7 / (31 / 24))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2 * D), min_size=1, max_size=40),
       st.integers(1, 2 * D))
def test_a_heavier_base_never_ends_a_generation_sooner(sizes: list[int], base: int) -> None:
    light = decide(costs(*sizes, base=base), None)
    heavy = decide(costs(*sizes, base=base), YEAR)
    assert heavy.base_weight > light.base_weight
    if heavy.start:
        assert light.start


# --- overrides and bad input --------------------------------------------------------------

def test_force_wins() -> None:
    assert decide(GenerationCosts(D), YEAR, force=True).start


def test_an_explicit_threshold_replaces_the_rule() -> None:
    small = GenerationCosts(D, [PointCost(1, D)], changed_fraction=0.2)
    assert decide(small, YEAR).start                        # the rule: huge change
    assert not decide(small, YEAR, threshold=0.5).start     # the user's threshold
    big = GenerationCosts(D, [PointCost(1, 1)], changed_fraction=0.6)
    assert not decide(big, YEAR).start
    v = decide(big, YEAR, threshold=0.5)
    assert v.start and "over the threshold 0.5" in v.reason


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.5])
def test_a_bad_threshold_is_a_usage_error(threshold: float) -> None:
    with pytest.raises(UsageError, match="threshold"):
        decide(GenerationCosts(D), None, threshold=threshold)


@pytest.mark.parametrize("make", [
    lambda: GenerationCosts(-1),
    lambda: GenerationCosts(D, data_bytes=-1),
    lambda: GenerationCosts(D, interval_days=0),
    lambda: GenerationCosts(D, [PointCost(0, 1)]),
    lambda: GenerationCosts(D, [PointCost(1, -1)]),
    lambda: GenerationCosts(D, [PointCost(1, 1), PointCost(1, 2)]),
])
def test_bad_costs_are_usage_errors(make: object) -> None:
    with pytest.raises(UsageError, match="generation policy"):
        make()  # type: ignore[operator]
