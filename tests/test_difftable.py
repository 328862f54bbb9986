"""Difference tables: compare/apply, the .vsbd file and every check of FORMAT §6."""
from __future__ import annotations

import io
import os
import stat
import struct
from typing import List, Optional

import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmsnapbackup.core.checktable import CheckTable, write_check_table
from vmsnapbackup.core.difftable import (
    DifferenceTable,
    apply,
    changed_indexes,
    compare,
    read_difference_table,
    write_difference_table,
)
from vmsnapbackup.errors import (
    CorruptFileError,
    IncompatibleFormatError,
    IntegrityError,
    UsageError,
)

BLOCK_SIZES = [1 << e for e in range(12, 23)]


def random_table(seed: int, disk_size: int, bs: int) -> CheckTable:
    n = -(-disk_size // bs)
    return CheckTable(disk_size, bs, np.random.default_rng(seed).integers(0, 256, (n, 16),
                                                                          np.uint8))


def changed_copy(t1: CheckTable, indexes: List[int], seed: int,
                 byte: Optional[int] = None) -> CheckTable:
    """Table 1 with the given entries changed (in one byte, or replaced at random)."""
    tn = t1.copy()
    rng = np.random.default_rng(seed)
    for i in indexes:
        v = bytearray(tn.value(i))
        if byte is None:
            v = bytearray(rng.integers(0, 256, 16, np.uint8).tobytes())
        else:
            v[byte] ^= 0x80
        tn.set(i, bytes(v))
    return tn


@st.composite
def table_pairs(draw):
    bs = draw(st.sampled_from(BLOCK_SIZES))
    n = draw(st.integers(0, 400))
    size = max(0, n * bs - draw(st.integers(0, bs - 1)))
    n = -(-size // bs)
    t1 = random_table(draw(st.integers(0, 2 ** 32)), size, bs)
    kind = draw(st.sampled_from(["subset", "random", "same", "all"]))
    if kind == "random":  # an unrelated table of the same geometry
        return t1, random_table(draw(st.integers(0, 2 ** 32)), size, bs)
    if kind == "same":
        return t1, t1.copy()
    idx = list(range(n)) if kind == "all" else draw(
        st.lists(st.integers(0, max(n - 1, 0)), max_size=20, unique=True) if n else st.just([]))
    byte = draw(st.none() | st.integers(0, 15))  # one changed byte hits each uint64 half
    return t1, changed_copy(t1, idx, draw(st.integers(0, 2 ** 32)), byte)


# -- compare / apply ----------------------------------------------------------------

@settings(max_examples=120, deadline=None)
@given(table_pairs())
def test_compare_apply_round_trip(pair) -> None:
    t1, tn = pair
    diff = compare(t1, tn)
    expected = [i for i in range(t1.count) if t1.value(i) != tn.value(i)]
    assert diff.indexes.dtype == np.uint64
    assert diff.indexes.tolist() == expected
    assert [v for _i, v in diff] == [tn.value(i) for i in expected]
    assert diff.table1_digest == t1.body_digest()
    assert len(diff) == diff.changed == len(expected)
    rebuilt = apply(t1, diff)
    assert rebuilt == tn and rebuilt.body_digest() == tn.body_digest()
    assert apply(t1, diff) is not t1 and t1 == pair[0]  # table 1 is left alone


@given(st.integers(0, 2 ** 32), st.integers(0, 300), st.sampled_from(BLOCK_SIZES[:4]))
def test_difference_of_identical_tables_is_empty(seed: int, n: int, bs: int) -> None:
    t1 = random_table(seed, n * bs, bs)
    diff = compare(t1, t1.copy())
    assert diff.changed == 0 and diff.fraction() == 0.0
    assert apply(t1, diff) == t1


def test_compare_crosses_chunk_boundaries(monkeypatch) -> None:
    """Chunked comparison must not lose or shift indexes at a chunk edge."""
    import vmsnapbackup.core.difftable as dt
    monkeypatch.setattr(dt, "_COMPARE_CHUNK", 7)
    t1 = random_table(3, 50 * 4096, 4096)
    changed = [0, 6, 7, 13, 14, 20, 21, 49]
    tn = changed_copy(t1, changed, 4, byte=15)
    assert compare(t1, tn).indexes.tolist() == changed
    assert changed_indexes(t1, tn, 6, 21).tolist() == [6, 7, 13, 14, 20]
    assert apply(t1, compare(t1, tn)) == tn


def test_changed_indexes_range_checks() -> None:
    t1 = random_table(1, 10 * 4096, 4096)
    with pytest.raises(UsageError):
        changed_indexes(t1, t1, 5, 11)
    with pytest.raises(UsageError):
        changed_indexes(t1, t1, 6, 5)
    assert changed_indexes(t1, t1).size == 0


def test_fraction_of_changed_blocks() -> None:
    t1 = random_table(1, 8 * 4096, 4096)
    assert compare(t1, changed_copy(t1, [1, 5], 2)).fraction() == 0.25


@pytest.mark.parametrize("other", [(8 * 4096, 8192), (8 * 4096 + 1, 4096)])
def test_geometry_mismatch_is_a_usage_error(other) -> None:
    t1 = random_table(1, 8 * 4096, 4096)
    tn = random_table(2, *other)
    with pytest.raises(UsageError, match="new generation"):
        compare(t1, tn)
    diff = compare(tn, tn)
    with pytest.raises(UsageError, match="new generation"):
        apply(t1, diff)


def test_apply_refuses_a_difference_of_another_table1() -> None:
    t1 = random_table(1, 8 * 4096, 4096)
    other = random_table(2, 8 * 4096, 4096)
    diff = compare(other, changed_copy(other, [3], 3))
    with pytest.raises(IntegrityError, match="another table 1"):
        apply(t1, diff)


def test_constructor_refuses_bad_indexes() -> None:
    d = bytes(16)
    vals = np.zeros((2, 16), np.uint8)
    DifferenceTable(4 * 4096, 4096, d, np.array([0, 3], np.uint64), vals)
    for idx, match in [([1, 1], "strictly ascending"), ([2, 1], "strictly ascending"),
                       ([1, 4], "out of range")]:
        with pytest.raises(UsageError, match=match):
            DifferenceTable(4 * 4096, 4096, d, np.array(idx, np.uint64), vals)
    with pytest.raises(UsageError):
        DifferenceTable(4 * 4096, 4096, d, np.array([0, 3], np.int64), vals)
    with pytest.raises(UsageError):
        DifferenceTable(4 * 4096, 4096, d, np.array([0, 3], np.uint64), vals[:1])
    with pytest.raises(UsageError):
        DifferenceTable(4 * 4096, 4096, b"short", np.array([0, 3], np.uint64), vals)
    with pytest.raises(UsageError):
        DifferenceTable(4 * 4096, 1000, d, np.array([0, 3], np.uint64), vals)


# -- file round trip ---------------------------------------------------------------

@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table_pairs())
def test_write_read_round_trip(tmp_path, pair) -> None:
    t1, tn = pair
    diff = compare(t1, tn)
    path = tmp_path / "diff-000002.vsbd"
    checksum = write_difference_table(path, diff)
    raw = path.read_bytes()
    assert len(raw) == 80 + 24 * diff.changed
    assert raw[:8] == b"VSBDIFF\0"
    assert int.from_bytes(raw[32:40], "little") == diff.changed
    assert raw[40:56] == t1.body_digest() and raw[56:64] == bytes(8)
    for k, (i, v) in enumerate(diff):  # entry k: u64 LE index, then the 16-byte value
        entry = raw[64 + 24 * k:64 + 24 * (k + 1)]
        assert int.from_bytes(entry[:8], "little") == i and entry[8:] == v
    assert raw[-16:] == checksum == xxhash.xxh3_128_digest(raw[:-16])
    back = read_difference_table(path, table1=t1, expected_checksum=checksum)
    assert back == diff
    assert apply(t1, back) == tn
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_round_trip_through_file_objects() -> None:
    t1 = random_table(1, 100 * 65536, 65536)
    diff = compare(t1, changed_copy(t1, [0, 50, 99], 2))
    out = io.BytesIO()
    write_difference_table(out, diff)
    back = read_difference_table(io.BytesIO(out.getvalue()), table1_digest=t1.body_digest())
    assert back == diff


# -- corruption: every check of FORMAT §6 -----------------------------------------

T1 = random_table(11, 10 * 4096 + 100, 4096)


def valid_file(tmp_path, name: str = "diff-000002.vsbd") -> tuple:
    diff = compare(T1, changed_copy(T1, [0, 4, 10], 12))
    path = tmp_path / name
    write_difference_table(path, diff)
    return path, path.read_bytes()


def craft(*, magic=b"VSBDIFF\0", version=1, algorithm=1, value_size=16, flags=0, bs=4096,
          disk=10 * 4096 + 100, count=None, digest=None, indexes=(1, 5, 10)) -> bytes:
    """A difference table file built by hand from §6, with a correct checksum."""
    digest = T1.body_digest() if digest is None else digest
    count = len(indexes) if count is None else count
    head = struct.pack("<8sHHHHIIQQ", magic, version, algorithm, value_size, flags, bs, 0,
                       disk, count) + digest + bytes(8)
    body = b"".join(struct.pack("<Q", i) + os.urandom(16) for i in indexes)
    return head + body + xxhash.xxh3_128_digest(head + body)


def assert_corrupt(path, data: bytes, match: str, **kw) -> None:
    path.write_bytes(data)
    with pytest.raises(CorruptFileError, match=match) as info:
        read_difference_table(path, **kw)
    assert str(path) in str(info.value) and info.value.path == str(path)


def test_crafted_valid_file_reads(tmp_path) -> None:
    (tmp_path / "d.vsbd").write_bytes(craft())
    diff = read_difference_table(tmp_path / "d.vsbd", table1=T1)
    assert diff.indexes.tolist() == [1, 5, 10] and diff.count == 11


@pytest.mark.parametrize("region", ["header", "body", "trailer"])
def test_truncated_in_every_region(tmp_path, region: str) -> None:
    path, raw = valid_file(tmp_path)
    cuts = {"header": [0, 8, 40, 63, 64, 79],
            "body": [80, 64 + 24 + 3, len(raw) - 17],
            "trailer": [len(raw) - 16, len(raw) - 1]}[region]
    for cut in cuts:
        assert_corrupt(path, raw[:cut], "too short|file length")


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_flipped_byte_is_detected(tmp_path, data: st.DataObject) -> None:
    path, raw = valid_file(tmp_path, "flip.vsbd")
    pos = data.draw(st.integers(0, len(raw) - 1))
    damaged = bytearray(raw)
    damaged[pos] ^= data.draw(st.integers(1, 255))
    path.write_bytes(bytes(damaged))
    if int.from_bytes(damaged[8:10], "little") > 1:  # reads as a newer version (§5 order)
        with pytest.raises(IncompatibleFormatError):
            read_difference_table(path, table1=T1)
    else:
        with pytest.raises(CorruptFileError) as info:
            read_difference_table(path, table1=T1)
        assert str(path) in str(info.value)


def test_foreign_files_have_wrong_magic(tmp_path) -> None:
    path = tmp_path / "foreign.vsbd"
    table_file = io.BytesIO()
    write_check_table(table_file, T1)
    assert_corrupt(path, table_file.getvalue(), "bad magic")  # a check table is not a diff
    assert_corrupt(path, b'{"format": "vmsnapbackup-pool", "version": 1, "created": "x"}' * 2,
                   "bad magic")
    assert_corrupt(path, bytes(200), "bad magic")


def test_newer_version_is_incompatible(tmp_path) -> None:
    path = tmp_path / "new.vsbd"
    path.write_bytes(craft(version=3))
    with pytest.raises(IncompatibleFormatError, match="version 3 is newer"):
        read_difference_table(path)


@pytest.mark.parametrize("fields,match", [
    ({"version": 0}, "invalid format version"),
    ({"algorithm": 0}, "unknown algorithm"),
    ({"value_size": 8}, "value size"),
    ({"flags": 2}, "unknown flags"),
    ({"bs": 4096 + 512}, "invalid block size"),
    ({"count": 12, "indexes": range(12)}, "more than the 11 blocks"),
    ({"count": 4}, "file length"),
    ({"count": 2}, "file length"),
    ({"indexes": (1, 5, 5)}, "entry 2: index 5 is not greater"),
    ({"indexes": (6, 5, 10)}, "entry 1: index 5 is not greater"),
    ({"indexes": (1, 5, 11)}, "entry 2: index 11 is out of range"),
    ({"indexes": (2 ** 64 - 1,)}, "out of range"),
    ({"disk": 5 * 4096, "indexes": (1, 5)}, "out of range"),
])
def test_each_check_names_itself(tmp_path, fields, match: str) -> None:
    assert_corrupt(tmp_path / "bad.vsbd", craft(**fields), match)


def test_semantic_checks_run_after_the_checksum(tmp_path) -> None:
    """An index fault in a file whose checksum fails is reported as the damage it is."""
    data = bytearray(craft(indexes=(1, 5, 5)))
    data[-1] ^= 1
    assert_corrupt(tmp_path / "bad.vsbd", bytes(data), "checksum mismatch")


def test_binding_to_table1(tmp_path) -> None:
    path = tmp_path / "d.vsbd"
    other = random_table(99, T1.disk_size, T1.block_size)
    path.write_bytes(craft())
    read_difference_table(path, table1=T1)
    read_difference_table(path, table1_digest=T1.body_digest())
    assert_corrupt(path, craft(), "bound to table 1", table1=other)
    assert_corrupt(path, craft(), "bound to table 1", table1_digest=bytes(16))
    assert_corrupt(path, craft(digest=bytes(16)), "bound to table 1", table1=T1)
    smaller = random_table(1, 11 * 4096, 4096)
    assert_corrupt(path, craft(), "differ from table 1", table1=smaller)
    with pytest.raises(CorruptFileError, match="recorded"):
        read_difference_table(path, expected_checksum=bytes(16))


def test_empty_difference_file(tmp_path) -> None:
    path = tmp_path / "d.vsbd"
    path.write_bytes(craft(indexes=()))
    diff = read_difference_table(path, table1=T1)
    assert diff.changed == 0 and apply(T1, diff) == T1
