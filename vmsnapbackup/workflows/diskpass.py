"""One pass over one frozen image: build its check table, write what the point needs.

This is the patent's core loop (check table, then base or point volume) and the hot
path.  It reads only the extents the export reports as data, hashes every
block once, straight from the read buffer, and decides per chunk:

* first point of a generation (no table 1): every non-zero block goes to the
  base volume; zero blocks and holes are left unwritten (a new image reads as
  zeros);
* point N: every block whose value differs from table 1 goes to the point
  volume, and a block that became zeros is written as zeros (WRITE_ZEROES):
  skipping it would let the restore show the base's old data through the
  backing file.

Holes are never read: their value is the zero value, and for point N they are
compared with table 1 like any other block.

Why two threads when there is something to write: the storage daemon serves
the read and the write connection from one event loop, and a write's reply
only comes once its data is in the volume.  Waiting for those replies between
two chunks left the daemon idle half of the time (profiled: 4.6 s for 2 GiB
against 1.9 s for ``qemu-img convert``).  So the calling thread reads and
hashes (requests pipelined on the source) while a writer thread owns the
target connection and keeps its writes pipelined across chunks.  Socket I/O
releases the GIL, so receiving and sending overlap on two cores.

Buffers: the chunks are read into a fixed set of buffers owned by the pass
(anonymous mappings, so a pass of small reads never touches most of them);
a buffer whose blocks must be written goes to the writer and comes back once
its bytes are in the socket.  No block is ever copied in Python (the kernel
copies it into our buffer and out of it), and memory stays bounded at
``(read depth + write backlog)`` chunks whatever the disk size.

A block is only counted once the pass returns, and the pass only returns
after every write it issued was answered without error: a failed write raises
here, never later.

Every chunk is taken from the run's bandwidth budget (:mod:`.ratebudget`)
before it is requested, when the run has one.  What the pass reads from and
writes to are the protocols of :mod:`.passio`; the writer thread is
:mod:`.passwriter`, a local raw file as source :mod:`.rawimage`.
"""
from __future__ import annotations

import collections
import logging
import mmap
import queue
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from ..core.blockruns import (
    Run,
    block_runs,
    complement_runs,
    intersect_runs,
)
from ..core.checktable import CheckTable
from ..core.difftable import changed_indexes
from ..core.tablebuilder import CheckTableBuilder
from ..errors import UsageError
from ..progress import ProgressCallback, ProgressEvent, emit
from .passio import BlockSource, BlockTarget, chunk_buffer, pieces
from .passwriter import PassWriter
from .ratebudget import RateBudget, throttled
from .rawimage import DEFAULT_CHUNK_SIZE, RawImageSource

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "READ_DEPTH",
    "WRITE_BACKLOG",
    "WRITE_DEPTH",
    "BlockSource",
    "BlockTarget",
    "PassStats",
    "RawImageSource",
    "run_disk_pass",
]

log = logging.getLogger(__name__)

#: Read requests kept in flight on the source export.
READ_DEPTH = 8
#: Write requests kept in flight on the target export.
WRITE_DEPTH = 8
#: Chunks read and hashed that may wait for the writer before reading pauses.
WRITE_BACKLOG = 8


@dataclass
class PassStats:
    """What one pass did, in blocks and bytes (reported per disk in the manifest)."""

    total: int = 0      # blocks in the disk
    read: int = 0       # blocks read from the export
    holes: int = 0      # blocks the export reported as zeros (not read)
    unchanged: int = 0  # blocks a dirty bitmap showed unwritten since table 1 (not read)
    changed: int = 0    # blocks written into the volume (first point: non-zero blocks)
    zero: int = 0       # changed blocks that are now zeros (written as zeros)
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0


def _zero_byte_runs(table: CheckTable, indexes: Iterable[int]) -> list[Run]:
    """Block indexes as ``(offset, length)`` byte runs, the last block clipped to the disk."""
    bs = table.block_size
    out = []
    for start, count in block_runs(indexes):
        offset = start * bs
        out.append((offset, min(count * bs, table.disk_size - offset)))
    return out


class _Plan:
    """What one chunk needs written: data runs (views into the chunk) and zero runs."""

    __slots__ = ("bytes", "changed", "writes", "zero", "zeros")

    def __init__(self) -> None:
        self.writes: list[tuple[int, memoryview]] = []
        self.zeros: list[Run] = []
        self.changed = 0
        self.zero = 0
        self.bytes = 0


def _plan_chunk(table: CheckTable, table1: CheckTable | None, offset: int,
                view: memoryview, first: int, zero_flags: list[bool]) -> _Plan:
    """The writes one hashed chunk needs (first point: non-zero blocks; point N: changes)."""
    plan = _Plan()
    n = len(zero_flags)
    if table1 is None:
        data_idx = [first + k for k in range(n) if not zero_flags[k]]
        zero_idx: list[int] = []
    else:
        wanted = changed_indexes(table1, table, first, first + n).tolist()
        data_idx = [i for i in wanted if not zero_flags[i - first]]
        zero_idx = [i for i in wanted if zero_flags[i - first]]
    bs = table.block_size
    for start, count in block_runs(data_idx):
        lo = (start - first) * bs
        hi = min(lo + count * bs, len(view))
        plan.writes.append((offset + lo, view[lo:hi]))
        plan.bytes += hi - lo
    plan.zeros = _zero_byte_runs(table, zero_idx)
    plan.zero = len(zero_idx)
    plan.changed = len(data_idx) + len(zero_idx)
    return plan


def run_disk_pass(
    source: BlockSource,  # the frozen image, a point volume or a raw file (read-only)
    target: BlockTarget | None,  # the base or point volume, a new image; None: hash only
    block_size: int,
    table1: CheckTable | None,
    *,
    disk: str = "",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: ProgressCallback | None = None,
    dirty: Sequence[Run] | None = None,
    data: Sequence[Run] | None = None,
    budget: RateBudget | None = None,
) -> tuple[CheckTable, PassStats]:
    """Read ``source`` once; return its check table and what was written to ``target``.

    ``table1`` None means this is the generation's first point and ``target``
    is a fresh base volume.  ``target`` None only hashes (verify, and the check
    after a restore).  The caller flushes and closes ``target``.

    ``dirty`` (point N only): block-aligned byte runs outside which nothing
    was written since table 1 was taken (a dirty bitmap's answer, checked by
    the caller).  Blocks outside them are not read: their values are table
    1's, so they can never count as changed.  ``data``: the source's
    ``data_ranges(block_size)``, when the caller already walked them.

    ``budget``: the bandwidth budget every chunk read is taken from before it
    is requested (the backup run's, handed down by the caller); None: no limit.
    """
    started = time.monotonic()
    size = source.size
    builder = CheckTableBuilder(size, block_size)
    table = builder.table
    stats = PassStats(total=table.count)
    chunk = max(block_size, chunk_size - chunk_size % block_size)

    data = list(source.data_ranges(block_size) if data is None else data)
    holes = list(complement_runs(data, size))
    if dirty is not None:
        if table1 is None:
            raise UsageError("a dirty map needs table 1 (only point N can skip reads)")
        dirty = list(dirty)
        for offset, length in complement_runs(dirty, size):
            stats.unchanged += len(builder.take_from(table1, offset, length))
        data = list(intersect_runs(data, dirty))
        holes = list(intersect_runs(holes, dirty))
    data_bytes = sum(length for _, length in data)

    # Holes first: no I/O to read, but for point N they may need zero writes.
    for offset, length in holes:
        span = builder.fill_zero(offset, length)
        stats.holes += len(span)
        if table1 is not None and target is not None:
            changed = changed_indexes(table1, table, span.start, span.stop)
            if len(changed):
                for z_off, z_len in _zero_byte_runs(table, changed):
                    target.write_zeroes(z_off, z_len)
                stats.zero += len(changed)
                stats.changed += len(changed)

    emit(progress, ProgressEvent(disk, "read", 0, data_bytes))
    reads = throttled(pieces(data, chunk), budget)
    if target is None:
        _hash_only(source, builder, reads, chunk, stats, disk, data_bytes, progress)
    else:
        _copy(source, target, builder, table1, reads, chunk, stats, disk, data_bytes,
              progress)
    emit(progress, ProgressEvent(disk, "read", data_bytes, data_bytes, finished=True))

    stats.seconds = time.monotonic() - started
    return builder.finish(), stats


def _hash_only(source: BlockSource, builder: CheckTableBuilder, reads: Iterable[Run],
               chunk: int, stats: PassStats, disk: str, data_bytes: int,
               progress: ProgressCallback | None) -> None:
    """Read into a ring of READ_DEPTH buffers (a buffer is free once its result is used)."""
    ring = [memoryview(chunk_buffer(chunk)) for _ in range(READ_DEPTH)]

    def requests() -> Iterator[tuple[int, memoryview]]:
        for index, (offset, length) in enumerate(reads):
            yield offset, ring[index % READ_DEPTH][:length]

    done = 0
    for offset, view in source.read_many(requests(), depth=READ_DEPTH):
        hashed = builder.hash_into(offset, view)
        stats.read += len(hashed.values)
        stats.bytes_read += len(view)
        done += len(view)
        emit(progress, ProgressEvent(disk, "read", done, data_bytes))


def _copy(source: BlockSource, target: BlockTarget, builder: CheckTableBuilder,
          table1: CheckTable | None, reads: Iterable[Run], chunk: int, stats: PassStats,
          disk: str, data_bytes: int, progress: ProgressCallback | None) -> None:
    """Read and hash here, write from the writer thread (see the module docstring)."""
    table = builder.table
    free: queue.Queue[mmap.mmap | None] = queue.Queue()
    for _ in range(READ_DEPTH + WRITE_BACKLOG):
        free.put(chunk_buffer(chunk))
    in_flight: collections.deque[mmap.mmap] = collections.deque()
    writer = PassWriter(target, free, WRITE_DEPTH, disk)

    def requests() -> Iterator[tuple[int, memoryview]]:
        for offset, length in reads:
            buffer = free.get()
            if buffer is None:  # the writer failed; its error is raised below
                assert writer.error is not None
                raise writer.error
            in_flight.append(buffer)
            yield offset, memoryview(buffer)[:length]

    finished = False
    try:
        done = 0
        for offset, view in source.read_many(requests(), depth=READ_DEPTH):
            buffer = in_flight.popleft()
            hashed = builder.hash_into(offset, view)
            n = len(hashed.values)
            stats.read += n
            stats.bytes_read += len(view)
            plan = _plan_chunk(table, table1, offset, view, hashed.first, hashed.zero)
            if plan.writes or plan.zeros:
                writer.submit(plan.writes, plan.zeros, buffer)
                stats.changed += plan.changed
                stats.zero += plan.zero
                stats.bytes_written += plan.bytes
            else:
                free.put(buffer)
            done += len(view)
            emit(progress, ProgressEvent(disk, "read", done, data_bytes))
        writer.finish()
        finished = True
    finally:
        if not finished:
            writer.abort()
