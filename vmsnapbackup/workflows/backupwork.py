"""What a backup carries per disk while it runs, and what it reports when it is done."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapters.domainxml import Disk
from ..adapters.storagedaemon import Export
from ..core.checktable import CheckTable
from ..core.difftable import DifferenceTable
from .diskpass import PassStats

__all__ = ["BackupResult", "DiskResult", "DiskWork", "full_read_reason"]


@dataclass
class DiskResult:
    """One disk of a finished point."""

    target: str
    source: str
    format: str
    virtual_size: int
    volume: str
    blocks: dict[str, int]
    bytes_written: int
    seconds: dict[str, float]
    #: why every backup reads this disk in full (a raw image or a block device), or None
    full_read: str | None = None
    #: bytes the pass read from the frozen image (the monitored I/O on the hypervisor)
    bytes_read: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class BackupResult:
    """What ``backup`` did: the point it sealed and how each disk went."""

    domain: str
    uuid: str
    point: int
    generation: int
    new_generation: bool
    consistency: str
    pool: str
    disks: list[DiskResult] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def bytes_read(self) -> int:
        return sum(d.bytes_read for d in self.disks)

    @property
    def bytes_written(self) -> int:
        return sum(d.bytes_written for d in self.disks)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["disks"] = [x.to_dict() for x in self.disks]
        d["skipped"] = [{"target": t, "reason": r} for t, r in self.skipped]
        return d


def full_read_reason(disk: Disk) -> str | None:
    """Why each backup of ``disk`` reads all of it, not only what changed (None: it need not).

    A dirty bitmap lives in a qcow2 image; a raw file has none (only its holes are
    skipped), and a raw block device has no holes either: it is read whole.
    """
    if (disk.format or "raw") == "qcow2":
        return None
    if disk.type == "block":
        return "raw block device: every backup reads the whole device"
    return "raw image: no dirty bitmap, every backup reads all its data"


@dataclass
class DiskWork:
    """Per-disk state while the backup runs."""

    disk: Disk
    image: str = ""              # what is read: the frozen image, or the image of a shut-off domain
    image_format: str = "raw"
    overlay: str | None = None
    size: int = 0
    source_export: Export | None = None
    volume_partial: Path | None = None
    volume_final: Path | None = None
    table1: CheckTable | None = None   # the generation's first table (None: new generation)
    table: CheckTable | None = None    # this point's check table, built by the pass
    difference: DifferenceTable | None = None   # table against table1 (None: new generation)
    stats: PassStats | None = None
    commit_seconds: float = 0.0
    dirty_bitmap: str | None = None    # the bitmap the pass trusted to skip reads

    def result(self, volume: str) -> DiskResult:
        """This disk's line of the :class:`BackupResult` (``volume`` relative to the pool)."""
        s = self.stats
        return DiskResult(
            target=self.disk.target, source=self.disk.source or "",
            format=self.disk.format or "raw", virtual_size=self.size, volume=volume,
            blocks={"total": s.total, "read": s.read, "holes": s.holes,
                    "unchanged": s.unchanged, "changed": s.changed,
                    "zero": s.zero} if s else {},
            bytes_written=s.bytes_written if s else 0,
            bytes_read=s.bytes_read if s else 0,
            seconds={"read": round(s.seconds, 3) if s else 0.0,
                     "commit": round(self.commit_seconds, 3)},
            full_read=full_read_reason(self.disk))
