"""Verify on the real stack: damage put into real pool files is found and placed.

The pools are built by test_restore.SyntheticPool (the disk pass and the core
API, minus libvirt) or by the real backup of a running domain
(test_restore's backup tests share the same checks).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_restore import BS, KiB, data_offset, flip_byte, three_backups, three_points

from vmsnapbackup.cli import main
from vmsnapbackup.core.pool import Pool
from vmsnapbackup.errors import ExitCode, NotFoundError, UsageError
from vmsnapbackup.workflows.verify import DAMAGED, GOOD, format_report, verify

pytestmark = pytest.mark.integration

if not all(shutil.which(b) for b in ("qemu-storage-daemon", "qemu-img")):
    pytest.skip("needs qemu-storage-daemon and qemu-img", allow_module_level=True)


def statuses(report) -> dict:  # type: ignore[no-untyped-def]
    return {p.number: p.status for d in report.domains for p in d.points}


def test_intact_pool_is_good(tmp_path: Path) -> None:
    sp = three_points(tmp_path)
    report = verify(sp.pool)
    assert report.ok and statuses(report) == {1: GOOD, 2: GOOD, 3: GOOD}
    (dom,) = report.domains
    for p in dom.points:
        assert {d.target: d.checked for d in p.disks} == {"vda": 17, "vdb": 8}
    text = format_report(report)
    assert "point 2 (gen 1, " in text and text.count(": good") == 3


def test_damaged_base_marks_its_generation(tmp_path: Path) -> None:
    sp = three_points(tmp_path)
    base = sp.volume(1, "vdb")
    flip_byte(base, data_offset(base, "qcow2", (BS, 2 * BS)))
    # a second generation, untouched, stays good
    sp.add_point({"vda": bytes(sp.contents[3]["vda"]), "vdb": bytes(512 * 1024)},
                 new_generation=True)
    report = verify(sp.pool, domain=sp.name)
    assert not report.ok
    assert statuses(report) == {1: DAMAGED, 2: DAMAGED, 3: DAMAGED, 4: GOOD}
    for p in report.domains[0].points[:3]:
        (bad,) = [d for d in p.disks if not d.ok]
        assert bad.target == "vdb"
        (problem,) = bad.problems
        assert problem.kind == "base volume" and problem.mismatch.indexes == (1,)
    text = format_report(report)
    assert "point 2 (gen 1, " in text
    assert ": damaged: vdb blocks 1 (1 of 8; base volume damaged)" in text


def test_damaged_point_volume_marks_only_its_point(tmp_path: Path) -> None:
    sp = three_points(tmp_path)
    vol = sp.volume(2, "vda")
    flip_byte(vol, data_offset(vol, "qcow2", (5 * BS, 6 * BS)))
    report = verify(sp.pool, domain=sp.name)
    assert statuses(report) == {1: GOOD, 2: DAMAGED, 3: GOOD}
    p2 = report.domains[0].points[1]
    (bad,) = [d for d in p2.disks if not d.ok]
    assert bad.problems[0].kind == "point volume"
    assert bad.problems[0].mismatch.indexes == (5,)
    assert "damaged: vda blocks 5 (1 of 17)" in format_report(report)
    # one point only
    only = verify(sp.pool, domain=sp.name, point=2)
    assert statuses(only) == {2: DAMAGED}
    assert statuses(verify(sp.pool, domain=sp.name, point=3)) == {3: GOOD}


def test_damaged_tables_and_manifest(tmp_path: Path) -> None:
    sp = three_points(tmp_path)
    m2 = sp.store.read_manifest(2)
    flip_byte(sp.store.resolve(m2.disk("vda").difference), 100)
    raw = sp.store.manifest_path(3).read_bytes()
    sp.store.manifest_path(3).write_bytes(raw.replace(b'"point": 3', b'"point": 33'))
    report = verify(sp.pool)
    assert statuses(report) == {1: GOOD, 2: DAMAGED, 3: DAMAGED}
    p2, p3 = report.domains[0].points[1:]
    assert p2.disks[0].problems[0].kind == "difference table"
    assert p3.reason and "checksum" in p3.reason
    # table 1 damaged: the whole generation (and the generation record check says so)
    flip_byte(sp.store.resolve(m2.disk("vdb").table), 64 + 3)
    report = verify(sp.pool)
    assert statuses(report)[1] == DAMAGED and statuses(report)[2] == DAMAGED
    assert any("vdb" in prob for prob in report.domains[0].problems)


def test_sample_reads_a_share_and_still_finds_whole_damage(tmp_path: Path) -> None:
    sp = three_points(tmp_path)
    report = verify(sp.pool, sample=25, seed=1)
    assert report.ok
    p = report.domains[0].points[0]
    # 25 % of the stored blocks: vda stores 4 (a short last block included), vdb 1
    assert {d.target: d.checked for d in p.disks} == {"vda": 1, "vdb": 1}
    # damage every data block of base vdb's block 1 region; a 100% sample is a full read
    base = sp.volume(1, "vdb")
    flip_byte(base, data_offset(base, "qcow2", (BS, 2 * BS)))
    assert not verify(sp.pool, sample=100).ok


def test_verify_usage(tmp_path: Path) -> None:
    sp = three_points(tmp_path)
    with pytest.raises(UsageError):
        verify(sp.pool, point=1)
    with pytest.raises(UsageError):
        verify(sp.pool, domain=sp.name, sample=0)
    with pytest.raises(NotFoundError):
        verify(sp.pool, domain=sp.name, point=7)
    with pytest.raises(NotFoundError):
        verify(sp.pool, domain="nosuchdomain")


def test_cli_prints_report_and_exits_integrity(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    sp = three_points(tmp_path)
    pool = str(sp.pool.root)
    assert main(["--pool", pool, "verify"]) == 0
    assert "ok: 3 good, 0 damaged" in capsys.readouterr().out
    vol = sp.volume(3, "vdb")
    flip_byte(vol, data_offset(vol, "qcow2", (3 * BS, 4 * BS)))
    assert main(["--pool", pool, "verify", sp.name]) == ExitCode.INTEGRITY
    out = capsys.readouterr().out
    assert "point 3 (gen 1, " in out and "damaged: vdb blocks 3 (1 of 8)" in out
    assert main(["--pool", pool, "verify", sp.name, "--point", "3", "--json"]) == \
        ExitCode.INTEGRITY
    doc = json.loads(capsys.readouterr().out)
    (point,) = doc["domains"][0]["points"]
    assert point["status"] == "damaged" and doc["ok"] is False
    vdb = next(d for d in point["disks"] if d["target"] == "vdb")
    assert vdb["problems"][0]["mismatch"]["blocks"] == [3]
    assert main(["--pool", pool, "verify", "--point", "3"]) == ExitCode.USAGE


def test_damage_in_backups_of_a_running_domain(running_domain, tmp_path: Path,  # type: ignore[no-untyped-def]
                                               capsys) -> None:
    pool = tmp_path / "pool"
    three_backups(running_domain, pool)
    assert statuses(verify(pool, domain=running_domain.name)) == {1: GOOD, 2: GOOD, 3: GOOD}
    assert verify(str(pool), sample=10).ok
    store = Pool.open(pool).domain(running_domain.uuid)
    # point 2's own volume: vda block 2 (128-192 KiB) was written for point 2
    vol = store.resolve(store.read_manifest(2).disk("vda").volume)
    flip_byte(vol, data_offset(vol, "qcow2", (128 * KiB, 192 * KiB)) + 7)
    report = verify(pool, domain=running_domain.name)
    assert statuses(report) == {1: GOOD, 2: DAMAGED, 3: GOOD}
    (bad,) = [d for d in report.domains[0].points[1].disks if not d.ok]
    assert bad.target == "vda" and bad.problems[0].mismatch.indexes == (2,)
    # the base of vdb: its short last block (written before point 1, never again)
    base = store.resolve(store.read_manifest(1).disk("vdb").base)
    flip_byte(base, data_offset(base, "qcow2", (32 * 1024 * KiB, 32 * 1024 * KiB + 12 * KiB)))
    report = verify(pool)
    assert statuses(report) == {1: DAMAGED, 2: DAMAGED, 3: DAMAGED}
    last = 32 * 1024 * KiB // BS
    for p in report.domains[0].points:
        vdb = next(d for d in p.disks if d.target == "vdb")
        assert vdb.problems[0].kind == "base volume"
        assert vdb.problems[0].mismatch.indexes == (last,)
    assert main(["--pool", str(pool), "verify", running_domain.name]) == ExitCode.INTEGRITY
    out = capsys.readouterr().out
    assert f"vdb blocks {last} (1 of {last + 1}; base volume damaged)" in out
    assert "point 2 (gen 1, " in out and "vda blocks 2 (1 of 1024)" in out
