"""Generation policy: should the next backup start a new generation? (pure; no pool access)

A point holds every block that differs from its generation's first table, so the points
of a generation grow for as long as it lasts, and a pool that never starts a new one grows
quadratically (docs/generations.md has the model and the simulator's figures).  A new
generation costs one base volume (the disk's data, not its virtual size); continuing
costs the next point, which holds every block changed since the base.  The rule weighs
the two in stored bytes, from what the pool already records:

* the **renewal rule**: over the life of a generation, the stored cost per point is
  ``(w * base + sum of its points) / (points + 1)``; that average falls while the points
  are small and rises once they grow past it, and it is lowest when a generation ends
  just as its next point would cost more than the average so far.  So a new generation
  starts when the *predicted* next point costs more than that average;
* ``w``, the base's weight, comes from the retention in force: a base is kept as long as
  the generation's longest-kept point (up to the retention's horizon: six months for
  ``keep-monthly 6``), while an average point is kept only ``points kept x interval``
  (Little's law).  Equal holding (``keep-last N``, or no retention known) gives ``w = 1``;
  ``keep-daily 7, keep-weekly 4, keep-monthly 6`` with daily backups gives about 10.7,
  which keeps generations long enough that months do not each pay a base for one point;
* a **cap**: a point predicted to hold more than half of the data is never worth it,
  since the next one will hold at least as much and the two together outweigh a new base;
* the **prediction** of the next point: the newest point plus the growth per backup seen
  between the two newest points the pool still has (or since the base when it has one).

Points that prune removed are filled in by linear interpolation between the points that
are left (the union of changes since the base only grows, so this is close and errs low).

Overrides: ``force`` (``--new-generation``) always starts one; an explicit ``threshold``
(``--threshold``) replaces this rule by the older one, "the newest point changed more than
this fraction of the virtual disk's blocks".  The rule never starts a generation before
the generation has a point besides its base, nor for a point predicted under 1 % of the
virtual disk (the **floor**): there the costs of a new base that stored bytes do not show (a
full read of the data where a point reads the dirty blocks, a new table 1 and checkpoint)
outweigh what it saves, as on a nearly empty disk where a new base is as small as a point.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import UsageError
from .retention import Policy

__all__ = [
    "CAP_FRACTION",
    "FLOOR_FRACTION",
    "DAYS_PER_MONTH",
    "GenerationCosts",
    "PointCost",
    "Verdict",
    "base_weight",
    "decide",
    "predicted_next",
]

#: A point predicted to hold more than this fraction of the data ends the generation.
CAP_FRACTION = 0.5
#: A point predicted under this fraction of the virtual disk never ends a generation.
FLOOR_FRACTION = 0.01
#: Mean length of a calendar month (a monthly bucket), in days.
DAYS_PER_MONTH = 30.44


@dataclass(frozen=True)
class PointCost:
    """One point of the generation still in the pool (not its base).

    ``index`` counts backups since the generation's first point: the point number minus
    the generation's ``first_point`` (FORMAT §3, §4), so 1 is the backup after the base.
    ``stored_bytes`` is what the point stores: its blocks that differ from table 1.
    """

    index: int
    stored_bytes: int


@dataclass(frozen=True)
class GenerationCosts:
    """What the pool says about the current generation, summed over its disks.

    ``base_bytes``: stored bytes of the base volumes (the data at the first point).
    ``points``: the generation's later points still in the pool, any order.
    ``data_bytes``: what a new base would store now (the disks' data, not their virtual
    size); None means "as the current base".
    ``interval_days``: typical time between two backups of the domain (for the
    retention's weight); ``changed_fraction``: the newest point's changed blocks over the
    virtual disk's blocks, the highest over the disks (only for an explicit threshold).
    ``virtual_bytes``: the disks' virtual size, for the floor (None: no floor).
    """

    base_bytes: int
    points: Sequence[PointCost] = ()
    data_bytes: int | None = None
    interval_days: float = 1.0
    changed_fraction: float = 0.0
    virtual_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.base_bytes < 0 or (self.data_bytes is not None and self.data_bytes < 0):
            raise UsageError("generation policy: sizes must be >= 0")
        if not self.interval_days > 0:
            raise UsageError(f"generation policy: interval must be > 0 days, "
                             f"not {self.interval_days!r}")
        seen = set()
        for p in self.points:
            if p.index < 1 or p.stored_bytes < 0:
                raise UsageError(f"generation policy: bad point {p!r}")
            if p.index in seen:
                raise UsageError(f"generation policy: point index {p.index} appears twice")
            seen.add(p.index)

    @property
    def new_base_bytes(self) -> int:
        return self.base_bytes if self.data_bytes is None else self.data_bytes


@dataclass(frozen=True)
class Verdict:
    """The decision, with the figures behind it (for the log line and ``--json``)."""

    start: bool
    reason: str
    predicted_bytes: int = 0
    average_bytes: float = 0.0
    base_weight: float = 1.0


def base_weight(retention: Policy | None, interval_days: float = 1.0) -> float:
    """How much longer a base is kept than an average point: horizon / (kept x interval).

    The horizon is the age of the oldest point the retention can keep; the points kept
    are the sum of its counts (rules overlap, so this errs towards a lighter base).  At
    least 1: a base is never kept for less time than a point of its generation.
    """
    if retention is None:
        return 1.0
    d = interval_days
    spans = {"keep_last": d, "keep_daily": max(d, 1.0), "keep_weekly": max(d, 7.0),
             "keep_monthly": max(d, DAYS_PER_MONTH), "keep_hourly": max(d, 1 / 24),
             "keep_yearly": max(d, 365.25)}
    counts = {k: v for k, v in retention.counts().items() if v}
    kept = sum(counts.values())
    if kept == 0:
        return 1.0
    horizon = max(spans[k] * v for k, v in counts.items())
    return max(1.0, horizon / (kept * d))


def predicted_next(costs: GenerationCosts) -> tuple[int, int]:
    """(index, stored bytes) of the next point if the generation goes on.

    The growth per backup is taken between the two newest points left, or between the
    base (0 bytes at index 0) and the only one; it is never negative.
    """
    pts = sorted(costs.points, key=lambda p: p.index)
    if not pts:
        return 1, 0
    last = pts[-1]
    prev = pts[-2] if len(pts) > 1 else PointCost(0, 0)
    growth = max(0, last.stored_bytes - prev.stored_bytes) / (last.index - prev.index)
    return last.index + 1, round(last.stored_bytes + growth)


def _points_total(costs: GenerationCosts) -> float:
    """Stored bytes of every point of the generation so far, pruned ones interpolated."""
    known = [(0, 0), *sorted((p.index, p.stored_bytes) for p in costs.points)]
    total = 0.0
    for (i0, b0), (i1, b1) in zip(known, known[1:]):
        # points i0+1 .. i1 on the line from (i0, b0) to (i1, b1): i1 known, the rest not
        gap = i1 - i0
        total += gap * b0 + (b1 - b0) * (gap + 1) / 2
    return total


def decide(costs: GenerationCosts, retention: Policy | None = None, *,
           threshold: float | None = None, force: bool = False) -> Verdict:
    """Whether the next backup starts a new generation, and why."""
    if force:
        return Verdict(True, "asked for")
    if threshold is not None:
        if not 0.0 < threshold <= 1.0:
            raise UsageError(f"the new-generation threshold must be in (0, 1], not {threshold}")
        over = costs.changed_fraction > threshold
        return Verdict(over, (f"the newest point changed {costs.changed_fraction:.1%} of the "
                              f"disk, {'over' if over else 'within'} the threshold "
                              f"{threshold:g}"))
    if not costs.points:
        return Verdict(False, "the generation has no point besides its base")
    index, nxt = predicted_next(costs)
    w = base_weight(retention, costs.interval_days)
    average = (w * costs.base_bytes + _points_total(costs)) / index
    cap = CAP_FRACTION * costs.new_base_bytes
    if costs.virtual_bytes is not None and nxt < FLOOR_FRACTION * costs.virtual_bytes:
        return Verdict(False, (f"the next point would store about {nxt} bytes, under "
                               f"{FLOOR_FRACTION:g} of the virtual disk"), nxt, average, w)
    if nxt > cap and costs.new_base_bytes > 0:
        return Verdict(True, (f"the next point would store about {nxt} bytes, over "
                              f"{CAP_FRACTION:g} of the data ({costs.new_base_bytes})"),
                       nxt, average, w)
    if nxt > average:
        return Verdict(True, (f"the next point would store about {nxt} bytes, more than the "
                              f"generation's average of {average:.0f} per point "
                              f"(base weighted {w:.1f})"), nxt, average, w)
    return Verdict(False, (f"the next point would store about {nxt} bytes, within the "
                           f"generation's average of {average:.0f} per point "
                           f"(base weighted {w:.1f})"), nxt, average, w)
