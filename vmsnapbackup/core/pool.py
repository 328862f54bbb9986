"""The pool on disk: where every file of FORMAT.md §1 lives, and the rules for
creating and listing them (§2, §3, §7, §10); removal is in :mod:`.removal`, names in
:mod:`.names`.

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

import contextlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import (
    CorruptFileError,
    IncompatibleFormatError,
    NotFoundError,
    UsageError,
)
from .atomic import atomic_write_bytes, make_private_dir
from .domainstore import DomainStore, PointInfo
from .manifest import DomainRecord, PoolEncryption, PoolHeader
from .names import (
    DOMAIN_RECORD,
    DOMAINS_DIR,
    GENERATION_RECORD,
    GENERATIONS_DIR,
    JOURNAL_FILE,
    LOCK_FILE,
    POINTS_DIR,
    POOL_HEADER,
    base_volume_name,
    canonical_uuid,
    difference_name,
    manifest_name,
    number_name,
    parse_number_name,
    partial_name,
    point_volume_name,
    table_name,
)
from .poolread import (
    MAX_SMALL_RECORD,
    read_bounded,
)
from .removal import Leftover
from .removal import listdir as _listdir
from .timefmt import utc_now

if TYPE_CHECKING:  # numpy and cryptography: listing a pool needs neither
    from .poolkey import PoolKey

__all__ = [
    "DOMAINS_DIR",
    "DOMAIN_RECORD",
    "GENERATIONS_DIR",
    "GENERATION_RECORD",
    "JOURNAL_FILE",
    "LOCK_FILE",
    "POINTS_DIR",
    # re-exported from .names, where they live since the split (callers import them here)
    "POOL_HEADER",
    "DomainStore",
    # re-exported from .removal
    "Leftover",
    "PointInfo",
    "Pool",
    "base_volume_name",
    "difference_name",
    "manifest_name",
    "number_name",
    "parse_number_name",
    "partial_name",
    "point_volume_name",
    "table_name",
]

log = logging.getLogger(__name__)

#: What a fresh filesystem root already holds; still "empty" for creating a pool.
_EMPTY_DIR_NAMES = {"lost+found"}


# --- the pool ----------------------------------------------------------------------------

class Pool:
    """A backup pool: a directory with ``vmsnapbackup-pool.json`` (§2)."""

    def __init__(self, root: Path, header: PoolHeader) -> None:
        self.root = root
        self.header = header
        #: the key of an encrypted pool once :meth:`unlock` checked it (FORMAT §15.2)
        self.key: PoolKey | None = None

    @property
    def encryption(self) -> PoolEncryption | None:
        """The encryption record of an encrypted pool, fixed when it was created."""
        return self.header.encryption

    def unlock(self, key: PoolKey | None) -> None:
        """Give the pool its key (None: none was given) before anything is read.

        An encrypted pool without a key is a UsageError, a key whose id is not the
        pool's an IntegrityError, a key for a plain pool a UsageError: each one line,
        and raised before a reader has written anything.
        """
        enc = self.encryption
        if enc is None:
            if key is not None:
                raise UsageError(f"pool {self.root} is not encrypted: drop --key-file")
            return
        if key is None:
            raise UsageError(f"pool {self.root} is encrypted (docs/FORMAT.md §15.2): "
                             "give its key with --key-file FILE")
        key.sealing.check_id(bytes.fromhex(enc.key_id), f"pool {self.root}")
        self.key = key

    @property
    def header_path(self) -> Path:
        return self.root / POOL_HEADER

    @property
    def domains_dir(self) -> Path:
        return self.root / DOMAINS_DIR

    @classmethod
    def create(cls, path: str | os.PathLike[str], *, compression: str | None = None,
               encryption: PoolEncryption | None = None) -> Pool:
        """Create a pool (or open the one already there): ``open(path, create=True)``."""
        return cls.open(path, create=True, compression=compression, encryption=encryption)

    @property
    def compression(self) -> str | None:
        """The pool's default compression (FORMAT §15.1), fixed when it was created."""
        return self.header.compression

    @classmethod
    def open(cls, path: str | os.PathLike[str], create: bool = False, *,
             compression: str | None = None,
             encryption: PoolEncryption | None = None) -> Pool:
        """Open the pool at ``path``, after the version gate.

        With ``create=True`` a missing path or an empty directory becomes a pool; a
        non-empty directory without a header is refused (UsageError), because writing
        a pool into, say, ``/var/lib/libvirt/images`` by a typo would mix backups with
        live disks.  Without ``create``, no header is NotFoundError.  ``compression``
        is recorded as the default of a pool created here (an existing pool keeps its own),
        and so is ``encryption`` (FORMAT §15.2: a pool is encrypted from its creation on).
        """
        root = Path(os.path.abspath(os.fspath(path)))
        header_path = root / POOL_HEADER
        if root.exists() and not root.is_dir():
            raise NotFoundError(f"not a vmsnapbackup pool: {root} is not a directory")
        data = (read_bounded(header_path, MAX_SMALL_RECORD, "pool header", root=root)
                if root.is_dir() else None)
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
        header = PoolHeader(created=utc_now(), compression=compression, encryption=encryption)
        try:
            # the header last: it is what makes the directory a pool
            atomic_write_bytes(header_path, header.to_json(), exclusive=True)
        except FileExistsError:
            data = read_bounded(header_path, MAX_SMALL_RECORD, "pool header", root=root) or b""
            return cls(root, PoolHeader.from_json(data, header_path))
        log.info("created pool %s", root)
        return cls(root, header)

    # domains -------------------------------------------------------------------------

    def domain(self, uuid: str, name: str | None = None,
               create: bool = False) -> DomainStore:
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
        # A racing creator may be first: its record is as good as ours.
        with contextlib.suppress(FileExistsError):
            atomic_write_bytes(store.record_path, record.to_json(), exclusive=True)
        return store

    def domains(self) -> list[DomainStore]:
        """Every domain directory of the pool (named by a canonical UUID), by UUID."""
        out = []
        for name in _listdir(self.domains_dir):
            if canonical_uuid(name) == name and (self.domains_dir / name).is_dir():
                out.append(DomainStore(self, name))
        return out

    def find_domain(self, name_or_uuid: str) -> DomainStore:
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


