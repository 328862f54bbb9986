"""The pass logic on in-memory disks: a point volume laid over its base must read
back exactly as the frozen image, whatever changed, became zeros, or became a hole.

The disks here are plain bytearrays behind the four calls the pass makes; the
proof against real exports is in integration/test_backup.py.
"""
from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from vmsnapbackup.core.checktable import CheckTable, zero_value
from vmsnapbackup.core.difftable import compare
from vmsnapbackup.workflows.diskpass import run_disk_pass

BS = 4096


class MemDisk:
    """A disk whose extents are given explicitly (as block status would report)."""

    def __init__(self, data: bytes, holes: list[tuple[int, int]] = ()) -> None:
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

    def read_chunks(self, ranges, chunk_size: int, depth=None):
        for off, ln in ranges:
            end = off + ln
            while off < end:
                step = min(chunk_size, end - off)
                yield off, memoryview(bytes(self.data[off:off + step]))
                off += step

    def read_many(self, requests, depth=None):
        for off, buf in requests:
            view = memoryview(buf)
            view[:] = self.data[off:off + len(view)]
            yield off, view


class Overlay:
    """A point volume: written blocks over a backing base (None = fresh base)."""

    def __init__(self, size: int, backing: bytes | None) -> None:
        self.size = size
        self.backing = backing
        self.writes: dict[int, bytes] = {}

    def write_many(self, requests, depth=None) -> None:
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


# -- the pipelined pass: buffers, the writer thread, failures ------------------------------

import threading

import pytest

from vmsnapbackup.errors import ExportError
from vmsnapbackup.workflows import diskpass


class PipelinedDisk(MemDisk):
    """Like a real client: ``depth`` reads in flight, each buffer filled when it is *sent*.

    A pass that handed a buffer to a new read while the writer still had to
    send it would see it overwritten here, and the volume would differ.
    """

    def __init__(self, data: bytes, holes=(), fail_at: int | None = None) -> None:
        super().__init__(data, holes)
        self.fail_at = fail_at
        self.reads = 0
        self.changed = threading.Condition()

    def read_many(self, requests, depth=None):
        pending = []
        source = iter(requests)
        exhausted = False
        while True:
            while not exhausted and len(pending) < (depth or 1):
                try:
                    off, buf = next(source)
                except StopIteration:
                    exhausted = True
                    break
                if self.fail_at is not None and off >= self.fail_at:
                    raise ExportError("read failed (scripted)")
                view = memoryview(buf)
                view[:] = self.data[off:off + len(view)]  # the data lands at once
                with self.changed:
                    self.reads += 1
                    self.changed.notify_all()
                pending.append((off, view))
            if not pending:
                return
            yield pending.pop(0)


class LateOverlay(Overlay):
    """A target whose writes start only once the reader has used every buffer.

    That is the moment a buffer reused too early would be overwritten before
    being sent.  Optionally the n-th write fails as on a full pool.
    """

    def __init__(self, size, backing, source: PipelinedDisk, wait_reads: int,
                 fail_write: int | None = None) -> None:
        super().__init__(size, backing)
        self.source, self.wait_reads, self.fail_write = source, wait_reads, fail_write
        self.thread_names = set()

    def write_many(self, requests, depth=None) -> None:
        self.thread_names.add(threading.current_thread().name)
        changed = self.source.changed
        with changed:
            changed.wait_for(lambda: self.source.reads >= self.wait_reads, timeout=10)
        for n, (off, view) in enumerate(requests, 1):
            if n == 1:
                # Every buffer is taken now.  Give the reader the chance to reuse one
                # that was handed back too early (a correct pass hands none back yet).
                with changed:
                    before = self.source.reads
                    changed.wait_for(lambda before=before: self.source.reads > before,
                                     timeout=0.5)
            if self.fail_write is not None and n >= self.fail_write:
                err = ExportError("write failed: ENOSPC (scripted)")
                err.errno_name = "ENOSPC"
                raise err
            self.writes[off] = bytes(view)


def random_disk(n_blocks: int, seed: int) -> bytes:
    import random
    rng = random.Random(seed)
    return b"".join(bytes([rng.randrange(1, 256)]) * BS if rng.random() < 0.7 else bytes(BS)
                    for _ in range(n_blocks))


def test_buffers_are_not_reused_before_their_blocks_are_sent():
    n_buffers = diskpass.READ_DEPTH + diskpass.WRITE_BACKLOG
    data = random_disk(n_buffers * 4 + 7, seed=1)
    disk = PipelinedDisk(data)
    base = LateOverlay(disk.size, None, disk, wait_reads=n_buffers)
    table1, _stats = run_disk_pass(disk, base, BS, None, chunk_size=2 * BS)
    assert base.image() == data
    assert table1 == table_of(data)
    assert base.thread_names and "MainThread" not in base.thread_names
    # point N over it, every block changed
    data_n = bytes(b ^ 0x5A for b in data)
    disk_n = PipelinedDisk(data_n)
    point = LateOverlay(disk_n.size, base.image(), disk_n, wait_reads=n_buffers)
    table_n, stats_n = run_disk_pass(disk_n, point, BS, table1, chunk_size=3 * BS)
    assert point.image() == data_n and table_n == table_of(data_n)
    assert stats_n.changed == compare(table1, table_n).changed


def _threads_of_pass():
    return [t for t in threading.enumerate() if t.name.startswith("vsb-write-")]


def test_a_failed_write_is_raised_by_the_pass_and_stops_reading():
    data = random_disk(200, seed=2)
    disk = PipelinedDisk(data)
    target = LateOverlay(disk.size, None, disk, wait_reads=0, fail_write=3)
    with pytest.raises(ExportError) as info:
        run_disk_pass(disk, target, BS, None, chunk_size=2 * BS)
    assert info.value.errno_name == "ENOSPC"
    # the reader stopped soon after (bounded by its buffers), not at the disk's end
    assert disk.reads < 100
    assert not _threads_of_pass()


def test_a_failed_read_stops_the_writer_and_is_raised():
    data = random_disk(100, seed=3)
    disk = PipelinedDisk(data, fail_at=60 * BS)
    target = LateOverlay(disk.size, None, disk, wait_reads=0)
    with pytest.raises(ExportError, match="read failed"):
        run_disk_pass(disk, target, BS, None, chunk_size=2 * BS)
    assert not _threads_of_pass()
    # what was written before the failure is what the disk holds there
    for off, blob in target.writes.items():
        assert blob == data[off:off + len(blob)]


def test_an_interrupt_in_the_progress_callback_unwinds_the_writer():
    data = random_disk(100, seed=4)
    disk = PipelinedDisk(data)
    target = LateOverlay(disk.size, None, disk, wait_reads=0)
    calls = []

    def progress(ev):
        calls.append(ev)
        if len(calls) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_disk_pass(disk, target, BS, None, chunk_size=2 * BS, progress=progress)
    assert not _threads_of_pass()


# -- a raw image read directly --------------------------------------------------------------

from vmsnapbackup.errors import IntegrityError, NotFoundError
from vmsnapbackup.workflows.diskpass import RawImageSource


def _sparse_file(path, size: int, extents) -> bytes:
    model = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, blob in extents:
            f.seek(off)
            f.write(blob)
            model[off:off + len(blob)] = blob
    return bytes(model)


def test_raw_image_source_hashes_like_the_disk_and_skips_holes(tmp_path):
    bs = 64 * 1024
    size = 40 * bs + 1000          # a short last block
    extents = [(3 * bs + 100, b"\x11" * 5000),        # inside one block
               (10 * bs, b"\x22" * (2 * bs)),          # two whole blocks
               (11 * bs + 10, b"\x33" * 10),           # overlaps the run above
               (40 * bs, b"\x44" * 1000)]              # the short tail
    data = _sparse_file(tmp_path / "img.raw", size, extents)
    with RawImageSource.open(tmp_path / "img.raw") as src:
        assert src.size == size
        ranges = list(src.data_ranges(bs))
        table, stats = run_disk_pass(src, None, bs, None, chunk_size=3 * bs)
    expected = CheckTable.empty(size, bs)
    expected.hash_into(0, data)
    assert table == expected
    # filesystems that do not track holes report everything as data: then all is read
    if stats.holes:
        assert ranges == [(3 * bs, bs), (10 * bs, 2 * bs), (40 * bs, 1000)]
        assert stats.read == 4 and stats.holes == table.count - 4


def test_raw_image_source_of_an_empty_and_a_missing_file(tmp_path):
    _sparse_file(tmp_path / "empty.raw", 5 * 4096, [])
    with RawImageSource.open(tmp_path / "empty.raw") as src:
        table, stats = run_disk_pass(src, None, 4096, None)
    assert table == CheckTable.empty(5 * 4096, 4096) and stats.read in (0, 5)
    with pytest.raises(NotFoundError):
        RawImageSource.open(tmp_path / "nope.raw")


def test_raw_image_source_that_shrinks_is_an_integrity_error(tmp_path):
    path = tmp_path / "img.raw"
    _sparse_file(path, 8 * 4096, [(0, b"\x01" * 8 * 4096)])
    with RawImageSource.open(path) as src:
        os.truncate(path, 4096)
        with pytest.raises(IntegrityError, match="could not be read"):
            list(src.read_chunks([(0, 8 * 4096)], chunk_size=8 * 4096))
