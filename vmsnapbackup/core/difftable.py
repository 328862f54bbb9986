"""Difference tables: the blocks whose value in table N differs from table 1 (FORMAT §6).

Comparing with the generation's *first* table (not the previous point) is what
makes every point depend on its base volume alone.  A difference table is
also how table N is stored: table 1 plus these entries rebuilds it (``apply``),
which costs 24 bytes per changed block instead of 16 bytes per block of the
disk.

``compare`` runs over the two tables' values as pairs of uint64 columns in
chunks, so two 16 Mi-entry tables (a 1 TiB disk at 64 KiB) compare in tens of
milliseconds with bounded temporary memory.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np

from ..errors import CorruptFileError, IntegrityError, UsageError
from .checktable import CheckTable
from .tablefile import (
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
    "DIFFERENCE_TABLE_MAGIC",
    "ENTRY_DTYPE",
    "DifferenceTable",
    "apply",
    "changed_indexes",
    "compare",
    "read_difference_table",
    "write_difference_table",
]

DIFFERENCE_TABLE_MAGIC = b"VSBDIFF\0"
# One file entry: block index (u64 LE) then the new value; packed, 24 bytes.
ENTRY_DTYPE = np.dtype([("index", "<u8"), ("value", np.uint8, (VALUE_SIZE,))])
assert ENTRY_DTYPE.itemsize == 8 + VALUE_SIZE

# Entries compared per pass: bounds the temporary masks (~3 MiB) whatever the disk size.
_COMPARE_CHUNK = 1 << 20


def _index_problem(indexes: np.ndarray, count: int) -> str | None:
    """Why ``indexes`` cannot be a difference's indexes for a table of ``count`` entries."""
    if indexes.size == 0:
        return None
    not_ascending = np.flatnonzero(indexes[1:] <= indexes[:-1])
    if not_ascending.size:
        at = int(not_ascending[0]) + 1
        return (f"entry {at}: index {int(indexes[at])} is not greater than the one before "
                f"({int(indexes[at - 1])}); indexes must be strictly ascending")
    if int(indexes[-1]) >= count:
        # Ascending, so the last index is the largest; report the first one out of range.
        at = int(np.searchsorted(indexes, np.uint64(count)))
        return (f"entry {at}: index {int(indexes[at])} is out of range "
                f"(table 1 has {count} entries)")
    return None


class DifferenceTable:
    """The changed entries of table N against table 1, bound to table 1 by its body digest.

    ``indexes`` is an ascending uint64 array of block indexes, ``values`` the
    matching (m, 16) uint8 values of table N.  Construction checks the
    invariants, so an in-memory difference is always one that ``apply`` can
    put in.
    """

    __slots__ = ("block_size", "count", "disk_size", "indexes", "table1_digest", "values")

    def __init__(self, disk_size: int, block_size: int, table1_digest: bytes,
                 indexes: np.ndarray, values: np.ndarray) -> None:
        validate_block_size(block_size)
        if isinstance(disk_size, bool) or not isinstance(disk_size, int) or disk_size < 0:
            raise UsageError(f"invalid disk size {disk_size!r}")
        if len(table1_digest) != VALUE_SIZE:
            raise UsageError(f"table-1 digest must have {VALUE_SIZE} bytes")
        indexes = np.ascontiguousarray(indexes)
        if indexes.dtype != np.uint64 or indexes.ndim != 1:
            raise UsageError(f"indexes must be a 1-D uint64 array, got {indexes.dtype} "
                             f"of shape {indexes.shape}")
        if values.dtype != np.uint8 or values.shape != (indexes.size, VALUE_SIZE):
            raise UsageError(f"values must be a ({indexes.size}, {VALUE_SIZE}) uint8 array, "
                             f"got {values.shape} {values.dtype}")
        count = block_count(disk_size, block_size)
        problem = _index_problem(indexes, count)
        if problem is not None:
            raise UsageError(f"invalid difference table: {problem}")
        self.block_size = block_size
        self.disk_size = disk_size
        self.count = count  # entries of table 1 (and N), not of the difference
        self.table1_digest = bytes(table1_digest)
        self.indexes = indexes
        self.values = np.ascontiguousarray(values)

    @property
    def changed(self) -> int:
        """How many blocks differ from table 1."""
        return int(self.indexes.size)

    def fraction(self) -> float:
        """Share of the disk's blocks that differ: what the new-generation threshold tests."""
        return self.changed / self.count if self.count else 0.0

    def __len__(self) -> int:
        return self.changed

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        """(block index, new value) pairs in ascending order."""
        for index, value in zip(self.indexes.tolist(), self.values):
            yield index, value.tobytes()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DifferenceTable):
            return NotImplemented
        return (self.block_size == other.block_size and self.disk_size == other.disk_size
                and self.table1_digest == other.table1_digest
                and bool(np.array_equal(self.indexes, other.indexes))
                and bool(np.array_equal(self.values, other.values)))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (f"DifferenceTable(disk_size={self.disk_size}, block_size={self.block_size}, "
                f"changed={self.changed}/{self.count})")


def _same_geometry(table1: CheckTable, other_bs: int, other_size: int, what: str) -> None:
    if table1.block_size != other_bs or table1.disk_size != other_size:
        raise UsageError(
            f"{what} has block size {other_bs} and disk size {other_size}, table 1 has "
            f"{table1.block_size} and {table1.disk_size}: a new generation is needed")


def _u64_pairs(table: CheckTable) -> np.ndarray:
    """The relative values (CheckTable.relative) as an (n, 2) uint64 view, no copy: two
    integer compares per entry, and equal exactly where the values are."""
    return table.relative.view(np.uint64)


def _changed_positions(table1: CheckTable, table_n: CheckTable, start: int,
                       stop: int | None) -> np.ndarray:
    """Changed indexes as a native intp array (numpy's fast path for take/put)."""
    _same_geometry(table1, table_n.block_size, table_n.disk_size, "table N")
    stop = table1.count if stop is None else stop
    if not 0 <= start <= stop <= table1.count:
        raise UsageError(f"range [{start}, {stop}) outside a table of {table1.count} entries")
    a = _u64_pairs(table1)
    b = _u64_pairs(table_n)
    # One byte per entry for the whole range, filled chunk by chunk with preallocated
    # outputs: then a single flatnonzero allocates the result at its exact size.
    # Fresh large allocations are page faults, and those, not the compares, dominate.
    differ = np.empty(stop - start, dtype=np.bool_)
    scratch = np.empty(min(_COMPARE_CHUNK, stop - start), dtype=np.bool_)
    for lo in range(start, stop, _COMPARE_CHUNK):
        hi = min(lo + _COMPARE_CHUNK, stop)
        out = differ[lo - start:hi - start]
        np.not_equal(a[lo:hi, 0], b[lo:hi, 0], out=out)
        other = scratch[:hi - lo]
        np.not_equal(a[lo:hi, 1], b[lo:hi, 1], out=other)
        out |= other
    positions = np.flatnonzero(differ)
    if start:
        positions += start
    return positions


def changed_indexes(table1: CheckTable, table_n: CheckTable, start: int = 0,
                    stop: int | None = None) -> np.ndarray:
    """Ascending uint64 indexes in ``[start, stop)`` where the two tables differ.

    Also usable on a range while a backup fills table N chunk by chunk, to know
    which freshly hashed blocks must go into the point volume.
    """
    return _as_uint64(_changed_positions(table1, table_n, start, stop))


def _as_uint64(positions: np.ndarray) -> np.ndarray:
    """Non-negative intp positions as uint64, by reinterpretation when the widths agree."""
    if positions.dtype.itemsize == 8:
        return positions.view(np.uint64)
    return positions.astype(np.uint64)


def _as_v16(values: np.ndarray) -> np.ndarray:
    """(n, 16) uint8 as a 1-D array of opaque 16-byte items: rows move as single memcpys."""
    v16: np.ndarray = values.view(np.dtype((np.void, VALUE_SIZE))).reshape(values.shape[0])
    return v16


def compare(table1: CheckTable, table_n: CheckTable) -> DifferenceTable:
    """The difference of table N against table 1.

    Tables of different block or disk size cannot be compared: that case is a
    new generation, decided by the workflow, so it is refused here (UsageError).
    """
    positions = _changed_positions(table1, table_n, 0, None)
    values = np.take(_u64_pairs(table_n), positions, axis=0).view(np.uint8) ^ table_n.zero_row
    return DifferenceTable(table1.disk_size, table1.block_size, table1.body_digest(),
                           _as_uint64(positions), values)


def apply(table1: CheckTable, diff: DifferenceTable) -> CheckTable:
    """Rebuild table N: a copy of table 1 with the difference's entries put in.

    Refuses a difference bound to another table 1 (IntegrityError): putting it
    in would yield a table that matches neither point.
    """
    _same_geometry(table1, diff.block_size, diff.disk_size, "the difference table")
    digest = table1.body_digest()
    if digest != diff.table1_digest:
        raise IntegrityError(
            f"difference table belongs to another table 1 (bound to body digest "
            f"{diff.table1_digest.hex()}, this table 1 has {digest.hex()})")
    rebuilt = table1.copy()
    if diff.changed:
        positions = (diff.indexes.view(np.intp) if np.dtype(np.intp).itemsize == 8
                     else diff.indexes.astype(np.intp))  # indexes < count: no sign issue
        relative = np.ascontiguousarray(diff.values ^ rebuilt.zero_row)
        np.put(_as_v16(rebuilt.relative), positions, _as_v16(relative))
    return rebuilt


# -- file I/O (FORMAT §6) ------------------------------------------------------

def write_difference_table(dest: Destination, diff: DifferenceTable) -> bytes:
    """Write ``diff`` as a ``.vsbd`` file; return the file checksum.

    A path is written atomically; an open binary file as is (durability is the
    caller's).  The checksum is what a manifest records as
    ``difference_digest``.
    """
    header = pack_header(DIFFERENCE_TABLE_MAGIC, diff.block_size, diff.disk_size, diff.changed,
                         diff.table1_digest)
    entries = np.empty(diff.changed, dtype=ENTRY_DTYPE)
    entries["index"] = diff.indexes
    entries["value"] = diff.values
    return write_table_file(dest, header, [entries.view(np.uint8).data],
                            "difference table")


def _check_changed_count(header: TableHeader) -> str | None:
    count = block_count(header.disk_size, header.block_size)
    if header.count > count:
        return (f"{header.count} changed entries, more than the {count} blocks of a "
                f"{header.disk_size}-byte disk at block size {header.block_size}")
    return None


def read_difference_table(
    source: Source,
    *,
    table1: CheckTable | None = None,
    table1_digest: bytes | None = None,
    expected_checksum: bytes | None = None,
) -> DifferenceTable:
    """Read a ``.vsbd`` file with every check of FORMAT §6.

    Frame checks as for a check table (the count is checked not to exceed the
    disk's blocks), then the checksum, ``expected_checksum`` (the manifest's
    ``difference_digest``), strictly ascending in-range indexes, and the
    binding to table 1: pass the table itself (geometry and body digest are
    compared) or just its body digest.  Any failure is CorruptFileError naming
    the file and the check.
    """
    header, body, _checksum, name = read_table_file(
        source, magic=DIFFERENCE_TABLE_MAGIC, kind="difference table",
        entry_size=ENTRY_DTYPE.itemsize, check_count=_check_changed_count,
        expected_checksum=expected_checksum)

    def corrupt(reason: str) -> CorruptFileError:
        return CorruptFileError(name, f"difference table: {reason}")

    entries = body.view(ENTRY_DTYPE)
    indexes = np.ascontiguousarray(entries["index"], dtype=np.uint64)
    count = block_count(header.disk_size, header.block_size)
    problem = _index_problem(indexes, count)
    if problem is not None:
        raise corrupt(problem)
    bound = header.extra[:VALUE_SIZE]
    if table1 is not None:
        if table1.block_size != header.block_size or table1.disk_size != header.disk_size:
            raise corrupt(f"block size {header.block_size} and disk size {header.disk_size} "
                          f"differ from table 1's ({table1.block_size}, {table1.disk_size})")
        if table1_digest is None:
            table1_digest = table1.body_digest()
    if table1_digest is not None and bound != table1_digest:
        raise corrupt(f"bound to table 1 body digest {bound.hex()}, but table 1 has "
                      f"{table1_digest.hex()}")
    values = np.ascontiguousarray(entries["value"])
    del entries, body
    log.debug("read difference table %s: %d changed of %d", name, indexes.size, count)
    return DifferenceTable(header.disk_size, header.block_size, bound, indexes, values)
