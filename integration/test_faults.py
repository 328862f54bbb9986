"""Fault injection on the real stack (issue 6).

For each fault: the guest-visible bytes of every disk equal what was written;
after at most one ``repair`` the domain runs on its original images with no
overlay, no storage daemon, no socket; ``list`` shows only complete points and
``verify`` passes on them; the next backup succeeds (see
:func:`faults.assert_recovered`).

The faults are injected into real backups running in child processes
(:class:`faults.ChildBackup`): the child stops at one step and the test kills
it, restarts libvirtd, starts a second backup, a prune, the domain...
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from domains import DiskSpec, DomainFactory, TestDomain
from faults import (
    MiB,
    Model,
    Reaper,
    assert_points,
    assert_recovered,
    hook_jobs_running,
    remount,
    restart_libvirtd,
    revive_connection,
    tmpfs,
    until,
    used_inodes,
    wait_gone,
    wait_libvirtd,
)

from vmsnapbackup.adapters.domainxml import find_disk, is_our_overlay
from vmsnapbackup.cli import main
from vmsnapbackup.core import inflight
from vmsnapbackup.core.pool import DomainStore, Pool
from vmsnapbackup.errors import ExitCode, HypervisorError, RepairNeededError
from vmsnapbackup.hooks import install as hookinstall
from vmsnapbackup.hooks.config import DEFAULT_CONFIG_PATH
from vmsnapbackup.hooks.logic import hook_main
from vmsnapbackup.progress import ProgressEvent
from vmsnapbackup.workflows.backup import backup
from vmsnapbackup.workflows.listing import list_points
from vmsnapbackup.workflows.repair import CANCEL_JOB, OFFLINE_COMMIT, repair

pytestmark = pytest.mark.integration

Points = dict[int, dict[str, bytes]]


@pytest.fixture(autouse=True)
def default_runtime_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    """Children, repairs and the hook (run by libvirtd) must all see /run/vmsnapbackup."""
    monkeypatch.delenv(inflight.RUNTIME_DIR_ENV, raising=False)


@pytest.fixture
def reaper(tmp_path: Path) -> Iterator[Reaper]:
    r = Reaper(tmp_path)
    try:
        yield r
    finally:
        r.close()


def two_disk_domain(make_domain: DomainFactory) -> TestDomain:
    return make_domain(disks=[DiskSpec("vda", "qcow2", 16 * MiB),
                              DiskSpec("vdb", "raw", 4 * MiB)], start=True)


def guest_data(model: Model) -> None:
    """Enough data that a disk pass takes several chunks (1 MiB requests)."""
    model.write("vda", 0, 3 * MiB, 0x11)
    model.write("vdb", 1 * MiB, 64 * 1024, 0x12)


def cli(*argv: str) -> int:
    return main([str(a) for a in argv])


def on_overlays(td: TestDomain) -> dict[str, bool]:
    return {t: is_our_overlay(find_disk(td.live_xml(), t).source) for t in td.disks}


def assert_stopped_at(step: str, td: TestDomain, store: DomainStore) -> None:
    """The child really stopped where it was asked to (the state each step leaves)."""
    entry = store.journal.read()
    assert entry is not None
    files = [store.resolve(f) for f in entry.files]
    if step in ("snapshot", "read", "write"):
        assert entry.step == "read" and on_overlays(td) == {"vda": True, "vdb": True}
    if step == "write":
        partial = [f for f in files if f.name.endswith(".partial")]
        assert partial and partial[0].exists()
    if step == "manifest":
        assert entry.step == "seal" and on_overlays(td) == {"vda": False, "vdb": False}
        assert not store.manifest_path(entry.point).exists()
        volumes = [f for f in files if f.name.endswith(".partial")]
        assert volumes and all(not v.exists() and v.with_suffix("").exists() for v in volumes)
    if step in ("commit", "commit-2nd"):
        first = step == "commit"
        assert entry.step == "commit" and on_overlays(td) == {"vda": first, "vdb": True}
        job = td.dom.blockJobInfo("vda" if first else "vdb", 0)
        assert job and job["type"] == libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT
        assert job["cur"] == job["end"]  # READY, waiting for the pivot that never comes


# -- SIGKILL of the backup process at each step --------------------------------------------

# (step, a sealed point before it, how the leftovers are dealt with, how the child dies)
#   repair: one `vmsnapbackup repair`, then the next backup
#   backup: no manual repair: the next backup repairs first by itself
#   block:  the child waits at the step and the test SIGKILLs it (after guest writes)
#   kill:   the child SIGKILLs itself at the step
KILLS = [
    ("snapshot", False, "backup", "block"),
    ("read", True, "repair", "block"),
    ("read", False, "backup", "kill"),
    ("write", False, "backup", "block"),     # half a base volume
    ("write", True, "repair", "block"),      # half a point volume
    ("manifest", True, "repair", "block"),
    ("manifest", False, "backup", "kill"),   # a whole new generation without its manifest
    ("commit", True, "backup", "block"),     # READY commit job on vda, vdb on its overlay
    ("commit", True, "repair", "kill"),
    ("commit-2nd", True, "repair", "block"),   # vda back on its image, vdb READY
]

#: What the repair of each step's leftovers must include (besides the pool files).
EXPECTED_REPAIR = {
    "snapshot": ["stop-daemon", "commit", "commit"],
    "read": ["stop-daemon", "commit", "commit"],
    "write": ["stop-daemon", "commit", "commit"],
    "manifest": [],   # the VM was committed back and the daemon had stopped
    "commit": [CANCEL_JOB, "commit", "commit"],
    "commit-2nd": [CANCEL_JOB, "commit"],
}


@pytest.mark.parametrize("step,prior,recover,action", KILLS,
                         ids=[f"{s}-{'point' if p else 'base'}-{r}-{a}" for s, p, r, a in KILLS])
def test_sigkill_of_the_backup(step: str, prior: bool, recover: str, action: str,
                               make_domain: DomainFactory, tmp_path: Path,
                               reaper: Reaper, capsys: pytest.CaptureFixture) -> None:
    td = two_disk_domain(make_domain)
    model = Model(td)
    guest_data(model)
    pool = tmp_path / "pool"
    points: Points = {}
    if prior:
        points[backup(td.name, pool).point] = model.snapshot()
        model.write("vda", 4 * MiB, 2 * MiB, 0x13)   # something for the next point to write
    child = reaper.start(td, pool, step, action)
    child.wait_at()
    store = Pool.open(pool).domain(td.uuid)
    entry = store.journal.read()
    assert entry is not None and entry.daemon is not None
    assert_stopped_at(step, td, store)
    # the guest goes on writing while the backup is stuck (into the overlays, or
    # mirrored by the commit job, or into the images once committed back)
    model.write("vda", 8 * MiB, 64 * 1024, 0x21)
    model.write("vdb", 0, 4096, 0x22)
    child.kill()
    wait_gone(entry.daemon.pid)   # PDEATHSIG: the storage daemon died with its owner
    # nothing half-written is listed, even before any repair
    assert_points(pool, td.uuid, points, tmp_path)

    if recover == "repair":
        capsys.readouterr()
        assert cli("--pool", pool, "repair", td.name, "--json") == 0, capsys.readouterr()
        done = [a["action"] for a in json.loads(capsys.readouterr().out)["actions"]]
        vm_side = [a for a in done if a in ("stop-daemon", CANCEL_JOB, "commit")]
        assert vm_side == EXPECTED_REPAIR[step], done
        assert done[-2:] == ["clear-journal", "clear-inflight"], done
        assert assert_recovered(td, pool, active=True) == sorted(points)
    result = backup(td.name, pool)   # repairs first when nobody did
    points[result.point] = model.snapshot()
    assert result.point == entry.point + 1
    assert assert_recovered(td, pool, active=True) == sorted(points)
    assert_points(pool, td.uuid, points, tmp_path)
    model.assert_guest_bytes()


def test_a_pivot_refused_as_not_ready_is_retried(make_domain: DomainFactory, tmp_path: Path,
                                                 reaper: Reaper) -> None:
    """libvirt refuses a pivot until it has taken in QEMU's READY event, which on a busy
    host comes after the job info already shows cur == end: the backup retries the
    pivot.  The commit-2nd fault must stop at the second *disk*, not the second call
    (a CI run stopped at vda's retry, with vda still on its overlay)."""
    td = two_disk_domain(make_domain)
    model = Model(td)
    guest_data(model)
    pool = tmp_path / "pool"
    child = reaper.start(td, pool, "commit-2nd", refuse_pivot_once=["vda"])
    child.wait_at()
    assert "injected pivot refusal of vda" in child.stderr()
    store = Pool.open(pool).domain(td.uuid)
    assert_stopped_at("commit-2nd", td, store)
    child.resume()
    outcome = child.outcome()
    assert outcome["returncode"] == 0 and outcome["point"] == 1, (outcome, child.stderr())
    assert assert_recovered(td, pool, active=True) == [1]
    assert_points(pool, td.uuid, {1: model.snapshot()}, tmp_path)
    model.assert_guest_bytes()


def test_sigkill_of_an_offline_backup(make_domain: DomainFactory, tmp_path: Path,
                                      reaper: Reaper) -> None:
    """A shut-off domain's images are read directly; the dead backup's record is stale
    at once, so the domain starts, and its next backup (running) repairs first."""
    td = two_disk_domain(make_domain)
    model = Model(td)
    guest_data(model)
    td.shutoff()
    pool = tmp_path / "pool"
    child = reaper.start(td, pool, "read")
    child.wait_at()
    entry = Pool.open(pool).domain(td.uuid).journal.read()
    assert entry is not None and entry.daemon is not None
    record = inflight.read(td.uuid)
    assert record is not None and record.offline
    child.kill()
    wait_gone(entry.daemon.pid)
    assert not inflight.is_live(record)
    assert_points(pool, td.uuid, {}, tmp_path)
    td.start()   # the images are free: the storage daemon died with the backup
    model.write("vda", 6 * MiB, 64 * 1024, 0x2a)
    result = backup(td.name, pool)
    assert result.point == entry.point + 1
    assert assert_recovered(td, pool, active=True) == [result.point]
    assert_points(pool, td.uuid, {result.point: model.snapshot()}, tmp_path)
    model.assert_guest_bytes()


# -- SIGTERM: the backup undoes itself ---------------------------------------------------

@pytest.mark.parametrize("step", ["snapshot", "read", "manifest", "commit", "commit-2nd"])
def test_sigterm_of_the_backup(step: str, make_domain: DomainFactory, tmp_path: Path,
                               reaper: Reaper) -> None:
    """A polite stop (a service manager, Ctrl-C) needs no repair: the backup commits the
    VM back, stops its daemon and removes its files itself, and exits 8."""
    td = two_disk_domain(make_domain)
    model = Model(td)
    guest_data(model)
    pool = tmp_path / "pool"
    points: Points = {backup(td.name, pool).point: model.snapshot()}
    model.write("vda", 4 * MiB, 2 * MiB, 0x2b)
    child = reaper.start(td, pool, step)
    child.wait_at()
    model.write("vda", 8 * MiB, 64 * 1024, 0x2c)
    child.proc.send_signal(signal.SIGTERM)
    out = child.outcome()
    assert (out.get("error"), out["returncode"]) == ("BackupInterruptedError",
                                                    ExitCode.INTERRUPTED), out
    assert "repair" not in out["message"], out
    assert assert_recovered(td, pool, active=True) == sorted(points)
    result = backup(td.name, pool)
    points[result.point] = model.snapshot()
    assert assert_recovered(td, pool, active=True) == sorted(points)
    assert_points(pool, td.uuid, points, tmp_path)
    model.assert_guest_bytes()

# -- libvirtd restarted during a backup -----------------------------------------------------

def test_libvirtd_restarted_during_a_backup(libvirt_conn: libvirt.virConnect,
                                            make_domain: DomainFactory, tmp_path: Path,
                                            reaper: Reaper, capsys: pytest.CaptureFixture
                                            ) -> None:
    """libvirtd stops and starts again while the backup reads (the domain keeps running
    on its overlays).  The backup's connection died with it: the backup reconnects for
    its commit and seals the point, with nothing left to repair."""
    td = two_disk_domain(make_domain)
    model = Model(td)
    guest_data(model)
    pool = tmp_path / "pool"
    points: Points = {backup(td.name, pool).point: model.snapshot()}
    model.write("vda", 4 * MiB, 1 * MiB, 0x31)
    child = reaper.start(td, pool, "read")
    child.wait_at()
    at_snapshot = model.snapshot()
    restart_libvirtd()
    revive_connection(libvirt_conn, [td])
    assert td.dom.isActive() and on_overlays(td) == {"vda": True, "vdb": True}
    model.write("vda", 9 * MiB, 64 * 1024, 0x32)   # the guest never noticed
    child.resume()
    out = child.outcome()
    assert out["returncode"] == 0 and out["point"] == 2, out
    points[2] = at_snapshot
    print(f"backup across a libvirtd restart: {out}")
    assert assert_recovered(td, pool, active=True) == sorted(points)
    result = backup(td.name, pool)
    points[result.point] = model.snapshot()
    assert assert_recovered(td, pool, active=True) == sorted(points)
    assert_points(pool, td.uuid, points, tmp_path)
    model.assert_guest_bytes()


# -- the pool filling up, a read-only pool --------------------------------------------------

def test_pool_fills_up(make_domain: DomainFactory, tmp_path: Path, reaper: Reaper,
                       capsys: pytest.CaptureFixture) -> None:
    td = make_domain(disks=[DiskSpec("vda", "qcow2", 16 * MiB)], start=True)
    model = Model(td)
    model.write("vda", 0, 12 * MiB, 0x41)   # more than the 8 MiB pool can take
    pool = tmp_path / "small-pool"
    with tmpfs(pool, "8m"):
        reaper.watch(td, pool)
        capsys.readouterr()
        assert cli("--pool", pool, "backup", td.name) == ExitCode.STORAGE
        err = capsys.readouterr().err
        assert "full" in err and err.count("\n") == 1, err
        # it undid everything itself: no journal, so no "run repair" either
        assert "repair" not in err, err
        assert assert_recovered(td, pool, active=True) == []
        model.write("vda", 13 * MiB, 64 * 1024, 0x42)
        remount(pool, "size=64m")
        points: Points = {backup(td.name, pool).point: model.snapshot()}
        assert assert_recovered(td, pool, active=True) == sorted(points)
        # a point volume that does not fit: 3 MiB changed, 1 MiB free
        model.write("vda", 0, 3 * MiB, 0x43)
        filler = pool / "filler"
        free = os.statvfs(pool).f_bavail * os.statvfs(pool).f_frsize
        subprocess.run(["fallocate", "-l", str(free - 1 * MiB), str(filler)], check=True)
        assert cli("--pool", pool, "backup", td.name) == ExitCode.STORAGE
        err = capsys.readouterr().err
        assert "full" in err and "repair" not in err, err
        assert assert_recovered(td, pool, active=True) == sorted(points)
        filler.unlink()
        points[backup(td.name, pool).point] = model.snapshot()
        assert assert_recovered(td, pool, active=True) == sorted(points)
        assert_points(pool, td.uuid, points, tmp_path)
    model.assert_guest_bytes()


def test_pool_runs_out_of_inodes_at_every_file_a_backup_creates(
        make_domain: DomainFactory, tmp_path: Path, reaper: Reaper,
        capsys: pytest.CaptureFixture) -> None:
    """ENOSPC at each file and directory in turn: a tmpfs allowed one more inode per
    attempt, from what the pool holds now until a backup fits (a base, then a point).
    Every failed attempt is exit 7, one line, and undoes itself completely."""
    td = make_domain(disks=[DiskSpec("vda", "qcow2", 16 * MiB),
                            DiskSpec("vdb", "raw", 4 * MiB)], start=True)
    model = Model(td)
    model.write("vda", 0, 2 * MiB, 0x45)
    pool = tmp_path / "inode-pool"
    points: Points = {}
    with tmpfs(pool, "64m"):
        reaper.watch(td, pool)
        Pool.open(pool, create=True)
        for _round in ("base", "point"):
            limit = used_inodes(pool)
            while True:
                remount(pool, f"nr_inodes={limit}")
                capsys.readouterr()
                rc = cli("--pool", pool, "backup", td.name)
                err = capsys.readouterr().err
                if rc == 0:
                    break
                last = err.strip().splitlines()[-1]
                assert rc == ExitCode.STORAGE and "full" in last, (limit, err)
                assert "repair" not in last, (limit, err)   # it undid everything itself
                assert assert_recovered(td, pool, active=True, pool_writable=False) \
                    == sorted(points), limit
                limit += 1
            points[max(p.point for p in list_points(pool, domain=td.uuid))] = \
                model.snapshot()
            remount(pool, "nr_inodes=100000")
            assert assert_recovered(td, pool, active=True) == sorted(points)
            model.write("vda", 4 * MiB, 1 * MiB, 0x46)
        assert_points(pool, td.uuid, points, tmp_path)
    model.assert_guest_bytes()


def test_read_only_pool(make_domain: DomainFactory, tmp_path: Path, reaper: Reaper,
                        capsys: pytest.CaptureFixture) -> None:
    td = make_domain(disks=[DiskSpec("vda", "qcow2", 16 * MiB)], start=True)
    model = Model(td)
    model.write("vda", 0, 2 * MiB, 0x51)
    pool = tmp_path / "ro-pool"
    with tmpfs(pool, "64m"):
        reaper.watch(td, pool)
        Pool.open(pool, create=True)
        remount(pool, "ro")   # a pool with no part for the domain yet
        capsys.readouterr()
        assert cli("--pool", pool, "backup", td.name) == ExitCode.STORAGE
        assert "not writable" in capsys.readouterr().err
        assert on_overlays(td) == {"vda": False} and inflight.read(td.uuid) is None
        remount(pool, "rw")
        points: Points = {backup(td.name, pool).point: model.snapshot()}
        model.write("vda", 3 * MiB, 64 * 1024, 0x52)
        remount(pool, "ro")   # the domain's part exists: lock file, domain.json, points
        assert cli("--pool", pool, "backup", td.name) == ExitCode.STORAGE
        assert "not writable" in capsys.readouterr().err
        assert cli("--pool", pool, "list") == 0   # reading still works
        assert assert_recovered(td, pool, active=True, pool_writable=False) == sorted(points)
        remount(pool, "rw")
        result = backup(td.name, pool)
        points[result.point] = model.snapshot()
        assert assert_recovered(td, pool, active=True) == sorted(points)
        assert_points(pool, td.uuid, points, tmp_path)
    model.assert_guest_bytes()


# -- the domain shut down or destroyed during a backup --------------------------------------

def _quit_qemu(td: TestDomain) -> None:
    """A shutdown the domain itself initiates: QEMU quits on its own (QMP ``quit``), and
    libvirt sees a shutdown, not a destroy.  (A firmware-only guest ignores ACPI, and
    there is no guest agent, so ``virsh shutdown`` would do nothing.)"""
    import libvirt_qemu

    libvirt_qemu.qemuMonitorCommand(td.dom, '{"execute": "quit"}', 0)


@pytest.mark.parametrize("how", ["destroy", "shutdown"])
def test_domain_stopped_during_a_backup(how: str, make_domain: DomainFactory, tmp_path: Path
                                        ) -> None:
    td = two_disk_domain(make_domain)
    model = Model(td)
    guest_data(model)
    pool = tmp_path / "pool"
    points: Points = {backup(td.name, pool).point: model.snapshot()}
    stopped = []

    def stop_it(ev: ProgressEvent) -> None:
        if not stopped:
            stopped.append(ev)
            model.write("vda", 5 * MiB, 128 * 1024, 0x61)   # into the overlay
            if how == "destroy":
                td.dom.destroy()
            else:
                _quit_qemu(td)
                until(lambda: not td.dom.isActive(), 30)

    with pytest.raises((RepairNeededError, HypervisorError)) as info:
        backup(td.name, pool, progress=stop_it)
    assert stopped and f"repair {td.name}" in str(info.value)
    state, reason = td.dom.state()
    assert state == libvirt.VIR_DOMAIN_SHUTOFF
    assert reason == (libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED if how == "destroy"
                      else libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN)
    assert_points(pool, td.uuid, points, tmp_path)

    report = repair(pool, domain=td.name)
    assert report.exit_code == ExitCode.OK
    assert [a.action for a in report.actions].count(OFFLINE_COMMIT) == 2
    assert assert_recovered(td, pool, active=False) == sorted(points)
    td.start()
    model.write("vda", 6 * MiB, 4096, 0x62)
    result = backup(td.name, pool)
    points[result.point] = model.snapshot()
    assert assert_recovered(td, pool, active=True) == sorted(points)
    assert_points(pool, td.uuid, points, tmp_path)
    model.assert_guest_bytes()


# -- two backups at once, a prune during a backup -------------------------------------------

def test_second_backup_prune_and_repair_refused_during_a_backup(
        make_domain: DomainFactory, tmp_path: Path, reaper: Reaper,
        capsys: pytest.CaptureFixture) -> None:
    td = two_disk_domain(make_domain)
    model = Model(td)
    guest_data(model)
    pool = tmp_path / "pool"
    points: Points = {backup(td.name, pool).point: model.snapshot()}
    model.write("vda", 4 * MiB, 2 * MiB, 0x71)
    child = reaper.start(td, pool, "read")
    child.wait_at()
    points[2] = model.snapshot()
    model.write("vda", 10 * MiB, 64 * 1024, 0x72)   # after point 2's snapshot
    capsys.readouterr()
    for argv in (("backup", td.name), ("prune", td.name, "--keep-last", "1"),
                 ("repair", td.name)):
        assert cli("--pool", pool, *argv) == ExitCode.LOCKED, argv
        err = capsys.readouterr().err
        assert f"pid {child.pid}" in err and err.count("\n") == 1, (argv, err)
    # none of them waited for the lock (the backup is still stuck) or touched anything
    assert child.proc.poll() is None
    assert on_overlays(td) == {"vda": True, "vdb": True}
    assert [p.number for p in Pool.open(pool).domain(td.uuid).points()] == [1]
    assert_points(pool, td.uuid, {1: points[1]}, tmp_path)   # list: only complete points

    child.resume()
    out = child.outcome()
    assert out.get("point") == 2 and out["returncode"] == 0, out
    assert assert_recovered(td, pool, active=True) == [1, 2]
    result = backup(td.name, pool)
    points[result.point] = model.snapshot()
    assert assert_recovered(td, pool, active=True) == sorted(points)
    assert_points(pool, td.uuid, points, tmp_path)
    model.assert_guest_bytes()



@pytest.mark.parametrize("running", [True, False], ids=["running", "shut-off"])
def test_second_backup_into_another_pool_refused_during_a_backup(
        running: bool, make_domain: DomainFactory, tmp_path: Path, reaper: Reaper,
        capsys: pytest.CaptureFixture) -> None:
    """Two pools, two pool locks: the host's in-flight record is what keeps the second
    backup away, and it must leave nothing behind in its pool."""
    td = two_disk_domain(make_domain)
    model = Model(td)
    guest_data(model)
    if not running:
        td.shutoff()
    pool_a, pool_b = tmp_path / "pool-a", tmp_path / "pool-b"
    child = reaper.start(td, pool_a, "read")
    child.wait_at()
    reaper.watch(td, pool_b)
    capsys.readouterr()
    assert cli("--pool", pool_b, "backup", td.name) == ExitCode.LOCKED
    err = capsys.readouterr().err
    assert f"pid {child.pid}" in err and err.count("\n") == 1, err
    assert child.proc.poll() is None
    store_b = Pool.open(pool_b).domain(td.uuid)
    assert not store_b.journal.exists(), "the refused backup left a journal"
    assert list_points(pool_b, domain=td.uuid) == [] and store_b.leftovers() == []

    child.resume()
    out = child.outcome()
    assert out.get("point") == 1, out
    assert assert_recovered(td, pool_a, active=running, other_pools=[pool_b]) == [1]
    assert assert_recovered(td, pool_b, active=running, other_pools=[pool_a]) == []
    result = backup(td.name, pool_b)
    assert assert_recovered(td, pool_b, active=running,
                            other_pools=[pool_a]) == [result.point]
    snap = model.snapshot()
    assert_points(pool_a, td.uuid, {1: snap}, tmp_path)
    assert_points(pool_b, td.uuid, {result.point: snap}, tmp_path)
    model.assert_guest_bytes()

# -- the hook, really invoked by libvirtd ---------------------------------------------------

class RealHook:
    """The installed hook; its jobs are real ``vmsnapbackup`` commands on ``pool``."""

    def __init__(self, pool: Path, job_log: Path) -> None:
        self.pool = pool
        self.job_log = job_log

    def job_output(self) -> str:
        try:
            return self.job_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""


@pytest.fixture
def real_hook(tmp_path: Path, capsys: pytest.CaptureFixture) -> Iterator[RealHook]:
    """``vmsnapbackup hook install --reload`` with a policy file naming this test's pool
    and the default (real) command; uninstalled, and whatever was there put back, after.

    Installed per test, for as short a time as possible: while it is in place it acts
    for every domain of this libvirtd.
    """
    if os.geteuid() != 0:
        pytest.fail("the hook tests install into /etc/libvirt/hooks and need root")
    hook_file = hookinstall.hook_path(hookinstall.DEFAULT_HOOKS_DIR)
    saved = {p: (p.read_bytes(), p.stat().st_mode) if p.exists() else None
             for p in (hook_file, DEFAULT_CONFIG_PATH)}
    made_conf_dir = not DEFAULT_CONFIG_PATH.parent.exists()
    hook = RealHook(tmp_path / "pool", tmp_path / "hook-jobs.log")
    try:
        DEFAULT_CONFIG_PATH.parent.mkdir(mode=0o755, exist_ok=True)
        DEFAULT_CONFIG_PATH.write_text(f"[DEFAULT]\npool = {hook.pool}\n"
                                       f"job_log = {hook.job_log}\n")
        assert cli("hook", "install", "--reload") == 0, capsys.readouterr()
        wait_libvirtd()
        yield hook
    finally:
        cli("hook", "uninstall")
        for path, old in saved.items():
            if old is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(old[0])
                os.chmod(path, old[1] & 0o7777)
        if made_conf_dir:
            with contextlib.suppress(OSError):
                DEFAULT_CONFIG_PATH.parent.rmdir()
        hookinstall.reload_libvirtd()
        wait_libvirtd()


def test_hook_refuses_a_start_while_an_offline_backup_reads(
        real_hook: RealHook, make_domain: DomainFactory, tmp_path: Path,
        reaper: Reaper) -> None:
    td = make_domain(disks=[DiskSpec("vda", "qcow2", 16 * MiB)], start=True)
    model = Model(td)
    model.write("vda", 0, 3 * MiB, 0x81)
    td.shutoff()
    pool = real_hook.pool
    child = reaper.start(td, pool, "read")
    child.wait_at()
    record = inflight.read(td.uuid)
    assert record is not None and record.offline and record.pid == child.pid
    with pytest.raises(libvirt.libvirtError) as info:
        td.dom.create()
    assert f"domain {td.name} cannot start" in str(info.value)
    assert f"pid {child.pid}" in str(info.value)
    assert not td.dom.isActive()
    child.resume()
    out = child.outcome()
    assert out.get("point") == 1 and out["consistency"] == "offline", out
    assert assert_recovered(td, pool, active=False) == [1]
    points: Points = {1: model.snapshot()}
    td.start()   # the very same start, now that the backup is over
    model.write("vda", 4 * MiB, 64 * 1024, 0x82)
    result = backup(td.name, pool)
    points[result.point] = model.snapshot()
    assert assert_recovered(td, pool, active=True) == sorted(points)
    assert_points(pool, td.uuid, points, tmp_path)
    model.assert_guest_bytes()


#: libvirt's environment for hooks is a bare one (virCommand's pass-through of the basics).
HOOK_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LC_ALL": "C"}


def test_hook_refuses_an_incoming_migration_during_a_backup(
        real_hook: RealHook, make_domain: DomainFactory, tmp_path: Path,
        reaper: Reaper) -> None:
    """libvirt refuses a migration to the same host before the destination's hook runs
    ("Attempt to migrate guest to the same host"), so the hook is run as libvirt would
    run it on the destination: ``DOMAIN migrate begin -``, the domain XML on stdin."""
    td = make_domain(disks=[DiskSpec("vda", "qcow2", 16 * MiB)], start=True)
    model = Model(td)
    model.write("vda", 0, 3 * MiB, 0x83)
    pool = real_hook.pool
    child = reaper.start(td, pool, "read")
    child.wait_at()
    xml = td.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE | libvirt.VIR_DOMAIN_XML_SECURE)
    argv = [td.name, "migrate", "begin", "-"]
    hook_file = hookinstall.hook_path(hookinstall.DEFAULT_HOOKS_DIR)
    proc = subprocess.run([str(hook_file), *argv], check=False, input=xml,
                          capture_output=True, text=True, env=HOOK_ENV, cwd="/", timeout=60)
    assert proc.returncode == 1, proc
    assert f"domain {td.name} cannot migrate" in proc.stderr and f"pid {child.pid}" in proc.stderr
    assert proc.stdout == ""   # libvirt would read stdout as a replacement XML
    spawned: list = []
    err = io.StringIO()
    assert hook_main(argv, io.StringIO(xml), spawn=spawned.append, stderr=err) == 1
    assert "cannot migrate" in err.getvalue() and spawned == []

    child.resume()
    out = child.outcome()
    assert out.get("point") == 1, out
    proc = subprocess.run([str(hook_file), *argv], check=False, input=xml,
                          capture_output=True, text=True, env=HOOK_ENV, cwd="/", timeout=60)
    assert (proc.returncode, proc.stdout) == (0, ""), proc   # the backup is over: welcome
    assert assert_recovered(td, pool, active=True) == [1]
    assert_points(pool, td.uuid, {1: model.snapshot()}, tmp_path)
    model.assert_guest_bytes()


@pytest.mark.parametrize("pool_name", ["hook-pool", "other-pool"])
def test_hook_repairs_a_domain_started_on_a_killed_backups_overlays(
        pool_name: str, real_hook: RealHook, make_domain: DomainFactory, tmp_path: Path,
        reaper: Reaper) -> None:
    """other-pool: the backup used a pool the hook's policy file does not name; the
    dead backup's in-flight record names it."""
    td = two_disk_domain(make_domain)
    model = Model(td)
    guest_data(model)
    pool = real_hook.pool if pool_name == "hook-pool" else tmp_path / pool_name
    points: Points = {backup(td.name, pool).point: model.snapshot()}
    model.write("vda", 4 * MiB, 1 * MiB, 0x91)
    child = reaper.start(td, pool, "read")
    child.wait_at()
    model.write("vda", 8 * MiB, 64 * 1024, 0x92)   # into the overlay
    entry = Pool.open(pool).domain(td.uuid).journal.read()
    assert entry is not None and entry.daemon is not None
    child.kill()
    wait_gone(entry.daemon.pid)
    td.dom.destroy()
    for target in td.disks:   # what the next start would run on
        inactive = td.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        assert is_our_overlay(find_disk(inactive, target).source)

    td.dom.create()   # `started` on our overlays: the hook hands a repair to a detached job

    def repaired() -> None:
        assert on_overlays(td) == {"vda": False, "vdb": False}, real_hook.job_output()
        assert inflight.read(td.uuid) is None
        assert hook_jobs_running(td.name) == []

    until(repaired, 120)
    assert f"repair -- {td.name}" in real_hook.job_output()
    assert not Pool.open(pool).domain(td.uuid).journal.exists(), real_hook.job_output()
    assert assert_recovered(td, pool, active=True) == sorted(points)
    model.write("vda", 12 * MiB, 4096, 0x93)
    result = backup(td.name, pool)
    points[result.point] = model.snapshot()
    assert assert_recovered(td, pool, active=True) == sorted(points)
    assert_points(pool, td.uuid, points, tmp_path)
    model.assert_guest_bytes()
