"""Retention policy: which points a prune keeps, and why (pure; no pool access).

The rules follow restic's ``forget`` so that users who know it get no surprise:

* points are ordered newest first by (timestamp, number): the number breaks ties
  between points of one timestamp, and numbers are handed out in the order points
  are taken (FORMAT.md §3);
* ``keep_last`` N keeps the N newest points;
* ``keep_hourly`` N keeps the newest point of each of the N most recent clock hours
  that have points;
* ``keep_daily`` N keeps, for each of the N most recent calendar days *that have
  points*, the newest point of that day (a day without a backup does not use up a
  slot, so a week's holiday does not empty a ``--keep-daily 7`` policy);
* ``keep_weekly`` does the same by ISO week (``isocalendar()`` year and week, so the
  week of 31 December may belong to the next year), ``keep_monthly`` by month,
  ``keep_yearly`` by calendar year;
* every rule is applied to all points independently; a point kept by several
  rules carries every reason (unlike borg, a point kept by ``last`` still uses up a
  ``daily`` slot -- restic's behaviour, and the one that makes the result
  independent of the order the rules are listed in);
* the newest point is always kept (reason ``newest``), whatever the counts: a
  prune never leaves a domain without its latest backup.

Time zone: hours, days, weeks, months and years are those of the datetimes passed
in, so the caller decides the zone.  Prune converts manifest timestamps (UTC) to the
host's *local* time, so "daily" means the admin's days and "yearly" the admin's New
Year, not London's.  The hour a daylight-saving change repeats (02:00-03:00 twice in
Europe each October) holds two real hours: an hourly bucket includes the UTC offset,
so they stay two buckets; aware datetimes carry it, naive ones cannot (their zone is
the caller's business).  Naive and aware datetimes must not be mixed.

Applying the policy again to the points it kept keeps all of them (idempotence):
every bucket's newest point survives, so the set of buckets and their newest points
are unchanged.  The property tests in ``tests/test_retention.py`` hold us to it.
"""
from __future__ import annotations

import datetime as _dt
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Callable

from ..errors import UsageError

__all__ = [
    "REASON_DAILY",
    "REASON_HOURLY",
    "REASON_LAST",
    "REASON_MONTHLY",
    "REASON_NEWEST",
    "REASON_WEEKLY",
    "REASON_YEARLY",
    "RULES",
    "Decision",
    "Policy",
    "decide",
    "select",
]

REASON_NEWEST = "newest"
REASON_LAST = "last"
REASON_HOURLY = "hourly"
REASON_DAILY = "daily"
REASON_WEEKLY = "weekly"
REASON_MONTHLY = "monthly"
REASON_YEARLY = "yearly"

#: The rules in the order they are applied (and reasons listed), as CLI/config words.
RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")

Bucket = Callable[[_dt.datetime, int], Hashable]

_RULES: tuple[tuple[str, Bucket], ...] = (
    # "last": every point is a bucket of its own
    (REASON_LAST, lambda ts, n: ("point", n)),
    # the offset keeps apart the two real hours a daylight-saving change labels alike
    (REASON_HOURLY, lambda ts, n: (ts.year, ts.month, ts.day, ts.hour, ts.utcoffset())),
    (REASON_DAILY, lambda ts, n: (ts.year, ts.month, ts.day)),
    (REASON_WEEKLY, lambda ts, n: tuple(ts.isocalendar()[:2])),
    (REASON_MONTHLY, lambda ts, n: (ts.year, ts.month)),
    (REASON_YEARLY, lambda ts, n: ts.year),
)


@dataclass(frozen=True)
class Policy:
    """How many of each kind to keep; None means the rule is not used.

    ``keep_hourly`` and ``keep_yearly`` come last so that the older positional
    form ``Policy(last, daily, weekly, monthly)`` keeps its meaning.
    """

    keep_last: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None
    keep_hourly: int | None = None
    keep_yearly: int | None = None

    def __post_init__(self) -> None:
        for name, value in self.counts().items():
            if value is None:
                continue
            if type(value) is not int or value < 0:
                raise UsageError(f"--{name.replace('_', '-')} must be a whole number >= 0, "
                                 f"not {value!r}")
        if all(v is None for v in self.counts().values()):
            raise UsageError("a retention policy needs at least one of "
                             + ", ".join(f"--keep-{r}" for r in RULES))

    def counts(self) -> dict[str, int | None]:
        """Every rule's count, in :data:`RULES` order."""
        return {f"keep_{r}": getattr(self, f"keep_{r}") for r in RULES}

    def to_dict(self) -> dict[str, int | None]:
        return self.counts()

    def _count(self, reason: str) -> int | None:
        return self.counts()[f"keep_{reason}"]


@dataclass(frozen=True)
class Decision:
    """One point's fate: ``keep`` and the rules that kept it (empty when removed)."""

    number: int
    keep: bool
    reasons: list[str] = field(default_factory=list)

    def __iter__(self):  # type: ignore[no-untyped-def]
        """Unpacks as ``(number, keep, reasons)``."""
        return iter((self.number, self.keep, list(self.reasons)))


def decide(points: Sequence[tuple[int, _dt.datetime]], policy: Policy) -> list[Decision]:
    """The decision for every point, in the order ``points`` were given."""
    numbers = [n for n, _ in points]
    if len(set(numbers)) != len(numbers):
        raise UsageError("retention: a point number appears twice")
    order = sorted(points, key=lambda p: (p[1], p[0]), reverse=True)  # newest first
    reasons: dict[int, list[str]] = {n: [] for n in numbers}
    if order:
        reasons[order[0][0]].append(REASON_NEWEST)
    for reason, bucket_of in _RULES:
        left = policy._count(reason)
        if not left:
            continue
        seen = set()
        for n, ts in order:
            bucket = bucket_of(ts, n)
            if bucket in seen:
                continue
            seen.add(bucket)
            reasons[n].append(reason)
            left -= 1
            if left == 0:
                break
    return [Decision(n, bool(reasons[n]), reasons[n]) for n in numbers]


def select(points: Sequence[tuple[int, _dt.datetime]], keep_last: int | None = None,
           keep_daily: int | None = None, keep_weekly: int | None = None,
           keep_monthly: int | None = None, keep_hourly: int | None = None,
           keep_yearly: int | None = None) -> list[Decision]:
    """Decisions for ``points`` (``(number, timestamp)`` pairs) under the given counts.

    Each decision unpacks as ``(number, keep, reasons)``.  At least one count must be
    given (UsageError otherwise), and none may be negative.
    """
    return decide(points, Policy(keep_last, keep_daily, keep_weekly, keep_monthly,
                                 keep_hourly, keep_yearly))
