"""Which generation a backup point belongs to: continue the current one, or start anew.

A point is a difference against its generation's FIRST check table, so a
generation can only continue while that table still describes the same disks
(same targets, block size and sizes) and while differences stay small enough
to be worth it (FORMAT §4).  The decision is taken twice per backup: once
before the snapshot, without disk sizes, to know whether the new generation
needs a checkpoint; once with the exported sizes, for good.
"""
from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from ..core.manifest import GenerationRecord, PointManifest
from ..core.pool import DomainStore
from ..errors import VmSnapBackupError

__all__ = ["CurrentGeneration", "new_generation_reason", "read_current"]


@dataclass(frozen=True)
class CurrentGeneration:
    """The generation a backup may continue, read once: the pool lock keeps it still."""

    number: int | None = None
    record: GenerationRecord | None = None
    unreadable: str | None = None          # why the record could not be read
    latest: PointManifest | None = None    # its newest sealed point

    @property
    def checkpoint(self) -> str | None:
        return self.record.checkpoint if self.record is not None else None


def read_current(store: DomainStore) -> CurrentGeneration:
    """The current generation's record and newest point, read once per backup."""
    number = store.current_generation()
    if number is None:
        return CurrentGeneration()
    try:
        record = store.read_generation(number)
    except VmSnapBackupError as exc:
        return CurrentGeneration(number, unreadable=str(exc))
    sealed = [p.manifest for p in store.points()
              if p.manifest is not None and p.manifest.generation == number]
    return CurrentGeneration(number, record, latest=sealed[-1] if sealed else None)


def new_generation_reason(current: CurrentGeneration, *, force: bool, targets: AbstractSet[str],
                          block_size: int, threshold: float,
                          sizes: Mapping[str, int] | None) -> str | None:
    """Why a new generation starts, or None: continue ``current`` (its record is readable).

    ``sizes`` (target -> virtual size) None leaves out the one reason that
    needs the exports (a resized disk): the verdict before the snapshot.
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
    latest = current.latest
    if latest is not None and not latest.is_generation_start:
        for d in latest.disks:
            total = max(d.blocks.total, 1)
            if d.blocks.changed / total > threshold:
                return (f"point {latest.point} changed {d.blocks.changed} of "
                        f"{d.blocks.total} blocks of {d.target}, over the threshold "
                        f"{threshold:g}")
    return None
