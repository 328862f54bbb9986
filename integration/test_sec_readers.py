"""Readers and prune (issue 12, FORMAT.md §8): a prune never runs under a reader.

A verify that a prune overtakes would report points damaged that were only
removed; a mount would lose what it serves.  With the readers lock, a prune
started while a verify or a mount reads the domain is refused (LOCKED, one line),
the reader finishes with every point good, and the prune works afterwards.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_restore import three_points

from vmsnapbackup.adapters.nbdclient import NbdClient
from vmsnapbackup.errors import ExitCode, LockedError, VmSnapBackupError
from vmsnapbackup.progress import ProgressEvent
from vmsnapbackup.workflows.access import mount_point
from vmsnapbackup.workflows.prune import prune
from vmsnapbackup.workflows.verify import verify

pytestmark = pytest.mark.integration


def test_prune_during_verify_is_refused(tmp_path: Path) -> None:
    sp = three_points(tmp_path)
    tried: list[BaseException | None] = []

    def prune_now(ev: ProgressEvent) -> None:
        if not tried:
            try:
                prune(sp.name, sp.pool, keep_last=1)
                tried.append(None)
            except VmSnapBackupError as err:
                tried.append(err)

    report = verify(sp.pool, domain=sp.name, progress=prune_now)
    assert isinstance(tried[0], LockedError), tried
    assert "being read by a restore, verify, mount or boot" in str(tried[0])
    assert report.ok and [p.status for p in report.domains[0].points] == ["good"] * 3
    done = prune(sp.name, sp.pool, keep_last=1)   # the reader gone, prune works
    assert [p.number for p in done.removed] == [1, 2]


def test_prune_during_a_mount_keeps_what_it_serves(tmp_path: Path) -> None:
    """A mount holds the readers lock only until its daemon has the volumes open; a
    prune then keeps the served point (in use) and the mount still reads it exactly."""
    sp = three_points(tmp_path)
    with mount_point(sp.name, sp.pool, 2, "vda") as m:
        report = prune(sp.name, sp.pool, keep_last=1)
        assert [p.number for p in report.removed] == [1]
        assert [p.number for p in report.kept] == [2, 3]
        assert report.kept[0].reasons[-1].startswith("in use")
        with NbdClient.open_uri(m.uri) as c:
            assert c.read(0, c.size)[:len(sp.contents[2]["vda"])] == sp.contents[2]["vda"]


def test_cli_prune_during_verify_one_line_locked(tmp_path: Path) -> None:
    sp = three_points(tmp_path)
    seen: list[subprocess.CompletedProcess[str]] = []

    def prune_cli(ev: ProgressEvent) -> None:
        if not seen:
            seen.append(subprocess.run(
                [sys.executable, "-m", "vmsnapbackup", "--pool", str(sp.pool.root), "prune",
                 sp.name, "--keep-last", "1"],
                capture_output=True, text=True, timeout=120, check=False))

    assert verify(sp.pool, domain=sp.name, progress=prune_cli).ok
    proc = seen[0]
    assert proc.returncode == ExitCode.LOCKED, proc.stderr
    assert "Traceback" not in proc.stderr and "being read" in proc.stderr
    assert len(sp.store.points()) == 3


def test_reader_during_prune_is_refused(tmp_path: Path) -> None:
    sp = three_points(tmp_path)
    with sp.store.lock("prune"), pytest.raises(LockedError, match=r"being pruned by pid"):
        verify(sp.pool, domain=sp.name)


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
HOLD = ("import fcntl,os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); "
        "fcntl.flock(fd, fcntl.LOCK_SH|fcntl.LOCK_NB); print('held')")


def test_nobody_cannot_hold_the_readers_lock(tmp_path: Path) -> None:
    """A local user who could take the shared lock would block every prune forever."""
    sp = three_points(tmp_path)
    with mount_point(sp.name, sp.pool, 3, "vda"):
        pass   # the readers file now exists
    readers = sp.store.path / "readers"
    assert readers.is_file() and (readers.stat().st_mode & 0o777) == 0o600
    proc = subprocess.run([*NOBODY, "/usr/bin/python3", "-c", HOLD, str(readers)],
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode != 0 and "held" not in proc.stdout
    # control: the same attack on a readable copy in a reachable directory works
    open_dir = Path("/tmp") / f"vsb-readers-{os.getpid()}"
    open_dir.mkdir(mode=0o755)
    try:
        copy = open_dir / "readers"
        copy.write_bytes(b"")
        copy.chmod(0o644)
        proc = subprocess.run([*NOBODY, "/usr/bin/python3", "-c", HOLD, str(copy)],
                              capture_output=True, text=True, timeout=30, check=False)
        assert proc.returncode == 0 and "held" in proc.stdout, proc.stderr
    finally:
        shutil.rmtree(open_dir, ignore_errors=True)
