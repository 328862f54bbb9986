"""Runs of consecutive block indexes: the unit of one NBD request.

The backup writes changed blocks, verify reads sampled blocks, and both want as
few requests as possible: one per run of neighbours rather than one per block.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Tuple

__all__ = ["block_runs"]


def block_runs(indexes: Iterable[int], max_count: int = 0) -> Iterator[Tuple[int, int]]:
    """Consecutive runs ``(first, count)`` of ascending indexes.

    ``max_count`` (if positive) cuts longer runs, so that one buffer stays small.
    Accepts numpy integers too (they come from table comparisons).
    """
    start = prev = None
    for i in indexes:
        i = int(i)
        if start is None:
            start = prev = i
        elif i == prev + 1 and (max_count <= 0 or i - start < max_count):
            prev = i
        else:
            yield start, prev - start + 1
            start = prev = i
    if start is not None:
        yield start, prev - start + 1
