"""The pool on disk: where every file of FORMAT.md §1 lives, and the rules for
creating, listing and removing them (§2, §3, §7, §10).

:class:`Pool` is the directory with its header; :class:`DomainStore` is one
domain's part of it (``domains/<uuid>/``).  Nothing here talks to a hypervisor or
reads a volume: workflows use these paths and records, and this module makes sure
that what they write goes in atomically and in the order that keeps "a point exists
iff its manifest does" true, and that what they remove goes in the reverse order.

Mutating methods of :class:`DomainStore` (``allocate_point``, ``write_*``,
``remove_point``, ``set_name``) expect the caller to hold the domain's lock
(:meth:`DomainStore.lock`); listing and reading never lock and rely on the write
order instead.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, List, NoReturn, Optional, Set, Tuple, Union

from ..errors import (
    CorruptFileError,
    IncompatibleFormatError,
    IntegrityError,
    NotFoundError,
    UsageError,
    storage_error_from_oserror,
)
from .atomic import (
    atomic_write_bytes,
    fsync_dir,
    is_temp_name,
    make_private_dir,
    read_optional,
    unlink_durable,
)
from .journal import Journal, JournalEntry
from .lock import DomainLock
from .manifest import (
    DomainRecord,
    GenerationRecord,
    PointManifest,
    PoolHeader,
    canonical_uuid,
    is_safe_relpath,
    is_safe_target,
    utc_now,
)

__all__ = [
    "POOL_HEADER",
    "DOMAINS_DIR",
    "DOMAIN_RECORD",
    "LOCK_FILE",
    "JOURNAL_FILE",
    "GENERATIONS_DIR",
    "POINTS_DIR",
    "GENERATION_RECORD",
    "number_name",
    "parse_number_name",
    "base_volume_name",
    "table_name",
    "point_volume_name",
    "difference_name",
    "manifest_name",
    "partial_name",
    "PointInfo",
    "Leftover",
    "Pool",
    "DomainStore",
]

log = logging.getLogger(__name__)

POOL_HEADER = "vmsnapbackup-pool.json"
DOMAINS_DIR = "domains"
DOMAIN_RECORD = "domain.json"
LOCK_FILE = "lock"
JOURNAL_FILE = "journal.json"
GENERATIONS_DIR = "generations"
POINTS_DIR = "points"
GENERATION_RECORD = "generation.json"

#: What a fresh filesystem root already holds; still "empty" for creating a pool.
_EMPTY_DIR_NAMES = {"lost+found"}

_NUMBER = re.compile(r"[0-9]{6,}")
_MANIFEST = re.compile(r"([0-9]{6,})\.json")
#: Files of a disk's point store that carry a point number (§1).
_NUMBERED = re.compile(r"(table|point|diff)-([0-9]{6,})\.(vsbt|qcow2|vsbd)(\.partial)?")
_BASE = re.compile(r"base\.(qcow2|raw)(\.partial)?")


# --- names (§1) --------------------------------------------------------------------------

def number_name(n: int) -> str:
    """Zero-padded to 6 digits; wider numbers simply widen the field (§1)."""
    if n < 1:
        raise UsageError(f"point and generation numbers start at 1, not {n}")
    return f"{n:06d}"


def parse_number_name(text: str) -> Optional[int]:
    """The number in a 6+-digit name, or None.  Only the one spelling
    :func:`number_name` produces is accepted, so ``1`` and ``000001`` can never be two
    names of one point."""
    if not _NUMBER.fullmatch(text):
        return None
    n = int(text)
    return n if n >= 1 and number_name(n) == text else None


def base_volume_name(fmt: str) -> str:
    if fmt not in ("qcow2", "raw"):
        raise UsageError(f"a base volume is qcow2 or raw, not {fmt!r}")
    return f"base.{fmt}"


def table_name(point: int) -> str:
    return f"table-{number_name(point)}.vsbt"


def point_volume_name(point: int) -> str:
    return f"point-{number_name(point)}.qcow2"


def difference_name(point: int) -> str:
    return f"diff-{number_name(point)}.vsbd"


def manifest_name(point: int) -> str:
    return f"{number_name(point)}.json"


def partial_name(name: str) -> str:
    """The name a volume has while it is being filled (§10)."""
    return name + ".partial"


def _numbered(name: str) -> Optional[Tuple[str, int]]:
    """(kind, number) for ``table-N.vsbt``/``point-N.qcow2``/``diff-N.vsbd`` (or .partial)."""
    m = _NUMBERED.fullmatch(name)
    if m is None:
        return None
    n = parse_number_name(m.group(2))
    return None if n is None else (m.group(1), n)


def _listdir(path: Path) -> List[str]:
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []


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
    manifest: Optional[PointManifest] = None
    damaged: Optional[str] = None
    incompatible: bool = False

    @property
    def ok(self) -> bool:
        return self.manifest is not None

    @property
    def generation(self) -> Optional[int]:
        return self.manifest.generation if self.manifest else None


@dataclass(frozen=True)
class Leftover:
    """Something an interrupted operation left behind, for ``repair`` (§1, §10).

    ``kind`` is ``temp`` (a ``.NAME.tmp-…`` file), ``partial`` (a volume never
    completed), ``generation`` (a generation directory no manifest refers to) or
    ``orphan`` (a point volume or difference table of a point without a manifest).
    """

    path: Path
    kind: str
    reason: str


# --- the pool ----------------------------------------------------------------------------

class Pool:
    """A backup pool: a directory with ``vmsnapbackup-pool.json`` (§2)."""

    def __init__(self, root: Path, header: PoolHeader) -> None:
        self.root = root
        self.header = header

    @property
    def header_path(self) -> Path:
        return self.root / POOL_HEADER

    @property
    def domains_dir(self) -> Path:
        return self.root / DOMAINS_DIR

    @classmethod
    def create(cls, path: Union[str, "os.PathLike[str]"]) -> "Pool":
        """Create a pool (or open the one already there): ``open(path, create=True)``."""
        return cls.open(path, create=True)

    @classmethod
    def open(cls, path: Union[str, "os.PathLike[str]"], create: bool = False) -> "Pool":
        """Open the pool at ``path``, after the version gate.

        With ``create=True`` a missing path or an empty directory becomes a pool; a
        non-empty directory without a header is refused (UsageError), because writing
        a pool into, say, ``/var/lib/libvirt/images`` by a typo would mix backups with
        live disks.  Without ``create``, no header is NotFoundError.
        """
        root = Path(os.path.abspath(os.fspath(path)))
        header_path = root / POOL_HEADER
        if root.exists() and not root.is_dir():
            raise NotFoundError(f"not a vmsnapbackup pool: {root} is not a directory")
        data = read_optional(header_path) if root.is_dir() else None
        if data is not None:
            return cls(root, PoolHeader.from_json(data, header_path))
        if not create:
            if not root.exists():
                raise NotFoundError(f"pool {root} does not exist (create it first)")
            raise NotFoundError(
                f"not a vmsnapbackup pool: {root} (no {POOL_HEADER}; create the pool first)")
        if root.is_dir() and not _is_empty_for_pool(root):
            raise UsageError(
                f"not a vmsnapbackup pool: {root} is a non-empty directory without "
                f"{POOL_HEADER}; refusing to create a pool there")
        make_private_dir(root / DOMAINS_DIR)
        header = PoolHeader(created=utc_now())
        try:
            # the header last: it is what makes the directory a pool
            atomic_write_bytes(header_path, header.to_json(), exclusive=True)
        except FileExistsError:
            data = read_optional(header_path) or b""
            return cls(root, PoolHeader.from_json(data, header_path))
        log.info("created pool %s", root)
        return cls(root, header)

    # domains -------------------------------------------------------------------------

    def domain(self, uuid: str, name: Optional[str] = None,
               create: bool = False) -> "DomainStore":
        """The store of the domain with this UUID.

        ``create=True`` (``name`` required) makes its directories and ``domain.json``
        if missing; an existing store is returned as it is (a rename is recorded by
        :meth:`DomainStore.set_name`, under the lock).
        """
        u = canonical_uuid(uuid)
        if u is None:
            raise UsageError(f"not a domain UUID: {uuid!r}")
        store = DomainStore(self, u)
        if store.record_path.exists():
            return store
        if not create:
            if store.path.is_dir():
                return store  # damaged (no domain.json), still listable
            raise NotFoundError(f"no backups of domain {name or u} in pool {self.root}")
        if not name:
            raise UsageError("a domain name is needed to create its store in the pool")
        make_private_dir(store.generations_dir)
        make_private_dir(store.points_dir)
        record = DomainRecord(uuid=u, name=name, last_point=store._highest_number_seen())
        try:
            atomic_write_bytes(store.record_path, record.to_json(), exclusive=True)
        except FileExistsError:
            pass  # a racing creator was first: its record is as good as ours
        return store

    def domains(self) -> List["DomainStore"]:
        """Every domain directory of the pool (named by a canonical UUID), by UUID."""
        out = []
        for name in _listdir(self.domains_dir):
            if canonical_uuid(name) == name and (self.domains_dir / name).is_dir():
                out.append(DomainStore(self, name))
        return out

    def find_domain(self, name_or_uuid: str) -> "DomainStore":
        """A domain by UUID, or by the name in its ``domain.json``.

        A name held by two stores (a domain undefined and defined again gets a new
        UUID) is ambiguous and refused rather than guessed.
        """
        u = canonical_uuid(name_or_uuid)
        if u is not None and (self.domains_dir / u).is_dir():
            return DomainStore(self, u)
        matches = []
        for store in self.domains():
            try:
                if store.record().name == name_or_uuid:
                    matches.append(store)
            except (CorruptFileError, IncompatibleFormatError) as err:
                log.warning("skipping domain %s while looking for %r: %s",
                            store.uuid, name_or_uuid, err)
        if not matches:
            raise NotFoundError(f"no domain {name_or_uuid!r} in pool {self.root}")
        if len(matches) > 1:
            raise UsageError(
                f"domain name {name_or_uuid!r} matches several domains in pool {self.root}: "
                + ", ".join(s.uuid for s in matches) + "; give the UUID")
        return matches[0]


def _is_empty_for_pool(root: Path) -> bool:
    """Empty, or only what a fresh filesystem or an interrupted create leaves."""
    for name in _listdir(root):
        if name in _EMPTY_DIR_NAMES:
            continue
        if name.startswith(f".{POOL_HEADER}.tmp-"):
            continue
        if name == DOMAINS_DIR and (root / name).is_dir() and not _listdir(root / name):
            continue
        return False
    return True


# --- one domain --------------------------------------------------------------------------

class DomainStore:
    """``domains/<uuid>/``: one domain's records, generations and points."""

    def __init__(self, pool: Pool, uuid: str) -> None:
        self.pool = pool
        self.uuid = uuid
        self.path = pool.domains_dir / uuid

    def __repr__(self) -> str:
        return f"DomainStore({self.path})"

    # paths ---------------------------------------------------------------------------

    @property
    def record_path(self) -> Path:
        return self.path / DOMAIN_RECORD

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK_FILE

    @property
    def journal_path(self) -> Path:
        return self.path / JOURNAL_FILE

    @property
    def generations_dir(self) -> Path:
        return self.path / GENERATIONS_DIR

    @property
    def points_dir(self) -> Path:
        return self.path / POINTS_DIR

    def generation_dir(self, generation: int) -> Path:
        return self.generations_dir / number_name(generation)

    def generation_record_path(self, generation: int) -> Path:
        return self.generation_dir(generation) / GENERATION_RECORD

    def disk_dir(self, generation: int, target: str) -> Path:
        """The disk's point store in a generation."""
        if not is_safe_target(target):
            raise UsageError(f"not a usable disk target name: {target!r}")
        return self.generation_dir(generation) / target

    def base_volume_path(self, generation: int, target: str, fmt: str) -> Path:
        return self.disk_dir(generation, target) / base_volume_name(fmt)

    def table_path(self, generation: int, target: str, point: int) -> Path:
        return self.disk_dir(generation, target) / table_name(point)

    def point_volume_path(self, generation: int, target: str, point: int) -> Path:
        return self.disk_dir(generation, target) / point_volume_name(point)

    def difference_path(self, generation: int, target: str, point: int) -> Path:
        return self.disk_dir(generation, target) / difference_name(point)

    def manifest_path(self, point: int) -> Path:
        return self.points_dir / manifest_name(point)

    def relpath(self, path: Union[str, "os.PathLike[str]"]) -> str:
        """``path`` relative to the domain directory, as manifests and the journal store
        it (so the pool can move)."""
        rel = Path(os.path.abspath(os.fspath(path))).relative_to(self.path).as_posix()
        if not is_safe_relpath(rel):
            raise UsageError(f"{path} is not inside {self.path}")
        return rel

    def resolve(self, rel: str) -> Path:
        """The absolute path of a relative path read from a manifest or journal."""
        if not is_safe_relpath(rel):
            raise UsageError(f"not a relative path inside {self.path}: {rel!r}")
        return self.path / rel

    # records -------------------------------------------------------------------------

    def record(self) -> DomainRecord:
        """``domain.json``; CorruptFileError if missing or damaged."""
        data = read_optional(self.record_path)
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
            m = _MANIFEST.fullmatch(name)
            n = parse_number_name(m.group(1)) if m else None
            if n:
                highest = max(highest, n)
        for g in self.generations():
            for target in _listdir(self.generation_dir(g)):
                for name in _listdir(self.generation_dir(g) / target):
                    k = _numbered(name)
                    if k:
                        highest = max(highest, k[1])
        return highest

    # generations (§4) ----------------------------------------------------------------

    def generations(self) -> List[int]:
        """Numbers of the generation directories present, ascending (with or without a
        ``generation.json``: use :meth:`read_generation` to know whether one is usable)."""
        out = []
        for name in _listdir(self.generations_dir):
            n = parse_number_name(name)
            if n is not None and (self.generations_dir / name).is_dir():
                out.append(n)
        return out

    def current_generation(self) -> Optional[int]:
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
        data = read_optional(path)
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

    def list_points(self) -> List[PointInfo]:
        """Every manifest file, valid or damaged, by point number.

        Only ``points/<N>.json`` counts: a generation directory, a volume or a
        ``.partial`` file without a manifest is not a point (§10), it is a leftover.
        """
        out = []
        for name in _listdir(self.points_dir):
            m = _MANIFEST.fullmatch(name)
            n = parse_number_name(m.group(1)) if m else None
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

    def points(self) -> List[PointInfo]:
        """The valid points only, oldest first: what may be restored."""
        return [p for p in self.list_points() if p.ok]

    def damaged_points(self) -> List[PointInfo]:
        return [p for p in self.list_points() if not p.ok]

    def read_manifest(self, point: int) -> PointManifest:
        path = self.manifest_path(point)
        if not path.exists():
            raise NotFoundError(f"domain {self.name} has no point {point}")
        return self._load_manifest(point, path)

    def _load_manifest(self, point: int, path: Path) -> PointManifest:
        data = read_optional(path)
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

    # removal (prune) -----------------------------------------------------------------

    def remove_point(self, point: int) -> List[Path]:
        """Remove a point (valid or damaged); returns what was removed, in order.

        The manifest first (from then on the point does not exist), then its own point
        volumes and difference tables, then its generation's base volumes, tables and
        directory only if no manifest of that generation is left.  Only names of §1 are
        removed and directories only when empty, so a stranger's file stops the removal
        of its directory rather than being deleted.  Caller holds the lock.
        """
        path = self.manifest_path(point)
        if not path.exists():
            raise NotFoundError(f"domain {self.name} has no point {point}")
        try:
            generation: Optional[int] = self._load_manifest(point, path).generation
        except (CorruptFileError, IncompatibleFormatError):
            # damaged: where its files are beats what its damaged text says
            generation = self._generation_holding(point) or _generation_of_manifest(path)
        removed: List[Path] = []
        unlink_durable(path)
        removed.append(path)
        log.info("domain %s: removed manifest of point %d", self.uuid, point)
        if generation is None:
            log.warning("domain %s: point %d's generation is unknown; its files stay for "
                        "repair", self.uuid, point)
            return removed
        gdir = self.generation_dir(generation)
        for target in _listdir(gdir):
            ddir = gdir / target
            if not ddir.is_dir():
                continue
            for name in (point_volume_name(point), difference_name(point)):
                for f in (ddir / name, ddir / partial_name(name)):
                    if unlink_durable(f):
                        removed.append(f)
        if self._generation_referenced(generation):
            return removed
        removed.extend(self._remove_generation(generation))
        return removed

    def _generation_holding(self, point: int) -> Optional[int]:
        """For a manifest too damaged to name its generation: the generation whose point
        stores hold this point's files."""
        for g in self.generations():
            for target in _listdir(self.generation_dir(g)):
                for name in _listdir(self.generation_dir(g) / target):
                    k = _numbered(name)
                    if k and k[1] == point:
                        return g
        return None

    def _referenced_generations(self) -> Optional[Set[int]]:
        """Generations named by a manifest file (valid or damaged) or by the journal.

        A damaged manifest protects both the generation its ``generation`` field still
        names and the one holding its files (a flipped digit must not let its real
        generation go).  None when a manifest is too damaged to tell: then every
        generation must be treated as referenced.
        """
        used: Set[int] = set()
        for info in self.list_points():
            if info.manifest is not None:
                used.add(info.manifest.generation)
                continue
            found = {g for g in (_generation_of_manifest(info.path),
                                 self._generation_holding(info.number)) if g is not None}
            if not found:
                return None
            used.update(found)
        entry = self._journal_or_none()
        if entry is not None and entry.generation is not None:
            used.add(entry.generation)
        return used

    def _generation_referenced(self, generation: int) -> bool:
        used = self._referenced_generations()
        return used is None or generation in used

    def _journal_or_none(self) -> Optional[JournalEntry]:
        try:
            return self.journal.read()
        except (CorruptFileError, IncompatibleFormatError) as err:
            log.warning("domain %s: journal unreadable: %s", self.uuid, err)
            return None

    def _remove_generation(self, generation: int) -> List[Path]:
        """Remove a generation no point refers to: our files, then empty directories."""
        removed: List[Path] = []
        gdir = self.generation_dir(generation)
        for target in _listdir(gdir):
            ddir = gdir / target
            if not ddir.is_dir():
                continue
            for name in _listdir(ddir):
                if _numbered(name) or _BASE.fullmatch(name) or is_temp_name(name):
                    f = ddir / name
                    if f.is_file() and unlink_durable(f):
                        removed.append(f)
            if _rmdir_if_empty(ddir):
                removed.append(ddir)
        rec = gdir / GENERATION_RECORD
        if unlink_durable(rec):
            removed.append(rec)
        for name in _listdir(gdir):
            if is_temp_name(name) and (gdir / name).is_file() and unlink_durable(gdir / name):
                removed.append(gdir / name)
        if _rmdir_if_empty(gdir):
            removed.append(gdir)
        else:
            log.warning("domain %s: generation directory %s keeps files that are not ours; "
                        "left in place", self.uuid, gdir)
        log.info("domain %s: removed generation %d (no point left in it)", self.uuid,
                 generation)
        return removed

    # leftovers (repair) --------------------------------------------------------------

    def leftovers(self) -> List[Leftover]:
        """What interrupted operations left: temp files, ``.partial`` volumes, generation
        directories no manifest or journal refers to, and point volumes / difference
        tables of points without a manifest (unless the journal names that point).

        Damaged manifests are not leftovers: they are evidence, listed by
        :meth:`list_points`, and only removed on purpose.  Call under the lock, or a
        running backup's files show up here.
        """
        out: List[Leftover] = []
        for d in (self.path, self.points_dir, self.generations_dir):
            for name in _listdir(d):
                if name.startswith(".") and (d / name).is_file():
                    out.append(Leftover(d / name, "temp", "temp file of an interrupted write"))
        used = self._referenced_generations()
        entry = self._journal_or_none()
        journal_point = entry.point if entry is not None else None
        manifests = {n for n in (parse_number_name(m.group(1)) for m in
                                 (_MANIFEST.fullmatch(x) for x in _listdir(self.points_dir))
                                 if m) if n is not None}
        for g in self.generations():
            gdir = self.generation_dir(g)
            if used is not None and g not in used:
                out.append(Leftover(gdir, "generation",
                                    f"generation {g} has no sealed point and no journal entry"))
                continue
            for name in _listdir(gdir):
                p = gdir / name
                if is_temp_name(name) and p.is_file():
                    out.append(Leftover(p, "temp", "temp file of an interrupted write"))
                if not p.is_dir():
                    continue
                for fname in _listdir(p):
                    f = p / fname
                    if not f.is_file():
                        continue
                    if fname.startswith("."):
                        out.append(Leftover(f, "temp", "temp file of an interrupted write"))
                    elif fname.endswith(".partial"):
                        out.append(Leftover(f, "partial", "volume never completed"))
                    else:
                        k = _numbered(fname)
                        if (k and k[0] in ("point", "diff") and k[1] not in manifests
                                and k[1] != journal_point):
                            out.append(Leftover(f, "orphan",
                                                f"point {k[1]} has no manifest"))
        return out


def _generation_of_manifest(path: Path) -> Optional[int]:
    """The generation a manifest names, read leniently: a damaged manifest still
    protects its generation from removal if its ``generation`` field is readable."""
    data = read_optional(path)
    if data is None:
        return None
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    g = obj.get("generation") if isinstance(obj, dict) else None
    return g if type(g) is int and g >= 1 else None


def _rmdir_if_empty(path: Path) -> bool:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return False
    except OSError as err:
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return False  # a stranger's file is in it: leave it
        _raise_storage(err, path)
    fsync_dir(path.parent)
    return True


def _raise_storage(err: OSError, path: Path) -> NoReturn:
    mapped = storage_error_from_oserror(err, os.fspath(path))
    if mapped is None:
        raise err
    raise mapped from err
