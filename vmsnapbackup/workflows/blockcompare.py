"""Comparing an image's blocks with the check table it must match.

Restore and verify both end in this comparison (:mod:`.pointread`); it is kept
apart from the reading so that the one answer -- which blocks differ, out of how
many checked -- is worded the same for every caller.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.checktable import CheckTable
from ..core.difftable import changed_indexes
from ..core.tablefile import VALUE_SIZE
from ..errors import UsageError

__all__ = ["NAMED_BLOCKS", "BlockMismatch", "compare_sampled", "compare_tables",
           "sample_indexes", "size_mismatch"]

#: Blocks named one by one in a mismatch message; the rest are counted.
NAMED_BLOCKS = 8


@dataclass(frozen=True)
class BlockMismatch:
    """Which blocks of an image differ from the table they must match.

    ``indexes`` are ascending; ``checked`` is how many blocks were compared (all of
    them, or a sample).  ``size_note`` is set when the image is not even the right
    size (then no block could be compared).
    """

    block_size: int
    total: int
    checked: int
    indexes: tuple[int, ...]
    size_note: str | None = None

    @property
    def ok(self) -> bool:
        return not self.indexes and self.size_note is None

    @property
    def count(self) -> int:
        return len(self.indexes)

    def offsets(self, limit: int = NAMED_BLOCKS) -> list[tuple[int, int]]:
        """(block index, byte offset) of the first ``limit`` differing blocks."""
        return [(i, i * self.block_size) for i in self.indexes[:limit]]

    def describe(self, limit: int = NAMED_BLOCKS) -> str:
        """One phrase for a person: ``2 of 1024 blocks differ: 17 (offset 1114112), 18 (...)``."""
        if self.size_note is not None:
            return self.size_note
        if not self.indexes:
            return f"all {self.checked} checked blocks match"
        named = ", ".join(f"{i} (offset {off})" for i, off in self.offsets(limit))
        more = f", and {self.count - limit} more" if self.count > limit else ""
        of = f"{self.total}" if self.checked == self.total else \
            f"{self.checked} sampled of {self.total}"
        return f"{self.count} of {of} blocks differ: {named}{more}"

    def to_dict(self, limit: int = 1000) -> dict[str, Any]:
        return {"block_size": self.block_size, "total": self.total, "checked": self.checked,
                "differ": self.count, "blocks": list(self.indexes[:limit]),
                "size": self.size_note}


def size_mismatch(expected: CheckTable, size: int, checked: int = 0) -> BlockMismatch | None:
    if size == expected.disk_size:
        return None
    return BlockMismatch(expected.block_size, expected.count, checked, (),
                         size_note=f"image is {size} bytes, the point's disk "
                                   f"{expected.disk_size}")


def compare_tables(expected: CheckTable, actual: CheckTable) -> BlockMismatch:
    """Every block of ``actual`` against ``expected`` (same block size)."""
    if actual.block_size != expected.block_size:
        raise UsageError("tables of different block sizes cannot be compared")
    bad = size_mismatch(expected, actual.disk_size, 0)
    if bad is not None:
        return bad
    indexes = changed_indexes(expected, actual)
    return BlockMismatch(expected.block_size, expected.count, expected.count,
                         tuple(int(i) for i in indexes))


def compare_sampled(expected: CheckTable, indexes: np.ndarray,
                    values: np.ndarray) -> BlockMismatch:
    """Sampled blocks: ``values[k]`` is the value read for block ``indexes[k]``."""
    if values.shape != (len(indexes), VALUE_SIZE):
        raise UsageError(f"{values.shape} values for {len(indexes)} sampled blocks")
    idx = np.asarray(indexes, dtype=np.intp)
    rows = expected.values_at(idx)
    differ = np.flatnonzero(np.any(rows != values, axis=1))
    return BlockMismatch(expected.block_size, expected.count, int(idx.size),
                         tuple(int(idx[k]) for k in differ))


def sample_indexes(count: int, percent: float,
                   rng: random.Random | None = None) -> np.ndarray:
    """A sorted random sample of block indexes: ``percent`` of ``count``, at least one.

    ``rng`` lets a caller (and the tests) make the sample reproducible.
    """
    if not 0 < percent <= 100:
        raise UsageError(f"a sample is more than 0 and at most 100 percent, not {percent}")
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    k = max(1, min(count, round(count * percent / 100.0)))
    if k == count:
        return np.arange(count, dtype=np.int64)
    rng = rng or random.Random()
    return np.array(sorted(rng.sample(range(count), k)), dtype=np.int64)
