"""Check tables: one XXH3-128 value per fixed-size block of a disk (FORMAT §5).

The check table is what lets a point hold only the blocks that changed since
the generation's first point, and what a restore is verified against.  A 1 TiB
disk at 64 KiB has 16 Mi entries (256 MiB), so the values live in one
contiguous numpy array ((n, 16) uint8): comparing two tables is then a couple of
vectorised passes instead of 16 million Python objects, and writing a table is
one ``write`` of that buffer.

Building a table streams: the reader hands over each chunk it read from the
export (``hash_into``) or each hole it was told about (``fill_zero``); the
disk is never held in memory, and holes are never read because the value of
an all-zero block is known in advance (``zero_value``).
"""
from __future__ import annotations

import logging
import mmap
from collections.abc import Iterator
from typing import Callable

import numpy as np
import xxhash

from ..errors import CorruptFileError, UsageError
from .blockhash import Buffer, HashedBlocks, as_bytes_view, hash_blocks, zero_value
from .tablefile import (
    DEFAULT_BLOCK_SIZE,
    VALUE_SIZE,
    Destination,
    Source,
    TableHeader,
    block_count,
    pack_header,
    read_table_file,
    validate_block_size,
    write_table_file,
)

log = logging.getLogger(__name__)

__all__ = [
    "CHECK_TABLE_MAGIC",
    "DEFAULT_BLOCK_SIZE",
    "Buffer",
    "CheckTable",
    "HashedBlocks",
    "hash_blocks",
    "read_check_table",
    "write_check_table",
    "zero_value",
]

CHECK_TABLE_MAGIC = b"VSBTABLE"

def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_disk_size(disk_size: object) -> int:
    if not _is_int(disk_size) or disk_size < 0:  # type: ignore[operator]
        raise UsageError(f"invalid disk size {disk_size!r}")
    return disk_size  # type: ignore[return-value]


#: Entries per chunk when a whole table is walked (1 MiB of values): bounds temporaries.
CHUNK_ENTRIES = 1 << 16


class CheckTable:
    """The check values of every block of one disk at one point.

    Entry i is the XXH3-128 digest of bytes ``[i*bs, min((i+1)*bs, disk_size))``.
    In memory each value is kept XORed with the value of an all-zero block
    (``relative``): a hole is then 16 zero bytes, in an array allocated zeroed,
    whose pages the kernel never materialises while nothing writes them.  So a
    1 TiB disk holding 100 MiB costs memory for its data's entries, not for 16 Mi
    of them (issue 19), while the file stays FORMAT §5's plain values.  Two tables
    of one block size compare entry for entry on ``relative`` as on the values.
    Whole-table work goes chunk by chunk (``CHUNK_ENTRIES``) and writes only
    chunks that are not all zeros.  Not thread-safe: one builder fills one table.
    """

    __slots__ = ("_rel", "_zero", "block_size", "count", "disk_size")

    def __init__(self, disk_size: int, block_size: int, values: np.ndarray) -> None:
        validate_block_size(block_size)
        validate_disk_size(disk_size)
        count = block_count(disk_size, block_size)
        if values.dtype != np.uint8 or values.shape != (count, VALUE_SIZE):
            raise UsageError(
                f"check table values must be a ({count}, {VALUE_SIZE}) uint8 array, "
                f"got {values.shape} {values.dtype}")
        self._setup(disk_size, block_size, count)
        for lo in range(0, count, CHUNK_ENTRIES):
            self._put_chunk(lo, values[lo:lo + CHUNK_ENTRIES] ^ self._zero)

    def _setup(self, disk_size: int, block_size: int, count: int) -> None:
        self.block_size = block_size
        self.disk_size = disk_size
        self.count = count
        self._zero = np.frombuffer(zero_value(block_size), dtype=np.uint8)
        # anonymous memory: zero-filled, each page made only when written, and never a
        # 2 MiB huge page (numpy's own large arrays ask for those, so one entry written
        # would cost 2 MiB)
        area = mmap.mmap(-1, max(count * VALUE_SIZE, 1),
                         flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._rel = np.frombuffer(area, dtype=np.uint8,
                                  count=count * VALUE_SIZE).reshape(count, VALUE_SIZE)

    def _put_chunk(self, lo: int, rel: np.ndarray) -> None:
        """Store relative values at ``lo``, leaving untouched pages untouched."""
        dst = self._rel[lo:lo + len(rel)]
        if rel.any() or dst.any():   # only the rows that hold something: pages stay lazy
            rows = np.any(rel, axis=1) | np.any(dst, axis=1)
            dst[rows] = rel[rows]

    # -- construction ------------------------------------------------------

    @classmethod
    def empty(cls, disk_size: int, block_size: int = DEFAULT_BLOCK_SIZE) -> CheckTable:
        """The table of an all-zero disk: what a disk that is one hole hashes to."""
        validate_block_size(block_size)
        validate_disk_size(disk_size)
        table = cls.__new__(cls)
        table._setup(disk_size, block_size, block_count(disk_size, block_size))
        tail = disk_size % block_size
        if tail:   # fresh entries are the zero block's already, but for a short last block
            table.set(table.count - 1, zero_value(tail))
        return table

    @classmethod
    def from_bytes(cls, disk_size: int, block_size: int, body: Buffer) -> CheckTable:
        """A table from its body (the concatenated values), copied."""
        validate_block_size(block_size)
        validate_disk_size(disk_size)
        array = np.frombuffer(as_bytes_view(body), dtype=np.uint8)
        count = block_count(disk_size, block_size)
        if array.size != count * VALUE_SIZE:
            raise UsageError(f"body of {array.size} bytes does not hold {count} values")
        return cls(disk_size, block_size, array.reshape(count, VALUE_SIZE))

    def copy(self) -> CheckTable:
        """An independent table: rebuilding table N must never alter table 1."""
        table = CheckTable.__new__(CheckTable)
        table._setup(self.disk_size, self.block_size, self.count)
        for lo in range(0, self.count, CHUNK_ENTRIES):
            table._put_chunk(lo, self._rel[lo:lo + CHUNK_ENTRIES])
        return table

    # -- access ------------------------------------------------------------

    @property
    def relative(self) -> np.ndarray:
        """The (count, 16) uint8 array of values XOR the zero block's value, not a
        copy: holes are zeros; for vectorised comparison of same-block-size tables."""
        return self._rel

    @property
    def zero_row(self) -> np.ndarray:
        """The value of an all-zero block of the table's block size, as 16 uint8."""
        return self._zero

    @property
    def values(self) -> np.ndarray:
        """Every value, as a new (count, 16) array: a full copy (tests, small tables)."""
        out: np.ndarray = self._rel ^ self._zero
        return out

    def values_at(self, indexes: np.ndarray) -> np.ndarray:
        """The values of the blocks ``indexes``, as a new (len, 16) array."""
        out: np.ndarray = self._rel[np.asarray(indexes, dtype=np.intp)] ^ self._zero
        return out

    def body_chunks(self) -> Iterator[memoryview]:
        """The values as flat byte buffers, chunk by chunk (the file body, in order)."""
        for lo in range(0, self.count, CHUNK_ENTRIES):
            yield (self._rel[lo:lo + CHUNK_ENTRIES] ^ self._zero).reshape(-1).data

    def body(self) -> memoryview:
        """The values as one flat byte buffer (a full copy: tests, small tables)."""
        return self.values.reshape(-1).data.toreadonly()

    def data_indexes(self) -> np.ndarray:
        """Indexes (int64) of the blocks that are not all zeros, ascending."""
        parts = [np.flatnonzero(np.any(self._rel[lo:lo + CHUNK_ENTRIES], axis=1)) + lo
                 for lo in range(0, self.count, CHUNK_ENTRIES)
                 if self._rel[lo:lo + CHUNK_ENTRIES].any()]
        found = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        if self.count and self.block_length(self.count - 1) != self.block_size:
            last = self.count - 1   # a short last block has its own zero value
            found = found[found != last]
            if not self.is_zero(last):
                found = np.append(found, last)
        return found.astype(np.int64)

    def first_data_block(self, start: int, stop: int) -> int | None:
        """The first block in ``[start, stop)`` (full-size blocks) that is not zeros."""
        for lo in range(start, stop, CHUNK_ENTRIES):
            chunk = self._rel[lo:min(lo + CHUNK_ENTRIES, stop)]
            if chunk.any():
                return lo + int(np.flatnonzero(np.any(chunk, axis=1))[0])
        return None

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.count:
            raise UsageError(f"block {index} out of range (table has {self.count} entries)")

    def block_length(self, index: int) -> int:
        """Bytes in block ``index``: the block size, except a short last block."""
        self._check_index(index)
        return min(self.block_size, self.disk_size - index * self.block_size)

    def value(self, index: int) -> bytes:
        """Entry ``index`` as bytes (a copy, so it stays valid if the table changes)."""
        self._check_index(index)
        return bytes((self._rel[index] ^ self._zero).data)

    def set(self, index: int, value: bytes) -> None:
        """Put one value in (e.g. a single re-read block); bulk work uses hash_into."""
        self._check_index(index)
        if len(value) != VALUE_SIZE:
            raise UsageError(f"a check value has {VALUE_SIZE} bytes, got {len(value)}")
        self._rel[index] = np.frombuffer(value, dtype=np.uint8) ^ self._zero

    def is_zero(self, index: int) -> bool:
        """Whether block ``index`` holds only zeros (judged by its value)."""
        return self.value(index) == zero_value(self.block_length(index))

    def body_digest(self) -> bytes:
        """XXH3-128 of the values: what a manifest records to check a rebuilt table N."""
        hasher = xxhash.xxh3_128()
        for piece in self.body_chunks():
            hasher.update(piece)
        return hasher.digest()

    def __len__(self) -> int:
        return self.count

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CheckTable):
            return NotImplemented
        return (self.block_size == other.block_size and self.disk_size == other.disk_size
                and all(np.array_equal(self._rel[lo:lo + CHUNK_ENTRIES],
                                       other._rel[lo:lo + CHUNK_ENTRIES])
                        for lo in range(0, self.count, CHUNK_ENTRIES)))

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return (f"CheckTable(disk_size={self.disk_size}, block_size={self.block_size}, "
                f"count={self.count})")

    # -- building ----------------------------------------------------------

    def _block_span(self, offset: int, length: int, what: str) -> range:
        """Block indexes covered by an aligned extent; refuse a misaligned one.

        An extent must start on a block boundary and end on one or at the disk
        end: a block only partly inside would get a value of part of its data.
        """
        bs = self.block_size
        end = offset + length
        if offset < 0 or length < 0 or end > self.disk_size:
            raise UsageError(f"{what} [{offset}, {end}) outside the disk (size {self.disk_size})")
        if offset % bs:
            raise UsageError(f"{what} offset {offset} is not a multiple of the block size {bs}")
        if length % bs and end != self.disk_size:
            raise UsageError(f"{what} length {length} at {offset} is not a multiple of the "
                             f"block size {bs} and does not reach the disk end")
        return range(offset // bs, -(-end // bs))

    def hash_into(self, offset: int, buffer: Buffer) -> HashedBlocks:
        """Hash the disk bytes ``buffer`` read at ``offset`` and store their values.

        The hot path of a backup: each block is hashed straight from a slice of
        the caller's buffer (no copy).  Returns the values and zero flags so that
        the caller can decide what to write without looking at the data again.
        """
        view = as_bytes_view(buffer)
        span = self._block_span(offset, len(view), "buffer")
        hashed = hash_blocks(view, self.block_size, span.start)
        if hashed.values:
            got = np.frombuffer(b"".join(hashed.values), dtype=np.uint8)
            self._put_chunk(span.start, got.reshape(-1, VALUE_SIZE) ^ self._zero)
        return hashed

    def fill_zero(self, offset: int, length: int) -> range:
        """Record ``[offset, offset+length)`` as zeros (a hole): no data is read, and
        no memory is touched where the entries already are (zero relative values).

        Returns the block indexes set.
        """
        span = self._block_span(offset, length, "hole")
        start, stop = span.start, span.stop
        tail = self.disk_size % self.block_size
        if tail and stop == self.count and start < stop:
            self.set(stop - 1, zero_value(tail))
            stop -= 1
        for lo in range(start, stop, CHUNK_ENTRIES):
            chunk = self._rel[lo:min(lo + CHUNK_ENTRIES, stop)]
            if chunk.any():
                chunk[np.any(chunk, axis=1)] = 0
        return span

    def take_from(self, other: CheckTable, span: range) -> None:
        """Copy ``other``'s entries of ``span`` (same disk and block size), chunk-wise."""
        for lo in range(span.start, span.stop, CHUNK_ENTRIES):
            hi = min(lo + CHUNK_ENTRIES, span.stop)
            self._put_chunk(lo, other._rel[lo:hi])


# -- file I/O (FORMAT §5) ------------------------------------------------------

def _check_count(header: TableHeader) -> str | None:
    expected = block_count(header.disk_size, header.block_size)
    if header.count != expected:
        return (f"entry count {header.count} does not match disk size {header.disk_size} "
                f"at block size {header.block_size} (expected {expected})")
    return None


def write_check_table(dest: Destination, table: CheckTable) -> bytes:
    """Write ``table`` as a ``.vsbt`` file; return the file checksum.

    A path is written atomically (temp file, fsync, rename, fsync dir); an open
    binary file is written as is, its durability left to the caller.  The
    returned checksum is what a manifest records as ``table1_digest``.
    """
    header = pack_header(CHECK_TABLE_MAGIC, table.block_size, table.disk_size, table.count)
    return write_table_file(dest, header, table.body_chunks(), "check table")


def read_check_table(source: Source, *, expected_checksum: bytes | None = None,
                     expected_body_digest: bytes | None = None) -> CheckTable:
    """Read a ``.vsbt`` file, checking everything FORMAT §5 lists, in its order.

    Raises CorruptFileError naming the file and the failed check, or
    IncompatibleFormatError for a newer version.  ``expected_checksum`` (the
    file's trailing checksum as a manifest recorded it) and
    ``expected_body_digest`` (the body digest, e.g. ``table_digest``) tie the
    file to the record that names it.
    """
    built: list[CheckTable] = []
    body_hash = xxhash.xxh3_128()

    def sink_for(header: TableHeader) -> Callable[[int, memoryview], None]:
        table = CheckTable.__new__(CheckTable)
        table._setup(header.disk_size, header.block_size, header.count)
        built.append(table)

        def sink(pos: int, piece: memoryview) -> None:
            body_hash.update(piece)
            rows = np.frombuffer(piece, dtype=np.uint8).reshape(-1, VALUE_SIZE)
            table._put_chunk(pos // VALUE_SIZE, rows ^ table.zero_row)
        return sink

    _header, _body, _checksum, name = read_table_file(
        source, magic=CHECK_TABLE_MAGIC, kind="check table", entry_size=VALUE_SIZE,
        check_count=_check_count, expected_checksum=expected_checksum, body_sink=sink_for)
    table = built[0]
    if expected_body_digest is not None:
        digest = body_hash.digest()
        if digest != expected_body_digest:
            raise CorruptFileError(name, f"check table: body digest {digest.hex()} differs "
                                         f"from the recorded {expected_body_digest.hex()}")
    log.debug("read check table %s: %d entries of %d bytes", name, table.count,
              table.block_size)
    return table

