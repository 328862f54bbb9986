from __future__ import annotations

from typing import List, Set, Tuple

from hypothesis import given
from hypothesis import strategies as st

from vmsnapbackup.core.blockruns import block_runs, complement_runs, intersect_runs

SIZE = 64


def as_set(runs: List[Tuple[int, int]]) -> Set[int]:
    return {i for off, n in runs for i in range(off, off + n)}


def runs_of(points: Set[int]) -> List[Tuple[int, int]]:
    return list(block_runs(sorted(points)))


sets = st.sets(st.integers(0, SIZE - 1))


@given(sets)
def test_complement_is_the_rest_of_the_disk(points: Set[int]) -> None:
    gaps = list(complement_runs(runs_of(points), SIZE))
    assert as_set(gaps) == set(range(SIZE)) - points
    assert all(n > 0 for _, n in gaps)
    assert gaps == sorted(gaps)


@given(sets, sets)
def test_intersection_is_the_overlap(a: Set[int], b: Set[int]) -> None:
    both = list(intersect_runs(runs_of(a), runs_of(b)))
    assert as_set(both) == a & b
    assert all(n > 0 for _, n in both)
    assert both == sorted(both)


def test_complement_clips_runs_past_the_end() -> None:
    assert list(complement_runs([(2, 3), (60, 10)], SIZE)) == [(0, 2), (5, 55)]
    assert list(complement_runs([], SIZE)) == [(0, SIZE)]
    assert list(complement_runs([(0, SIZE)], SIZE)) == []
