"""``repair --all`` passes over work in progress: a domain that another process's
live backup holds right now (in any pool) is not a leftover, and ``--all`` neither
touches it nor fails on it.  Found by the soak, whose ``--all`` met the live backups
of tests running beside it."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from domains import DiskSpec, DomainFactory

from vmsnapbackup.adapters.domainxml import overlay_path
from vmsnapbackup.adapters.hypervisor import Hypervisor, connect
from vmsnapbackup.core.pool import Pool
from vmsnapbackup.workflows.repair import COMMIT, repair

pytestmark = pytest.mark.integration

MiB = 1024 * 1024

HOLDER = textwrap.dedent("""
    import sys
    from vmsnapbackup.core import inflight
    rec = inflight.InflightRecord.now(sys.argv[1], sys.argv[2], "backup", sys.argv[3])
    with inflight.inflight(rec):
        print("held", flush=True)
        sys.stdin.read()
""")


@pytest.fixture
def hv() -> Iterator[Hypervisor]:
    with connect() as h:
        yield h


def test_all_skips_a_domain_a_live_backup_holds(
        hv: Hypervisor, make_domain: DomainFactory, tmp_path: Path) -> None:
    pool_dir = tmp_path / "pool"
    Pool.create(pool_dir)
    td = make_domain(disks=[DiskSpec("vda", "qcow2", 16 * MiB)], start=True)
    dom = hv.find_domain(td.name)
    disks, _ = hv.backup_disks(dom)
    hv.snapshot(dom, disks, lambda d: overlay_path(d, "p3-live001"))

    # with nobody holding it, the domain on our overlay is a leftover: --all plans its commit
    report = repair(pool_dir, all_domains=True, dry_run=True)
    assert [a.action for a in {d.domain: d for d in report.domains}[td.name].actions] == [COMMIT]

    holder = subprocess.Popen([sys.executable, "-c", HOLDER, td.uuid, td.name, str(pool_dir)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        report = repair(pool_dir, all_domains=True)
        assert td.name not in {d.domain for d in report.domains}
        assert ".vmsnapbackup-" in hv.disks(dom)[0].source  # untouched
    finally:
        holder.communicate("", timeout=30)
    # the holder gone, it is a leftover again and repair puts the domain back
    report = repair(pool_dir, domain=td.name)
    assert [a.action for a in report.actions] == [COMMIT]
