"""``list`` shows each point's stored size and what its generation costs: its base
plus its points still in the pool (the base from its files once prune removed the
generation's first point)."""
from __future__ import annotations

import os
from pathlib import Path

import poolfake

from vmsnapbackup.core.pool import Pool
from vmsnapbackup.workflows.listing import list_points
from vmsnapbackup.workflows.prune import prune

UUID = "3f2a4b6c-1d2e-4f30-8a9b-0c1d2e3f4a5b"
BASE_FILE = 256 * 1024
STORED = 65536      # bytes_written per disk in poolfake's manifests


def put(p: Path, size: int) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(os.urandom(size))
    os.chmod(p, 0o600)


def test_generation_cost_before_and_after_prune(tmp_path: Path) -> None:
    pool = Pool.create(tmp_path / "pool")
    store = pool.domain(UUID, name="web1", create=True)
    sizes = {"base": BASE_FILE, "table": 8192, "volume": 4096, "difference": 512}
    for n in range(1, 6):
        poolfake.fake_backup(store, put, new_generation=(n == 4), sizes=sizes)

    by = {p.point: p for p in list_points(pool.root)}
    assert [by[n].stored_bytes for n in range(1, 6)] == [STORED] * 5
    # generation 1: points 1 (its base), 2, 3; generation 2: points 4 (base), 5
    assert {by[n].generation_bytes for n in (1, 2, 3)} == {3 * STORED}
    assert {by[n].generation_bytes for n in (4, 5)} == {2 * STORED}

    prune("web1", pool.root, keep_last=4)      # point 1 goes, generation 1's base stays
    by = {p.point: p for p in list_points(pool.root)}
    assert sorted(by) == [2, 3, 4, 5]
    assert {by[n].generation_bytes for n in (2, 3)} == {BASE_FILE + 2 * STORED}
    assert by[5].to_dict()["generation_bytes"] == 2 * STORED
