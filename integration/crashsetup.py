"""What the power-cut tests share: their fixtures and starting pools.

The tests (test_crash_power, test_crash_run, test_crash_restore,
test_rebase_crash) import the fixtures by name; each keeps its own scenario
and its own questions.  The cut itself and its judging are :mod:`powercut`.

``VMSNAPBACKUP_CRASH_CUTS`` sets the number of strata per scenario (default
10); ``VMSNAPBACKUP_CRASH_SEED`` the seed (each test has its own default).
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from domains import DiskSpec, DomainFactory, TestDomain
from powercut import daemon_dirs, sweep_daemon_dirs
from powerloss.mount import fuse_available
from test_backup import convert

import vmsnapbackup
from vmsnapbackup.core.pool import Pool

MiB = 2**20
CUTS = int(os.environ.get("VMSNAPBACKUP_CRASH_CUTS", "10"))


def crash_seed(default: int) -> int:
    """The seed of the cut points: ``VMSNAPBACKUP_CRASH_SEED``, else the test's own."""
    return int(os.environ.get("VMSNAPBACKUP_CRASH_SEED", str(default)))


@pytest.fixture(autouse=True)
def _power_loss_fs() -> None:
    """Every crash test needs the power-loss file system (FUSE, as root)."""
    why = fuse_available()
    if why is not None or os.geteuid() != 0:
        pytest.skip(f"power-loss file system unavailable: {why or 'not root'}")


@pytest.fixture
def area(tmp_path: Path) -> Iterator[Path]:
    """Scratch space; afterwards, storage daemon dirs no repair could know of are
    swept (see powercut.sweep_daemon_dirs) and reported in the test's output."""
    before = daemon_dirs()
    yield tmp_path
    left = sweep_daemon_dirs(before)
    if left:
        # printed with the table: a finding about repair, not a failure of the pool
        print(f"cuts left {len(left)} storage daemon dirs that repair did not remove: "
              + ", ".join(p.name for p in left))
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture
def domain(make_domain: DomainFactory) -> TestDomain:
    """Tiny disks: every cut replays a whole command, so calls must be few."""
    dom = make_domain(disks=[DiskSpec("vda", "qcow2", 2 * MiB), DiskSpec("vdb", "raw", MiB)])
    dom.write("vda", 0, 64 * 1024, 0x11)
    dom.write("vdb", 512 * 1024, 4096, 0x22)
    return dom


def pool_with_points(dom: TestDomain, area: Path, n: int) -> Path:
    """A pool holding ``n`` points of ``dom``, made without any cut."""
    t = area / f"template-{n}"
    for i in range(n):
        dom.write("vda", (i + 1) * 256 * 1024, 4096, 0x30 + i)
        vmsnapbackup.backup(dom.name, t)
    return t


def point_images(pool: Path, dom: TestDomain, point: int, scratch: Path) -> dict[str, bytes]:
    """Each disk of ``point`` as raw bytes: what a restore or a rebase must give back."""
    store = Pool.open(pool).domain(dom.uuid)
    manifest = store.read_manifest(point)
    return {t: convert(store.resolve(manifest.disk(t).volume), scratch / f"want-{t}.raw")
            for t in dom.disks}
