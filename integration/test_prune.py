"""Prune on points taken by real backups of a running domain.

Real backups cannot have chosen timestamps, so the calendar rules are proven in
tests/test_retention.py and tests/test_prune.py; here keep-last decides, and what
matters is the pool: exactly the kept points are left, each still converts to the
bytes the guest had at its snapshot, and a generation with no point left is gone.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from domains import DiskModel, TestDomain
from test_backup import convert

from vmsnapbackup.adapters.nbdclient import NbdClient
from vmsnapbackup.cli import main
from vmsnapbackup.core.pool import Pool
from vmsnapbackup.errors import LockedError
from vmsnapbackup.workflows.access import mount_point
from vmsnapbackup.workflows.backup import backup
from vmsnapbackup.workflows.prune import prune

pytestmark = pytest.mark.integration

MiB = 2**20


def take_points(dom: TestDomain, pool: Path) -> dict[int, dict[str, bytes]]:
    """Five points: 1-2 in generation 1, 3-5 in generation 2."""
    model = DiskModel(dom)
    expected: dict[int, dict[str, bytes]] = {}
    for n in range(1, 6):
        model.write("vda", n * MiB, 64 * 1024, 0x10 + n)
        model.write("vdb", (n - 1) * 2 * MiB, 4096, 0x20 + n)
        r = backup(dom.name, pool, new_generation=(n == 3))
        assert r.point == n and r.generation == (1 if n < 3 else 2)
        expected[n] = model.snapshot()
    return expected


def test_prune_keeps_exactly_the_policy_and_kept_points_restore(
        running_domain: TestDomain, tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    expected = take_points(running_domain, pool)
    store = Pool.open(pool).domain(running_domain.uuid)
    gen1_bases = [store.base_volume_path(1, t, "qcow2") for t in ("vda", "vdb")]
    assert all(b.is_file() for b in gen1_bases)

    plan = prune(running_domain.name, pool, keep_last=2, dry_run=True)
    assert [p.number for p in plan.removed] == [1, 2, 3]
    assert [p.number for p in store.points()] == [1, 2, 3, 4, 5]   # nothing removed

    report = prune(running_domain.name, pool, keep_last=2)
    assert sorted(p.number for p in report.kept) == [4, 5]
    assert sorted(p.number for p in report.removed) == [1, 2, 3]
    assert sorted(report.files_removed) == sorted(plan.files_removed)
    assert report.bytes_freed == plan.bytes_freed > 0
    assert report.generations_removed == [1]
    assert sorted(report.bases_removed) == sorted(store.relpath(b) for b in gen1_bases)
    assert not any(b.exists() for b in gen1_bases)
    assert not store.generation_dir(1).exists()
    # point 3 was generation 2's first point: its volume is the base points 4 and 5 need
    assert store.base_volume_path(2, "vda", "qcow2").is_file()
    assert [p.number for p in store.points()] == [4, 5]
    for info in store.points():
        assert info.manifest is not None
        for d in info.manifest.disks:
            got = convert(store.resolve(d.volume), tmp_path / "out.raw")
            assert got == expected[info.number][d.target], (info.number, d.target)
    # a further backup after the prune still works and numbers go on
    assert backup(running_domain.name, pool).point == 6


def test_prune_during_a_held_lock_fails_at_once(running_domain: TestDomain,
                                                tmp_path: Path, capsys) -> None:
    pool = tmp_path / "pool"
    backup(running_domain.name, pool)
    backup(running_domain.name, pool)
    store = Pool.open(pool).domain(running_domain.uuid)
    with store.lock("backup"):
        with pytest.raises(LockedError, match="backup"):
            prune(running_domain.name, pool, keep_last=1)
        assert main(["--pool", str(pool), "prune", running_domain.name, "--keep-last", "1"]) == 4
    assert "locked" in capsys.readouterr().err
    assert [p.number for p in store.points()] == [1, 2]
    assert prune(running_domain.name, pool, keep_last=1).removed[0].number == 1


def test_a_mounted_point_is_not_pruned(running_domain: TestDomain, tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    for _ in range(3):
        backup(running_domain.name, pool)
    with mount_point(running_domain.name, pool, 2, "vdb") as m:
        with NbdClient.open_uri(m.uri) as c:
            assert c.size == running_domain.specs["vdb"].size
        report = prune(running_domain.name, pool, keep_last=1)
        kept = {p.number: p.reasons for p in report.kept}
        assert sorted(kept) == [2, 3] and kept[2][0].startswith("in use: pid ")
        assert "qemu-storage" in kept[2][0]
        assert [p.number for p in report.removed] == [1]
    # point 1 was the generation's first point: its volume is the base, still needed
    store = Pool.open(pool).domain(running_domain.uuid)
    assert [p.number for p in store.points()] == [2, 3]
    assert store.base_volume_path(1, "vda", "qcow2").is_file()
    assert [p.number for p in prune(running_domain.name, pool, keep_last=1).removed] == [2]
