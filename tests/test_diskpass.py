"""The pass logic on in-memory disks: a point volume laid over its base must read
back exactly as the frozen image, whatever changed, became zeros, or became a hole.

The disks here are plain bytearrays behind the four calls the pass makes; the
proof against real exports is in integration/test_backup.py.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from hypothesis import given, settings, strategies as st

from vmsnapbackup.core.checktable import CheckTable, zero_value
from vmsnapbackup.core.difftable import compare
from vmsnapbackup.workflows.diskpass import run_disk_pass

BS = 4096


class MemDisk:
    """A disk whose extents are given explicitly (as block status would report)."""

    def __init__(self, data: bytes, holes: List[Tuple[int, int]] = ()) -> None:
        self.data = bytearray(data)
        self.holes = list(holes)  # ranges reported as zero (must be zeros in data)
        self.size = len(data)

    def data_ranges(self, block_size: int):
        covered = bytearray(self.size)
        for off, ln in self.holes:
            covered[off:off + ln] = b"\1" * ln
        pos = 0
        while pos < self.size:
            blk_end = min(pos + block_size, self.size)
            if not all(covered[pos:blk_end]):
                start = pos
                while pos < self.size and not all(covered[pos:min(pos + block_size, self.size)]):
                    pos = min(pos + block_size, self.size)
                yield start, pos - start
            else:
                pos = blk_end

    def read_chunks(self, ranges, chunk_size: int):
        for off, ln in ranges:
            end = off + ln
            while off < end:
                step = min(chunk_size, end - off)
                yield off, memoryview(bytes(self.data[off:off + step]))
                off += step


class Overlay:
    """A point volume: written blocks over a backing base (None = fresh base)."""

    def __init__(self, size: int, backing: Optional[bytes]) -> None:
        self.size = size
        self.backing = backing
        self.writes: Dict[int, bytes] = {}

    def write_many(self, requests) -> None:
        for off, view in requests:
            self.writes[off] = bytes(view)

    def write_zeroes(self, off: int, length: int) -> None:
        self.writes[off] = bytes(length)

    def image(self) -> bytes:
        out = bytearray(self.backing if self.backing is not None else bytes(self.size))
        for off, blob in sorted(self.writes.items()):
            out[off:off + len(blob)] = blob
        return bytes(out)


def table_of(data: bytes) -> CheckTable:
    t = CheckTable.empty(len(data), BS)
    if data:
        t.hash_into(0, data)
    return t


blocks = st.sampled_from([b"\0" * BS, b"\xaa" * BS, b"\x55" * BS, bytes(range(256)) * 16])


@st.composite
def disks(draw, n_blocks: int, tail: int):
    parts = [draw(blocks) for _ in range(n_blocks)]
    data = b"".join(parts) + (draw(st.sampled_from([b"\0", b"\x11"])) * tail)
    # report some of the zero blocks as holes
    holes = [(i * BS, BS) for i, p in enumerate(parts) if p == b"\0" * BS and draw(st.booleans())]
    return MemDisk(data, holes)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(0, BS - 1), st.data())
def test_point_over_base_reads_back_as_the_frozen_image(n_blocks, tail, data):
    first = data.draw(disks(n_blocks, tail))
    base = Overlay(first.size, None)
    table1, stats1 = run_disk_pass(first, base, BS, None, chunk_size=2 * BS)
    assert base.image() == bytes(first.data)
    assert table1 == table_of(bytes(first.data))
    assert stats1.read + stats1.holes == table1.count
    # the base holds no zero block
    assert all(any(blob) for blob in base.writes.values())

    nth = data.draw(disks(n_blocks, tail))
    point = Overlay(nth.size, base.image())
    table_n, stats = run_disk_pass(nth, point, BS, table1, chunk_size=3 * BS)
    assert point.image() == bytes(nth.data)
    assert table_n == table_of(bytes(nth.data))
    diff = compare(table1, table_n)
    assert stats.changed == diff.changed
    # only the differing blocks were written
    written_blocks = sum(-(-len(b) // BS) for b in point.writes.values())
    assert written_blocks == diff.changed
    zero_tail = zero_value(nth.size % BS) if nth.size % BS else None
    expected_zero = sum(
        1 for i, _ in diff
        if table_n.value(i) in (zero_value(BS), zero_tail))
    assert stats.zero == expected_zero


def test_unchanged_disk_writes_nothing():
    disk = MemDisk(b"\x01" * (5 * BS + 100))
    base = Overlay(disk.size, None)
    table1, _ = run_disk_pass(disk, base, BS, None)
    point = Overlay(disk.size, base.image())
    _, stats = run_disk_pass(disk, point, BS, table1)
    assert point.writes == {} and stats.changed == 0 and stats.bytes_written == 0
