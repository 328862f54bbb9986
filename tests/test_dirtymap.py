"""The checks that stand between a dirty bitmap and a skipped read (workflows/dirtymap.py).

The source is a real sparse file read through RawImageSource (the same
interface as the NBD export: size, data_ranges, read_chunks).
"""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from vmsnapbackup.core.checktable import CheckTable
from vmsnapbackup.workflows import dirtymap
from vmsnapbackup.workflows.diskpass import RawImageSource, run_disk_pass

BS = 4096
BLOCKS = 300
FALLOC_FL_PUNCH_HOLE, FALLOC_FL_KEEP_SIZE = 0x02, 0x01


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def punch(path: Path, offset: int, length: int) -> None:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "r+b") as f:
        if libc.fallocate(f.fileno(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                          ctypes.c_long(offset), ctypes.c_long(length)) != 0:
            pytest.skip("no hole punching here")


def table_of(path: Path) -> CheckTable:
    with RawImageSource.open(path) as src:
        table, _ = run_disk_pass(src, None, BS, None)
    return table


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(BLOCKS * BS + 100)   # a short last block
    rng = random.Random(7)
    for i in range(0, BLOCKS, 3):       # data in every third block, holes between
        write_at(path, i * BS, rng.randbytes(BS))
    write_at(path, BLOCKS * BS, b"\x7f" * 100)
    return path


def check(path: Path, table1: CheckTable, dirty):  # type: ignore[no-untyped-def]
    with RawImageSource.open(path) as src:
        return dirtymap.unchanged_blocks_disagree(src, table1, dirty, rng=random.Random(3))


def test_writes_inside_the_dirty_runs_pass(image: Path) -> None:
    table1 = table_of(image)
    write_at(image, 30 * BS, b"\x01" * BS)
    punch(image, 60 * BS, BS)
    assert check(image, table1, [(30 * BS, BS), (60 * BS, BS)]) is None


def test_data_changed_outside_the_dirty_runs_is_caught(image: Path) -> None:
    table1 = table_of(image)
    for i in range(0, BLOCKS, 3):       # a stale bitmap: every data block rewritten
        write_at(image, i * BS, b"\x02" * BS)
    reason = check(image, table1, [(0, BS)])
    assert reason is not None and "differs from table 1" in reason


def test_a_discard_outside_the_dirty_runs_is_caught(image: Path) -> None:
    table1 = table_of(image)
    punch(image, 90 * BS, BS)
    reason = check(image, table1, [(0, BS)])
    assert reason is not None and "block 90 reads as a hole" in reason


def test_the_short_last_block_is_checked_too(image: Path) -> None:
    table1 = table_of(image)
    write_at(image, BLOCKS * BS, b"\x55" * 100)
    # every block but the short last one is dirty: that one is the whole sample
    reason = check(image, table1, [(0, BLOCKS * BS)])
    assert reason is not None and f"block {BLOCKS} " in reason
    assert check(image, table_of(image), [(0, BLOCKS * BS)]) is None


def test_checkpoint_names_are_ours_and_fresh() -> None:
    a, b = dirtymap.new_checkpoint_name(5), dirtymap.new_checkpoint_name(5)
    assert a != b and a.startswith("vmsnapbackup-p5-")
    assert dirtymap.is_our_checkpoint(a) and not dirtymap.is_our_checkpoint("nightly-backup")


def test_a_pass_with_a_right_bitmap_builds_the_same_table_as_a_full_read(image: Path) -> None:
    table1 = table_of(image)
    write_at(image, 31 * BS, b"\x03" * (2 * BS))   # inside the dirty run below
    punch(image, 33 * BS, BS)
    dirty = [(30 * BS, 6 * BS)]
    with RawImageSource.open(image) as src:
        table, stats = run_disk_pass(src, None, BS, table1, dirty=dirty)
    assert table == table_of(image)
    assert stats.unchanged == BLOCKS + 1 - 6
    assert stats.read + stats.holes == 6


def test_change_outside_names_a_change_the_bitmap_missed(image: Path) -> None:
    table1 = table_of(image)
    write_at(image, 30 * BS, b"\x04" * BS)
    write_at(image, 90 * BS, b"\x05" * BS)
    table = table_of(image)
    assert dirtymap.change_outside(table1, table, [(30 * BS, BS), (90 * BS, BS)]) is None
    assert dirtymap.change_outside(table1, table, [(30 * BS, BS)]) == 90
    assert dirtymap.change_outside(table1, table, []) == 30
