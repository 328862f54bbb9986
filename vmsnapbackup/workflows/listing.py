"""What the pool holds, for ``list``: read from the manifests only (FORMAT §10 read order),
so listing never needs libvirt and never shows a half-written point."""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..adapters.storagepool import resolve_pool
from ..core.defaults import DEFAULT_URI
from ..core.genpolicy import GenerationCosts, PointCost, predicted_next
from ..core.manifest import PointDisk
from ..core.pool import DomainStore, Pool
from ..errors import NotFoundError, VmSnapBackupError
from .generation import base_files_bytes

__all__ = ["PointSummary", "list_points", "pending_repairs"]


@dataclass
class PointSummary:
    domain: str
    uuid: str
    point: int
    generation: int | None = None
    taken: str | None = None
    consistency: str | None = None
    disks: list[str] = field(default_factory=list)
    virtual_bytes: int = 0
    stored_bytes: int = 0
    generation_start: bool = False
    damaged: str | None = None
    #: what the point's generation stores now: its base plus its points still in the pool
    generation_bytes: int = 0
    #: disks every backup reads in full (raw images, block devices: no dirty bitmap)
    full_read: list[str] = field(default_factory=list)
    #: "zstd" when the point's volumes are compressed (FORMAT §15.1), else None
    compression: str | None = None
    #: size of the point's volume files (None: a manifest from before §15.1)
    volume_bytes: int | None = None
    #: volume_bytes / stored_bytes: what compression (and qcow2 metadata) made of the data
    ratio: float | None = None
    #: stored bytes added per backup since the generation's previous point kept (issue 19)
    growth_bytes: int = 0
    #: on the newest point of a generation: what its next point would store, predicted as
    #: the backup's generation policy does (core.genpolicy.predicted_next)
    predicted_next_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def list_points(pool: str | os.PathLike[str], *, uri: str = DEFAULT_URI,
                domain: str | None = None) -> list[PointSummary]:
    """Every point of ``domain`` (or of every domain), oldest first; damaged ones flagged."""
    the_pool = _open_pool(pool, uri)
    stores = [the_pool.find_domain(domain)] if domain else the_pool.domains()
    out: list[PointSummary] = []
    for store in stores:
        name = store.name
        for info in store.list_points():
            m = info.manifest
            if m is None:
                out.append(PointSummary(name, store.uuid, info.number, damaged=info.damaged))
                continue
            out.append(PointSummary(
                domain=name, uuid=store.uuid, point=m.point, generation=m.generation,
                taken=m.snapshot_at or m.started, consistency=m.consistency,
                disks=[d.target for d in m.disks],
                virtual_bytes=sum(d.virtual_size for d in m.disks),
                stored_bytes=sum(d.bytes_written for d in m.disks),
                generation_start=m.is_generation_start,
                full_read=[d.target for d in m.disks if d.format != "qcow2"],
                **_volume_costs(m.disks)))
        _add_generation_costs(store, [p for p in out if p.uuid == store.uuid])
    return out


def _volume_costs(disks: Sequence[PointDisk]) -> dict[str, Any]:
    """``compression``, ``volume_bytes`` and ``ratio`` of a point, from its manifest."""
    sizes = [d.volume_bytes for d in disks]
    data = sum(d.bytes_written for d in disks)
    if any(v is None for v in sizes):
        return {"compression": disks[0].compression}
    on_disk = sum(v for v in sizes if v is not None)
    return {"compression": disks[0].compression, "volume_bytes": on_disk,
            "ratio": round(on_disk / data, 3) if data else None}


def _add_generation_costs(store: DomainStore, points: list[PointSummary]) -> None:
    """Each point's ``generation_bytes``: its generation's base (the first point's stored
    bytes, or the base files once prune removed that point) plus the later points kept."""
    totals: dict[int, int] = {}
    for gen in {p.generation for p in points if p.generation is not None}:
        mine = [p for p in points if p.generation == gen]
        if any(p.generation_start for p in mine):
            base = 0
        else:
            try:
                base = base_files_bytes(store, gen, store.read_generation(gen))
            except VmSnapBackupError:
                base = 0
        totals[gen] = base + sum(p.stored_bytes for p in mine)
    for p in points:
        if p.generation is not None:
            p.generation_bytes = totals[p.generation]
    _add_growth(store, points)


def _add_growth(store: DomainStore, points: list[PointSummary]) -> None:
    """Per point the growth since the generation's previous kept point (from its base
    at 0 bytes), and on each generation's newest point the predicted next point."""
    for gen in {p.generation for p in points if p.generation is not None}:
        mine = sorted((p for p in points if p.generation == gen and p.damaged is None),
                      key=lambda p: p.point)
        start = next((p.point for p in mine if p.generation_start), None)
        if start is None:
            try:
                start = store.read_generation(gen).first_point
            except VmSnapBackupError:
                continue
        later = [p for p in mine if p.point > start]
        prev_index, prev_bytes = 0, 0
        for p in later:
            index = p.point - start
            p.growth_bytes = round((p.stored_bytes - prev_bytes) / (index - prev_index))
            prev_index, prev_bytes = index, p.stored_bytes
        if mine:
            costs = [PointCost(p.point - start, p.stored_bytes) for p in later]
            mine[-1].predicted_next_bytes = predicted_next(
                GenerationCosts(base_bytes=0, points=costs))[1]


def pending_repairs(pool: str | os.PathLike[str], *, uri: str = DEFAULT_URI,
                    domain: str | None = None) -> list[str]:
    """One line per domain whose backup was interrupted (its journal is still there):
    ``list`` shows it, because the next backup or prune will refuse until repair ran."""
    the_pool = _open_pool(pool, uri)
    stores = [the_pool.find_domain(domain)] if domain else the_pool.domains()
    out = []
    for store in stores:
        entry = store.journal.read()
        if entry is not None:
            out.append(f"domain {store.name}: an interrupted {entry.operation} (pid {entry.pid}, "
                       f"since {entry.started}) needs repair: vmsnapbackup --pool "
                       f"{the_pool.root} repair {store.name}")
    return out


def _open_pool(pool: str | os.PathLike[str], uri: str) -> Pool:
    """The pool to list; a path with nothing there yet is NotFoundError, said plainly
    (``backup`` creates a missing pool, so "create it first" would mislead)."""
    pool_dir, _ = resolve_pool(os.fspath(pool), uri)
    if not pool_dir.exists():
        raise NotFoundError(f"no pool yet at {pool_dir} (the first backup into it creates it)")
    return Pool.open(pool_dir)
