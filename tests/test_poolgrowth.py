"""``status`` and the metrics see a pool outgrow the generation policy (issue 19):
:func:`vmsnapbackup.workflows.poolgrowth.pool_growth` on a pool written by the fake
backup, its points' stored bytes set by hand."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import poolfake

from vmsnapbackup.core.manifest import BlockCounts
from vmsnapbackup.core.pool import DomainStore, Pool
from vmsnapbackup.workflows.poolgrowth import GROWTH_SLACK, pool_growth

UUID = "5a2a4b6c-1d2e-4f30-8a9b-0c1d2e3f4a5c"
BLOCK = 65536
#: the fake disk: 1 MiB virtual (16 blocks), half of them data; its base stores DATA
DATA = 16 * BLOCK
HOLES = 8


def put(p: Path, size: int) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(os.urandom(size))


def pool_with(tmp_path: Path, stored: list[int], new_generation: int = 0) -> Pool:
    """A pool whose domain's points store ``stored[i]`` bytes (point i + 1); the point
    numbered ``new_generation`` starts a generation.  Later points went through the
    dirty bitmap (unchanged blocks, holes counted only where read)."""
    pool = Pool.create(tmp_path / "pool")
    store: DomainStore = pool.domain(UUID, name="web1", create=True)
    for n, size in enumerate(stored, 1):
        start = n == 1 or n == new_generation
        poolfake.fake_backup(store, put, new_generation=n == new_generation)
        m = store.read_manifest(n)
        blocks = (BlockCounts(total=16, read=8, holes=HOLES, changed=8, zero=0) if start else
                  BlockCounts(total=16, read=2, holes=0, changed=2, zero=0, unchanged=14))
        disks = tuple(dataclasses.replace(d, bytes_written=size, blocks=blocks)
                      for d in m.disks)
        store.manifest_path(n).unlink()
        store.write_manifest(dataclasses.replace(m, disks=disks))
    return pool


def test_growth_within_the_policy_is_no_warning(tmp_path: Path) -> None:
    # base 1 MiB; points of 64, 128, 192 KiB: the average with the base is far above
    pool = pool_with(tmp_path, [DATA, BLOCK, 2 * BLOCK, 3 * BLOCK])
    g = pool_growth(pool.root, "web1")
    # the data from the base's full pass, not from a bitmap pass's uncounted holes
    assert (g.points, g.generation, g.data_bytes) == (4, 1, (16 - HOLES) * BLOCK)
    assert g.stored_bytes == DATA + 6 * BLOCK
    assert g.growth_bytes == BLOCK and g.predicted_next_bytes == 4 * BLOCK
    # limit for point 4: half the data (256 KiB), under the average (base + 64 + 128
    # KiB) / 3 = 448 KiB; the point's 192 KiB is within
    assert g.policy_limit_bytes == 4 * BLOCK
    assert not g.over_policy and g.reason is None
    assert g.to_record()["over_policy"] == 0


def test_a_point_past_the_policy_is_a_warning(tmp_path: Path) -> None:
    # the generation went on where the policy's cap (half the data, 256 KiB) had ended it
    sizes = [DATA, 2 * BLOCK, 4 * BLOCK, 6 * BLOCK, 8 * BLOCK, 10 * BLOCK, 13 * BLOCK]
    g = pool_with(tmp_path, sizes)
    growth = pool_growth(g.root, "web1")
    assert growth.policy_limit_bytes is not None
    assert GROWTH_SLACK * growth.policy_limit_bytes < 13 * BLOCK
    assert growth.over_policy and growth.reason is not None
    assert "point 7" in growth.reason and "--new-generation" in growth.reason
    assert growth.to_record()["over_policy"] == 1
    assert "reason" not in growth.to_record()


def test_a_new_generation_clears_the_warning(tmp_path: Path) -> None:
    sizes = [DATA, 2 * BLOCK, 4 * BLOCK, 6 * BLOCK, 8 * BLOCK, 10 * BLOCK, 13 * BLOCK, DATA]
    growth = pool_growth(pool_with(tmp_path, sizes, new_generation=8).root, "web1")
    assert growth.generation == 2 and growth.growth_bytes is None
    assert not growth.over_policy and growth.policy_limit_bytes is None
    # both generations count: the old one's base and points stay until prune
    assert growth.stored_bytes == sum(sizes)
