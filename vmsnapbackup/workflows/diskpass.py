"""One pass over one frozen image: build its check table, write what the point needs.

This is the patent's core loop (DESIGN.md §2 steps 4–5) and the backup's hot
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
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Iterator, List, Optional, Tuple

import numpy as np

from ..core.checktable import CheckTable, CheckTableBuilder
from ..core.difftable import changed_indexes
from ..progress import ProgressCallback, ProgressEvent, emit

__all__ = ["PassStats", "run_disk_pass", "DEFAULT_CHUNK_SIZE"]

#: Read request size: 1 MiB measured fastest over a unix socket (DESIGN §4),
#: and large enough that xxhash releases the GIL on most blocks.
DEFAULT_CHUNK_SIZE = 1 << 20


@dataclass
class PassStats:
    """What one pass did, in blocks and bytes (reported per disk in the manifest)."""

    total: int = 0      # blocks in the disk
    read: int = 0       # blocks read from the export
    holes: int = 0      # blocks the export reported as zeros (not read)
    changed: int = 0    # blocks written into the volume (first point: non-zero blocks)
    zero: int = 0       # changed blocks that are now zeros (written as zeros)
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0


def _runs(indexes: Iterable[int]) -> Iterator[Tuple[int, int]]:
    """Consecutive runs ``(first, count)`` of ascending indexes: one request per run."""
    start = prev = None
    for i in indexes:
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            yield start, prev - start + 1
            start = prev = i
    if start is not None:
        yield start, prev - start + 1


def _holes(ranges: List[Tuple[int, int]], size: int) -> Iterator[Tuple[int, int]]:
    """The gaps between sorted, non-overlapping data ranges, up to ``size``."""
    pos = 0
    for offset, length in ranges:
        if offset > pos:
            yield pos, offset - pos
        pos = max(pos, offset + length)
    if pos < size:
        yield pos, size - pos


def run_disk_pass(
    source,  # NbdClient on the frozen image (read-only)
    target,  # NbdClient on the base or point volume (writable)
    block_size: int,
    table1: Optional[CheckTable],
    *,
    disk: str = "",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: Optional[ProgressCallback] = None,
) -> Tuple[CheckTable, PassStats]:
    """Read ``source`` once; return its check table and what was written to ``target``.

    ``table1`` None means this is the generation's first point and ``target``
    is a fresh base volume.  ``target`` None only hashes (verify, and the check
    after a restore).  The caller flushes and closes ``target``.
    """
    started = time.monotonic()
    size = source.size
    builder = CheckTableBuilder(size, block_size)
    table = builder.table
    stats = PassStats(total=table.count)
    chunk = max(block_size, chunk_size - chunk_size % block_size)

    data = list(source.data_ranges(block_size))
    data_bytes = sum(length for _, length in data)

    # Holes first: no I/O to read, but for point N they may need zero writes.
    for offset, length in _holes(data, size):
        span = builder.fill_zero(offset, length)
        stats.holes += len(span)
        if table1 is not None and target is not None:
            changed = changed_indexes(table1, table, span.start, span.stop)
            if len(changed):
                _write_zero_runs(target, table, changed, stats)

    done = 0
    emit(progress, ProgressEvent(disk, "read", 0, data_bytes))
    for offset, view in source.read_chunks(data, chunk_size=chunk):
        hashed = builder.hash_into(offset, view)
        first, n = hashed.first, len(hashed.values)
        stats.read += n
        stats.bytes_read += len(view)
        if target is None:
            wanted = []
            zero_flags = None
        elif table1 is None:
            wanted = [first + k for k in range(n) if not hashed.zero[k]]
            zero_flags = None
        else:
            wanted = changed_indexes(table1, table, first, first + n).tolist()
            zero_flags = hashed.zero
        if wanted:
            _write_runs(target, table, offset, view, first, wanted, zero_flags, stats)
        done += len(view)
        emit(progress, ProgressEvent(disk, "read", done, data_bytes))
    emit(progress, ProgressEvent(disk, "read", data_bytes, data_bytes, finished=True))

    stats.seconds = time.monotonic() - started
    return builder.finish(), stats


def _write_runs(target, table: CheckTable, offset: int, view: memoryview, first: int,
                wanted: List[int], zero_flags: Optional[List[bool]], stats: PassStats) -> None:
    """Write the wanted blocks of one chunk: data runs as one WRITE each, zero runs as zeros."""
    bs = table.block_size
    writes = []
    if zero_flags is None:
        data_idx, zero_idx = wanted, []
    else:
        data_idx = [i for i in wanted if not zero_flags[i - first]]
        zero_idx = [i for i in wanted if zero_flags[i - first]]
    for start, count in _runs(data_idx):
        lo = (start - first) * bs
        hi = min(lo + count * bs, len(view))
        writes.append((offset + lo, view[lo:hi]))
        stats.bytes_written += hi - lo
    stats.changed += len(data_idx) + len(zero_idx)
    if writes:
        target.write_many(writes)
    if zero_idx:
        _write_zero_runs(target, table, np.asarray(zero_idx), stats, count_changed=False)


def _write_zero_runs(target, table: CheckTable, indexes, stats: PassStats,
                     count_changed: bool = True) -> None:
    """Blocks that became zeros: WRITE_ZEROES, so the backing base's data is hidden."""
    bs = table.block_size
    for start, count in _runs(int(i) for i in indexes):
        offset = start * bs
        length = min(count * bs, table.disk_size - offset)
        target.write_zeroes(offset, length)
    stats.zero += len(indexes)
    if count_changed:
        stats.changed += len(indexes)
