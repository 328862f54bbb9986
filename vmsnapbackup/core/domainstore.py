"""One domain's part of a pool, ``domains/<uuid>/`` (FORMAT.md §1, §3, §4, §7): its
records, its point numbers, generations and points (its paths: :mod:`.domainpaths`).

Mutating methods (``allocate_point``, ``write_*``, ``remove_point``, ``set_name``)
expect the caller to hold the domain's lock (:meth:`DomainStore.lock`); listing and
reading never lock and rely on the write order (§10) instead.  Every record is read
bounded and only from inside the pool (:mod:`.poolread`).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import (
    CorruptFileError,
    IncompatibleFormatError,
    IntegrityError,
    NotFoundError,
    UsageError,
)
from . import removal
from .atomic import atomic_write_bytes, fsync_dir, make_private_dir
from .domainpaths import DomainPaths
from .journal import Journal
from .lock import DomainLock
from .manifest import DomainRecord, GenerationRecord, PointManifest
from .names import manifest_number, numbered, parse_number_name
from .poolread import MAX_GENERATION_RECORD, MAX_MANIFEST, MAX_SMALL_RECORD
from .removal import Leftover
from .removal import listdir as _listdir
from .removal import raise_storage as _raise_storage

__all__ = ["DomainStore", "PointInfo"]

log = logging.getLogger(__name__)


# --- listing results ---------------------------------------------------------------------

@dataclass(frozen=True)
class PointInfo:
    """One entry of :meth:`DomainStore.list_points`.

    Exactly one of ``manifest`` and ``damaged`` is set.  A damaged point is never one
    to restore from; it is listed so that the user sees it (and ``verify``/``repair``
    can report it) rather than have it silently vanish.  ``incompatible`` marks a
    manifest written by a newer format version: not damaged, just unreadable here.
    """

    number: int
    path: Path
    manifest: PointManifest | None = None
    damaged: str | None = None
    incompatible: bool = False

    @property
    def ok(self) -> bool:
        return self.manifest is not None

    @property
    def generation(self) -> int | None:
        return self.manifest.generation if self.manifest else None


# --- one domain --------------------------------------------------------------------------

class DomainStore(DomainPaths):
    """``domains/<uuid>/``: one domain's records, generations and points (its paths:
    :class:`.domainpaths.DomainPaths`)."""

    # records -------------------------------------------------------------------------

    def record(self) -> DomainRecord:
        """``domain.json``; CorruptFileError if missing or damaged."""
        data = self.read_file(self.record_path, MAX_SMALL_RECORD, "domain record")
        if data is None:
            raise CorruptFileError(self.record_path, "missing (the domain directory has no record)")
        rec = DomainRecord.from_json(data, self.record_path)
        if rec.uuid != self.uuid:
            raise CorruptFileError(self.record_path,
                                   f"uuid {rec.uuid} does not match its directory {self.uuid}")
        return rec

    @property
    def name(self) -> str:
        """The domain's latest known name, or its UUID if the record cannot be read
        (for messages: a damaged record must not hide which domain we mean)."""
        try:
            return self.record().name
        except (CorruptFileError, IncompatibleFormatError):
            return self.uuid

    def set_name(self, name: str) -> None:
        """Record a rename (§3: ``name`` follows the domain's latest name).  Under the lock:
        an unlocked rewrite could put back an older ``last_point``."""
        rec = self.record()
        if rec.name != name:
            atomic_write_bytes(self.record_path, replace(rec, name=name).to_json())

    def lock(self, operation: str) -> DomainLock:
        """The domain's lock (not yet taken: use ``with store.lock("backup") as lk``)."""
        return DomainLock(self.lock_path, operation, what=f"domain {self.name} ({self.uuid})")

    @property
    def journal(self) -> Journal:
        return Journal(self.journal_path)

    # point numbers (§3) --------------------------------------------------------------

    def allocate_point(self) -> int:
        """Hand out the next point number, burning it before anything of the point exists.

        Takes one more than the highest number ever seen, in ``domain.json`` and on disk
        (manifests and point-store files, damaged or not), so a number is never reused
        even if ``domain.json`` was restored from an older copy.  Caller holds the lock.
        """
        rec = self.record()
        n = max(rec.last_point, self._highest_number_seen()) + 1
        atomic_write_bytes(self.record_path, replace(rec, last_point=n).to_json())
        log.debug("domain %s: allocated point %d", self.uuid, n)
        return n

    def _highest_number_seen(self) -> int:
        highest = 0
        for name in _listdir(self.points_dir):
            highest = max(highest, manifest_number(name) or 0)
        for g in self.generations():
            for target in _listdir(self.generation_dir(g)):
                for name in _listdir(self.generation_dir(g) / target):
                    k = numbered(name)
                    if k:
                        highest = max(highest, k[1])
        return highest

    # generations (§4) ----------------------------------------------------------------

    def generations(self) -> list[int]:
        """Numbers of the generation directories present, ascending (with or without a
        ``generation.json``: use :meth:`read_generation` to know whether one is usable)."""
        out = []
        for name in _listdir(self.generations_dir):
            n = parse_number_name(name)
            if n is not None and (self.generations_dir / name).is_dir():
                out.append(n)
        return out

    def current_generation(self) -> int | None:
        """The generation of the newest valid point, or None without points.

        Not simply the highest directory: a generation whose first point was never
        sealed is a leftover, not something to add points to.
        """
        good = self.points()
        return good[-1].manifest.generation if good else None  # type: ignore[union-attr]

    def allocate_generation(self, targets: Iterable[str] = ()) -> int:
        """Create the next generation's directory (and its disks' point stores).

        One more than any generation on disk or named by a valid manifest.  Caller holds
        the lock; ``mkdir`` being exclusive still keeps two callers apart.
        """
        used = set(self.generations())
        used.update(p.manifest.generation for p in self.points() if p.manifest)
        g = max(used, default=0) + 1
        make_private_dir(self.generations_dir)
        while True:
            try:
                os.mkdir(self.generation_dir(g), 0o700)
                os.chmod(self.generation_dir(g), 0o700)
                break
            except FileExistsError:
                g += 1
            except OSError as err:
                _raise_storage(err, self.generation_dir(g))
        fsync_dir(self.generations_dir)
        for t in targets:
            make_private_dir(self.disk_dir(g, t))
        return g

    def read_generation(self, generation: int) -> GenerationRecord:
        """``generation.json`` of a generation: NotFoundError if the generation does not
        exist, CorruptFileError if its record is missing or damaged."""
        path = self.generation_record_path(generation)
        data = self.read_file(path, MAX_GENERATION_RECORD, "generation record")
        if data is None:
            if not self.generation_dir(generation).is_dir():
                raise NotFoundError(f"domain {self.name}: no generation {generation}")
            raise CorruptFileError(path, "missing")
        rec = GenerationRecord.from_json(data, path)
        if rec.generation != generation:
            raise CorruptFileError(path, f"says generation {rec.generation}, "
                                   f"but lies in the directory of generation {generation}")
        return rec

    def write_generation(self, record: GenerationRecord) -> Path:
        """Write ``generation.json`` once (§10 step 4): a generation's record never changes,
        so an existing one means a caller bug and is refused."""
        path = self.generation_record_path(record.generation)
        make_private_dir(path.parent)
        for target, disk in record.disks.items():
            for name in (disk.base, disk.table):
                f = self.disk_dir(record.generation, target) / name
                if not f.is_file():
                    raise IntegrityError(f"{f} is missing; refusing to write {path}")
        try:
            atomic_write_bytes(path, record.to_json(), exclusive=True)
        except FileExistsError:
            raise IntegrityError(f"{path} already exists; a generation's record is "
                                 "written once") from None
        return path

    # points (§7) ---------------------------------------------------------------------

    def list_points(self) -> list[PointInfo]:
        """Every manifest file, valid or damaged, by point number.

        Only ``points/<N>.json`` counts: a generation directory, a volume or a
        ``.partial`` file without a manifest is not a point (§10), it is a leftover.
        """
        out = []
        for name in _listdir(self.points_dir):
            n = manifest_number(name)
            if n is None:
                continue
            path = self.points_dir / name
            try:
                out.append(PointInfo(n, path, manifest=self._load_manifest(n, path)))
            except CorruptFileError as err:
                out.append(PointInfo(n, path, damaged=err.reason))
            except IncompatibleFormatError as err:
                out.append(PointInfo(n, path, damaged=str(err), incompatible=True))
            except OSError as err:
                out.append(PointInfo(n, path, damaged=f"cannot read: {err.strerror}"))
        out.sort(key=lambda p: p.number)
        return out

    def points(self) -> list[PointInfo]:
        """The valid points only, oldest first: what may be restored."""
        return [p for p in self.list_points() if p.ok]

    def damaged_points(self) -> list[PointInfo]:
        return [p for p in self.list_points() if not p.ok]

    def read_manifest(self, point: int) -> PointManifest:
        path = self.manifest_path(point)
        if not path.exists():
            raise NotFoundError(f"domain {self.name} has no point {point}")
        return self._load_manifest(point, path)

    def _load_manifest(self, point: int, path: Path) -> PointManifest:
        data = self.read_file(path, MAX_MANIFEST, "point manifest")
        if data is None:
            raise CorruptFileError(path, "vanished while reading")
        m = PointManifest.from_json(data, path)
        if m.point != point:
            raise CorruptFileError(path, f"says point {m.point}, but is named for point {point}")
        if m.domain.uuid != self.uuid:
            raise CorruptFileError(path, f"belongs to domain {m.domain.uuid}, not {self.uuid}")
        return m

    def write_manifest(self, manifest: PointManifest) -> Path:
        """Seal a point: the manifest, atomically and last (§10 step 5).

        Refuses if a file the manifest names is missing (a point that cannot be
        restored must not exist) or if the point already has a manifest.
        """
        if manifest.domain.uuid != self.uuid:
            raise UsageError(f"manifest of domain {manifest.domain.uuid} "
                             f"written to store {self.uuid}")
        data = manifest.to_json()  # validates
        for d in manifest.disks:
            for rel in (d.volume, d.base, d.table, d.difference):
                if rel is not None and not self.resolve(rel).is_file():
                    raise IntegrityError(f"{self.resolve(rel)} is missing; refusing to seal "
                                         f"point {manifest.point}")
        path = self.manifest_path(manifest.point)
        make_private_dir(self.points_dir)
        try:
            atomic_write_bytes(path, data, exclusive=True)
        except FileExistsError:
            raise IntegrityError(f"{path} already exists; point {manifest.point} "
                                 "was sealed before") from None
        return path

    # removal and leftovers (in .removal) ---------------------------------------------

    def remove_point(self, point: int) -> list[Path]:
        """Remove a point (valid or damaged); returns what was removed, in order
        (:func:`.removal.remove_point`).  Caller holds the lock."""
        return removal.remove_point(self, point)

    def leftovers(self) -> list[Leftover]:
        """What interrupted operations left behind (:func:`.removal.leftovers`)."""
        return removal.leftovers(self)
