"""Which generation a backup point belongs to: continue the current one, or start anew.

A point is a difference against its generation's FIRST check table, so a
generation can only continue while that table still describes the same disks
(same targets, block size and sizes).  Past that, whether continuing is worth
it is :func:`..core.genpolicy.decide`'s call, fed here from what the pool
records of the current generation: the stored bytes of its base and of its
points still kept, the data a new base would store, the interval between
backups (FORMAT §4, docs/generations.md §6).  The decision is taken twice per
backup: once before the snapshot, without disk sizes, to know whether the new
generation needs a checkpoint; once with the exported sizes, for good.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from ..core.genpolicy import GenerationCosts, PointCost, Verdict, decide
from ..core.manifest import GenerationRecord, PointManifest
from ..core.pool import DomainStore
from ..core.retention import Policy
from ..core.timefmt import parse_timestamp
from ..errors import VmSnapBackupError

__all__ = ["CurrentGeneration", "base_files_bytes", "generation_costs",
           "new_generation_reason", "read_current"]

log = logging.getLogger(__name__)

SECONDS_PER_DAY = 86400.0


@dataclass(frozen=True)
class CurrentGeneration:
    """The generation a backup may continue, read once: the pool lock keeps it still."""

    number: int | None = None
    record: GenerationRecord | None = None
    unreadable: str | None = None          # why the record could not be read
    sealed: Sequence[PointManifest] = field(default=())   # its sealed points, oldest first
    base_files_bytes: int = 0              # allocated bytes of its base volume files

    @property
    def latest(self) -> PointManifest | None:
        """Its newest sealed point."""
        return self.sealed[-1] if self.sealed else None

    @property
    def checkpoint(self) -> str | None:
        return self.record.checkpoint if self.record is not None else None


def read_current(store: DomainStore) -> CurrentGeneration:
    """The current generation's record and sealed points, read once per backup."""
    number = store.current_generation()
    if number is None:
        return CurrentGeneration()
    try:
        record = store.read_generation(number)
    except VmSnapBackupError as exc:
        return CurrentGeneration(number, unreadable=str(exc))
    sealed = [p.manifest for p in store.points()
              if p.manifest is not None and p.manifest.generation == number]
    return CurrentGeneration(number, record, sealed=sealed,
                             base_files_bytes=base_files_bytes(store, number, record))


def base_files_bytes(store: DomainStore, number: int, record: GenerationRecord) -> int:
    """What the base volumes occupy on disk: the base's cost once prune removed the
    generation's first manifest (the base stays as long as any point of it)."""
    total = 0
    for target, disk in record.disks.items():
        try:
            st = os.stat(store.disk_dir(number, target) / disk.base)
        except (OSError, VmSnapBackupError):
            continue
        total += min(st.st_size, st.st_blocks * 512)
    return total


def generation_costs(current: CurrentGeneration) -> GenerationCosts:
    """The policy's inputs from the current generation's manifests (docs/generations.md §6)."""
    rec = current.record
    assert rec is not None
    first = next((m for m in current.sealed if m.point == rec.first_point), None)
    base = (sum(d.bytes_written for d in first.disks) if first is not None
            else current.base_files_bytes)
    points = [PointCost(m.point - rec.first_point, sum(d.bytes_written for d in m.disks))
              for m in current.sealed if m.point > rec.first_point]
    latest = current.latest
    data: int | None = None
    changed = 0.0
    virtual = sum(d.virtual_size for d in rec.disks.values())
    if latest is not None:
        # a pass through the dirty bitmap counts holes only where it read: the data is
        # known from the newest full pass of the generation (its base, when kept)
        full = [m for m in current.sealed if not any(d.blocks.unchanged for d in m.disks)]
        if full:
            data = sum((d.blocks.total - d.blocks.holes) * d.block_size for d in full[-1].disks)
        changed = max((d.blocks.changed / max(d.blocks.total, 1) for d in latest.disks),
                      default=0.0)
    return GenerationCosts(base_bytes=base, points=points, data_bytes=data,
                           interval_days=_interval_days(current, rec), changed_fraction=changed,
                           virtual_bytes=virtual)


def _interval_days(current: CurrentGeneration, rec: GenerationRecord) -> float:
    """Mean time between backups of the generation: its first to its newest point over
    their distance in points (1 day when it cannot tell)."""
    latest = current.latest
    first_time = rec.created
    if latest is None or latest.point <= rec.first_point:
        return 1.0
    try:
        t0 = parse_timestamp(first_time)
        t1 = parse_timestamp(latest.snapshot_at or latest.started)
    except (ValueError, VmSnapBackupError):
        return 1.0
    days = (t1 - t0).total_seconds() / SECONDS_PER_DAY / (latest.point - rec.first_point)
    return days if days > 0 else 1.0


def new_generation_reason(current: CurrentGeneration, *, force: bool, targets: AbstractSet[str],
                          block_size: int, threshold: float | None,
                          sizes: Mapping[str, int] | None,
                          retention: Policy | None = None) -> str | None:
    """Why a new generation starts, or None: continue ``current`` (its record is readable).

    ``sizes`` (target -> virtual size) None leaves out the one reason that
    needs the exports (a resized disk): the verdict before the snapshot.
    ``threshold`` None lets the cost policy decide; a fraction is the older rule.
    """
    if force:
        return "asked for"
    number, rec = current.number, current.record
    if number is None:
        return "first backup"
    if rec is None:
        return f"generation {number} is unreadable: {current.unreadable}"
    if set(rec.disks) != set(targets):
        return (f"disks changed ({', '.join(sorted(rec.disks))} -> "
                f"{', '.join(sorted(targets))})")
    if rec.block_size != block_size:
        return f"block size changed ({rec.block_size} -> {block_size})"
    for target, size in (sizes or {}).items():
        if rec.disks[target].virtual_size != size:
            return (f"disk {target} was resized "
                    f"({rec.disks[target].virtual_size} -> {size} bytes)")
    verdict = policy_verdict(current, threshold=threshold, retention=retention)
    if verdict.start:
        return verdict.reason
    if sizes is not None:   # the final verdict: say why the generation goes on
        log.info("continuing generation %d: %s", number, verdict.reason)
    return None


def policy_verdict(current: CurrentGeneration, *, threshold: float | None,
                   retention: Policy | None) -> Verdict:
    """The cost policy's verdict on continuing ``current`` (its record readable)."""
    latest = current.latest
    if (latest is None or latest.is_generation_start) and threshold is not None:
        # the older rule never ends a generation on its base alone
        return Verdict(False, "the generation has no point besides its base")
    return decide(generation_costs(current), retention, threshold=threshold)
