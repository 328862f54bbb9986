"""Runs of consecutive block indexes: the unit of one NBD request.

The backup writes changed blocks, verify reads sampled blocks, and both want as
few requests as possible: one per run of neighbours rather than one per block.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

__all__ = ["Run", "block_runs", "complement_runs", "intersect_runs", "whole_block_runs"]


def block_runs(indexes: Iterable[int], max_count: int = 0) -> Iterator[tuple[int, int]]:
    """Consecutive runs ``(first, count)`` of ascending indexes.

    ``max_count`` (if positive) cuts longer runs, so that one buffer stays small.
    Accepts numpy integers too (they come from table comparisons).
    """
    start: int | None = None
    prev = 0
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


Run = tuple[int, int]


def complement_runs(runs: Iterable[Run], size: int) -> Iterator[Run]:
    """The gaps of sorted, non-overlapping ``(offset, length)`` runs within ``[0, size)``."""
    pos = 0
    for offset, length in runs:
        if offset > pos:
            yield pos, min(offset, size) - pos
        pos = max(pos, offset + length)
        if pos >= size:
            return
    if pos < size:
        yield pos, size - pos


def intersect_runs(a: Iterable[Run], b: Iterable[Run]) -> Iterator[Run]:
    """Where two lists of sorted, non-overlapping runs overlap (a merge, one pass)."""
    ia, ib = iter(a), iter(b)
    ra, rb = next(ia, None), next(ib, None)
    while ra is not None and rb is not None:
        lo = max(ra[0], rb[0])
        hi = min(ra[0] + ra[1], rb[0] + rb[1])
        if lo < hi:
            yield lo, hi - lo
        if ra[0] + ra[1] <= rb[0] + rb[1]:
            ra = next(ia, None)
        else:
            rb = next(ib, None)


def whole_block_runs(spans: Iterable[Run], block_size: int, start: int,
                     end: int) -> Iterator[Run]:
    """Ordered ``(offset, length)`` spans widened to whole blocks, joined, clipped to [start, end).

    What an NBD extent list becomes before a pass reads it: a block only partly
    inside an extent must be read whole, or its value would hash part of it.
    """
    run_start: int | None = None
    run_end = 0
    for offset, length in spans:
        lo = max(offset - offset % block_size, start)
        hi = min(-(-(offset + length) // block_size) * block_size, end)
        if run_start is not None and lo <= run_end:
            run_end = max(run_end, hi)
            continue
        if run_start is not None:
            yield run_start, run_end - run_start
        run_start, run_end = lo, hi
    if run_start is not None:
        yield run_start, run_end - run_start
