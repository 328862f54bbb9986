"""Prune on pools built with the core API (no hypervisor needed: prune never talks to one)."""
from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import poolfake
import pytest

from vmsnapbackup.cli import main
from vmsnapbackup.core.journal import JournalDisk, JournalEntry
from vmsnapbackup.core.pool import DomainStore, Pool
from vmsnapbackup.errors import LockedError, NotFoundError, RepairNeededError, UsageError
from vmsnapbackup.workflows.prune import prune

UUID = "3f2a4b6c-1d2e-4f30-8a9b-0c1d2e3f4a5b"
LOCAL = dt.datetime.now().astimezone().tzinfo


def stamp(when: dt.datetime) -> str:
    u = when.astimezone(dt.timezone.utc)
    return u.strftime("%Y-%m-%dT%H:%M:%S.") + f"{u.microsecond // 1000:03d}Z"


def local(day: int, hour: int = 12, month: int = 3) -> dt.datetime:
    return dt.datetime(2026, month, day, hour, tzinfo=LOCAL)


def put(p: Path, size: int) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "wb") as f:
        f.write(os.urandom(size))
    os.chmod(p, 0o600)


def fake_backup(store: DomainStore, when: dt.datetime, new_generation: bool = False,
                targets: Sequence[str] = ("vda", "vdb")) -> int:
    """The pool side of a backup, in FORMAT §10 order, with a chosen timestamp."""
    return poolfake.fake_backup(
        store, put, new_generation=new_generation, targets=targets, when=stamp(when),
        sizes={"base": 256 * 1024, "table": 8192, "volume": 64 * 1024, "difference": 4096})


@pytest.fixture
def pool(tmp_path: Path) -> Pool:
    return Pool.create(tmp_path / "pool")


@pytest.fixture
def store(pool: Pool) -> DomainStore:
    return pool.domain(UUID, name="web1", create=True)


def tree(root: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            if p.name == "lock":
                continue
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


def numbers(points) -> list[int]:  # type: ignore[no-untyped-def]
    return sorted(p.number for p in points)


# --- the policy applied to a pool ------------------------------------------------------------

def test_keep_daily_across_two_generations(pool: Pool, store: DomainStore) -> None:
    # gen 1: points 1..4 on days 1, 1, 2, 3; gen 2: points 5..6 on days 5, 5
    for when in (local(1, 8), local(1, 20), local(2), local(3)):
        fake_backup(store, when)
    fake_backup(store, local(5, 9), new_generation=True)
    fake_backup(store, local(5, 18))
    report = prune("web1", pool.root, keep_daily=2)
    # days with points, newest first: 5 (point 6), 3 (point 4): gen 1 stays for point 4
    assert numbers(report.kept) == [4, 6]
    assert numbers(report.removed) == [1, 2, 3, 5]
    assert [p.number for p in store.points()] == [4, 6]
    by = {p.number: p.reasons for p in report.kept}
    assert by == {6: ["newest", "daily"], 4: ["daily"]}
    assert all(p.reasons == ["not kept by any rule"] for p in report.removed)
    # point 1 is gen 1's first point: its volume is the base, which point 4 still needs
    assert store.base_volume_path(1, "vda", "qcow2").is_file()
    assert store.base_volume_path(2, "vda", "qcow2").is_file()  # point 6 needs it
    assert report.bases_removed == [] and report.generations_removed == []
    # removed: manifests of 1,2,3,5 and point/diff files of 2,3 (two disks each)
    assert len(report.files_removed) == 4 + 2 * 2 * 2
    assert report.bytes_freed >= 2 * 2 * (64 * 1024 + 4096)


def test_a_generation_without_points_loses_its_base(pool: Pool, store: DomainStore) -> None:
    for d in (1, 2, 3):
        fake_backup(store, local(d))
    fake_backup(store, local(4), new_generation=True)
    fake_backup(store, local(5))
    report = prune("web1", pool.root, keep_last=2)
    assert numbers(report.kept) == [4, 5] and numbers(report.removed) == [1, 2, 3]
    assert sorted(report.bases_removed) == ["generations/000001/vda/base.qcow2",
                                            "generations/000001/vdb/base.qcow2"]
    assert report.generations_removed == [1]
    assert not store.generation_dir(1).exists()
    assert store.generations() == [2]
    assert report.bytes_freed >= 2 * (256 * 1024 + 8192) + 2 * 2 * (64 * 1024 + 4096)


def test_dry_run_predicts_the_real_run_and_changes_nothing(tmp_path: Path) -> None:
    reports = []
    for dry in (True, False):
        p = Pool.create(tmp_path / f"pool-{dry}")
        s = p.domain(UUID, name="web1", create=True)
        for d in (1, 2, 3):
            fake_backup(s, local(d))
        fake_backup(s, local(4), new_generation=True)
        for d in (5, 6):
            fake_backup(s, local(d))
        before = tree(p.root)
        r = prune("web1", p.root, keep_last=2, keep_monthly=1, dry_run=dry)
        if dry:
            assert tree(p.root) == before
            assert numbers(s.points()) == [1, 2, 3, 4, 5, 6]
        reports.append(r)
    dry_r, real = reports
    assert dry_r.dry_run and not real.dry_run
    assert numbers(dry_r.kept) == numbers(real.kept) == [5, 6]
    assert numbers(dry_r.removed) == numbers(real.removed) == [1, 2, 3, 4]
    assert sorted(dry_r.files_removed) == sorted(real.files_removed)
    assert sorted(dry_r.bases_removed) == sorted(real.bases_removed)
    assert dry_r.generations_removed == real.generations_removed == [1]
    # allocated sizes of identical files may differ by filesystem luck; not here (same fs)
    assert dry_r.bytes_freed == real.bytes_freed > 0


def test_newest_kept_and_second_run_is_a_no_op(pool: Pool, store: DomainStore) -> None:
    for d in range(1, 6):
        fake_backup(store, local(d))
    first = prune("web1", pool.root, keep_last=0)
    assert numbers(first.kept) == [5] and first.kept[0].reasons == ["newest"]
    again = prune("web1", pool.root, keep_last=0)
    assert again.removed == [] and again.files_removed == [] and again.bytes_freed == 0


def test_damaged_points_are_kept_and_reported(pool: Pool, store: DomainStore) -> None:
    for d in (1, 2, 3, 4):
        fake_backup(store, local(d))
    path = store.manifest_path(2)
    path.write_bytes(path.read_bytes().replace(b'"crash-consistent"', b'"quiesced"'))
    report = prune("web1", pool.root, keep_last=1)
    assert numbers(report.kept) == [2, 4]
    assert numbers(report.damaged) == [2]
    assert report.damaged[0].reasons[0].startswith("damaged: ")
    assert "checksum" in (report.damaged[0].damaged or "")
    assert path.exists()
    assert numbers(report.removed) == [1, 3]
    assert report.to_dict()["damaged"] == [2]
    # the damaged point still protects its generation's base
    assert store.base_volume_path(1, "vda", "qcow2").exists()


def test_damaged_point_protects_its_generation_in_a_dry_run_too(tmp_path: Path) -> None:
    for dry in (True, False):
        p = Pool.create(tmp_path / f"p{dry}")
        s = p.domain(UUID, name="web1", create=True)
        for d in (1, 2):
            fake_backup(s, local(d))
        fake_backup(s, local(3), new_generation=True)
        s.manifest_path(2).write_bytes(b"{not json")
        r = prune("web1", p.root, keep_last=1, dry_run=dry)
        assert numbers(r.removed) == [1] and r.generations_removed == []
        assert r.bases_removed == []


def test_points_in_use_are_kept(pool: Pool, store: DomainStore) -> None:
    for d in (1, 2, 3):
        fake_backup(store, local(d))
    vol = store.point_volume_path(1, "vdb", 2)
    holder = subprocess.Popen([sys.executable, "-c", ("import sys,time; f=open(sys.argv[1],'rb');"
                               "print('ok',flush=True); time.sleep(60)"), str(vol)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ok"
        report = prune("web1", pool.root, keep_last=1)
    finally:
        holder.kill()
        holder.wait()
    assert numbers(report.kept) == [2, 3] and numbers(report.removed) == [1]
    reasons = {p.number: p.reasons for p in report.kept}
    assert len(reasons[2]) == 1 and reasons[2][0].startswith(f"in use: pid {holder.pid} (")
    assert vol.exists()


def hold_open(path: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", ("import sys,time; f=open(sys.argv[1],'rb');"
                               "print('ok',flush=True); time.sleep(60)"), str(path)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "ok"
    return holder


def test_an_open_base_keeps_its_generation_only_when_it_would_go(pool: Pool,
                                                                  store: DomainStore) -> None:
    for d in (1, 2):
        fake_backup(store, local(d))
    for d in (3, 4):
        fake_backup(store, local(d), new_generation=True)
    # gen 1: points 1 (base) and 2; gen 2: point 3; gen 3: point 4
    holder = hold_open(store.base_volume_path(1, "vda", "qcow2"))
    try:
        dry = prune("web1", pool.root, keep_last=1, dry_run=True)
        # every point of gen 1 would go and its base is open: its first point stays
        assert numbers(dry.kept) == [1, 4] and numbers(dry.removed) == [2, 3]
        assert dry.generations_removed == [2]
        # with point 2 kept by the policy, the base stays anyway: point 1 may go
        report = prune("web1", pool.root, keep_last=3)
        assert numbers(report.kept) == [2, 3, 4] and numbers(report.removed) == [1]
    finally:
        holder.kill()
        holder.wait()
    assert store.base_volume_path(1, "vda", "qcow2").exists()


# --- refusals --------------------------------------------------------------------------------

def test_prune_refuses_while_the_lock_is_held(pool: Pool, store: DomainStore) -> None:
    fake_backup(store, local(1))
    fake_backup(store, local(2))
    with store.lock("backup"):
        with pytest.raises(LockedError, match="backup"):
            prune("web1", pool.root, keep_last=1)
        with pytest.raises(LockedError):
            prune("web1", pool.root, keep_last=1, dry_run=True)
    assert numbers(store.points()) == [1, 2]


def test_prune_refuses_while_a_journal_exists(pool: Pool, store: DomainStore) -> None:
    fake_backup(store, local(1))
    fake_backup(store, local(2))
    store.journal.write(JournalEntry(operation="backup", pid=4242, host="h", started=stamp(local(3)),
                                     step="start", point=3,
                                     disks={"vda": JournalDisk(source="/img/vda.qcow2")}))
    with pytest.raises(RepairNeededError, match="interrupted backup left a journal; run repair"):
        prune("web1", pool.root, keep_last=1)
    assert numbers(store.points()) == [1, 2]


def test_a_keep_option_is_required(pool: Pool, store: DomainStore) -> None:
    fake_backup(store, local(1))
    with pytest.raises(UsageError, match="at least one"):
        prune("web1", pool.root)
    with pytest.raises(UsageError):
        prune("web1", pool.root, keep_last=-2)


def test_unknown_domain(pool: Pool) -> None:
    with pytest.raises(NotFoundError):
        prune("nope", pool.root, keep_last=1)


# --- the command line -----------------------------------------------------------------------

def test_cli_prune_json_and_text(pool: Pool, store: DomainStore,
                                 capsys: pytest.CaptureFixture) -> None:
    for d in (1, 2, 3):
        fake_backup(store, local(d))
    rc = main(["--pool", str(pool.root), "prune", "web1", "--keep-last", "2", "--dry-run",
               "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    doc = json.loads(out)
    assert doc["dry_run"] is True and [p["number"] for p in doc["removed"]] == [1]
    assert doc["policy"] == {"keep_last": 2, "keep_daily": None, "keep_weekly": None,
                             "keep_monthly": None, "keep_hourly": None, "keep_yearly": None}
    rc = main(["--pool", str(pool.root), "prune", "web1", "--keep-last", "2"])
    text = capsys.readouterr().out
    assert rc == 0 and "removed 1 point(s)" in text and "newest, last" in text
    assert numbers(store.points()) == [2, 3]


def test_cli_prune_without_keep_is_exit_2(pool: Pool, store: DomainStore,
                                          capsys: pytest.CaptureFixture) -> None:
    fake_backup(store, local(1))
    assert main(["--pool", str(pool.root), "prune", "web1"]) == 2
    assert "at least one" in capsys.readouterr().err
    assert main(["--pool", str(pool.root), "prune", "web1", "--keep-last", "-1"]) == 2


def test_cli_prune_locked_is_exit_4(pool: Pool, store: DomainStore,
                                    capsys: pytest.CaptureFixture) -> None:
    fake_backup(store, local(1))
    with store.lock("backup"):
        assert main(["--pool", str(pool.root), "prune", "web1", "--keep-last", "1"]) == 4
    assert "locked" in capsys.readouterr().err
