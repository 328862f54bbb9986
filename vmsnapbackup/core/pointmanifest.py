"""The point manifest, ``points/<N>.json`` (FORMAT.md §7): a point exists iff its
manifest does and validates, so this is the record every restore starts from.

Its checksum (FORMAT.md §7.3) is defined over the stored bytes, so that any language
can check it without reproducing one JSON serializer: version 2 files end with the
``checksum`` member, and the checksum is the XXH3-128 of every byte before its 32
hex digits.  Version 1 files defined it over Python's ``json.dumps`` of the parsed
object; that is still how a version-1 manifest is checked (and only then).
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import xxhash

from ..errors import CorruptFileError
from .jsonfields import (
    ENCRYPTED_VERSION,
    FORMAT_VERSION,
    Fields,
    JsonDict,
    PathArg,
    check_header,
    kind_of,
    load_json_object,
)
from .names import (
    GENERATIONS_DIR,
    TABLE_RE,
    VOLUME_FORMATS,
    base_volume_name,
    difference_name,
    number_name,
    point_volume_name,
)

__all__ = [
    "COMPRESSIONS",
    "CONSISTENCIES",
    "CONSISTENCY_CRASH",
    "CONSISTENCY_OFFLINE",
    "CONSISTENCY_QUIESCED",
    "POINT_FORMAT",
    "STATUS_COMPLETE",
    "BlockCounts",
    "DomainInfo",
    "PointDisk",
    "PointManifest",
    "manifest_bytes",
    "manifest_checksum",
    "manifest_checksum_v1",
    "stored_checksum",
]

POINT_FORMAT = "vmsnapbackup-point"
STATUS_COMPLETE = "complete"

CONSISTENCY_QUIESCED = "quiesced"
CONSISTENCY_CRASH = "crash-consistent"
CONSISTENCY_OFFLINE = "offline"
CONSISTENCIES = (CONSISTENCY_QUIESCED, CONSISTENCY_CRASH, CONSISTENCY_OFFLINE)

#: How a volume may be compressed (FORMAT §15.1): qcow2 compression types we write.
COMPRESSIONS = ("zstd",)

#: The end of every version-2 manifest: the checksum member closes the object (§7.3).
_TRAILER = re.compile(rb'"checksum": "([0-9a-f]{32})"\n\}\n\Z')
_CHECKSUM_KEY_LINE = ',\n  "checksum": "'
#: An image format libvirt names (``qcow2``, ``raw``, ``vmdk``, ...).
_IMAGE_FORMAT = re.compile(r"[A-Za-z0-9_-]{1,32}")
#: ``<host boot id>:<libvirt domain id>`` (§7).
_QEMU_RUN = re.compile(r"[A-Za-z0-9-]{1,64}:[0-9]{1,20}")
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


# --- the checksum (§7.3) -----------------------------------------------------------------

def manifest_bytes(body: Mapping[str, Any]) -> bytes:
    """The stored form of a version-2 manifest: ``body`` (without ``checksum``) as
    every record is written, with the checksum member appended last."""
    obj = {k: v for k, v in body.items() if k != "checksum"}
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=True)
    if not obj or not text.endswith("\n}"):
        raise ValueError("a manifest is a non-empty JSON object")
    head = (text[:-2] + _CHECKSUM_KEY_LINE).encode("ascii")
    return head + xxhash.xxh3_128_hexdigest(head).encode("ascii") + b'"\n}\n'


def stored_checksum(data: bytes) -> tuple[str, str] | None:
    """(stored, computed) checksum of version-2 manifest bytes, or None when the file
    does not end with the checksum member."""
    m = _TRAILER.search(data)
    if m is None:
        return None
    return m.group(1).decode("ascii"), xxhash.xxh3_128_hexdigest(data[:m.start(1)])


def manifest_checksum_v1(obj: Mapping[str, Any]) -> str:
    """Version 1's checksum: XXH3-128 of the manifest without ``checksum`` as
    ``json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)``."""
    body = {k: v for k, v in obj.items() if k != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return xxhash.xxh3_128_hexdigest(text.encode("ascii"))


#: the name this had before version 2 (kept for callers of the old module)
manifest_checksum = manifest_checksum_v1


def _check_checksum(data: bytes, obj: Mapping[str, Any], version: int, path: PathArg) -> None:
    f = Fields(obj, path)
    stored = f.digest("checksum")
    if version == 1:
        ok = manifest_checksum_v1(obj) == stored
    else:
        found = stored_checksum(data)
        if found is None:
            raise CorruptFileError(path, "does not end with its checksum member "
                                   "(truncated or rewritten)")
        ok = found[0] == stored and found[1] == stored
    if not ok:
        raise CorruptFileError(path, "checksum mismatch (the manifest was changed or damaged)")


# --- the parts of a manifest -------------------------------------------------------------

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
        if not self.unchanged:  # optional (FORMAT §12)
            del d["unchanged"]
        return d

    @classmethod
    def from_fields(cls, f: Fields) -> BlockCounts:
        unchanged = f.integer("unchanged") if f.obj.get("unchanged") is not None else 0
        return cls(total=f.integer("total"), read=f.integer("read"), holes=f.integer("holes"),
                   changed=f.integer("changed"), zero=f.integer("zero"), unchanged=unchanged)


@dataclass(frozen=True)
class DomainInfo:
    """The domain as it was at the point: enough to define it again on restore."""

    name: str
    uuid: str
    xml: str
    #: in an encrypted pool (FORMAT §15.2): the sealed XML in base64, and ``xml`` is ""
    xml_sealed: str | None = None

    def to_dict(self) -> JsonDict:
        d: JsonDict = {"name": self.name, "uuid": self.uuid, "xml": self.xml}
        if self.xml_sealed is not None:
            d["xml_sealed"] = self.xml_sealed
        return d

    @classmethod
    def from_fields(cls, f: Fields) -> DomainInfo:
        sealed = f.text("xml_sealed") if f.obj.get("xml_sealed") is not None else None
        if sealed is not None and not _BASE64.fullmatch(sealed):
            f.fail("xml_sealed", "not base64")
        return cls(name=f.domain_name("name"), uuid=f.uuid("uuid"),
                   xml=f.text("xml", allow_empty=sealed is not None), xml_sealed=sealed)


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
    difference: str | None
    difference_digest: str | None
    table_digest: str
    blocks: BlockCounts
    bytes_written: int
    seconds: Mapping[str, float] = field(default_factory=dict)
    #: the bitmap that let the pass skip unwritten blocks (None: every data block was read)
    dirty_bitmap: str | None = None
    #: "zstd" when the volume holds compressed clusters (FORMAT §15.1; None: plain)
    compression: str | None = None
    #: the volume file's size when sealed: what the point costs in the pool (None: unknown)
    volume_bytes: int | None = None

    @property
    def is_base(self) -> bool:
        """True when this disk's volume is the base volume (a generation's first point)."""
        return self.difference is None

    def to_dict(self) -> JsonDict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["blocks"] = self.blocks.to_dict()
        d["seconds"] = dict(self.seconds)
        for optional in ("dirty_bitmap", "compression", "volume_bytes"):
            if d[optional] is None:  # optional (FORMAT §12, §15.1)
                del d[optional]
        return d

    @classmethod
    def from_fields(cls, f: Fields) -> PointDisk:
        seconds_f = f.sub("seconds")
        seconds = {k: seconds_f.number(k) for k in sorted(seconds_f.obj)}
        d = cls(
            target=f.target("target"),
            source=f.host_path("source"),
            format=f.matching("format", _IMAGE_FORMAT, "an image format name"),
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
            compression=(f.choice("compression", COMPRESSIONS)
                         if f.obj.get("compression") is not None else None),
            volume_bytes=(f.integer("volume_bytes")
                          if f.obj.get("volume_bytes") is not None else None),
        )
        if (d.difference is None) != (d.difference_digest is None):
            f.fail("difference_digest", "difference and difference_digest must both be set "
                   "or both be null")
        if d.difference is None and d.volume != d.base:
            f.fail("volume", "a disk without a difference table must use its base volume")
        if d.difference is not None and d.volume == d.base:
            f.fail("volume", "a disk with a difference table must have its own point volume")
        return d

    def check_layout(self, f: Fields, point: int, generation: int) -> None:
        """Every path names the file §1 puts there for this point, generation and disk:
        a manifest cannot send a restore to another disk's, point's or domain's file."""
        store = f"{GENERATIONS_DIR}/{number_name(generation)}/{self.target}/"
        expect = {"base": store + base_volume_name(self.base_format)}
        if self.difference is None:
            expect["volume"] = expect["base"]
        else:
            expect["volume"] = store + point_volume_name(point)
            expect["difference"] = store + difference_name(point)
            if self.volume_format != "qcow2":
                f.fail("volume_format", "a point volume is qcow2")
        for key, want in expect.items():
            if getattr(self, key) != want:
                f.fail(key, f"expected {want!r} for point {point}, found {getattr(self, key)!r}")
        if not (self.table.startswith(store) and TABLE_RE.fullmatch(self.table[len(store):])):
            f.fail("table", f"not table 1 of {store}: {self.table!r}")


@dataclass(frozen=True)
class PointManifest:
    """``points/N.json``: the point exists iff this file does and validates (§7, §10)."""

    point: int
    generation: int
    domain: DomainInfo
    started: str
    snapshot_at: str | None
    finished: str
    consistency: str
    disks: tuple[PointDisk, ...]
    status: str = STATUS_COMPLETE
    #: the QEMU process that ran the domain at the snapshot (§7): "<boot id>:<domain id>"
    qemu_run: str | None = None
    #: the format version of the file it was read from (written: always the current one)
    version: int = field(default=FORMAT_VERSION, compare=False)

    @property
    def is_generation_start(self) -> bool:
        """True for the first point of a generation (its volumes are the base volumes)."""
        return all(d.is_base for d in self.disks)

    def disk(self, target: str) -> PointDisk:
        for d in self.disks:
            if d.target == target:
                return d
        raise KeyError(target)

    def to_dict(self) -> JsonDict:
        """The fields of the manifest as written, without ``checksum`` (a property of
        the stored bytes, added by :meth:`to_json`)."""
        d: JsonDict = {
            "format": POINT_FORMAT,
            "version": FORMAT_VERSION if self.domain.xml_sealed is None else ENCRYPTED_VERSION,
            "point": self.point, "generation": self.generation, "status": self.status,
            "domain": self.domain.to_dict(),
            "started": self.started, "snapshot_at": self.snapshot_at,
            "finished": self.finished, "consistency": self.consistency,
            "disks": [x.to_dict() for x in self.disks],
        }
        if self.qemu_run is not None:  # optional (FORMAT §12)
            d["qemu_run"] = self.qemu_run
        return d

    def to_json(self) -> bytes:
        """The bytes of ``points/N.json``; read back first, so a bug cannot seal a
        manifest that every later reader would call corrupt."""
        data = manifest_bytes(self.to_dict())
        PointManifest.from_json(data, f"<manifest of point {self.point}>")
        return data

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any], path: PathArg) -> PointManifest:
        """The manifest's fields, validated; the checksum is not looked at (it is a
        property of the stored bytes: :meth:`from_json` checks it)."""
        version = check_header(obj, path, POINT_FORMAT, "point manifest")
        f = Fields(obj, path)
        status = f.text("status")
        if status != STATUS_COMPLETE:
            f.fail("status", f"point is not complete (status {status!r})")
        disk_list = f.items("disks")
        if not disk_list:
            f.fail("disks", "a point has at least one disk")
        disks: list[PointDisk] = []
        for i, item in enumerate(disk_list):
            if not isinstance(item, dict):
                f.fail(f"disks[{i}]", f"expected an object, found {kind_of(item)}")
            disks.append(PointDisk.from_fields(Fields(item, path, f"disks[{i}].")))
        targets = [d.target for d in disks]
        if len(set(targets)) != len(targets):
            f.fail("disks", f"a disk target appears twice: {targets}")
        if len({d.is_base for d in disks}) > 1:
            f.fail("disks", "disks disagree on whether this is the generation's first point")
        m = cls(
            point=f.integer("point", minimum=1),
            generation=f.integer("generation", minimum=1),
            domain=DomainInfo.from_fields(f.sub("domain")),
            started=f.timestamp("started"),
            snapshot_at=f.timestamp("snapshot_at", optional=True),
            finished=f.timestamp("finished"),
            consistency=f.choice("consistency", CONSISTENCIES),
            disks=tuple(disks),
            status=status,
            qemu_run=(f.matching("qemu_run", _QEMU_RUN, "<boot id>:<domain id>")
                      if obj.get("qemu_run") is not None else None),
            version=version,
        )
        for i, d in enumerate(m.disks):
            d.check_layout(Fields(disk_list[i], path, f"disks[{i}]."), m.point, m.generation)
        return m

    @classmethod
    def from_json(cls, data: bytes | str, path: PathArg) -> PointManifest:
        """A manifest read from its stored bytes: parse, version gate, checksum, fields."""
        raw = data.encode("utf-8") if isinstance(data, str) else data
        obj = load_json_object(raw, path)
        version = check_header(obj, path, POINT_FORMAT, "point manifest")
        _check_checksum(raw, obj, version, path)
        return cls.from_dict(obj, path)
