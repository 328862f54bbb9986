"""Prune: remove the points a retention policy does not keep (FORMAT.md §10 removal order).

What makes a prune safe to run from cron next to backups:

* it holds the domain's lock for its whole run (``DomainStore.lock("prune")``), so it
  never runs beside a backup or a repair; a held lock fails at once (LockedError),
  it never waits;
* it refuses while a journal exists: a dead backup's files are not yet sorted into
  "sealed" and "leftover", and removing a base under them would turn a repairable
  state into a lost one (RepairNeededError: run ``repair`` first);
* a point is removed by :meth:`DomainStore.remove_point`: its manifest first (from
  then on it does not exist for any reader), then its own files, then its
  generation's base volume only when no point of that generation is left;
* damaged manifests are never removed here: they are kept and reported, so that a
  person (``verify``, ``repair``) decides about them, and they keep protecting their
  generation's base;
* a point whose removal would delete a file some process holds open (a ``mount``
  export, an instant-recovery ``boot`` daemon, a restore's ``qemu-img``) is kept and
  reported as in use: removing it would free nothing until that process ends and
  would break the boot domain at its next start.  A point's own volume counts; a
  base volume only when the whole generation would go (then its first point stays).
  The check reads ``/proc/*/fd``; it sees every process only when run as root (as a
  prune of a root-owned pool is), and a mount started after it is not seen.

``dry_run`` takes the lock and makes the same checks, so it answers exactly "what
would a prune do now"; it removes nothing and estimates the files and bytes from
the same rules ``remove_point`` applies.

The policy itself is :mod:`vmsnapbackup.core.retention` (pure); a point's time is
its snapshot time in the host's local time zone, so "daily" means the admin's days.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapters.openfiles import files_held_open
from ..adapters.storagepool import refresh_pool, resolve_pool
from ..core import defaults
from ..core.manifest import PointManifest, parse_timestamp
from ..core.pool import (
    DomainStore,
    PointInfo,
    Pool,
    difference_name,
    partial_name,
    point_volume_name,
)
from ..core.retention import Policy, decide
from ..errors import RepairNeededError
from .drylock import looking

__all__ = [
    "REASON_DAMAGED",
    "REASON_IN_USE",
    "REASON_REMOVED",
    "PruneReport",
    "PrunedPoint",
    "prune",
]

log = logging.getLogger(__name__)

REASON_DAMAGED = "damaged"
REASON_IN_USE = "in use"
REASON_REMOVED = "not kept by any rule"


@dataclass
class PrunedPoint:
    """One point in a prune report: kept (with the rules that kept it) or removed."""

    number: int
    generation: int | None
    taken: str | None
    reasons: list[str] = field(default_factory=list)
    damaged: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class PruneReport:
    """What a prune kept, removed (or, with ``dry_run``, would remove) and freed.

    ``files_removed`` and ``bases_removed`` are relative to the domain's directory
    in the pool; ``bytes_freed`` counts allocated bytes (``st_blocks``), which is
    what the filesystem gets back.
    """

    domain: str
    uuid: str
    pool: str
    dry_run: bool
    policy: dict[str, int | None]
    kept: list[PrunedPoint] = field(default_factory=list)
    removed: list[PrunedPoint] = field(default_factory=list)
    bytes_freed: int = 0
    files_removed: list[str] = field(default_factory=list)
    bases_removed: list[str] = field(default_factory=list)
    generations_removed: list[int] = field(default_factory=list)

    @property
    def damaged(self) -> list[PrunedPoint]:
        return [p for p in self.kept if p.damaged is not None]

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in ("kept", "removed")}
        d["kept"] = [p.to_dict() for p in self.kept]
        d["removed"] = [p.to_dict() for p in self.removed]
        d["damaged"] = [p.number for p in self.damaged]
        return d


def prune(
    domain: str,
    pool: str | os.PathLike[str] | Pool,
    *,
    uri: str = defaults.DEFAULT_URI,
    keep_last: int | None = None,
    keep_daily: int | None = None,
    keep_weekly: int | None = None,
    keep_monthly: int | None = None,
    dry_run: bool = False,
    keep_hourly: int | None = None,
    keep_yearly: int | None = None,
) -> PruneReport:
    """Apply a retention policy to ``domain``'s points in ``pool``.

    ``domain`` is a name or UUID as recorded in the pool (the domain need not exist
    in libvirt any more); ``pool`` a directory, a libvirt storage pool name or an
    open :class:`Pool`.  At least one ``keep_*`` is required (UsageError).
    """
    policy = Policy(keep_last, keep_daily, keep_weekly, keep_monthly,  # validates first
                    keep_hourly, keep_yearly)
    libvirt_pool: str | None = None
    if isinstance(pool, Pool):
        the_pool = pool
    else:
        pool_dir, libvirt_pool = resolve_pool(os.fspath(pool), uri)
        the_pool = Pool.open(pool_dir)
    store = the_pool.find_domain(domain)
    # a dry run only looks: no lock file created or noted, works on a read-only pool
    with looking(store) if dry_run else store.lock("prune"):
        entry = store.journal.read()
        if entry is not None:
            raise RepairNeededError(
                f"an interrupted backup left a journal; run repair first "
                f"(domain {store.name}: {entry.operation} by pid {entry.pid} since "
                f"{entry.started}; vmsnapbackup --pool {the_pool.root} repair {store.name})")
        report = _run(store, the_pool, policy, dry_run)
    if not dry_run and report.files_removed:
        refresh_pool(libvirt_pool, uri)
    return report


def _run(store: DomainStore, pool: Pool, policy: Policy, dry_run: bool) -> PruneReport:
    infos = store.list_points()
    report = PruneReport(domain=store.name, uuid=store.uuid, pool=str(pool.root),
                         dry_run=dry_run, policy=policy.to_dict())
    valid = [i for i in infos if i.manifest is not None]
    taken = {i.number: _taken(i) for i in valid}
    decisions = {d.number: d for d in decide([(i.number, taken[i.number][0]) for i in valid],
                                             policy)}
    in_use = _points_in_use(store, valid,
                            {n for n, d in decisions.items() if not d.keep})
    remove: list[PointInfo] = []
    for info in infos:
        if info.manifest is None:
            log.warning("domain %s: point %d is damaged (%s); keeping it for verify/repair",
                        store.name, info.number, info.damaged)
            report.kept.append(PrunedPoint(info.number, None, None,
                                           [f"{REASON_DAMAGED}: {info.damaged}"],
                                           damaged=info.damaged))
            continue
        m = info.manifest
        point = PrunedPoint(m.point, m.generation, taken[info.number][1],
                            list(decisions[info.number].reasons))
        if not decisions[info.number].keep and info.number in in_use:
            point.reasons.append(f"{REASON_IN_USE}: {in_use[info.number]}")
            log.warning("domain %s: point %d is in use (%s); keeping it", store.name,
                        info.number, in_use[info.number])
        if point.reasons:
            report.kept.append(point)
        else:
            point.reasons.append(REASON_REMOVED)
            report.removed.append(point)
            remove.append(info)
    if dry_run:
        _plan(store, infos, remove, report)
    else:
        _remove(store, remove, report)
    return report


def _taken(info: PointInfo) -> tuple[_dt.datetime, str]:
    """When a point was taken: its snapshot time (else its start), in local time."""
    assert info.manifest is not None
    text = info.manifest.snapshot_at or info.manifest.started
    return parse_timestamp(text).astimezone(), text


# --- removal ---------------------------------------------------------------------------------

def _allocated(path: Path) -> int:
    try:
        st = path.lstat()
    except OSError:
        return 0
    return st.st_blocks * 512 if path.is_file() else 0


def _remove(store: DomainStore, remove: list[PointInfo], report: PruneReport) -> None:
    """Oldest first, so an interrupted prune leaves the newer points, as a re-run would."""
    for info in sorted(remove, key=lambda i: i.number):
        sizes = _sizes_of_candidates(store, info)
        removed = store.remove_point(info.number)
        log.info("domain %s: removed point %d", store.name, info.number)
        for path in removed:
            _account(store, path, sizes.get(path), report)


def _sizes_of_candidates(store: DomainStore, info: PointInfo) -> dict[Path, int]:
    """Allocated sizes of every file ``remove_point`` may remove, taken before it does."""
    sizes: dict[Path, int] = {info.path: _allocated(info.path)}
    assert info.manifest is not None
    gdir = store.generation_dir(info.manifest.generation)
    for root, _dirs, files in os.walk(gdir):
        for name in files:
            p = Path(root) / name
            sizes[p] = _allocated(p)
    return sizes


def _account(store: DomainStore, path: Path, size: int | None,
             report: PruneReport) -> None:
    """Add one removed path to the report; ``size`` None means it was a directory."""
    rel = store.relpath(path)
    parts = Path(rel).parts
    if size is None:
        if len(parts) == 2 and parts[0] == "generations":
            report.generations_removed.append(int(parts[1]))
        return
    if path.name.startswith("base.") and not path.name.endswith(".partial"):
        report.bases_removed.append(rel)
    report.files_removed.append(rel)
    report.bytes_freed += size


def _plan(store: DomainStore, infos: list[PointInfo], remove: list[PointInfo],
          report: PruneReport) -> None:
    """What :meth:`DomainStore.remove_point` would remove, without removing it.

    Mirrors its rules: the manifest, the point's own volumes and difference tables
    (and their ``.partial`` names), and a generation's whole directory once no
    manifest of that generation -- valid or damaged -- is left.
    """
    removing = {i.number for i in remove}
    protected = _generations_still_referenced(store, infos, removing)
    emptied: set[int] = set()
    for info in sorted(remove, key=lambda i: i.number):
        assert info.manifest is not None
        g = info.manifest.generation
        _account(store, info.path, _allocated(info.path), report)
        gdir = store.generation_dir(g)
        for ddir in sorted(p for p in _children(gdir) if p.is_dir()):
            for name in (point_volume_name(info.number), difference_name(info.number)):
                for f in (ddir / name, ddir / partial_name(name)):
                    if f.is_file():
                        _account(store, f, _allocated(f), report)
        if protected is not None and g not in protected and g not in emptied:
            emptied.add(g)
    for g in sorted(emptied):
        gdir = store.generation_dir(g)
        already = set(report.files_removed)
        for root, _dirs, files in os.walk(gdir):
            for name in sorted(files):
                f = Path(root) / name
                if store.relpath(f) not in already:
                    _account(store, f, _allocated(f), report)
        _account(store, gdir, None, report)


def _children(path: Path) -> list[Path]:
    try:
        return [path / n for n in os.listdir(path)]
    except OSError:
        return []


def _generations_still_referenced(store: DomainStore, infos: list[PointInfo],
                                  removing: set[int]) -> set[int] | None:
    """Generations a point left after the prune refers to; None when a damaged
    manifest's generation cannot be told (then no generation may go)."""
    used: set[int] = set()
    for info in infos:
        if info.number in removing:
            continue
        if info.manifest is not None:
            used.add(info.manifest.generation)
            continue
        found = _damaged_generations(store, info)
        if not found:
            return None
        used.update(found)
    return used


def _damaged_generations(store: DomainStore, info: PointInfo) -> set[int]:
    """Where a damaged point's files are, and what its ``generation`` field still says."""
    found: set[int] = set()
    try:
        obj = json.loads(info.path.read_bytes())
        g = obj.get("generation") if isinstance(obj, dict) else None
        if type(g) is int and g >= 1:
            found.add(g)
    except (OSError, ValueError):
        pass
    for g in store.generations():
        for ddir in _children(store.generation_dir(g)):
            for name in (point_volume_name(info.number), difference_name(info.number)):
                if (ddir / name).exists() or (ddir / partial_name(name)).exists():
                    found.add(g)
    return found


# --- points held open by a process -------------------------------------------------------------

def _points_in_use(store: DomainStore, valid: list[PointInfo],
                   removing: set[int]) -> dict[int, str]:
    """Points to be removed whose removal would delete a file some process holds open,
    with ``pid N (command)`` of such a process.

    A point's own volume counts always; a base volume only when every point of its
    generation is to be removed (otherwise the base stays anyway): then the
    generation's first point (whose volume is the base), or its newest point, is kept.
    """
    holders = files_held_open()
    if not holders:
        return {}
    users: dict[int, str] = {}
    by_generation: dict[int, list[tuple[PointInfo, PointManifest]]] = {}
    for info in valid:
        assert info.manifest is not None
        by_generation.setdefault(info.manifest.generation, []).append((info, info.manifest))
        if info.number not in removing:
            continue
        for d in info.manifest.disks:
            path = _real(store.resolve(d.volume))
            if not d.is_base and path in holders:
                users.setdefault(info.number, holders[path])
    for _gen, points in sorted(by_generation.items()):
        if any(i.number not in removing or i.number in users for i, _ in points):
            continue  # a point of the generation stays, and with it the base
        holder = next((holders[b] for b in (_real(store.resolve(d.base))
                                            for _, m in points for d in m.disks)
                       if b in holders), None)
        if holder is not None:
            keeper = next((i for i, m in points if m.is_generation_start), points[-1][0])
            users[keeper.number] = holder
    return users


def _real(path: Path) -> str:
    try:
        return os.path.realpath(path)
    except OSError:
        return os.fspath(path)
