from __future__ import annotations

import copy
import json
from typing import Any, Dict

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmsnapbackup.core import manifest as mf
from vmsnapbackup.errors import CorruptFileError, IncompatibleFormatError

UUID = "3f2a4b6c-1d2e-4f30-8a9b-0c1d2e3f4a5b"
PATH = "/pool/domains/x/points/000003.json"
D1 = "11" * 16
D2 = "22" * 16
D3 = "33" * 16


def spec_checksum(obj: Dict[str, Any]) -> str:
    """The §7 rule, written out independently of the code under test."""
    body = {k: v for k, v in obj.items() if k != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return xxhash.xxh3_128_digest(text.encode()).hex()


def spec_manifest(point: int = 3, first: bool = False) -> Dict[str, Any]:
    """A manifest written by hand after FORMAT.md §7 (not produced by the code)."""
    vol = ("generations/000001/vda/base.qcow2" if first
           else f"generations/000001/vda/point-{point:06d}.qcow2")
    obj: Dict[str, Any] = {
        "format": "vmsnapbackup-point", "version": 1,
        "point": point, "generation": 1, "status": "complete",
        "domain": {"name": "web1", "uuid": UUID, "xml": "<domain type='kvm'>web1</domain>"},
        "started": "2026-11-25T13:00:00.123Z", "snapshot_at": "2026-11-25T13:00:00.200Z",
        "finished": "2026-11-25T13:00:02.500Z",
        "consistency": "crash-consistent",
        "disks": [{
            "target": "vda", "source": "/var/lib/libvirt/images/web1.qcow2", "format": "qcow2",
            "virtual_size": 68719476736, "block_size": 65536,
            "volume": vol, "volume_format": "qcow2",
            "base": "generations/000001/vda/base.qcow2", "base_format": "qcow2",
            "table": "generations/000001/vda/table-000001.vsbt", "table1_digest": D1,
            "difference": None if first else f"generations/000001/vda/diff-{point:06d}.vsbd",
            "difference_digest": None if first else D2,
            "table_digest": D3,
            "blocks": {"total": 1048576, "read": 40000, "holes": 1008576, "changed": 812,
                       "zero": 3},
            "bytes_written": 53215232, "seconds": {"read": 1.9, "commit": 0.4},
        }],
    }
    obj["checksum"] = spec_checksum(obj)
    return obj


def dump(obj: Dict[str, Any]) -> bytes:
    return json.dumps(obj, indent=1).encode()


def resealed(obj: Dict[str, Any]) -> bytes:
    obj = copy.deepcopy(obj)
    obj["checksum"] = spec_checksum(obj)
    return dump(obj)


# --- the good path ------------------------------------------------------------------------

def test_hand_written_manifest_reads() -> None:
    m = mf.from_json(dump(spec_manifest()), PATH)
    assert m.point == 3 and m.generation == 1
    assert m.domain.uuid == UUID
    d = m.disk("vda")
    assert d.difference == "generations/000001/vda/diff-000003.vsbd"
    assert d.blocks == mf.BlockCounts(1048576, 40000, 1008576, 812, 3)
    assert d.seconds == {"read": 1.9, "commit": 0.4}
    assert not m.is_generation_start


def test_first_point_of_generation_reads() -> None:
    m = mf.from_json(dump(spec_manifest(point=1, first=True)), PATH)
    assert m.is_generation_start
    assert m.disks[0].volume == m.disks[0].base and m.disks[0].difference_digest is None


def spec_checksum_v2(data: bytes) -> str:
    """The version-2 rule of §7.3, written out independently: the file ends with the
    checksum member; hash every byte before its 32 hex digits."""
    assert data.endswith(b'"\n}\n')
    head = data[:-36]
    assert head.endswith(b'"checksum": "')
    return xxhash.xxh3_128_hexdigest(head)


def hand_written_v2(obj: Dict[str, Any]) -> bytes:
    """A version-2 manifest serialised differently from the code (compact, unsorted
    keys, UTF-8 left unescaped): the checksum must not care how the body is written."""
    body = {k: v for k, v in obj.items() if k != "checksum"}
    body["version"] = 2
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
    head = (text[:-1] + ',"checksum": "').encode("utf-8")
    return head + xxhash.xxh3_128_hexdigest(head).encode() + b'"\n}\n'


def test_written_manifest_is_version_2_with_spec_checksum_and_round_trips() -> None:
    m = mf.from_json(dump(spec_manifest()), PATH)
    assert m.version == 1
    data = mf.to_json(m)
    obj = json.loads(data)
    assert obj["version"] == 2
    assert obj["checksum"] == spec_checksum_v2(data)
    assert {k: v for k, v in obj.items() if k not in ("checksum", "version")} == \
        {k: v for k, v in spec_manifest().items() if k not in ("checksum", "version")}
    again = mf.from_json(data, PATH)
    assert again == m and again.version == 2


def test_version_2_checksum_is_over_the_stored_bytes() -> None:
    obj = spec_manifest()
    obj["domain"]["xml"] = "<domain><description>caf\u00e9</description></domain>"
    data = hand_written_v2(obj)
    m = mf.from_json(data, PATH)
    assert m.version == 2 and "caf\u00e9" in m.domain.xml
    # same JSON value, other bytes: the checksum no longer matches
    spaced = data.replace(b'"point":3', b'"point": 3', 1)
    assert json.loads(spaced) == json.loads(data)
    with pytest.raises(CorruptFileError, match="checksum mismatch"):
        mf.from_json(spaced, PATH)
    # the version-1 rule does not pass for a version-2 file
    v1_sealed = dict(json.loads(data))
    v1_sealed["checksum"] = spec_checksum(v1_sealed)
    with pytest.raises(CorruptFileError, match="checksum"):
        mf.from_json(dump(v1_sealed), PATH)


def test_version_2_checksum_member_must_close_the_file() -> None:
    data = mf.to_json(mf.from_json(dump(spec_manifest()), PATH))
    obj = json.loads(data)
    moved = json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n"   # checksum not last
    with pytest.raises(CorruptFileError, match="does not end with its checksum"):
        mf.from_json(moved, PATH)
    with pytest.raises(CorruptFileError):
        mf.from_json(data + b"\n", PATH)


def test_to_json_refuses_an_invalid_manifest() -> None:
    import dataclasses
    m = mf.from_json(dump(spec_manifest()), PATH)
    bad = dataclasses.replace(m, consistency="whatever")
    with pytest.raises(CorruptFileError, match="consistency"):
        mf.to_json(bad)


# --- corruption ---------------------------------------------------------------------------

def test_truncated_manifest_is_corrupt_and_named() -> None:
    data = dump(spec_manifest())
    for n in (0, 1, len(data) // 2, len(data) - 2):
        with pytest.raises(CorruptFileError) as ei:
            mf.from_json(data[:n], PATH)
        assert ei.value.path == PATH and PATH in str(ei.value)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_flipped_bit_is_caught_or_harmless(data: st.DataObject) -> None:
    v1 = dump(spec_manifest())
    stored = data.draw(st.sampled_from([v1, mf.to_json(mf.from_json(v1, PATH))]))
    raw = bytearray(stored)
    i = data.draw(st.integers(0, len(raw) - 1))
    bit = data.draw(st.integers(0, 7))
    raw[i] ^= 1 << bit
    original = mf.from_json(stored, PATH)
    try:
        got = mf.from_json(bytes(raw), PATH)
    except CorruptFileError as err:
        assert err.path == PATH
    except IncompatibleFormatError as err:  # the flip landed in "version"
        assert "newer" in str(err)
    else:
        assert got == original  # only a flip that changes nothing may pass


def test_wrong_checksum() -> None:
    obj = spec_manifest()
    obj["disks"][0]["blocks"]["changed"] = 813  # not resealed
    with pytest.raises(CorruptFileError, match="checksum"):
        mf.from_json(dump(obj), PATH)


@pytest.mark.parametrize("foreign", [b"[]", b'"x"', b"{}", b'{"format": "other", "version": 1}',
                                     b"\xff\xfe", b"not json", b'{"a": NaN}',
                                     b'{"format": "vmsnapbackup-point", "format": "x"}'])
def test_foreign_json_is_corrupt(foreign: bytes) -> None:
    with pytest.raises(CorruptFileError) as ei:
        mf.from_json(foreign, PATH)
    assert ei.value.path == PATH


def test_other_record_kind_is_foreign() -> None:
    rec = mf.DomainRecord(UUID, "web1", 3).to_json()
    with pytest.raises(CorruptFileError, match="not a vmsnapbackup-point file"):
        mf.from_json(rec, PATH)


def test_newer_version_is_incompatible() -> None:
    obj = spec_manifest()
    obj["version"] = 4
    obj["newfield"] = {"whatever": 1}
    with pytest.raises(IncompatibleFormatError, match=r"version 4 is newer than this "
                       r"vmsnapbackup \(3\); upgrade"):
        mf.from_json(resealed(obj), PATH)


@pytest.mark.parametrize("version", [0, -1, "1", 1.0, True, None])
def test_bad_version_is_corrupt(version: Any) -> None:
    obj = spec_manifest()
    obj["version"] = version
    with pytest.raises(CorruptFileError, match="version"):
        mf.from_json(resealed(obj), PATH)


def _all_keys(obj: Any, prefix: tuple = ()) -> list:
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.append(prefix + (k,))
            out.extend(_all_keys(v, prefix + (k,)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.extend(_all_keys(v, prefix + (i,)))
    return out


REQUIRED = [k for k in _all_keys(spec_manifest())
            if not (len(k) >= 3 and k[-2] == "seconds")]  # seconds' keys are free-form


@pytest.mark.parametrize("key", REQUIRED, ids=lambda k: ".".join(map(str, k)))
def test_missing_field_is_corrupt_naming_it(key: tuple) -> None:
    obj = spec_manifest()
    parent = obj
    for k in key[:-1]:
        parent = parent[k]
    del parent[key[-1]]
    data = dump(obj) if key == ("checksum",) else resealed(obj)
    with pytest.raises(CorruptFileError) as ei:
        mf.from_json(data, PATH)
    assert str(key[-1]) in ei.value.reason
    assert ei.value.path == PATH


WRONG_TYPES = [
    (("point",), "3"), (("point",), 0), (("point",), True), (("generation",), 1.5),
    (("domain",), "web1"), (("domain", "uuid"), "not-a-uuid"),
    (("domain", "uuid"), UUID.upper()), (("started",), "yesterday"), (("finished",), None),
    (("consistency",), "perfect"), (("disks",), {}), (("disks",), []),
    (("disks", 0, "target"), "../vda"), (("disks", 0, "virtual_size"), -1),
    (("disks", 0, "block_size"), 65535), (("disks", 0, "block_size"), 1 << 23),
    (("disks", 0, "volume"), "/etc/passwd"), (("disks", 0, "volume"), "../../x"),
    (("disks", 0, "base"), "generations//base.qcow2"), (("disks", 0, "volume_format"), "vmdk"),
    (("disks", 0, "table1_digest"), "AB" * 16), (("disks", 0, "table_digest"), "ab"),
    (("disks", 0, "difference"), None), (("disks", 0, "blocks", "zero"), -3),
    (("disks", 0, "blocks"), [1, 2]), (("disks", 0, "seconds", "read"), "1.9"),
    (("disks", 0, "bytes_written"), 1e9),
    # names from a pool reach paths and XML: validated at parse time (FORMAT §13)
    (("domain", "name"), "../../escaped"), (("domain", "name"), "a\nb"),
    (("domain", "name"), ".."), (("disks", 0, "source"), "images/web1.qcow2"),
    (("disks", 0, "format"), "qcow2 -o x"), (("qemu_run",), "x; rm"),
    # a path must be the one §1 gives this point, generation and disk
    (("disks", 0, "volume"), "generations/000001/vda/point-000004.qcow2"),
    (("disks", 0, "volume"), "generations/000002/vda/point-000003.qcow2"),
    (("disks", 0, "difference"), "generations/000001/vdb/diff-000003.vsbd"),
    (("disks", 0, "base"), "generations/000001/vda/base.raw"),
    (("disks", 0, "table"), "generations/000001/vda/point-000003.qcow2"),
    (("disks", 0, "table"), "points/000001.json"),
]


@pytest.mark.parametrize("key,value", WRONG_TYPES, ids=lambda x: str(x))
def test_wrong_value_is_corrupt(key: tuple, value: Any) -> None:
    obj = spec_manifest()
    parent = obj
    for k in key[:-1]:
        parent = parent[k]
    parent[key[-1]] = value
    with pytest.raises(CorruptFileError) as ei:
        mf.from_json(resealed(obj), PATH)
    assert ei.value.path == PATH


@pytest.mark.parametrize("status", ["running", "failed", ""])
def test_status_not_complete_is_corrupt(status: str) -> None:
    obj = spec_manifest()
    obj["status"] = status
    with pytest.raises(CorruptFileError, match="status"):
        mf.from_json(resealed(obj), PATH)


def test_first_point_rules() -> None:
    obj = spec_manifest(point=1, first=True)
    obj["disks"][0]["volume"] = "generations/000001/vda/point-000001.qcow2"
    with pytest.raises(CorruptFileError, match="base volume"):
        mf.from_json(resealed(obj), PATH)
    obj = spec_manifest()
    obj["disks"][0]["difference_digest"] = None
    with pytest.raises(CorruptFileError, match="both"):
        mf.from_json(resealed(obj), PATH)


def test_duplicate_targets_are_corrupt() -> None:
    obj = spec_manifest()
    obj["disks"].append(copy.deepcopy(obj["disks"][0]))
    with pytest.raises(CorruptFileError, match="twice"):
        mf.from_json(resealed(obj), PATH)


def test_offline_point_may_lack_snapshot_time() -> None:
    obj = spec_manifest()
    obj["consistency"] = "offline"
    obj["snapshot_at"] = None
    assert mf.from_json(resealed(obj), PATH).snapshot_at is None


# --- pool header, domain.json, generation.json --------------------------------------------

def spec_generation() -> Dict[str, Any]:
    return {"format": "vmsnapbackup-generation", "version": 1, "generation": 2,
            "first_point": 5, "created": "2026-11-25T13:00:00Z", "block_size": 65536,
            "algorithm": "xxh3-128",
            "disks": {"vda": {"virtual_size": 68719476736, "base_format": "qcow2",
                              "base": "base.qcow2", "table": "table-000005.vsbt",
                              "table_digest": D1}}}


RECORDS = [
    (mf.PoolHeader, {"format": "vmsnapbackup-pool", "version": 1,
                     "created": "2026-11-25T13:00:00Z"}, "pool"),
    (mf.DomainRecord, {"format": "vmsnapbackup-domain", "version": 1, "uuid": UUID,
                       "name": "web1", "last_point": 3}, "domain record"),
    (mf.GenerationRecord, spec_generation(), "generation"),
]


@pytest.mark.parametrize("cls,obj,kind", RECORDS, ids=lambda x: getattr(x, "__name__", ""))
def test_record_round_trip(cls: Any, obj: Dict[str, Any], kind: str) -> None:
    rec = cls.from_json(json.dumps(obj).encode(), "/p/f.json")   # version 1 reads
    assert json.loads(rec.to_json()) == dict(obj, version=2)     # and is written as 2
    assert cls.from_json(rec.to_json(), "/p/f.json") == rec


@pytest.mark.parametrize("cls,obj,kind", RECORDS, ids=lambda x: getattr(x, "__name__", ""))
def test_record_corruption(cls: Any, obj: Dict[str, Any], kind: str) -> None:
    path = "/p/f.json"
    data = json.dumps(obj).encode()
    for bad in (data[: len(data) // 2], b"", data.replace(b"{", b"[", 1),
                data.replace(b'"', b"'", 1), b'{"format": "elsewhere", "version": 1}', b"[1]"):
        with pytest.raises(CorruptFileError) as ei:
            cls.from_json(bad, path)
        assert ei.value.path == path
    for key in obj:
        partial = {k: v for k, v in obj.items() if k != key}
        with pytest.raises(CorruptFileError) as ei:
            cls.from_json(json.dumps(partial), path)
        assert key in ei.value.reason
    newer = dict(obj, version=7)
    with pytest.raises(IncompatibleFormatError) as ie:
        cls.from_json(json.dumps(newer), path)
    assert f"{kind} format version 7 is newer than this vmsnapbackup (3); upgrade" in str(ie.value)


@pytest.mark.parametrize("change", [
    {"block_size": 1000}, {"algorithm": "sha256"}, {"generation": 0}, {"disks": {}},
    {"disks": {"../x": spec_generation()["disks"]["vda"]}},
    {"disks": {"vda": dict(spec_generation()["disks"]["vda"], base="../base.qcow2")}},
    {"disks": {"vda": dict(spec_generation()["disks"]["vda"], base_format="vdi")}},
    {"disks": {"vda": dict(spec_generation()["disks"]["vda"], base="base.raw")}},
    {"disks": {"vda": dict(spec_generation()["disks"]["vda"], table="table-000004.vsbt")}},
    {"disks": {"vda": dict(spec_generation()["disks"]["vda"], table="../table-000005.vsbt")}},
])
def test_generation_bad_values(change: Dict[str, Any]) -> None:
    obj = dict(spec_generation(), **change)
    with pytest.raises(CorruptFileError):
        mf.GenerationRecord.from_json(json.dumps(obj), "/g.json")


def test_domain_record_rejects_bad_values() -> None:
    base = dict(RECORDS[1][1])
    for change in ({"last_point": -1}, {"last_point": "3"}, {"uuid": "../../etc"},
                   {"name": ""}, {"name": 5}, {"name": "../../escaped"}, {"name": "a/b"},
                   {"name": "x\x1b[2J"}):
        with pytest.raises(CorruptFileError):
            mf.DomainRecord.from_json(json.dumps(dict(base, **change)), "/d.json")


def test_timestamps() -> None:
    now = mf.utc_now()
    assert now.endswith("Z") and mf.parse_timestamp(now).utcoffset().total_seconds() == 0
    assert mf.parse_timestamp("2026-11-25T13:00:00.123456789+02:00").hour == 13
    with pytest.raises(ValueError):
        mf.parse_timestamp("2026-11-25 13:00")


def test_canonical_uuid() -> None:
    assert mf.canonical_uuid(UUID.upper()) == UUID
    assert mf.canonical_uuid("web1") is None


# --- optional fields added within version 1 (FORMAT §12) ----------------------------------

def test_dirty_bitmap_fields_round_trip_and_are_optional() -> None:
    obj = spec_manifest()
    obj["disks"][0]["dirty_bitmap"] = "vmsnapbackup-p1-0a1b2c3d"
    obj["disks"][0]["blocks"]["unchanged"] = 7
    m = mf.from_json(resealed(obj), PATH)
    d = m.disk("vda")
    assert d.dirty_bitmap == "vmsnapbackup-p1-0a1b2c3d" and d.blocks.unchanged == 7
    again = json.loads(mf.to_json(m))
    assert again["disks"][0]["dirty_bitmap"] == "vmsnapbackup-p1-0a1b2c3d"
    assert again["disks"][0]["blocks"]["unchanged"] == 7
    # absent (a manifest written before the amendment): no bitmap, nothing skipped, and a
    # re-serialisation adds neither key, so its checksum stays what it was
    plain = mf.from_json(dump(spec_manifest()), PATH)
    assert plain.disk("vda").dirty_bitmap is None and plain.disk("vda").blocks.unchanged == 0
    assert "dirty_bitmap" not in json.loads(mf.to_json(plain))["disks"][0]


@pytest.mark.parametrize("name", ["", "other-tool-cp", "vmsnapbackup-", 7, "vmsnapbackup-a/b"])
def test_a_foreign_checkpoint_name_is_corrupt(name: Any) -> None:
    obj = spec_manifest()
    obj["disks"][0]["dirty_bitmap"] = name
    with pytest.raises(CorruptFileError, match="dirty_bitmap"):
        mf.from_json(resealed(obj), PATH)


def test_generation_checkpoint_round_trips_and_is_optional() -> None:
    disks = {"vda": mf.GenerationDisk(virtual_size=2**20, base_format="qcow2",
                                      base="base.qcow2", table="table-000001.vsbt",
                                      table_digest="0" * 32)}
    rec = mf.GenerationRecord(generation=1, first_point=1, created="2026-11-25T13:00:00.123Z",
                              block_size=65536, disks=disks,
                              checkpoint="vmsnapbackup-p1-0a1b2c3d")
    assert mf.GenerationRecord.from_json(rec.to_json(), PATH) == rec
    obj = json.loads(rec.to_json())
    del obj["checkpoint"]
    assert mf.GenerationRecord.from_dict(obj, PATH).checkpoint is None
    obj["checkpoint"] = "not-ours"
    with pytest.raises(CorruptFileError, match="checkpoint"):
        mf.GenerationRecord.from_dict(obj, PATH)


def test_qemu_run_round_trips_and_is_optional() -> None:
    obj = spec_manifest()
    obj["qemu_run"] = "5e1c0000-0000-4000-8000-000000000000:17"
    m = mf.from_json(resealed(obj), PATH)
    assert m.qemu_run == obj["qemu_run"]
    assert json.loads(mf.to_json(m))["qemu_run"] == obj["qemu_run"]
    plain = mf.from_json(dump(spec_manifest()), PATH)
    assert plain.qemu_run is None and "qemu_run" not in json.loads(mf.to_json(plain))


def test_deeply_nested_json_is_corrupt_not_a_recursion_error() -> None:
    deep = b'{"format": "vmsnapbackup-point", "x": ' + b"[" * 200000 + b"]" * 200000 + b"}"
    with pytest.raises(CorruptFileError, match="nested too deeply") as ei:
        mf.from_json(deep, PATH)
    assert ei.value.path == PATH
    with pytest.raises(CorruptFileError, match="nested too deeply"):
        mf.DomainRecord.from_json(b"[" * 200000, PATH)


def test_a_domain_name_a_user_may_have_still_reads() -> None:
    obj = spec_manifest()
    obj["domain"]["name"] = "Web server (prod) \u00e9"
    assert mf.from_json(resealed(obj), PATH).domain.name == obj["domain"]["name"]
