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

import functools
import logging
from typing import NamedTuple, Union

import numpy as np
import xxhash

from ..errors import CorruptFileError, IntegrityError, UsageError
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
    "CheckTableBuilder",
    "HashedBlocks",
    "hash_blocks",
    "read_check_table",
    "write_check_table",
    "zero_value",
]

CHECK_TABLE_MAGIC = b"VSBTABLE"

Buffer = Union[bytes, bytearray, memoryview]

_xxh3_128_digest = xxhash.xxh3_128_digest


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate_disk_size(disk_size: object) -> int:
    if not _is_int(disk_size) or disk_size < 0:  # type: ignore[operator]
        raise UsageError(f"invalid disk size {disk_size!r}")
    return disk_size  # type: ignore[return-value]


@functools.lru_cache(maxsize=64)
def zero_value(length: int) -> bytes:
    """The check value of ``length`` zero bytes.

    Computed once per length (a table uses at most two: the block size and the
    short last block), so holes reported by the export are never read.
    """
    if length < 0:
        raise UsageError(f"negative block length {length}")
    return _xxh3_128_digest(bytes(length))


def _as_bytes_view(buffer: Buffer) -> memoryview:
    """A flat byte view of any buffer, without copying (slices stay zero-copy)."""
    view = memoryview(buffer)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


class HashedBlocks(NamedTuple):
    """Values of consecutive blocks, and which of them are all zeros.

    The zero flags are what a backup needs besides the values: a block that is
    zeros is skipped in a base volume and written as zeros (not skipped) in a
    point volume.  They come from comparing the value with ``zero_value``, not
    from scanning the data again.
    """

    first: int  # index of the first block (0 for a plain buffer)
    values: list[bytes]
    zero: list[bool]


def hash_blocks(buffer: Buffer, block_size: int, first: int = 0) -> HashedBlocks:
    """Hash ``buffer`` block by block: blocks of ``block_size``, the last one may be short.

    Hashes straight from slices of a memoryview: no block is copied.
    """
    validate_block_size(block_size)
    view = _as_bytes_view(buffer)
    size = len(view)
    values = [_xxh3_128_digest(view[off:off + block_size]) for off in range(0, size, block_size)]
    zero_full = zero_value(block_size)
    zero = [value == zero_full for value in values]
    tail = size % block_size
    if tail:
        zero[-1] = values[-1] == zero_value(tail)
    return HashedBlocks(first, values, zero)


class CheckTable:
    """The check values of every block of one disk at one point.

    ``values`` is an (count, 16) uint8 C-contiguous array that the table owns;
    entry i is the XXH3-128 digest of bytes ``[i*bs, min((i+1)*bs, disk_size))``.
    Not thread-safe: one builder fills one table.
    """

    __slots__ = ("_flat", "_values", "block_size", "count", "disk_size")

    def __init__(self, disk_size: int, block_size: int, values: np.ndarray) -> None:
        validate_block_size(block_size)
        _validate_disk_size(disk_size)
        count = block_count(disk_size, block_size)
        if values.dtype != np.uint8 or values.shape != (count, VALUE_SIZE):
            raise UsageError(
                f"check table values must be a ({count}, {VALUE_SIZE}) uint8 array, "
                f"got {values.shape} {values.dtype}")
        if not values.flags.c_contiguous or not values.flags.writeable:
            values = np.array(values, dtype=np.uint8, order="C")
        self.block_size = block_size
        self.disk_size = disk_size
        self.count = count
        self._values = values
        self._flat = values.reshape(-1).data

    # -- construction ------------------------------------------------------

    @classmethod
    def empty(cls, disk_size: int, block_size: int = DEFAULT_BLOCK_SIZE) -> CheckTable:
        """The table of an all-zero disk: what a disk that is one hole hashes to.

        A builder starts from this, so a hole needs no work at all when the
        caller does not track coverage.
        """
        validate_block_size(block_size)
        _validate_disk_size(disk_size)
        values = np.empty((block_count(disk_size, block_size), VALUE_SIZE), dtype=np.uint8)
        table = cls(disk_size, block_size, values)
        table.fill_zero(0, disk_size)
        return table

    @classmethod
    def from_bytes(cls, disk_size: int, block_size: int, body: Buffer) -> CheckTable:
        """A table from its body (the concatenated values), copied."""
        validate_block_size(block_size)
        _validate_disk_size(disk_size)
        array = np.frombuffer(_as_bytes_view(body), dtype=np.uint8)
        count = block_count(disk_size, block_size)
        if array.size != count * VALUE_SIZE:
            raise UsageError(f"body of {array.size} bytes does not hold {count} values")
        return cls(disk_size, block_size, array.reshape(count, VALUE_SIZE).copy())

    def copy(self) -> CheckTable:
        """An independent table: rebuilding table N must never alter table 1."""
        return CheckTable(self.disk_size, self.block_size, self._values.copy())

    # -- access ------------------------------------------------------------

    @property
    def values(self) -> np.ndarray:
        """The (count, 16) uint8 array itself (not a copy): for vectorised comparison."""
        return self._values

    def body(self) -> memoryview:
        """The values as one flat byte buffer (what the file body and body digest cover)."""
        return self._flat.toreadonly()

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
        return bytes(self._flat[index * VALUE_SIZE:(index + 1) * VALUE_SIZE])

    def set(self, index: int, value: bytes) -> None:
        """Put one value in (e.g. a single re-read block); bulk work uses hash_into."""
        self._check_index(index)
        if len(value) != VALUE_SIZE:
            raise UsageError(f"a check value has {VALUE_SIZE} bytes, got {len(value)}")
        self._flat[index * VALUE_SIZE:(index + 1) * VALUE_SIZE] = value

    def is_zero(self, index: int) -> bool:
        """Whether block ``index`` holds only zeros (judged by its value)."""
        return self.value(index) == zero_value(self.block_length(index))

    def body_digest(self) -> bytes:
        """XXH3-128 of the values: what a manifest records to check a rebuilt table N."""
        return _xxh3_128_digest(self._flat)

    def __len__(self) -> int:
        return self.count

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CheckTable):
            return NotImplemented
        return (self.block_size == other.block_size and self.disk_size == other.disk_size
                and bool(np.array_equal(self._values, other._values)))

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
        the caller's buffer (no copy), and the values land in the table with a
        single copy.  Returns the values and zero flags so that the caller can
        decide what to write without looking at the data again.
        """
        view = _as_bytes_view(buffer)
        span = self._block_span(offset, len(view), "buffer")
        hashed = hash_blocks(view, self.block_size, span.start)
        if hashed.values:
            self._flat[span.start * VALUE_SIZE:span.stop * VALUE_SIZE] = b"".join(hashed.values)
        return hashed

    def fill_zero(self, offset: int, length: int) -> range:
        """Record ``[offset, offset+length)`` as zeros (a hole): no data is read.

        Returns the block indexes set.
        """
        span = self._block_span(offset, length, "hole")
        start, stop = span.start, span.stop
        tail = self.disk_size % self.block_size
        if tail and stop == self.count and start < stop:
            self._values[stop - 1] = np.frombuffer(zero_value(tail), dtype=np.uint8)
            stop -= 1
        if start < stop:
            self._values[start:stop] = np.frombuffer(zero_value(self.block_size), dtype=np.uint8)
        return span


class CheckTableBuilder:
    """Builds a check table from extents and refuses to finish with a gap.

    A table whose untouched entries silently kept the zero value would make a
    backup that skipped a region look complete; tracking which blocks were
    hashed or marked a hole (one byte per block, 1/16 of the table) turns that
    bug into an error at ``finish``.  Extents may overlap (the later wins).
    """

    def __init__(self, disk_size: int, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        validate_block_size(block_size)
        _validate_disk_size(disk_size)
        count = block_count(disk_size, block_size)
        self.table = CheckTable(disk_size, block_size,
                                np.zeros((count, VALUE_SIZE), dtype=np.uint8))
        self._covered = np.zeros(count, dtype=np.bool_)

    def hash_into(self, offset: int, buffer: Buffer) -> HashedBlocks:
        """As :meth:`CheckTable.hash_into`, and mark the blocks covered."""
        hashed = self.table.hash_into(offset, buffer)
        self._covered[hashed.first:hashed.first + len(hashed.values)] = True
        return hashed

    def fill_zero(self, offset: int, length: int) -> range:
        """As :meth:`CheckTable.fill_zero`, and mark the blocks covered."""
        span = self.table.fill_zero(offset, length)
        self._covered[span.start:span.stop] = True
        return span

    def take_from(self, other: CheckTable, offset: int, length: int) -> range:
        """Copy ``other``'s values for ``[offset, offset+length)``: blocks known unchanged.

        Used for the blocks a dirty bitmap says were not written since
        ``other`` was built, so they need no read.  ``other`` must describe the
        same disk with the same block size.
        """
        if (other.disk_size, other.block_size) != (self.table.disk_size, self.table.block_size):
            raise UsageError(
                f"cannot take values from a table of a {other.disk_size}-byte disk with "
                f"{other.block_size}-byte blocks into one of {self.table.disk_size} bytes with "
                f"{self.table.block_size}-byte blocks")
        span = self.table._block_span(offset, length, "unchanged extent")
        self.table._values[span.start:span.stop] = other._values[span.start:span.stop]
        self._covered[span.start:span.stop] = True
        return span

    def first_missing(self) -> int | None:
        """Index of the first block neither hashed nor marked a hole, or None."""
        missing = np.flatnonzero(~self._covered)
        return int(missing[0]) if missing.size else None

    def finish(self) -> CheckTable:
        """The table, once every block is covered; IntegrityError names the first gap."""
        missing = self.first_missing()
        if missing is not None:
            left = int(np.count_nonzero(~self._covered))
            raise IntegrityError(
                f"check table incomplete: {left} block(s) never read nor reported as a "
                f"hole, the first at offset {missing * self.table.block_size}")
        return self.table


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
    return write_table_file(dest, header, [table.body()], "check table")


def read_check_table(source: Source, *, expected_checksum: bytes | None = None,
                     expected_body_digest: bytes | None = None) -> CheckTable:
    """Read a ``.vsbt`` file, checking everything FORMAT §5 lists, in its order.

    Raises CorruptFileError naming the file and the failed check, or
    IncompatibleFormatError for a newer version.  ``expected_checksum`` (the
    file's trailing checksum as a manifest recorded it) and
    ``expected_body_digest`` (the body digest, e.g. ``table_digest``) tie the
    file to the record that names it.
    """
    header, body, _checksum, name = read_table_file(
        source, magic=CHECK_TABLE_MAGIC, kind="check table", entry_size=VALUE_SIZE,
        check_count=_check_count, expected_checksum=expected_checksum)
    table = CheckTable(header.disk_size, header.block_size,
                       body.reshape(header.count, VALUE_SIZE))
    if expected_body_digest is not None:
        digest = table.body_digest()
        if digest != expected_body_digest:
            raise CorruptFileError(name, f"check table: body digest {digest.hex()} differs "
                                         f"from the recorded {expected_body_digest.hex()}")
    log.debug("read check table %s: %d entries of %d bytes", name, table.count,
              table.block_size)
    return table

