"""Which blocks a sampled verify reads, and how likely that sample was to find damage.

A sample is only worth something if it is drawn from what the pool *stores*.
Drawing from the whole virtual disk mostly picks holes (a 512 MiB disk holding
5 MiB is 99 % holes): the sample reads zeros nobody stored and misses the data.
So the population of a base volume is the blocks table 1 says hold data, and
the population of a point volume is the blocks its difference table lists (the
blocks that point stored, zeros included: a point writes a block that became
zeros).  Each run draws a fresh sample (seeded from ``os.urandom`` unless a
seed is given, so a run can be reproduced), and the report states the chance
that the sample would have caught one damaged stored block: sampled / stored.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

import numpy as np

from ..core.checktable import CheckTable
from ..core.difftable import DifferenceTable

__all__ = ["SampleTally", "draw", "fresh_seed", "stored_in_base", "stored_in_point"]


def fresh_seed() -> int:
    """A seed nobody chose: every run samples different blocks."""
    return int.from_bytes(os.urandom(8), "big")


def stored_in_base(table1: CheckTable) -> np.ndarray:
    """Indexes of the blocks a base volume holds: those that are not zeros."""
    return table1.data_indexes()


def stored_in_point(diff: DifferenceTable) -> np.ndarray:
    """Indexes of the blocks a point volume holds: those its difference table lists."""
    return np.asarray(diff.indexes, dtype=np.int64)


def draw(population: np.ndarray, percent: float, rng: random.Random) -> np.ndarray:
    """A sorted random ``percent`` of ``population`` (at least one block if any is stored)."""
    n = int(population.size)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    k = max(1, min(n, round(n * percent / 100.0)))
    if k == n:
        return np.sort(population)
    picked = rng.sample(range(n), k)
    return np.sort(population[np.asarray(picked, dtype=np.intp)])


@dataclass
class SampleTally:
    """Stored and sampled blocks over the distinct volumes a run looked at."""

    volumes: dict[str, tuple[int, int]] = field(default_factory=dict)

    def add(self, volume: str, stored: int, sampled: int) -> None:
        self.volumes.setdefault(volume, (stored, sampled))

    @property
    def stored(self) -> int:
        return sum(s for s, _ in self.volumes.values())

    @property
    def sampled(self) -> int:
        return sum(k for _, k in self.volumes.values())

    def chance(self, damaged: int = 1) -> float:
        """Probability that the sample read at least one of ``damaged`` damaged blocks,
        the damage lying anywhere in what is stored.  For one block that is simply
        sampled / stored; for more it is drawn without replacement:
        1 - C(N-d, K) / C(N, K)."""
        n, k = self.stored, self.sampled
        if n == 0 or k >= n:
            return 1.0
        miss = 1.0
        for i in range(min(damaged, n)):
            miss *= max(0.0, (n - k - i) / (n - i))
        return 1.0 - miss
