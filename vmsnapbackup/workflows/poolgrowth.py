"""How a domain's part of the pool grows, for ``status`` and the metrics (issue 19).

A pool whose generations never end grows quadratically (docs/generations.md §1), and
nothing fails while it does: every backup succeeds, only the disk fills months later.
Monitoring sees it coming here, from the manifests alone: the domain's stored bytes,
what the newest point added per backup, the size the policy predicts for the next
point, and whether the current generation went on past where the generation policy
(core.genpolicy) would have ended it, as it does when backups use an explicit
``--threshold`` (a job's ``threshold``) that never fires on a sparse disk.

"Past the policy" is judged on the newest point, with the costs the backup that took it
saw (the generation before it): the policy's limit for that point is the generation's
average cost per point (its base weighted by the retention), or half the data when that
is lower.  The newest point storing more than :data:`GROWTH_SLACK` times that limit is a
warning: the slack keeps a prune that removed points between two backups (the policy
interpolates them) from turning one backup's honest verdict into an alarm.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

from ..adapters.storagepool import resolve_pool
from ..core.defaults import DEFAULT_URI
from ..core.genpolicy import CAP_FRACTION, FLOOR_FRACTION, base_weight, decide
from ..core.pool import DomainStore, Pool
from ..core.retention import Policy
from ..errors import VmSnapBackupError
from .generation import generation_costs, read_current
from .listing import PointSummary, list_points

__all__ = ["GROWTH_SLACK", "PoolGrowth", "pool_growth"]

#: The newest point may store this many times the policy's limit before it is a warning.
GROWTH_SLACK = 1.5


@dataclass(frozen=True)
class PoolGrowth:
    """One domain's part of the pool and how it grows (sizes in stored bytes)."""

    points: int = 0                         # good points in the pool
    stored_bytes: int = 0                   # what they store (bases included)
    data_bytes: int | None = None           # the data a new base would store now
    generation: int | None = None           # the current generation
    generation_bytes: int = 0               # what it stores: its base plus its points kept
    growth_bytes: int | None = None         # what the newest point added per backup
    predicted_next_bytes: int | None = None  # the next point, if the generation goes on
    policy_limit_bytes: int | None = None   # the policy's limit for the newest point
    over_policy: bool = False               # the newest point exceeds the limit (x slack)
    reason: str | None = None               # why over_policy, in words

    def to_record(self) -> dict[str, Any]:
        """The state record's ``pool`` entry (docs/JOBS.md), numbers only where known."""
        return {k: (int(v) if isinstance(v, bool) else v) for k, v in self.__dict__.items()
                if v is not None and k != "reason"}


def pool_growth(pool: str | os.PathLike[str], domain: str, *, uri: str = DEFAULT_URI,
                retention: Policy | None = None,
                points: list[PointSummary] | None = None) -> PoolGrowth:
    """``domain``'s growth in ``pool``; ``retention`` weighs the base as backup does.

    ``points`` are the domain's listed points when the caller has them already.
    """
    if points is None:
        points = list_points(pool, uri=uri, domain=domain)
    good = [p for p in points if p.damaged is None]
    if not good:
        return PoolGrowth()
    newest = max(good, key=lambda p: p.point)
    gens: dict[int, int] = {}
    for p in good:
        if p.generation is not None:
            gens[p.generation] = p.generation_bytes
    growth = PoolGrowth(
        points=len(good), stored_bytes=sum(gens.values()),
        generation=newest.generation, generation_bytes=newest.generation_bytes,
        growth_bytes=None if newest.generation_start else newest.growth_bytes,
        predicted_next_bytes=newest.predicted_next_bytes)
    try:
        pool_dir, _ = resolve_pool(os.fspath(pool), uri)   # list_points found it
        store = Pool.open(pool_dir).find_domain(domain)
        return _judge(store, growth, newest, retention)
    except VmSnapBackupError:
        return growth


def _judge(store: DomainStore, growth: PoolGrowth, newest: PointSummary,
           retention: Policy | None) -> PoolGrowth:
    """Hold the newest point against the limit the policy set for it."""
    current = read_current(store)
    if current.record is None or not current.sealed:
        return growth
    now = generation_costs(current)
    growth = replace(growth, data_bytes=now.data_bytes)
    if newest.generation_start or current.latest is None or \
            current.latest.point != newest.point or len(current.sealed) < 2:
        return growth
    before = generation_costs(replace(current, sealed=current.sealed[:-1]))
    if not before.points:
        return growth   # the newest point is the first after the base: the policy goes on
    verdict = decide(before, retention)
    cap = CAP_FRACTION * before.new_base_bytes
    limit = min(verdict.average_bytes, cap) if cap > 0 else verdict.average_bytes
    if before.virtual_bytes is not None:
        limit = max(limit, FLOOR_FRACTION * before.virtual_bytes)
    stored = newest.stored_bytes
    growth = replace(growth, policy_limit_bytes=round(limit))
    if stored > GROWTH_SLACK * limit:
        w = base_weight(retention, before.interval_days)
        growth = replace(growth, over_policy=True, reason=(
            f"generation {growth.generation} grows past the generation policy: point "
            f"{newest.point} stores {stored} bytes, over {GROWTH_SLACK:g} x the "
            f"{round(limit)} the policy allows it (base weighted {w:.1f}); a backup with "
            "--new-generation or a rebase starts a new one"))
    return growth
