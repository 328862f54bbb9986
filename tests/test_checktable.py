"""Check tables: hashing, zero values, building by extents, the .vsbt file and its checks."""
from __future__ import annotations

import io
import json
import os
import stat
import struct
from typing import List

import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmsnapbackup.core.checktable import (
    CheckTable,
    hash_blocks,
    read_check_table,
    write_check_table,
    zero_value,
)
from vmsnapbackup.core.tablebuilder import CheckTableBuilder
from vmsnapbackup.core.tablefile import file_checksum
from vmsnapbackup.errors import (
    CorruptFileError,
    IncompatibleFormatError,
    IntegrityError,
    UsageError,
)

KiB = 1024
BLOCK_SIZES = [1 << e for e in range(12, 23)]
SMALL_BLOCK_SIZES = [4 * KiB, 8 * KiB, 16 * KiB, 64 * KiB]
BUDGET = 6 * 1024 * KiB  # bytes of disk per example: keeps the suite fast


def reference_values(data: bytes, bs: int) -> List[bytes]:
    """FORMAT §5 stated plainly: one digest per block, the last one unpadded."""
    return [xxhash.xxh3_128_digest(data[o:o + bs]) for o in range(0, len(data), bs)]


def disk_bytes(seed: int, size: int, bs: int, zero_blocks: List[int]) -> bytes:
    """Random disk content with some blocks zeroed (holes/zeroed data are common)."""
    buf = bytearray(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    for i in zero_blocks:
        start = i * bs
        if start < size:
            end = min(start + bs, size)
            buf[start:end] = bytes(end - start)
    return bytes(buf)


@st.composite
def disks(draw, block_sizes=BLOCK_SIZES):
    bs = draw(st.sampled_from(block_sizes))
    max_blocks = max(1, BUDGET // bs)
    size = draw(st.integers(0, max_blocks * bs))
    n = -(-size // bs)
    zeros = draw(st.lists(st.integers(0, max(n - 1, 0)), max_size=4))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    return bs, disk_bytes(seed, size, bs, zeros)


# -- zero values and block hashing ----------------------------------------------

@given(st.integers(0, 70000) | st.sampled_from(BLOCK_SIZES))
def test_zero_value_matches_hashing_zeros(length: int) -> None:
    assert zero_value(length) == xxhash.xxh3_128_digest(bytes(length))


def test_zero_value_is_cached() -> None:
    assert zero_value(65536) is zero_value(65536)
    with pytest.raises(UsageError):
        zero_value(-1)


@settings(max_examples=40, deadline=None)
@given(disks())
def test_hash_blocks_matches_reference_and_flags_zero_blocks(disk) -> None:
    bs, data = disk
    hashed = hash_blocks(memoryview(data), bs)
    assert hashed.first == 0
    assert hashed.values == reference_values(data, bs)
    expected_zero = [not any(data[o:o + bs]) for o in range(0, len(data), bs)]
    assert hashed.zero == expected_zero


def test_hash_blocks_accepts_any_buffer_kind() -> None:
    data = os.urandom(3 * 4096)
    ref = reference_values(data, 4096)
    assert hash_blocks(data, 4096).values == ref
    assert hash_blocks(bytearray(data), 4096).values == ref
    assert hash_blocks(memoryview(data).cast("I"), 4096).values == ref
    assert hash_blocks(np.frombuffer(data, np.uint8).reshape(3, 4096), 4096).values == ref


# -- building tables ----------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(disks(), st.data())
def test_chunked_build_equals_one_go_and_reference(disk, data: st.DataObject) -> None:
    bs, content = disk
    size = len(content)
    whole = CheckTable.empty(size, bs)
    whole.hash_into(0, memoryview(content))
    assert bytes(whole.body()) == b"".join(reference_values(content, bs))

    chunked = CheckTable.empty(size, bs)
    offsets = sorted(set(data.draw(st.lists(st.integers(0, max(0, -(-size // bs) - 1)),
                                            max_size=6))) | {0})
    bounds = [o * bs for o in offsets] + [size]
    # Feed the chunks in a shuffled order: position, not order, decides where values go.
    pieces = list(zip(bounds, bounds[1:]))
    for start, end in data.draw(st.permutations(pieces)):
        if end > start:
            chunked.hash_into(start, memoryview(content)[start:end])
    assert chunked == whole
    assert chunked.body_digest() == xxhash.xxh3_128_digest(b"".join(reference_values(content, bs)))


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(BLOCK_SIZES), st.data())
def test_fill_zero_equals_hashing_zeros(bs: int, data: st.DataObject) -> None:
    n_max = max(1, (2 * 1024 * KiB) // bs)
    size = data.draw(st.integers(1, n_max * bs))
    n = -(-size // bs)
    first = data.draw(st.integers(0, n - 1))
    last = data.draw(st.integers(first, n - 1))
    start, end = first * bs, min((last + 1) * bs, size)

    table = CheckTable(size, bs, np.random.default_rng(1).integers(0, 256, (n, 16), np.uint8))
    expected = table.copy()
    expected.hash_into(start, bytes(end - start))
    span = table.fill_zero(start, end - start)
    assert span == range(first, last + 1)
    assert table == expected
    assert CheckTable.empty(size, bs) == _hashed(bytes(size), bs)
    assert all(table.is_zero(i) for i in span)


def _hashed(content: bytes, bs: int) -> CheckTable:
    t = CheckTable(len(content), bs, np.zeros((-(-len(content) // bs), 16), np.uint8))
    t.hash_into(0, content)
    return t


def test_short_last_block_is_hashed_unpadded() -> None:
    data = os.urandom(4096 * 2 + 100)
    t = _hashed(data, 4096)
    assert t.count == 3
    assert t.block_length(2) == 100
    assert t.value(2) == xxhash.xxh3_128_digest(data[8192:])
    assert t.value(2) != xxhash.xxh3_128_digest(data[8192:].ljust(4096, b"\0"))
    assert CheckTable.empty(8192 + 100, 4096).value(2) == zero_value(100)


def test_hash_into_returns_values_and_zero_flags() -> None:
    bs = 4096
    data = os.urandom(bs) + bytes(bs) + os.urandom(10)
    t = CheckTable.empty(8 * bs + 10, bs)
    got = t.hash_into(6 * bs, data)
    assert got.first == 6 and got.zero == [False, True, False]
    assert got.values == [t.value(6), t.value(7), t.value(8)]


@pytest.mark.parametrize("offset,length", [
    (100, 4096),          # misaligned start
    (0, 4096 + 1),        # length not a multiple, does not reach the end
    (4096 * 3, 8192),     # runs past the disk end
    (-4096, 4096),        # negative offset
])
def test_misaligned_extents_are_refused(offset: int, length: int) -> None:
    t = CheckTable.empty(4 * 4096 + 10, 4096)
    with pytest.raises(UsageError):
        t.hash_into(offset, bytes(max(length, 0)))
    with pytest.raises(UsageError):
        t.fill_zero(offset, length)


def test_value_set_and_bounds() -> None:
    t = CheckTable.empty(3 * 4096, 4096)
    v = os.urandom(16)
    t.set(1, v)
    assert t.value(1) == v and not t.is_zero(1) and t.is_zero(0)
    for bad in (-1, 3):
        with pytest.raises(UsageError):
            t.value(bad)
        with pytest.raises(UsageError):
            t.set(bad, v)
    with pytest.raises(UsageError):
        t.set(0, b"short")


@pytest.mark.parametrize("bs", [0, 1000, 8 * 1024 * 1024])
def test_bad_block_size_refused_everywhere(bs: int) -> None:
    with pytest.raises(UsageError):
        CheckTable.empty(1 << 20, bs)
    with pytest.raises(UsageError):
        CheckTableBuilder(1 << 20, bs)
    with pytest.raises(UsageError):
        hash_blocks(b"", bs)


def test_constructor_checks_shape() -> None:
    with pytest.raises(UsageError):
        CheckTable(3 * 4096, 4096, np.zeros((2, 16), np.uint8))
    with pytest.raises(UsageError):
        CheckTable(3 * 4096, 4096, np.zeros((3, 16), np.uint16))
    with pytest.raises(UsageError):
        CheckTable(-1, 4096, np.zeros((0, 16), np.uint8))
    ro = np.zeros((3, 16), np.uint8)
    ro.flags.writeable = False
    t = CheckTable(3 * 4096, 4096, ro)  # copied, so the table stays writable
    t.set(0, bytes(range(16)))
    assert not ro.any()


def test_from_bytes_and_empty_disk() -> None:
    body = os.urandom(48)
    t = CheckTable.from_bytes(3 * 4096, 4096, body)
    assert bytes(t.body()) == body and t.body_digest() == xxhash.xxh3_128_digest(body)
    with pytest.raises(UsageError):
        CheckTable.from_bytes(3 * 4096, 4096, body[:-1])
    empty = CheckTable.empty(0, 4096)
    assert empty.count == 0 and len(empty) == 0
    assert empty.body_digest() == xxhash.xxh3_128_digest(b"")


def test_builder_refuses_a_gap_and_accepts_full_cover() -> None:
    bs = 4096
    data = os.urandom(5 * bs + 7)
    b = CheckTableBuilder(len(data), bs)
    b.hash_into(0, data[:2 * bs])
    b.fill_zero(3 * bs, bs)
    b.hash_into(4 * bs, data[4 * bs:])
    assert b.first_missing() == 2
    with pytest.raises(IntegrityError, match="offset 8192"):
        b.finish()
    b.hash_into(2 * bs, data[2 * bs:3 * bs])
    t = b.finish()
    expected = bytearray(data)
    expected[3 * bs:4 * bs] = bytes(bs)
    assert t == _hashed(bytes(expected), bs)


# -- file round trip ---------------------------------------------------------------

@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(BLOCK_SIZES), st.integers(0, 300), st.integers(0, 2 ** 32 - 1))
def test_write_read_round_trip(tmp_path, bs: int, n: int, seed: int) -> None:
    tail = np.random.default_rng(seed).integers(0, bs)
    size = max(0, n * bs - int(tail))
    count = -(-size // bs)
    table = CheckTable(size, bs, np.random.default_rng(seed).integers(0, 256, (count, 16),
                                                                      np.uint8))
    path = tmp_path / "table-000001.vsbt"
    checksum = write_check_table(path, table)
    raw = path.read_bytes()
    assert len(raw) == 80 + 16 * count
    assert raw[:8] == b"VSBTABLE" and raw[64:-16] == bytes(table.body())
    assert raw[-16:] == checksum == xxhash.xxh3_128_digest(raw[:-16]) == file_checksum(path)
    back = read_check_table(path, expected_checksum=checksum,
                            expected_body_digest=table.body_digest())
    assert back == table and back.count == count
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_round_trip_through_file_objects() -> None:
    table = _hashed(os.urandom(10 * 4096 + 5), 4096)
    out = io.BytesIO()
    write_check_table(out, table)
    assert read_check_table(io.BytesIO(out.getvalue())) == table


# -- corruption: every check of FORMAT §5 -----------------------------------------

def valid_file(tmp_path, name: str = "table-000001.vsbt") -> tuple:
    table = _hashed(os.urandom(7 * 4096 + 300), 4096)
    path = tmp_path / name
    write_check_table(path, table)
    return path, path.read_bytes()


def craft(*, magic=b"VSBTABLE", version=1, algorithm=1, value_size=16, flags=0, bs=4096,
          disk=3 * 4096, count=3, body=None, reserved=0) -> bytes:
    """A check table file built by hand from §5, with a correct checksum."""
    body = os.urandom(16 * count) if body is None else body
    head = struct.pack("<8sHHHHIIQQ", magic, version, algorithm, value_size, flags, bs,
                       reserved, disk, count) + bytes(24)
    return head + body + xxhash.xxh3_128_digest(head + body)


def assert_corrupt(path, data: bytes, match: str) -> CorruptFileError:
    path.write_bytes(data)
    with pytest.raises(CorruptFileError, match=match) as info:
        read_check_table(path)
    assert str(path) in str(info.value) and info.value.path == str(path)
    return info.value


def test_crafted_valid_file_reads(tmp_path) -> None:
    body = os.urandom(48)
    (tmp_path / "t.vsbt").write_bytes(craft(body=body))
    t = read_check_table(tmp_path / "t.vsbt")
    assert bytes(t.body()) == body and (t.disk_size, t.block_size) == (3 * 4096, 4096)


@pytest.mark.parametrize("region", ["header", "body", "trailer"])
def test_truncated_in_every_region(tmp_path, region: str) -> None:
    path, raw = valid_file(tmp_path)
    cuts = {"header": [0, 1, 40, 63, 64, 79],
            "body": [80, 64 + 16 * 3 + 5, len(raw) - 17],
            "trailer": [len(raw) - 16, len(raw) - 1]}[region]
    for cut in cuts:
        assert_corrupt(path, raw[:cut], "too short|file length")


def test_extended_file_is_corrupt(tmp_path) -> None:
    path, raw = valid_file(tmp_path)
    assert_corrupt(path, raw + b"\0", "file length")


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_flipped_byte_is_detected(tmp_path, data: st.DataObject) -> None:
    path, raw = valid_file(tmp_path, "flip.vsbt")
    pos = data.draw(st.integers(0, len(raw) - 1))
    mask = data.draw(st.integers(1, 255))
    damaged = bytearray(raw)
    damaged[pos] ^= mask
    path.write_bytes(bytes(damaged))
    version = int.from_bytes(damaged[8:10], "little")
    if version > 1:
        # §5 checks the version before the checksum: a damaged version field that
        # reads as a newer version is reported as INCOMPATIBLE, by design of the order.
        with pytest.raises(IncompatibleFormatError):
            read_check_table(path)
    else:
        with pytest.raises(CorruptFileError) as info:
            read_check_table(path)
        assert str(path) in str(info.value)


def test_foreign_files_have_wrong_magic(tmp_path) -> None:
    path = tmp_path / "foreign.vsbt"
    doc = json.dumps({"format": "vmsnapbackup-point", "version": 1, "pad": "x" * 100}).encode()
    assert_corrupt(path, doc, "bad magic")
    assert_corrupt(path, bytes(4096), "bad magic")
    assert_corrupt(path, b'{"format": 1}', "too short")
    assert_corrupt(path, b"", "too short")
    assert_corrupt(path, craft(magic=b"VSBDIFF\0"), "bad magic")


def test_newer_version_is_incompatible(tmp_path) -> None:
    path = tmp_path / "new.vsbt"
    path.write_bytes(craft(version=2, flags=7))
    with pytest.raises(IncompatibleFormatError, match="version 2 is newer.*upgrade") as info:
        read_check_table(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("fields,match", [
    ({"version": 0}, "invalid format version"),
    ({"algorithm": 2}, "unknown algorithm"),
    ({"value_size": 32}, "value size"),
    ({"flags": 1}, "unknown flags"),
    ({"flags": 0x8000}, "unknown flags"),
    ({"bs": 1000}, "invalid block size"),
    ({"bs": 8 * 1024 * 1024, "disk": 1, "count": 1}, "invalid block size"),
    ({"count": 4}, "entry count 4 does not match"),
    ({"count": 2, "disk": 3 * 4096 + 1}, "entry count 2 does not match"),
])
def test_each_header_check_names_itself(tmp_path, fields, match: str) -> None:
    assert_corrupt(tmp_path / "bad.vsbt", craft(**fields), match)


def test_count_matching_size_but_body_missing(tmp_path) -> None:
    data = craft(count=3, body=b"")
    assert_corrupt(tmp_path / "t.vsbt", data, "file length")


def test_reserved_bytes_do_not_change_the_reading(tmp_path) -> None:
    """Reserved fields are written as 0; the checksum, not the reader, guards them."""
    (tmp_path / "t.vsbt").write_bytes(craft(reserved=5))
    assert read_check_table(tmp_path / "t.vsbt").count == 3


def test_checksum_and_digest_binding(tmp_path) -> None:
    path, raw = valid_file(tmp_path)
    damaged = raw[:-1] + bytes([raw[-1] ^ 1])
    assert_corrupt(path, damaged, "checksum mismatch")
    path.write_bytes(raw)
    with pytest.raises(CorruptFileError, match="recorded"):
        read_check_table(path, expected_checksum=bytes(16))
    with pytest.raises(CorruptFileError, match="body digest"):
        read_check_table(path, expected_body_digest=bytes(16))


def test_missing_file_is_corrupt(tmp_path) -> None:
    with pytest.raises(CorruptFileError, match="missing"):
        read_check_table(tmp_path / "nope.vsbt")


def test_take_from_copies_values_and_covers_blocks() -> None:
    bs = 4096
    size = 5 * bs + 100
    src = CheckTableBuilder(size, bs)
    src.hash_into(0, bytes(range(256)) * (size // 256) + bytes(size % 256))
    table1 = src.finish()
    b = CheckTableBuilder(size, bs)
    b.hash_into(0, b"\x01" * (2 * bs))
    assert list(b.take_from(table1, 2 * bs, size - 2 * bs)) == [2, 3, 4, 5]
    t = b.finish()   # complete: nothing missing
    assert [t.value(i) == table1.value(i) for i in range(6)] == [False, False] + [True] * 4
    with pytest.raises(UsageError):
        b.take_from(CheckTableBuilder(size + bs, bs).table, 0, bs)
