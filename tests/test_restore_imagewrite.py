"""The restore's writer: a new raw image filled by the disk pass (no QEMU here).

The pass reads a local raw file (``RawImageSource``) so the whole copy loop --
holes skipped, zero blocks left out, the same buffer hashed and written -- runs
without a storage daemon; the real export is in integration/test_restore.py.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

from vmsnapbackup.core.checktable import CheckTable
from vmsnapbackup.errors import StorageError
from vmsnapbackup.workflows.diskpass import RawImageSource, run_disk_pass
from vmsnapbackup.workflows.imagewrite import RawImageWriter

BS = 64 * 1024


class FileSource(RawImageSource):
    """A raw file read into the pass's own buffers (the NbdClient.read_many contract)."""

    def read_many(self, requests, depth=None):  # type: ignore[no-untyped-def]
        for offset, buffer in requests:
            view = memoryview(buffer)
            assert os.preadv(self._fd, [view], offset) == len(view)
            yield offset, view


def _source(path: Path, size: int, seed: int) -> bytes:
    """A sparse raw file: random blocks, an allocated all-zero block, holes, and a
    short last block with data (``size`` is not a multiple of the block size)."""
    rnd = random.Random(seed)
    data = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for index in (0, 1, 5, 6, 7, 40):
            block = rnd.randbytes(BS)
            data[index * BS:(index + 1) * BS] = block
            f.seek(index * BS)
            f.write(block)
        f.seek(9 * BS)
        f.write(bytes(BS))  # written zeros: data to SEEK_DATA, zeros to the pass
        tail = size - size % BS
        data[tail + 10:tail + 20] = b"t" * 10
        f.seek(tail + 10)
        f.write(b"t" * 10)
    return bytes(data)


def test_pass_from_a_raw_file_copies_it_exactly_and_sparsely(tmp_path: Path) -> None:
    size = 48 * BS + 3000
    src = tmp_path / "src.raw"
    data = _source(src, size, 1)
    out = tmp_path / "out.raw"
    with FileSource.open(src) as source, RawImageWriter.create(out, size) as image:
        table, stats = run_disk_pass(source, image, BS, None)
        image.flush()
    assert out.read_bytes() == data
    expected = CheckTable.empty(size, BS)
    expected.hash_into(0, data)
    assert table.body_digest() == expected.body_digest()
    # 6 data blocks and the short tail are written; the zero block and holes are not
    assert stats.changed == 7 and stats.bytes_written == 6 * BS + 3000
    assert os.stat(out).st_blocks * 512 < os.stat(src).st_blocks * 512


def test_create_is_new_private_and_reads_as_zeros(tmp_path: Path) -> None:
    out = tmp_path / "img.raw"
    old = os.umask(0o000)
    try:
        with RawImageWriter.create(out, 10 * BS + 1):
            pass
    finally:
        os.umask(old)
    st = os.stat(out)
    assert st.st_mode & 0o777 == 0o600
    assert st.st_size == 10 * BS + 1 and st.st_blocks == 0
    with pytest.raises(StorageError, match="File exists"):
        RawImageWriter.create(out, BS)
    assert os.stat(out).st_size == 10 * BS + 1, "an existing file is never touched"


def test_next_item_is_taken_only_once_the_last_is_in_the_file(tmp_path: Path) -> None:
    """The pass reuses a buffer as soon as the writer asks for the next item."""
    out = tmp_path / "img.raw"
    buffer = bytearray(BS)
    checked: List[int] = []

    def items() -> Iterator[Tuple[int, memoryview]]:
        for k in range(1, 5):
            buffer[:] = bytes([k]) * BS
            yield k * BS, memoryview(buffer)
            with open(out, "rb") as f:  # resumed: the write of k must be complete
                f.seek(k * BS)
                assert f.read(BS) == bytes([k]) * BS
            checked.append(k)

    with RawImageWriter.create(out, 8 * BS) as image:
        image.write_many(items(), depth=8)
    assert checked == [1, 2, 3, 4]
    content = out.read_bytes()
    assert content[:BS] == bytes(BS) and content[5 * BS:] == bytes(3 * BS)


def test_writes_outside_the_image_and_zeroes(tmp_path: Path) -> None:
    out = tmp_path / "img.raw"
    with RawImageWriter.create(out, 4 * BS) as image:
        image.write_many([(0, b"\xff" * (4 * BS))])
        image.write_zeroes(BS - 1, 2 * BS + 2)
        with pytest.raises(StorageError, match="outside the image"):
            image.write_many([(4 * BS - 1, b"ab")])
    content = out.read_bytes()
    assert content == b"\xff" * (BS - 1) + bytes(2 * BS + 2) + b"\xff" * (BS - 1)
