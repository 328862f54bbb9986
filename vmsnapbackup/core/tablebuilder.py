"""Building a check table from the extents a pass reads, refusing to finish with a gap.

Apart from :mod:`.checktable` (the table itself) because only the backup's
and restore's passes build tables this way; everything else reads them.
"""
from __future__ import annotations

import numpy as np

from ..errors import IntegrityError, UsageError
from .blockhash import Buffer, HashedBlocks
from .checktable import CheckTable, validate_disk_size
from .tablefile import DEFAULT_BLOCK_SIZE, block_count, validate_block_size

__all__ = ["CheckTableBuilder"]


class CheckTableBuilder:
    """Builds a check table from extents and refuses to finish with a gap.

    A table whose untouched entries silently kept the zero value would make a
    backup that skipped a region look complete; tracking which blocks were
    hashed or marked a hole (one byte per block, 1/16 of the table) turns that
    bug into an error at ``finish``.  Extents may overlap (the later wins).
    """

    def __init__(self, disk_size: int, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        validate_block_size(block_size)
        validate_disk_size(disk_size)
        count = block_count(disk_size, block_size)
        self.table = CheckTable.empty(disk_size, block_size)   # no page touched
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
        self.table.take_from(other, span)
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
