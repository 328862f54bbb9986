"""A long-lived pool stays bounded under the default generation policy (issue 19).

A running domain with 64 MiB of data on a 256 MiB disk; before each backup the
"guest" rewrites 20 random 64 KiB blocks of its data; after each backup
``prune --keep-last 7``; default settings (no threshold: the cost policy of
core.genpolicy decides).  The pool must stay at most 4x the data after every
backup (the issue asks it of the end).  The full 60 take about 40 s here;
VSB_GEN_BACKUPS shortens the series.  Figures: docs/generations.md §7.
"""
from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import pytest
from domains import DiskModel, DiskSpec, DomainFactory
from test_backup import convert

from vmsnapbackup.core.pool import Pool
from vmsnapbackup.workflows.backup import backup
from vmsnapbackup.workflows.prune import prune

pytestmark = pytest.mark.integration

log = logging.getLogger("vsb.generations")

MiB = 2**20
BLOCK = 64 * 1024
DATA = 64 * MiB
KEEP = 7
WRITES = 20
BACKUPS = int(os.environ.get("VSB_GEN_BACKUPS", "60"))
MAX_RATIO = 4.0


def pool_bytes(pool: Path) -> int:
    """What the pool occupies on disk (allocated bytes of every file)."""
    return sum(p.stat().st_blocks * 512 for p in pool.rglob("*") if p.is_file())


def test_pool_stays_within_four_times_the_data(make_domain: DomainFactory,
                                               tmp_path: Path) -> None:
    dom = make_domain(disks=[DiskSpec("vda", "qcow2", 256 * MiB)], start=True)
    model = DiskModel(dom)
    model.write("vda", 0, DATA, 0x5A)
    rng = random.Random(19)
    pool = tmp_path / "pool"
    generations: set[int] = set()
    ratio = 0.0
    for n in range(1, BACKUPS + 1):
        if n > 1:
            for _ in range(WRITES):
                model.write("vda", rng.randrange(DATA // BLOCK) * BLOCK, BLOCK,
                            rng.randrange(1, 256))
        r = backup(dom.name, pool)
        generations.add(r.generation)
        prune(dom.name, pool, keep_last=KEEP)
        ratio = pool_bytes(pool) / DATA
        log.info("backup %d: generation %d%s, %.2f MiB written, pool %.2f x data", n,
                 r.generation, " (new)" if r.new_generation else "",
                 sum(d.bytes_written for d in r.disks) / MiB, ratio)
        assert ratio <= MAX_RATIO, f"after backup {n} the pool is {ratio:.2f} x the data"
    store = Pool.open(pool).domain(dom.uuid)
    points = {p.number: p.manifest for p in store.points()}
    assert len(points) == min(KEEP, BACKUPS)
    if BACKUPS >= 20:
        # 2 % of the data rewritten per backup: the policy must have renewed by now
        assert len(generations) >= 2, generations
    # the newest point restores bit-exact (prune's own tests check the older ones)
    newest = points[max(points)]
    assert newest is not None and newest.point == r.point
    want = model.snapshot()["vda"]
    got = convert(store.resolve(newest.disk("vda").volume), tmp_path / "newest.raw")
    assert got == want, "the newest point differs from what the guest wrote"
    log.info("final: %d backups, %d generations, pool %.2f x data", BACKUPS,
             len(generations), ratio)
