"""The sample of a sampled verify: drawn from stored blocks, and the chance it reports."""
from __future__ import annotations

import random

import numpy as np
import pytest

from vmsnapbackup.core.checktable import CheckTable, hash_blocks
from vmsnapbackup.workflows.verifysample import SampleTally, draw, fresh_seed, stored_in_base

BS = 4096


def table_with_data(blocks: int, data: list[int], tail: int = 0) -> CheckTable:
    size = blocks * BS + tail
    t = CheckTable.empty(size, BS)
    for b in data:
        length = t.block_length(b)
        (value,) = hash_blocks(b"\x01" * length, BS, b).values
        t.set(b, value)
    return t


def test_stored_in_base_is_the_data_blocks_only() -> None:
    t = table_with_data(100, [3, 50, 100], tail=100)   # block 100 is a short last block
    assert stored_in_base(t).tolist() == [3, 50, 100]
    assert stored_in_base(table_with_data(10, [])).size == 0


def test_draw_is_a_share_of_the_population() -> None:
    pop = np.array([3, 9, 20, 41, 77, 80, 99, 120], dtype=np.int64)
    picked = draw(pop, 25, random.Random(1))
    assert picked.size == 2 and set(picked.tolist()) <= set(pop.tolist())
    assert list(picked) == sorted(picked)
    assert draw(pop, 100, random.Random(1)).tolist() == pop.tolist()
    assert draw(pop, 0.1, random.Random(1)).size == 1   # at least one block
    assert draw(np.zeros(0, dtype=np.int64), 50, random.Random(1)).size == 0
    assert fresh_seed() != fresh_seed()


def test_chance_of_finding_damage() -> None:
    t = SampleTally()
    t.add("/base", 20, 5)
    t.add("/base", 20, 5)        # the same volume counts once
    t.add("/p2", 4, 1)
    assert (t.stored, t.sampled) == (24, 6)
    assert t.chance(1) == pytest.approx(0.25)
    # two damaged blocks: 1 - (18/24 * 17/23)
    assert t.chance(2) == pytest.approx(1 - (18 / 24) * (17 / 23))
    assert SampleTally().chance(1) == 1.0
