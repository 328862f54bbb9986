"""Issue 18 item 7 (the rest): ``backup --exclude DISK`` and ``prune --all``."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from domains import DiskSpec, DomainFactory

from vmsnapbackup.cli import main
from vmsnapbackup.core.pool import Pool
from vmsnapbackup.errors import ExitCode

pytestmark = pytest.mark.integration


def test_exclude_leaves_a_disk_out(make_domain: DomainFactory, tmp_path: Path,
                                   capsys) -> None:  # type: ignore[no-untyped-def]
    td = make_domain(disks=[DiskSpec("vda", "qcow2", 32 * 2**20),
                            DiskSpec("vdb", "raw", 16 * 2**20),
                            DiskSpec("vdc", "qcow2", 16 * 2**20)])
    pool = tmp_path / "pool"
    # an unknown disk is an error, before the pool is made or a number taken
    assert main(["--pool", str(pool), "backup", td.name, "--exclude", "vdz"]) \
        == int(ExitCode.NOT_FOUND)
    assert "vdz" in capsys.readouterr().err
    assert not pool.exists()

    assert main(["--pool", str(pool), "backup", td.name, "--json", "--exclude", "vdb",
                 "--exclude", "vdc"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["point"] == 1
    assert [d["target"] for d in doc["disks"]] == ["vda"]
    assert {"target": "vdb", "reason": "excluded"} in doc["skipped"]
    store = Pool.open(pool).find_domain(td.name)
    assert [d.target for d in store.read_manifest(1).disks] == ["vda"]
    assert "vmsnapbackup-" not in td.live_xml()


def test_prune_all_prunes_every_domain_and_says_which_failed(
        make_domain: DomainFactory, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    pool = tmp_path / "pool"
    doms = [make_domain(disks=[DiskSpec("vda", "qcow2", 8 * 2**20)], start=False)
            for _ in range(2)]
    for td in doms:
        for _ in range(3):
            assert main(["--pool", str(pool), "backup", td.name]) == 0
    the_pool = Pool.open(pool)
    stores = [the_pool.find_domain(td.name) for td in doms]

    # one domain busy: the other is still pruned, and the exit code says one failed
    with stores[0].lock("backup"):
        rc = main(["--pool", str(pool), "prune", "--all", "--keep-last", "2"])
    out = capsys.readouterr()
    assert rc == int(ExitCode.LOCKED), out
    assert "1 domain(s) pruned, 1 failed" in out.out
    assert f"domain {doms[0].name}: FAILED" in out.out
    assert [i.number for i in stores[0].list_points()] == [1, 2, 3]
    assert [i.number for i in stores[1].list_points()] == [2, 3]

    assert main(["--pool", str(pool), "prune", "--all", "--keep-last", "1"]) == 0
    assert "2 domain(s) pruned, 0 failed" in capsys.readouterr().out
    assert [[i.number for i in s.list_points()] for s in stores] == [[3], [3]]

    # DOMAIN and --all together, or neither: a usage error
    assert main(["--pool", str(pool), "prune", "--keep-last", "1"]) == int(ExitCode.USAGE)
    assert main(["--pool", str(pool), "prune", doms[0].name, "--all", "--keep-last", "1"]) \
        == int(ExitCode.USAGE)
