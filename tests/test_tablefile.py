"""The shared table-file frame: block sizes, header layout, atomic writing, read checks."""
from __future__ import annotations

import io
import os
import stat
import struct

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from vmsnapbackup.core import tablefile as tf
from vmsnapbackup.errors import CorruptFileError, IncompatibleFormatError, UsageError

VALID_BLOCK_SIZES = [1 << e for e in range(12, 23)]


@pytest.mark.parametrize("bs", VALID_BLOCK_SIZES)
def test_valid_block_sizes_accepted(bs: int) -> None:
    assert tf.is_valid_block_size(bs)
    assert tf.validate_block_size(bs) == bs


@pytest.mark.parametrize("bs", [0, -4096, 2048, 4095, 4097, 65536 + 4096, 3 * 4096,
                                8 * 1024 * 1024, True, 65536.0, "65536", None])
def test_invalid_block_sizes_refused(bs: object) -> None:
    assert not tf.is_valid_block_size(bs)
    with pytest.raises(UsageError, match="block size"):
        tf.validate_block_size(bs)


def test_default_block_size_is_64k() -> None:
    assert tf.DEFAULT_BLOCK_SIZE == 65536 and tf.is_valid_block_size(tf.DEFAULT_BLOCK_SIZE)


@given(st.integers(0, 1 << 50), st.sampled_from(VALID_BLOCK_SIZES))
def test_block_count_rounds_up(disk_size: int, bs: int) -> None:
    n = tf.block_count(disk_size, bs)
    assert n * bs >= disk_size
    assert (n - 1) * bs < disk_size or n == 0


def test_header_layout_matches_format() -> None:
    """Offsets of FORMAT §5/§6, checked field by field (not through the same struct)."""
    extra = bytes(range(16))
    h = tf.pack_header(b"VSBTABLE", 65536, 10 ** 12 + 3, 15258790, extra)
    assert len(h) == 64
    assert h[0:8] == b"VSBTABLE"
    assert int.from_bytes(h[8:10], "little") == 1
    assert int.from_bytes(h[10:12], "little") == 1
    assert int.from_bytes(h[12:14], "little") == 16
    assert int.from_bytes(h[14:16], "little") == 0
    assert int.from_bytes(h[16:20], "little") == 65536
    assert h[20:24] == bytes(4)
    assert int.from_bytes(h[24:32], "little") == 10 ** 12 + 3
    assert int.from_bytes(h[32:40], "little") == 15258790
    assert h[40:56] == extra and h[56:64] == bytes(8)


def _count_ok(header: tf.TableHeader) -> None:
    return None


def _frame(body: bytes, *, magic: bytes = b"TESTMAGC", count: int = 2, version: int = 1,
           flags: int = 0, fix: bool = True) -> bytes:
    head = struct.pack("<8sHHHHIIQQ24x", magic, version, 1, 16, flags, 4096, 0, 8192, count)
    data = head + body
    return data + (xxhash.xxh3_128_digest(data) if fix else bytes(16))


def _read(data: bytes, **kw: object):
    return tf.read_table_file(io.BytesIO(data), magic=b"TESTMAGC", kind="test table",
                              entry_size=16, check_count=_count_ok, **kw)


def test_read_frame_returns_header_body_checksum() -> None:
    body = os.urandom(32)
    data = _frame(body)
    header, got, checksum, name = _read(data)
    assert bytes(got) == body and checksum == data[-16:] and name == "<stream>"
    assert (header.block_size, header.disk_size, header.count) == (4096, 8192, 2)


def test_expected_checksum_mismatch_is_corrupt() -> None:
    data = _frame(os.urandom(32))
    _read(data, expected_checksum=data[-16:])
    with pytest.raises(CorruptFileError, match="recorded"):
        _read(data, expected_checksum=bytes(16))


def test_count_checked_before_any_allocation() -> None:
    """A huge count in a small file fails on the length check, not on a MemoryError."""
    data = _frame(os.urandom(32), count=(1 << 62))
    with pytest.raises(CorruptFileError, match="file length"):
        _read(data)


def test_checks_run_in_format_order() -> None:
    """Several faults at once: the first check of §5's order is the one reported."""
    data = _frame(os.urandom(32), flags=1, count=5, fix=False)
    with pytest.raises(CorruptFileError, match="flags"):
        _read(data)
    with pytest.raises(IncompatibleFormatError):
        _read(_frame(os.urandom(32), version=9, flags=1, fix=False))
    with pytest.raises(CorruptFileError, match="too short"):
        _read(_frame(b"", version=9)[:79])


def test_stream_is_read_from_its_position() -> None:
    data = _frame(os.urandom(32))
    stream = io.BytesIO(b"junk" + data)
    stream.seek(4)
    header, body, _c, _n = tf.read_table_file(stream, magic=b"TESTMAGC", kind="t",
                                              entry_size=16, check_count=_count_ok)
    assert bytes(body) == data[64:96]


def test_write_to_path_is_atomic_and_private(tmp_path) -> None:
    target = tmp_path / "table-000001.vsbt"
    header = tf.pack_header(b"TESTMAGC", 4096, 8192, 2)
    body = os.urandom(32)
    digest = tf.write_table_file(target, header, [memoryview(body)], "test table")
    data = target.read_bytes()
    assert data == header + body + digest
    assert digest == xxhash.xxh3_128_digest(header + body)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert os.listdir(tmp_path) == ["table-000001.vsbt"]  # no temp file left
    assert tf.file_checksum(target) == digest


def test_failed_write_leaves_target_and_no_temp(tmp_path) -> None:
    target = tmp_path / "t.vsbt"
    target.write_bytes(b"old")

    def pieces():
        yield memoryview(b"x" * 16)
        raise RuntimeError("reader died")

    with pytest.raises(RuntimeError):
        tf.write_table_file(target, tf.pack_header(b"TESTMAGC", 4096, 8192, 2), pieces(), "t")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["t.vsbt"]


def test_write_to_open_file_writes_in_place() -> None:
    out = io.BytesIO()
    header = tf.pack_header(b"TESTMAGC", 4096, 8192, 2)
    digest = tf.write_table_file(out, header, [memoryview(bytes(32))], "t")
    assert out.getvalue() == header + bytes(32) + digest


def test_missing_file_is_corrupt_and_named(tmp_path) -> None:
    path = tmp_path / "gone.vsbt"
    with pytest.raises(CorruptFileError, match="gone.vsbt.*missing"):
        tf.read_table_file(path, magic=b"TESTMAGC", kind="t", entry_size=16,
                           check_count=_count_ok)
    with pytest.raises(CorruptFileError, match="is a directory"):
        tf.read_table_file(tmp_path, magic=b"TESTMAGC", kind="t", entry_size=16,
                           check_count=_count_ok)


@settings(max_examples=60)
@given(st.data())
def test_any_truncation_is_corrupt(data: st.DataObject) -> None:
    full = _frame(os.urandom(32))
    cut = data.draw(st.integers(0, len(full) - 1))
    with pytest.raises(CorruptFileError):
        _read(full[:cut])
