"""The small JSON records of the pool (FORMAT.md §2, §3, §4), and the one import for
every record kind.

Pool header, ``domain.json`` and ``generation.json`` live here; the point manifest in
:mod:`.pointmanifest`, field validation in :mod:`.jsonfields`, the timestamp format in
:mod:`.timefmt` and every name in :mod:`.names`.  Their public names are re-exported
here, where callers found them before the split.

Rules shared by every record:

* ``format`` must name the record kind, else the file is foreign (CORRUPT).
* ``version`` greater than :data:`FORMAT_VERSION` is
  :class:`~vmsnapbackup.errors.IncompatibleFormatError` (the user needs a newer
  tool, the file is fine); any other bad value is CORRUPT.  Versions 1 and 2 read.
* Unknown keys are ignored, so an optional key can be added within a version.
* Names and paths are validated at parse time (FORMAT.md §13), so a damaged or hostile
  record can never point a restore or a prune outside the domain's directory.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .blocksize import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE
from .jsonfields import (
    ENCRYPTED_VERSION,
    FORMAT_VERSION,
    READABLE_VERSIONS,
    Fields,
    JsonDict,
    PathArg,
    check_header,
    check_target,
    digest_hex,
    load_json_object,
    record_bytes,
)
from .names import (
    CHECKPOINT_NAME_RE as CHECKPOINT_NAME,
)
from .names import (
    CHECKPOINT_PREFIX,
    TABLE_RE,
    VOLUME_FORMATS,
    base_volume_name,
    canonical_uuid,
    is_safe_relpath,
    is_safe_target,
    table_name,
)
from .pointmanifest import (
    COMPRESSIONS,
    CONSISTENCIES,
    CONSISTENCY_CRASH,
    CONSISTENCY_OFFLINE,
    CONSISTENCY_QUIESCED,
    POINT_FORMAT,
    STATUS_COMPLETE,
    BlockCounts,
    DomainInfo,
    PointDisk,
    PointManifest,
    manifest_bytes,
    manifest_checksum,
    manifest_checksum_v1,
    stored_checksum,
)
from .timefmt import parse_timestamp, utc_now

__all__ = [
    "ALGORITHM",
    "CHECKPOINT_NAME",
    "CHECKPOINT_PREFIX",
    "COMPRESSIONS",
    "CONSISTENCIES",
    "CONSISTENCY_CRASH",
    "CONSISTENCY_OFFLINE",
    "CONSISTENCY_QUIESCED",
    "DOMAIN_FORMAT",
    "FORMAT_VERSION",
    "GENERATION_FORMAT",
    "MAX_BLOCK_SIZE",
    "MIN_BLOCK_SIZE",
    "POINT_FORMAT",
    "POOL_FORMAT",
    "READABLE_VERSIONS",
    "STATUS_COMPLETE",
    "VOLUME_FORMATS",
    "BlockCounts",
    "DomainInfo",
    "DomainRecord",
    "Fields",
    "GenerationDisk",
    "GenerationRecord",
    "JsonDict",
    "PathArg",
    "PointDisk",
    "PointManifest",
    "PoolEncryption",
    "PoolHeader",
    "canonical_uuid",
    "check_header",
    "check_target",
    "digest_hex",
    "from_json",
    "is_safe_relpath",
    "is_safe_target",
    "load_json_object",
    "manifest_bytes",
    "manifest_checksum",
    "manifest_checksum_v1",
    "parse_timestamp",
    "record_bytes",
    "stored_checksum",
    "to_json",
    "utc_now",
]

POOL_FORMAT = "vmsnapbackup-pool"
DOMAIN_FORMAT = "vmsnapbackup-domain"
GENERATION_FORMAT = "vmsnapbackup-generation"

ALGORITHM = "xxh3-128"


# --- pool header (§2) --------------------------------------------------------------------

#: the fixed algorithm names of an encrypted pool's header (FORMAT §15.2)
ENCRYPTION_NAMES = {"volumes": "qcow2-luks-aes-256-xts", "records": "aes-256-gcm",
                    "kdf": "hkdf-sha256"}
_HEX_RE = re.compile(r"[0-9a-f]+")


@dataclass(frozen=True)
class PoolEncryption:
    """The ``encryption`` object of an encrypted pool's header: the salt the sealing key
    is derived with and the id of the key file (FORMAT §15.2); never the key."""

    salt: str      # 64 hex digits
    key_id: str    # 32 hex digits

    def to_dict(self) -> JsonDict:
        return {**ENCRYPTION_NAMES, "salt": self.salt, "key_id": self.key_id}

    @classmethod
    def from_fields(cls, f: Fields) -> PoolEncryption:
        for key, value in ENCRYPTION_NAMES.items():
            if f.text(key) != value:
                f.fail(key, f"this version knows only {value!r}")
        salt, key_id = f.text("salt"), f.text("key_id")
        if len(salt) != 64 or not _HEX_RE.fullmatch(salt):
            f.fail("salt", "expected 64 lowercase hex digits")
        if len(key_id) != 32 or not _HEX_RE.fullmatch(key_id):
            f.fail("key_id", "expected 32 lowercase hex digits")
        return cls(salt=str(salt), key_id=str(key_id))


@dataclass(frozen=True)
class PoolHeader:
    """``vmsnapbackup-pool.json``: its presence is what makes a directory a pool."""

    created: str
    #: what backups into this pool compress with unless told otherwise (FORMAT §15.1)
    compression: str | None = None
    #: set in an encrypted pool (FORMAT §15.2), which is then a version-3 pool
    encryption: PoolEncryption | None = None

    def to_dict(self) -> JsonDict:
        version = FORMAT_VERSION if self.encryption is None else ENCRYPTED_VERSION
        d: JsonDict = {"format": POOL_FORMAT, "version": version, "created": self.created}
        if self.compression is not None:
            d["compression"] = self.compression
        if self.encryption is not None:
            d["encryption"] = self.encryption.to_dict()
        return d

    def to_json(self) -> bytes:
        return record_bytes(_validated(self.to_dict(), PoolHeader))

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any], path: PathArg) -> PoolHeader:
        check_header(obj, path, POOL_FORMAT, "pool")
        f = Fields(obj, path)
        compression = (f.choice("compression", COMPRESSIONS)
                       if obj.get("compression") is not None else None)
        encryption = (PoolEncryption.from_fields(f.sub("encryption"))
                      if obj.get("encryption") is not None else None)
        return cls(created=f.timestamp("created"), compression=compression,
                   encryption=encryption)

    @classmethod
    def from_json(cls, data: bytes | str, path: PathArg) -> PoolHeader:
        return cls.from_dict(load_json_object(data, path), path)


# --- domain.json (§3) --------------------------------------------------------------------

@dataclass(frozen=True)
class DomainRecord:
    """``domain.json``: the domain's name (it follows renames) and the highest point
    number ever handed out, which is what keeps numbers from being reused."""

    uuid: str
    name: str
    last_point: int = 0

    def to_dict(self) -> JsonDict:
        return {"format": DOMAIN_FORMAT, "version": FORMAT_VERSION, "uuid": self.uuid,
                "name": self.name, "last_point": self.last_point}

    def to_json(self) -> bytes:
        return record_bytes(_validated(self.to_dict(), DomainRecord))

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any], path: PathArg) -> DomainRecord:
        check_header(obj, path, DOMAIN_FORMAT, "domain record")
        f = Fields(obj, path)
        return cls(uuid=f.uuid("uuid"), name=f.domain_name("name"),
                   last_point=f.integer("last_point"))

    @classmethod
    def from_json(cls, data: bytes | str, path: PathArg) -> DomainRecord:
        return cls.from_dict(load_json_object(data, path), path)


# --- generation.json (§4) ----------------------------------------------------------------

@dataclass(frozen=True)
class GenerationDisk:
    """One disk of a generation: its base volume and table 1, by file name inside the
    disk's point store.  ``table_digest`` is the body digest of table 1 (what every
    difference table of the generation is bound to, §6)."""

    virtual_size: int
    base_format: str
    base: str
    table: str
    table_digest: str

    def to_dict(self) -> JsonDict:
        return dataclasses.asdict(self)

    @classmethod
    def from_fields(cls, f: Fields) -> GenerationDisk:
        d = cls(
            virtual_size=f.integer("virtual_size"),
            base_format=f.choice("base_format", VOLUME_FORMATS),
            base=f.text("base"),
            table=f.matching("table", TABLE_RE, "a table 1 file name"),
            table_digest=f.digest("table_digest"),
        )
        if d.base != base_volume_name(d.base_format):
            f.fail("base", f"expected {base_volume_name(d.base_format)!r}, found {d.base!r}")
        return d


@dataclass(frozen=True)
class GenerationRecord:
    """``generation.json``: what is fixed for a generation (block size, disks, sizes)."""

    generation: int
    first_point: int
    created: str
    block_size: int
    disks: Mapping[str, GenerationDisk]
    algorithm: str = ALGORITHM
    #: the libvirt checkpoint made just before the first snapshot (None: none)
    checkpoint: str | None = None

    def to_dict(self) -> JsonDict:
        d = {
            "format": GENERATION_FORMAT, "version": FORMAT_VERSION,
            "generation": self.generation, "first_point": self.first_point,
            "created": self.created, "block_size": self.block_size,
            "algorithm": self.algorithm,
            "disks": {t: d.to_dict() for t, d in sorted(self.disks.items())},
        }
        if self.checkpoint is not None:  # optional (FORMAT §12)
            d["checkpoint"] = self.checkpoint
        return d

    def to_json(self) -> bytes:
        return record_bytes(_validated(self.to_dict(), GenerationRecord))

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any], path: PathArg) -> GenerationRecord:
        check_header(obj, path, GENERATION_FORMAT, "generation")
        f = Fields(obj, path)
        algorithm = f.text("algorithm")
        if algorithm != ALGORITHM:
            f.fail("algorithm", f"unknown algorithm {algorithm!r}")
        disks_f = f.sub("disks")
        if not disks_f.obj:
            f.fail("disks", "a generation has at least one disk")
        disks = {}
        for target in sorted(disks_f.obj):
            check_target(disks_f, target, target)
            disks[target] = GenerationDisk.from_fields(disks_f.sub(target))
        rec = cls(
            generation=f.integer("generation", minimum=1),
            first_point=f.integer("first_point", minimum=1),
            created=f.timestamp("created"),
            block_size=f.block_size("block_size"),
            disks=disks,
            algorithm=algorithm,
            checkpoint=f.checkpoint("checkpoint"),
        )
        for target, disk in rec.disks.items():
            if disk.table != table_name(rec.first_point):
                disks_f.sub(target).fail("table", f"expected {table_name(rec.first_point)!r} "
                                         f"(table 1 of point {rec.first_point})")
        return rec

    @classmethod
    def from_json(cls, data: bytes | str, path: PathArg) -> GenerationRecord:
        return cls.from_dict(load_json_object(data, path), path)


def to_json(manifest: PointManifest) -> bytes:
    """The bytes of a point manifest, checksum included (see :meth:`PointManifest.to_json`)."""
    return manifest.to_json()


def from_json(data: bytes | str, path: PathArg) -> PointManifest:
    """A validated point manifest, or CorruptFileError / IncompatibleFormatError naming
    ``path``."""
    return PointManifest.from_json(data, path)


def _validated(d: JsonDict, cls: Any) -> JsonDict:
    """Refuse to write a record we would refuse to read."""
    cls.from_dict(d, f"<new {cls.__name__}>")
    return d
