"""The JSON records of the pool, typed and validated (FORMAT.md §2, §3, §4, §7).

Pool header, ``domain.json``, ``generation.json`` and the point manifest.  Each
record is a frozen dataclass with ``to_dict``/``to_json`` for writing and
``from_json(data, path)`` for reading.  Reading validates everything before any
value is used, because these files decide what a restore reads and what a prune
deletes: a flipped byte must become a named
:class:`~vmsnapbackup.errors.CorruptFileError`, never a wrong path or number.

Rules shared by every record:

* ``format`` must name the record kind, else the file is foreign (CORRUPT).
* ``version`` greater than :data:`FORMAT_VERSION` is
  :class:`~vmsnapbackup.errors.IncompatibleFormatError` (the user needs a newer
  tool, the file is fine); any other bad value is CORRUPT.
* Unknown keys are ignored: a version-1 writer never adds any (a change raises the
  version), and a reader that can still restore a backup is worth more than a strict
  one.  For manifests they are still covered by the checksum.
* Paths stored in records are relative, without ``..``, so a damaged or hostile
  record can never point a restore or a prune outside the domain's directory.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import re
import uuid as _uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, NoReturn, Optional, Tuple, Union

import xxhash

from ..errors import CorruptFileError, IncompatibleFormatError

__all__ = [
    "FORMAT_VERSION",
    "POOL_FORMAT",
    "DOMAIN_FORMAT",
    "GENERATION_FORMAT",
    "POINT_FORMAT",
    "ALGORITHM",
    "CONSISTENCY_QUIESCED",
    "CONSISTENCY_CRASH",
    "CONSISTENCY_OFFLINE",
    "CONSISTENCIES",
    "VOLUME_FORMATS",
    "MIN_BLOCK_SIZE",
    "MAX_BLOCK_SIZE",
    "utc_now",
    "parse_timestamp",
    "canonical_uuid",
    "digest_hex",
    "manifest_checksum",
    "load_json_object",
    "check_header",
    "PoolHeader",
    "DomainRecord",
    "GenerationDisk",
    "GenerationRecord",
    "BlockCounts",
    "DomainInfo",
    "PointDisk",
    "PointManifest",
    "to_json",
    "from_json",
    "Fields",
    "is_safe_relpath",
    "is_safe_target",
    "check_target",
    "record_bytes",
]

#: The one format version this code reads and writes (FORMAT.md §11).
FORMAT_VERSION = 1

POOL_FORMAT = "vmsnapbackup-pool"
DOMAIN_FORMAT = "vmsnapbackup-domain"
GENERATION_FORMAT = "vmsnapbackup-generation"
POINT_FORMAT = "vmsnapbackup-point"

ALGORITHM = "xxh3-128"

CONSISTENCY_QUIESCED = "quiesced"
CONSISTENCY_CRASH = "crash-consistent"
CONSISTENCY_OFFLINE = "offline"
CONSISTENCIES = (CONSISTENCY_QUIESCED, CONSISTENCY_CRASH, CONSISTENCY_OFFLINE)

#: Formats a base or point volume may have (§1: base.qcow2 | base.raw; points are qcow2).
VOLUME_FORMATS = ("qcow2", "raw")

#: Block size bounds of a check table (§5).
MIN_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 4194304

STATUS_COMPLETE = "complete"

_HEX32 = re.compile(r"[0-9a-f]{32}")
_TIMESTAMP_PARTS = re.compile(
    r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:\d{2})"
)
#: Disk targets become directory names: keep them to what libvirt uses (vda, sdb, hdc,
#: xvda, ...) and never let one be ".", ".." or contain a slash.
_TARGET = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_FILENAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
#: Names of the libvirt checkpoints (and their bitmaps) this tool creates (§4).
CHECKPOINT_PREFIX = "vmsnapbackup-"
CHECKPOINT_NAME = re.compile(re.escape(CHECKPOINT_PREFIX) + r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")

JsonDict = Dict[str, Any]
#: a file name, only ever used in messages
PathArg = Union[str, "os.PathLike[str]"]


# --- small shared helpers ----------------------------------------------------------------

def utc_now() -> str:
    """Timestamps in every record: UTC, millisecond precision, ``Z`` suffix, so they sort
    as strings and read the same on every host."""
    now = _dt.datetime.now(_dt.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def parse_timestamp(text: str) -> _dt.datetime:
    """An aware datetime from a record timestamp (for prune's keep-daily and friends).

    Python 3.9's ``fromisoformat`` knows neither ``Z`` nor more than 6 fraction
    digits, hence the normalisation.
    """
    m = _TIMESTAMP_PARTS.fullmatch(text)
    if m is None:
        raise ValueError(f"not a timestamp: {text!r}")
    base, frac, tz = m.groups()
    frac = "." + frac[:6].ljust(6, "0") if frac else ""
    return _dt.datetime.fromisoformat(base + frac + ("+00:00" if tz == "Z" else tz))


def canonical_uuid(text: str) -> Optional[str]:
    """The lowercase 8-4-4-4-12 form of a UUID, or None if ``text`` is not one.

    Domain directories are named by it, so it must be the one spelling libvirt uses.
    """
    try:
        u = _uuid.UUID(text)
    except (ValueError, AttributeError, TypeError):
        return None
    return str(u)


def digest_hex(digest: bytes) -> str:
    """A 16-byte XXH3-128 digest as the 32 lowercase hex digits records store."""
    if len(digest) != 16:
        raise ValueError("an XXH3-128 digest is 16 bytes")
    return digest.hex()


def _fail(path: PathArg, reason: str) -> NoReturn:
    raise CorruptFileError(path, reason)


def _no_constants(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicates(pairs: List[Tuple[str, Any]]) -> JsonDict:
    out: JsonDict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def load_json_object(data: Union[bytes, str], path: PathArg) -> JsonDict:
    """Parse a record file, strictly: an object, no NaN/Infinity, no duplicate keys
    (a damaged byte can turn one key into a copy of another)."""
    if len(data) == 0:
        _fail(path, "empty file (truncated?)")
    try:
        if isinstance(data, bytes):
            data = data.decode("utf-8")
        obj = json.loads(data, parse_constant=_no_constants, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as err:  # JSONDecodeError is a ValueError
        raise CorruptFileError(path, f"not valid JSON ({err})") from err
    if not isinstance(obj, dict):
        _fail(path, f"expected a JSON object, found {type(obj).__name__}")
    return obj


def check_header(obj: Mapping[str, Any], path: PathArg, fmt: str, kind: str) -> None:
    """The format and version gate every record passes first (§2).

    Version before anything else: a newer writer may have changed every other field,
    and "upgrade" is a more useful message than "corrupt".
    """
    if "format" not in obj:
        _fail(path, f"not a {fmt} file (no 'format' field)")
    if obj["format"] != fmt:
        _fail(path, f"not a {fmt} file (format {obj['format']!r})")
    if "version" not in obj:
        _fail(path, "missing field 'version'")
    version = obj["version"]
    if type(version) is not int or version < 1:
        _fail(path, f"version: expected a positive integer, found {version!r}")
    if version > FORMAT_VERSION:
        raise IncompatibleFormatError(
            f"{path}: {kind} format version {version} is newer than this vmsnapbackup "
            f"({FORMAT_VERSION}); upgrade"
        )


class Fields:
    """Typed access to one JSON object of a record, failing with the file and the field
    named (``disks[1].blocks.total: expected an integer``)."""

    def __init__(self, obj: Mapping[str, Any], path: PathArg, where: str = "") -> None:
        self.obj = obj
        self.path = path
        self.where = where

    def fail(self, key: str, msg: str) -> NoReturn:
        _fail(self.path, f"{self.where}{key}: {msg}")

    def raw(self, key: str) -> Any:
        if key not in self.obj:
            _fail(self.path, f"missing field '{self.where}{key}'")
        return self.obj[key]

    def text(self, key: str, *, optional: bool = False, allow_empty: bool = False) -> Any:
        v = self.raw(key)
        if v is None and optional:
            return None
        if not isinstance(v, str):
            self.fail(key, f"expected a string, found {_kind(v)}")
        if not v and not allow_empty:
            self.fail(key, "must not be empty")
        return v

    def integer(self, key: str, *, minimum: int = 0, optional: bool = False) -> Any:
        v = self.raw(key)
        if v is None and optional:
            return None
        if type(v) is not int:  # bool is an int subclass: refuse it too
            self.fail(key, f"expected an integer, found {_kind(v)}")
        if v < minimum:
            self.fail(key, f"must be >= {minimum}, found {v}")
        return v

    def number(self, key: str) -> float:
        v = self.raw(key)
        if type(v) not in (int, float) or not math.isfinite(v) or v < 0:
            self.fail(key, f"expected a non-negative number, found {v!r}")
        return v

    def flag(self, key: str) -> bool:
        v = self.raw(key)
        if type(v) is not bool:
            self.fail(key, f"expected true or false, found {_kind(v)}")
        return v

    def choice(self, key: str, choices: Tuple[str, ...]) -> str:
        v = self.text(key)
        if v not in choices:
            self.fail(key, f"expected one of {', '.join(choices)}, found {v!r}")
        return v

    def digest(self, key: str, *, optional: bool = False) -> Any:
        v = self.text(key, optional=optional)
        if v is not None and not _HEX32.fullmatch(v):
            self.fail(key, "expected 32 lowercase hex digits")
        return v

    def timestamp(self, key: str, *, optional: bool = False) -> Any:
        v = self.text(key, optional=optional)
        if v is not None:
            try:
                parse_timestamp(v)
            except ValueError:
                self.fail(key, f"not an ISO 8601 timestamp: {v!r}")
        return v

    def uuid(self, key: str) -> str:
        v = self.text(key)
        if canonical_uuid(v) != v:
            self.fail(key, f"not a lowercase UUID: {v!r}")
        return v

    def block_size(self, key: str) -> int:
        v = self.integer(key, minimum=MIN_BLOCK_SIZE)
        if v > MAX_BLOCK_SIZE or v & (v - 1):
            self.fail(key, f"must be a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}")
        return v

    def relpath(self, key: str, *, optional: bool = False) -> Any:
        v = self.text(key, optional=optional)
        if v is not None and not is_safe_relpath(v):
            self.fail(key, f"not a relative path inside the domain directory: {v!r}")
        return v

    def filename(self, key: str) -> str:
        v = self.text(key)
        if not _FILENAME.fullmatch(v):
            self.fail(key, f"not a plain file name: {v!r}")
        return v

    def checkpoint(self, key: str) -> Optional[str]:
        """A checkpoint name of ours; an absent key reads as null (an optional v1 field)."""
        v = self.obj.get(key)
        if v is None:
            return None
        if not isinstance(v, str) or not CHECKPOINT_NAME.fullmatch(v):
            self.fail(key, f"not a vmsnapbackup checkpoint name: {v!r}")
        return v

    def sub(self, key: str) -> "Fields":
        v = self.raw(key)
        if not isinstance(v, dict):
            self.fail(key, f"expected an object, found {_kind(v)}")
        return Fields(v, self.path, f"{self.where}{key}.")

    def items(self, key: str) -> List[Any]:
        v = self.raw(key)
        if not isinstance(v, list):
            self.fail(key, f"expected a list, found {_kind(v)}")
        return v


def _kind(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def is_safe_relpath(p: str) -> bool:
    """Relative, POSIX, no empty, ``.`` or ``..`` components: stays inside its root."""
    if not p or p.startswith("/") or "\\" in p or "\0" in p:
        return False
    return all(part not in ("", ".", "..") for part in p.split("/"))


def is_safe_target(t: str) -> bool:
    """A disk target usable as a directory name (``vda``)."""
    return bool(_TARGET.fullmatch(t)) and t not in (".", "..")


def check_target(f: Fields, key: str, value: str) -> None:
    if not is_safe_target(value):
        f.fail(key, f"not a usable disk target name: {value!r}")


def record_bytes(obj: JsonDict) -> bytes:
    """The on-disk form of every JSON record: indented and sorted for people, ASCII so
    no encoding question arises, newline-terminated."""
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=True) + "\n").encode("ascii")


# --- pool header (§2) --------------------------------------------------------------------

@dataclass(frozen=True)
class PoolHeader:
    """``vmsnapbackup-pool.json``: its presence is what makes a directory a pool."""

    created: str

    def to_dict(self) -> JsonDict:
        return {"format": POOL_FORMAT, "version": FORMAT_VERSION, "created": self.created}

    def to_json(self) -> bytes:
        return record_bytes(_validated(self.to_dict(), PoolHeader))

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any], path: PathArg) -> "PoolHeader":
        check_header(obj, path, POOL_FORMAT, "pool")
        return cls(created=Fields(obj, path).timestamp("created"))

    @classmethod
    def from_json(cls, data: Union[bytes, str], path: PathArg) -> "PoolHeader":
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
    def from_dict(cls, obj: Mapping[str, Any], path: PathArg) -> "DomainRecord":
        check_header(obj, path, DOMAIN_FORMAT, "domain record")
        f = Fields(obj, path)
        return cls(uuid=f.uuid("uuid"), name=f.text("name"), last_point=f.integer("last_point"))

    @classmethod
    def from_json(cls, data: Union[bytes, str], path: PathArg) -> "DomainRecord":
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
    def from_fields(cls, f: Fields) -> "GenerationDisk":
        return cls(
            virtual_size=f.integer("virtual_size"),
            base_format=f.choice("base_format", VOLUME_FORMATS),
            base=f.filename("base"),
            table=f.filename("table"),
            table_digest=f.digest("table_digest"),
        )


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
    checkpoint: Optional[str] = None

    def to_dict(self) -> JsonDict:
        d = {
            "format": GENERATION_FORMAT, "version": FORMAT_VERSION,
            "generation": self.generation, "first_point": self.first_point,
            "created": self.created, "block_size": self.block_size,
            "algorithm": self.algorithm,
            "disks": {t: d.to_dict() for t, d in sorted(self.disks.items())},
        }
        if self.checkpoint is not None:  # optional within version 1 (FORMAT §12)
            d["checkpoint"] = self.checkpoint
        return d

    def to_json(self) -> bytes:
        return record_bytes(_validated(self.to_dict(), GenerationRecord))

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any], path: PathArg) -> "GenerationRecord":
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
        return cls(
            generation=f.integer("generation", minimum=1),
            first_point=f.integer("first_point", minimum=1),
            created=f.timestamp("created"),
            block_size=f.block_size("block_size"),
            disks=disks,
            algorithm=algorithm,
            checkpoint=f.checkpoint("checkpoint"),
        )

    @classmethod
    def from_json(cls, data: Union[bytes, str], path: PathArg) -> "GenerationRecord":
        return cls.from_dict(load_json_object(data, path), path)


# --- point manifest (§7) -----------------------------------------------------------------

@dataclass(frozen=True)
class BlockCounts:
    """Per-disk block counts of a point (``blocks`` in §7).

    ``changed`` counts blocks differing from table 1 (for a generation's first point:
    the non-zero blocks written); ``zero`` those of them now all zeros.
    """

    total: int
    read: int
    holes: int
    changed: int
    zero: int
    unchanged: int = 0   # not read: the dirty bitmap showed them unwritten since table 1

    def to_dict(self) -> JsonDict:
        d = dataclasses.asdict(self)
        if not self.unchanged:  # optional within version 1 (FORMAT §12)
            del d["unchanged"]
        return d

    @classmethod
    def from_fields(cls, f: Fields) -> "BlockCounts":
        unchanged = f.integer("unchanged") if f.obj.get("unchanged") is not None else 0
        return cls(total=f.integer("total"), read=f.integer("read"), holes=f.integer("holes"),
                   changed=f.integer("changed"), zero=f.integer("zero"), unchanged=unchanged)


@dataclass(frozen=True)
class DomainInfo:
    """The domain as it was at the point: enough to define it again on restore."""

    name: str
    uuid: str
    xml: str

    def to_dict(self) -> JsonDict:
        return dataclasses.asdict(self)

    @classmethod
    def from_fields(cls, f: Fields) -> "DomainInfo":
        return cls(name=f.text("name"), uuid=f.uuid("uuid"), xml=f.text("xml"))


@dataclass(frozen=True)
class PointDisk:
    """One disk of a point.  Paths are relative to the domain's directory.

    For the first point of a generation ``volume == base`` and ``difference`` /
    ``difference_digest`` are None.
    """

    target: str
    source: str
    format: str
    virtual_size: int
    block_size: int
    volume: str
    volume_format: str
    base: str
    base_format: str
    table: str
    table1_digest: str
    difference: Optional[str]
    difference_digest: Optional[str]
    table_digest: str
    blocks: BlockCounts
    bytes_written: int
    seconds: Mapping[str, float] = field(default_factory=dict)
    #: the bitmap that let the pass skip unwritten blocks (None: every data block was read)
    dirty_bitmap: Optional[str] = None

    @property
    def is_base(self) -> bool:
        """True when this disk's volume is the base volume (a generation's first point)."""
        return self.difference is None

    def to_dict(self) -> JsonDict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["blocks"] = self.blocks.to_dict()
        d["seconds"] = dict(self.seconds)
        if self.dirty_bitmap is None:  # optional within version 1 (FORMAT §12)
            del d["dirty_bitmap"]
        return d

    @classmethod
    def from_fields(cls, f: Fields) -> "PointDisk":
        target = f.text("target")
        check_target(f, "target", target)
        seconds_f = f.sub("seconds")
        seconds = {k: seconds_f.number(k) for k in sorted(seconds_f.obj)}
        d = cls(
            target=target,
            source=f.text("source"),
            format=f.text("format"),
            virtual_size=f.integer("virtual_size"),
            block_size=f.block_size("block_size"),
            volume=f.relpath("volume"),
            volume_format=f.choice("volume_format", VOLUME_FORMATS),
            base=f.relpath("base"),
            base_format=f.choice("base_format", VOLUME_FORMATS),
            table=f.relpath("table"),
            table1_digest=f.digest("table1_digest"),
            difference=f.relpath("difference", optional=True),
            difference_digest=f.digest("difference_digest", optional=True),
            table_digest=f.digest("table_digest"),
            blocks=BlockCounts.from_fields(f.sub("blocks")),
            bytes_written=f.integer("bytes_written"),
            seconds=seconds,
            dirty_bitmap=f.checkpoint("dirty_bitmap"),
        )
        if (d.difference is None) != (d.difference_digest is None):
            f.fail("difference_digest", "difference and difference_digest must both be set "
                   "or both be null")
        if d.difference is None and d.volume != d.base:
            f.fail("volume", "a disk without a difference table must use its base volume")
        if d.difference is not None and d.volume == d.base:
            f.fail("volume", "a disk with a difference table must have its own point volume")
        return d


@dataclass(frozen=True)
class PointManifest:
    """``points/N.json``: the point exists iff this file does and validates (§7, §10)."""

    point: int
    generation: int
    domain: DomainInfo
    started: str
    snapshot_at: Optional[str]
    finished: str
    consistency: str
    disks: Tuple[PointDisk, ...]
    status: str = STATUS_COMPLETE
    #: the QEMU process that ran the domain at the snapshot (§7): "<boot id>:<domain id>"
    qemu_run: Optional[str] = None

    @property
    def is_generation_start(self) -> bool:
        """True for the first point of a generation (its volumes are the base volumes)."""
        return all(d.is_base for d in self.disks)

    def disk(self, target: str) -> PointDisk:
        for d in self.disks:
            if d.target == target:
                return d
        raise KeyError(target)

    def to_dict(self, with_checksum: bool = True) -> JsonDict:
        d: JsonDict = {
            "format": POINT_FORMAT, "version": FORMAT_VERSION,
            "point": self.point, "generation": self.generation, "status": self.status,
            "domain": self.domain.to_dict(),
            "started": self.started, "snapshot_at": self.snapshot_at,
            "finished": self.finished, "consistency": self.consistency,
            "disks": [x.to_dict() for x in self.disks],
        }
        if self.qemu_run is not None:  # optional within version 1 (FORMAT §12)
            d["qemu_run"] = self.qemu_run
        if with_checksum:
            d["checksum"] = manifest_checksum(d)
        return d

    def to_json(self) -> bytes:
        """The bytes of ``points/N.json``; validated first, so a bug cannot seal a
        manifest that every later reader would call corrupt."""
        d = self.to_dict()
        PointManifest.from_dict(d, f"<manifest of point {self.point}>")
        return record_bytes(d)

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any], path: PathArg) -> "PointManifest":
        check_header(obj, path, POINT_FORMAT, "point manifest")
        f = Fields(obj, path)
        stored = f.digest("checksum")
        if manifest_checksum(obj) != stored:
            _fail(path, "checksum mismatch (the manifest was changed or damaged)")
        status = f.text("status")
        if status != STATUS_COMPLETE:
            f.fail("status", f"point is not complete (status {status!r})")
        disk_list = f.items("disks")
        if not disk_list:
            f.fail("disks", "a point has at least one disk")
        disks = []
        for i, item in enumerate(disk_list):
            if not isinstance(item, dict):
                f.fail(f"disks[{i}]", f"expected an object, found {_kind(item)}")
            disks.append(PointDisk.from_fields(Fields(item, path, f"disks[{i}].")))
        targets = [d.target for d in disks]
        if len(set(targets)) != len(targets):
            f.fail("disks", f"a disk target appears twice: {targets}")
        if len({d.is_base for d in disks}) > 1:
            f.fail("disks", "disks disagree on whether this is the generation's first point")
        return cls(
            point=f.integer("point", minimum=1),
            generation=f.integer("generation", minimum=1),
            domain=DomainInfo.from_fields(f.sub("domain")),
            started=f.timestamp("started"),
            snapshot_at=f.timestamp("snapshot_at", optional=True),
            finished=f.timestamp("finished"),
            consistency=f.choice("consistency", CONSISTENCIES),
            disks=tuple(disks),
            status=status,
            qemu_run=f.text("qemu_run") if obj.get("qemu_run") is not None else None,
        )

    @classmethod
    def from_json(cls, data: Union[bytes, str], path: PathArg) -> "PointManifest":
        return cls.from_dict(load_json_object(data, path), path)


def manifest_checksum(obj: Mapping[str, Any]) -> str:
    """§7: XXH3-128 of the manifest without its ``checksum`` key, serialised as
    ``json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)``."""
    body = {k: v for k, v in obj.items() if k != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return xxhash.xxh3_128_hexdigest(text.encode("ascii"))


def to_json(manifest: PointManifest) -> bytes:
    """The bytes of a point manifest, checksum included (see :meth:`PointManifest.to_json`)."""
    return manifest.to_json()


def from_json(data: Union[bytes, str], path: PathArg) -> PointManifest:
    """A validated point manifest, or CorruptFileError / IncompatibleFormatError naming
    ``path``."""
    return PointManifest.from_json(data, path)


def _validated(d: JsonDict, cls: Any) -> JsonDict:
    """Refuse to write a record we would refuse to read."""
    cls.from_dict(d, f"<new {cls.__name__}>")
    return d
