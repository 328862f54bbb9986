"""``list --json`` shows how a generation grows: per point the stored bytes added per
backup since the generation's previous kept point, and on each generation's newest
point the size its next point is predicted at (the backup's generation policy's
prediction, core.genpolicy.predicted_next)."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import poolfake

from vmsnapbackup.core.pool import Pool
from vmsnapbackup.workflows.listing import list_points

UUID = "5a2a4b6c-1d2e-4f30-8a9b-0c1d2e3f4a5c"


def put(p: Path, size: int) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(os.urandom(size))


def test_growth_per_point_and_the_predicted_next(tmp_path: Path) -> None:
    pool = Pool.create(tmp_path / "pool")
    store = pool.domain(UUID, name="web1", create=True)
    stored = {1: 1000, 2: 100, 3: 300, 4: 500, 5: 2000, 6: 40}
    for n in range(1, 7):
        poolfake.fake_backup(store, put, new_generation=(n == 5))
        path = store.manifest_path(n)
        m = store.read_manifest(n)
        disks = tuple(dataclasses.replace(d, bytes_written=stored[n]) for d in m.disks)
        path.unlink()
        store.write_manifest(dataclasses.replace(m, disks=disks))
    store.remove_point(3)   # a pruned point: growth is spread over the gap

    by = {p.point: p for p in list_points(pool.root)}
    # generation 1: base 1 (1000), then 2 (100), 4 (500: +400 over two backups)
    assert [by[n].growth_bytes for n in (1, 2, 4)] == [0, 100, 200]
    assert by[4].predicted_next_bytes == 700      # 500 + 200 per backup
    assert by[2].predicted_next_bytes is None
    # generation 2: base 5, then 6 (40)
    assert by[6].growth_bytes == 40 and by[6].predicted_next_bytes == 80
    assert "predicted_next_bytes" in by[6].to_dict()
