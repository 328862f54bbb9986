"""keep-hourly and keep-yearly: edge cases of the two rules jobs added to retention.

Buckets are those of the datetimes handed in (prune hands in host-local aware
times); these tests pin what that means at an hour's end, a year's end, a
daylight-saving change and a zone whose offset is not whole hours.
"""
from __future__ import annotations

import datetime as dt
from typing import Dict, List, Sequence, Tuple
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmsnapbackup.cli import build_parser
from vmsnapbackup.core.genpolicy import base_weight
from vmsnapbackup.core.retention import RULES, Decision, Policy, decide, select
from vmsnapbackup.errors import UsageError

UTC = dt.timezone.utc
BERLIN = ZoneInfo("Europe/Berlin")
KOLKATA = ZoneInfo("Asia/Kolkata")


def kept(decisions: Sequence[Decision]) -> Dict[int, List[str]]:
    return {d.number: d.reasons for d in decisions if d.keep}


def test_hourly_keeps_the_newest_of_each_hour_with_points() -> None:
    h = dt.datetime(2026, 3, 1, 10, 0)
    pts = [(1, h), (2, h.replace(minute=59, second=59)),        # 10:xx: 2 is newest
           (3, h.replace(hour=11, minute=0)),                   # 11:00 exactly
           # 12:00 .. 15:00 have no point and use up no slot
           (4, h.replace(hour=16, minute=5)), (5, h.replace(hour=16, minute=30))]
    assert kept(select(pts, keep_hourly=2)) == {3: ["hourly"], 5: ["newest", "hourly"]}
    assert kept(select(pts, keep_hourly=3)) == {2: ["hourly"], 3: ["hourly"],
                                                 5: ["newest", "hourly"]}


def test_hourly_same_hour_on_another_day_is_another_bucket() -> None:
    pts = [(1, dt.datetime(2026, 3, 1, 10, 30)), (2, dt.datetime(2026, 3, 2, 10, 30))]
    assert kept(select(pts, keep_hourly=2)) == {1: ["hourly"], 2: ["newest", "hourly"]}


def test_hourly_keeps_apart_the_hour_a_dst_change_repeats() -> None:
    # 2026-10-25 in Berlin: 02:00-03:00 happens twice (CEST, then CET)
    first = dt.datetime(2026, 10, 25, 0, 10, tzinfo=UTC).astimezone(BERLIN)   # 02:10 CEST
    second = dt.datetime(2026, 10, 25, 1, 10, tzinfo=UTC).astimezone(BERLIN)  # 02:10 CET
    assert (first.hour, second.hour) == (2, 2) and first.utcoffset() != second.utcoffset()
    assert kept(select([(1, first), (2, second)], keep_hourly=2)) == {
        1: ["hourly"], 2: ["newest", "hourly"]}
    # naive times cannot tell the two apart: one bucket (the caller's choice of zone)
    naive = [(1, first.replace(tzinfo=None)), (2, second.replace(tzinfo=None, minute=20))]
    assert kept(select(naive, keep_hourly=2)) == {2: ["newest", "hourly"]}


def test_hourly_in_a_half_hour_zone_follows_local_hours() -> None:
    # 10:20Z and 10:40Z are one UTC hour but 15:50 and 16:10 in Kolkata (+05:30)
    a = dt.datetime(2026, 5, 1, 10, 20, tzinfo=UTC)
    b = dt.datetime(2026, 5, 1, 10, 40, tzinfo=UTC)
    assert kept(select([(1, a), (2, b)], keep_hourly=2)) == {2: ["newest", "hourly"]}
    local = [(1, a.astimezone(KOLKATA)), (2, b.astimezone(KOLKATA))]
    assert kept(select(local, keep_hourly=2)) == {1: ["hourly"], 2: ["newest", "hourly"]}


def test_yearly_at_the_year_boundary() -> None:
    pts = [(1, dt.datetime(2025, 6, 1)), (2, dt.datetime(2025, 12, 31, 23, 59, 59)),
           (3, dt.datetime(2026, 1, 1, 0, 0, 0)), (4, dt.datetime(2026, 1, 1, 0, 0, 1))]
    assert kept(select(pts, keep_yearly=1)) == {4: ["newest", "yearly"]}
    assert kept(select(pts, keep_yearly=2)) == {2: ["yearly"], 4: ["newest", "yearly"]}


def test_yearly_years_without_points_use_no_slot() -> None:
    pts = [(1, dt.datetime(2019, 5, 1)), (2, dt.datetime(2020, 5, 1)),
           (3, dt.datetime(2026, 5, 1))]          # 2021..2025 had no backup
    assert kept(select(pts, keep_yearly=2)) == {2: ["yearly"], 3: ["newest", "yearly"]}


def test_yearly_buckets_in_the_zone_of_the_timestamp() -> None:
    # 23:30Z on New Year's Eve is already the new year at UTC+2
    late = dt.datetime(2026, 12, 31, 23, 30, tzinfo=UTC)
    earlier = dt.datetime(2026, 12, 31, 20, 0, tzinfo=UTC)
    east = dt.timezone(dt.timedelta(hours=2))
    in_utc = [(1, earlier), (2, late)]
    in_east = [(1, earlier.astimezone(east)), (2, late.astimezone(east))]
    assert kept(select(in_utc, keep_yearly=2)) == {2: ["newest", "yearly"]}
    assert kept(select(in_east, keep_yearly=2)) == {1: ["yearly"], 2: ["newest", "yearly"]}


def test_rules_apply_in_order_and_reasons_accumulate() -> None:
    t = dt.datetime(2026, 1, 1, 12)
    pts = [(1, t - dt.timedelta(days=400)), (2, t - dt.timedelta(hours=1)), (3, t)]
    out = kept(decide(pts, Policy(keep_last=1, keep_hourly=2, keep_daily=1, keep_yearly=2)))
    assert out == {1: ["yearly"], 2: ["hourly"],
                   3: ["newest", "last", "hourly", "daily", "yearly"]}


def test_the_older_positional_form_keeps_its_meaning() -> None:
    p = Policy(1, 2, 3, 4)
    assert (p.keep_last, p.keep_daily, p.keep_weekly, p.keep_monthly) == (1, 2, 3, 4)
    assert p.keep_hourly is None and p.keep_yearly is None
    assert list(p.counts()) == [f"keep_{r}" for r in RULES]


@pytest.mark.parametrize("kwargs,match", [
    ({"keep_hourly": -1}, "keep-hourly"),
    ({"keep_yearly": 2.0}, "keep-yearly"),
    ({"keep_yearly": False}, "keep-yearly"),
])
def test_bad_counts_name_their_rule(kwargs: dict, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        Policy(**kwargs)


def test_only_hourly_or_yearly_is_a_policy() -> None:
    assert Policy(keep_hourly=0).keep_hourly == 0
    assert Policy(keep_yearly=3).keep_yearly == 3


def test_generation_policy_weighs_the_new_rules() -> None:
    # a base kept for years is heavy against daily points kept for a week
    assert base_weight(Policy(keep_daily=7, keep_yearly=2)) > 60
    assert base_weight(Policy(keep_hourly=24), interval_days=1 / 24) == 1.0


def test_prune_cli_has_the_options() -> None:
    args = build_parser("prune").parse_args(
        ["prune", "dom", "--keep-hourly", "24", "--keep-yearly", "3"])
    assert (args.keep_hourly, args.keep_yearly) == (24, 3)


# --- properties ----------------------------------------------------------------------------

T0 = dt.datetime(2025, 12, 30, 22, 0, tzinfo=UTC)
counts = st.one_of(st.none(), st.integers(min_value=0, max_value=8))


@st.composite
def aware_points(draw: st.DrawFn) -> List[Tuple[int, dt.datetime]]:
    """Up to 40 points over ~2 years around a New Year, seen in Berlin (DST changes)."""
    n = draw(st.integers(min_value=0, max_value=40))
    minutes = draw(st.lists(st.integers(min_value=0, max_value=2 * 365 * 24 * 60),
                            min_size=n, max_size=n))
    return [(i + 1, (T0 + dt.timedelta(minutes=m)).astimezone(BERLIN))
            for i, m in enumerate(minutes)]


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    values = draw(st.tuples(*[counts] * 6).filter(lambda t: any(v is not None for v in t)))
    return Policy(*values)


@settings(max_examples=300, deadline=None)
@given(aware_points(), policies())
def test_idempotent_and_bounded(points: List[Tuple[int, dt.datetime]], policy: Policy) -> None:
    first = decide(points, policy)
    survivors = [p for p in points if p[0] in {d.number for d in first if d.keep}]
    second = decide(survivors, policy)
    assert all(d.keep for d in second)
    when = dict(points)
    for reason, count in (("hourly", policy.keep_hourly), ("yearly", policy.keep_yearly)):
        got = [d.number for d in first if reason in d.reasons]
        assert len(got) <= (count or 0)
        labels = [(when[n].astimezone(UTC).replace(minute=0, second=0, microsecond=0)
                   if reason == "hourly" else when[n].year) for n in got]
        assert len(labels) == len(set(labels)), f"two {reason} points in one bucket"
