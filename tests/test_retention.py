from __future__ import annotations

import datetime as dt
from typing import Dict, List, Optional, Sequence, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmsnapbackup.core.retention import Decision, Policy, decide, select
from vmsnapbackup.errors import UsageError

T0 = dt.datetime(2026, 1, 1, 12, 0)


def at(day: int, hour: int = 12, month: int = 1, year: int = 2026) -> dt.datetime:
    return dt.datetime(year, month, day, hour)


def kept(decisions: Sequence[Decision]) -> Dict[int, List[str]]:
    return {d.number: d.reasons for d in decisions if d.keep}


# --- the rules, by example -----------------------------------------------------------------

def test_keep_last_keeps_the_newest_n() -> None:
    pts = [(n, T0 + dt.timedelta(hours=n)) for n in range(1, 7)]
    assert kept(select(pts, keep_last=3)) == {4: ["last"], 5: ["last"],
                                               6: ["newest", "last"]}


def test_decisions_come_in_input_order_and_unpack() -> None:
    pts = [(3, at(3)), (1, at(1)), (2, at(2))]
    out = select(pts, keep_last=1)
    assert [d.number for d in out] == [3, 1, 2]
    number, keep, reasons = out[0]
    assert (number, keep, reasons) == (3, True, ["newest", "last"])
    assert list(out[1]) == [1, False, []]


def test_keep_daily_takes_the_newest_of_each_day_with_points() -> None:
    pts = [(1, at(1, 8)), (2, at(1, 20)),      # day 1: 2 is the newest
           (3, at(2, 9)),                      # day 2
           # days 3..5 have no backup: they do not use up slots
           (4, at(6, 1)), (5, at(6, 2)), (6, at(6, 23))]
    assert kept(select(pts, keep_daily=2)) == {3: ["daily"], 6: ["newest", "daily"]}
    assert kept(select(pts, keep_daily=3)) == {2: ["daily"], 3: ["daily"],
                                                6: ["newest", "daily"]}


def test_keep_weekly_uses_iso_weeks_across_the_new_year() -> None:
    # 2026-12-31 is a Thursday of ISO week 2026-W53; 2027-01-03 (Sunday) is in it too,
    # 2027-01-04 (Monday) starts 2027-W01.
    pts = [(1, at(28, month=12)),  # W53 Monday
           (2, at(31, month=12)),  # W53 Thursday
           (3, at(3, year=2027)),  # W53 Sunday: newest of W53
           (4, at(4, year=2027))]  # W01
    assert kept(select(pts, keep_weekly=2)) == {3: ["weekly"], 4: ["newest", "weekly"]}
    assert kept(select(pts, keep_weekly=1)) == {4: ["newest", "weekly"]}


def test_keep_monthly() -> None:
    pts = [(1, at(1, month=1)), (2, at(31, month=1)), (3, at(1, month=3)),
           (4, at(15, month=3)), (5, at(2, month=4))]
    assert kept(select(pts, keep_monthly=3)) == {2: ["monthly"], 4: ["monthly"],
                                                  5: ["newest", "monthly"]}


def test_rules_combine_and_reasons_accumulate() -> None:
    pts = [(n, at(n)) for n in range(1, 11)]  # ten days in January, one point a day
    out = kept(select(pts, keep_last=2, keep_daily=3, keep_weekly=2, keep_monthly=1))
    # 2026-01-04 is a Sunday (W01), 01-11 a Sunday (W02): weekly keeps 10 (W02) and 4 (W01)
    assert out == {10: ["newest", "last", "daily", "weekly", "monthly"],
                   9: ["last", "daily"], 8: ["daily"], 4: ["weekly"]}


def test_newest_is_kept_even_with_zero_counts() -> None:
    pts = [(1, at(1)), (2, at(2))]
    assert kept(select(pts, keep_last=0)) == {2: ["newest"]}
    assert kept(select(pts, keep_daily=0, keep_monthly=0)) == {2: ["newest"]}


def test_timestamp_orders_points_and_number_breaks_ties() -> None:
    # the clock went back: point 3 has the older timestamp and is not the newest
    pts = [(1, at(1)), (2, at(5)), (3, at(4))]
    assert kept(select(pts, keep_last=1)) == {2: ["newest", "last"]}
    same = [(1, T0), (2, T0), (3, T0)]
    assert kept(select(same, keep_last=2)) == {3: ["newest", "last"], 2: ["last"]}


def test_aware_timestamps_bucket_in_their_own_zone() -> None:
    cet = dt.timezone(dt.timedelta(hours=1))
    # 23:30 UTC on day 1 is 00:30 on day 2 in CET
    pts = [(1, dt.datetime(2026, 1, 1, 23, 30, tzinfo=dt.timezone.utc).astimezone(cet)),
           (2, dt.datetime(2026, 1, 2, 8, 0, tzinfo=cet))]
    assert kept(select(pts, keep_daily=2)) == {2: ["newest", "daily"]}


def test_empty_input() -> None:
    assert select([], keep_last=3) == []


@pytest.mark.parametrize("kwargs,match", [
    ({}, "at least one"),
    ({"keep_last": -1}, "keep-last"),
    ({"keep_daily": 1.5}, "keep-daily"),
    ({"keep_weekly": True}, "keep-weekly"),
])
def test_bad_policies_are_usage_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        select([(1, T0)], **kwargs)


def test_duplicate_numbers_are_refused() -> None:
    with pytest.raises(UsageError, match="twice"):
        select([(1, T0), (1, T0)], keep_last=1)


# --- properties ----------------------------------------------------------------------------

counts = st.one_of(st.none(), st.integers(min_value=0, max_value=12))


@st.composite
def point_lists(draw: st.DrawFn) -> List[Tuple[int, dt.datetime]]:
    """Up to 60 points over ~3 years, with clusters on one day, and numbers that
    mostly but not always follow the timestamps."""
    n = draw(st.integers(min_value=0, max_value=60))
    offsets = draw(st.lists(st.integers(min_value=0, max_value=3 * 365 * 24 * 60),
                            min_size=n, max_size=n))
    numbers = draw(st.permutations(list(range(1, n + 1))))
    if draw(st.booleans()):
        offsets.sort()
        numbers = sorted(numbers)
    return [(num, T0 + dt.timedelta(minutes=off)) for num, off in zip(numbers, offsets)]


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    values = draw(st.tuples(counts, counts, counts, counts).filter(
        lambda t: any(v is not None for v in t)))
    return Policy(*values)


def newest(points: Sequence[Tuple[int, dt.datetime]]) -> Optional[int]:
    return max(points, key=lambda p: (p[1], p[0]))[0] if points else None


@settings(max_examples=400, deadline=None)
@given(point_lists(), policies())
def test_newest_always_kept(points: List[Tuple[int, dt.datetime]], policy: Policy) -> None:
    out = decide(points, policy)
    assert [d.number for d in out] == [p[0] for p in points]
    if points:
        by_number = {d.number: d for d in out}
        assert by_number[newest(points)].keep
        assert "newest" in by_number[newest(points)].reasons
    for d in out:
        assert d.keep == bool(d.reasons)


@settings(max_examples=400, deadline=None)
@given(point_lists(), st.integers(min_value=0, max_value=70), policies())
def test_keep_last_keeps_at_least_min_n_len(points: List[Tuple[int, dt.datetime]], n: int,
                                             other: Policy) -> None:
    policy = Policy(n, other.keep_daily, other.keep_weekly, other.keep_monthly)
    out = decide(points, policy)
    assert sum(d.keep for d in out) >= min(n, len(points))
    # and exactly the n newest carry the reason "last"
    newest_n = {p[0] for p in sorted(points, key=lambda p: (p[1], p[0]), reverse=True)[:n]}
    assert {d.number for d in out if "last" in d.reasons} == newest_n


@settings(max_examples=400, deadline=None)
@given(point_lists(), policies())
def test_idempotent(points: List[Tuple[int, dt.datetime]], policy: Policy) -> None:
    first = decide(points, policy)
    keep = {d.number for d in first if d.keep}
    survivors = [p for p in points if p[0] in keep]
    second = decide(survivors, policy)
    assert all(d.keep for d in second)
    # the same rules keep them, for the same reasons
    assert {d.number: d.reasons for d in second} == {d.number: d.reasons for d in first
                                                     if d.keep}


@settings(max_examples=300, deadline=None)
@given(point_lists(), policies())
def test_bucket_rules_keep_at_most_their_count(points: List[Tuple[int, dt.datetime]],
                                               policy: Policy) -> None:
    out = decide(points, policy)
    for reason, count in (("last", policy.keep_last), ("daily", policy.keep_daily),
                          ("weekly", policy.keep_weekly), ("monthly", policy.keep_monthly)):
        got = [d.number for d in out if reason in d.reasons]
        assert len(got) <= (count or 0)
        if reason == "daily":
            # never two points of one day
            days = [dict(points)[n].date() for n in got]
            assert len(days) == len(set(days))
