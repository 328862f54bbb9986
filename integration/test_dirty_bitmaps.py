"""Dirty bitmaps on a real libvirtd + QEMU: later points read only what was written.

Every test checks the points byte for byte against a model of what the "guest"
wrote, so a bitmap that let a pass skip a changed block fails here -- and
the tests where the bitmap is made to lie (writes behind QEMU's back, an
offline merge) check that it is caught and everything is read instead.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from domains import DiskModel, DiskSpec, TestDomain
from test_backup import assert_clean, assert_points_match

from vmsnapbackup.adapters.domainxml import overlay_path
from vmsnapbackup.adapters.hypervisor import connect
from vmsnapbackup.cli import main
from vmsnapbackup.core.pool import Pool
from vmsnapbackup.progress import ProgressEvent
from vmsnapbackup.workflows.backup import backup
from vmsnapbackup.workflows.verify import verify

pytestmark = pytest.mark.integration

MiB = 2**20
KiB = 1024


def our_checkpoints(dom: TestDomain) -> list[str]:
    return sorted(c.getName() for c in dom.dom.listAllCheckpoints()
                  if c.getName().startswith("vmsnapbackup-"))


def generation_checkpoint(pool: Path, dom: TestDomain) -> str:
    store = Pool.open(pool).domain(dom.uuid)
    name = store.read_generation(store.current_generation()).checkpoint
    assert name is not None
    return name


def disk_result(result, target: str):  # type: ignore[no-untyped-def]
    return next(d for d in result.disks if d.target == target)


def manifest_disk(pool: Path, dom: TestDomain, point: int, target: str):  # type: ignore[no-untyped-def]
    return Pool.open(pool).domain(dom.uuid).read_manifest(point).disk(target)


def write_behind_qemus_back(dom: TestDomain, model: DiskModel, bitmap: str, offset: int,
                            pattern: int) -> None:
    """64 KiB written into vda offline with ``bitmap`` disabled: a write it never sees."""
    dom.shutoff()
    image = str(dom.disks["vda"])
    subprocess.run(["qemu-img", "bitmap", "--disable", image, bitmap], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern:#x} {offset} 64k",
                    image], check=True, capture_output=True)
    subprocess.run(["qemu-img", "bitmap", "--enable", image, bitmap], check=True)
    model.disks["vda"][offset:offset + 64 * KiB] = bytes([pattern]) * 64 * KiB
    dom.start()


def seed(model: DiskModel) -> None:
    """Data the base point holds: 8 MiB on vda (128 blocks), some of vdb."""
    model.write("vda", 8 * MiB, 8 * MiB, 0x11)
    model.write("vda", 40 * MiB, 64 * KiB, 0x12)
    model.write("vdb", 0, 2 * MiB, 0x13)


def test_later_points_read_only_the_dirty_blocks(running_domain: TestDomain, tmp_path: Path):
    dom = running_domain
    model = DiskModel(dom)
    pool = tmp_path / "pool"
    expected: dict[int, dict[str, bytes]] = {}
    seed(model)
    r1 = backup(dom.name, pool)
    expected[1] = model.snapshot()
    cp = generation_checkpoint(pool, dom)
    assert our_checkpoints(dom) == [cp]
    assert disk_result(r1, "vda").blocks["unchanged"] == 0

    model.write("vda", 8 * MiB + 4 * KiB, 4 * KiB, 0x21)   # inside the base's data
    model.zero("vda", 9 * MiB, 64 * KiB)                  # a block that became zeros
    model.write("vda", 63 * MiB, 1 * MiB, 0x22)           # the last MiB
    model.write("vdb", 1 * MiB, 64 * KiB, 0x23)
    backup(dom.name, pool)
    expected[2] = model.snapshot()
    vda = manifest_disk(pool, dom, 2, "vda")
    assert vda.dirty_bitmap == cp
    # 1 + 1 + 16 blocks written since the base; everything else came from table 1
    assert vda.blocks.read + vda.blocks.holes <= 18 + 2
    assert vda.blocks.unchanged >= vda.blocks.total - 20
    assert vda.blocks.changed == 18 and vda.blocks.zero == 1
    vdb = manifest_disk(pool, dom, 2, "vdb")   # raw: no bitmap, read as before
    assert vdb.dirty_bitmap is None and vdb.blocks.unchanged == 0

    # writes while the pass reads are not in this point (the overlay takes them)
    during: list[str] = []

    def write_during(ev: ProgressEvent) -> None:
        if ev.disk == "vda" and not during:
            during.append("x")
            dom.write("vda", 20 * MiB, 128 * KiB, 0x33)

    model.write("vda", 30 * MiB, 64 * KiB, 0x31)
    expected[3] = model.snapshot()
    r3 = backup(dom.name, pool, progress=write_during)
    assert during and manifest_disk(pool, dom, 3, "vda").dirty_bitmap == cp
    model.disks["vda"][20 * MiB:20 * MiB + 128 * KiB] = b"\x33" * 128 * KiB

    # point 4 sees the write made during point 3: the bitmap survived the commit
    r4 = backup(dom.name, pool)
    expected[4] = model.snapshot()
    vda4 = manifest_disk(pool, dom, 4, "vda")
    assert vda4.dirty_bitmap == cp and vda4.blocks.changed >= 18 + 1 + 2

    assert_clean(dom, dom.disks)
    assert_points_match(pool, dom.uuid, expected, tmp_path)
    report = verify(pool, domain=dom.name)
    assert report.ok, report.to_dict()
    assert [r3.point, r4.point] == [3, 4]

    # a new generation brings its own checkpoint and retires the old one
    r5 = backup(dom.name, pool, new_generation=True)
    assert r5.new_generation
    cp5 = generation_checkpoint(pool, dom)
    assert cp5 != cp and our_checkpoints(dom) == [cp5]
    # one without bitmaps retires it too, and makes none
    backup(dom.name, pool, new_generation=True, dirty_bitmaps=False)
    assert our_checkpoints(dom) == []


def test_a_bitmap_that_missed_writes_is_not_trusted(make_domain, tmp_path: Path):
    dom = make_domain(disks=[DiskSpec("vda", "qcow2", 16 * MiB)])
    model = DiskModel(dom)
    pool = tmp_path / "pool"
    model.write("vda", 1 * MiB, 2 * MiB, 0x41)      # 32 blocks: all sampled by the check
    backup(dom.name, pool)
    point1 = model.snapshot()
    cp = generation_checkpoint(pool, dom)
    write_behind_qemus_back(dom, model, cp, 2 * MiB, 0x42)
    model.write("vda", 8 * MiB, 64 * KiB, 0x43)     # a write the bitmap does see

    r2 = backup(dom.name, pool)
    expected2 = model.snapshot()
    vda = manifest_disk(pool, dom, 2, "vda")
    assert vda.dirty_bitmap is None and vda.blocks.unchanged == 0
    assert vda.blocks.changed == 2
    assert our_checkpoints(dom) == []               # a bitmap that lied once is gone
    model.write("vda", 9 * MiB, 64 * KiB, 0x44)
    expected3 = model.snapshot()
    r3 = backup(dom.name, pool)                     # no checkpoint now: a full read
    assert manifest_disk(pool, dom, 3, "vda").dirty_bitmap is None
    assert [r2.point, r3.point] == [2, 3]
    assert_points_match(pool, dom.uuid, {1: point1, 2: expected2, 3: expected3}, tmp_path)


def test_offline_merge_by_repair_retires_the_checkpoints(make_domain, tmp_path: Path):
    """A domain shut off on our overlay is merged by qemu-img, which drops the bitmap's
    view of the overlay's writes: repair must delete the checkpoint before merging."""
    dom = make_domain(disks=[DiskSpec("vda", "qcow2", 16 * MiB)])
    model = DiskModel(dom)
    pool = tmp_path / "pool"
    model.write("vda", 1 * MiB, 1 * MiB, 0x51)
    backup(dom.name, pool)
    point1 = model.snapshot()
    assert our_checkpoints(dom) != []
    # what a backup killed after its snapshot leaves: the domain on our overlay ...
    with connect() as hv:
        d = hv.find_domain(dom.name)
        disk = next(x for x in hv.disks(d) if x.target == "vda")
        hv.snapshot(d, [disk], {"vda": overlay_path(disk, "p9-dead00", None)})
    model.write("vda", 4 * MiB, 64 * KiB, 0x52)     # lands in the overlay (and its bitmap)
    dom.shutoff()                                    # ... and then shut off
    assert main(["--pool", str(pool), "repair", dom.name]) == 0
    assert our_checkpoints(dom) == []
    dom.start()
    r = backup(dom.name, pool)
    vda = manifest_disk(pool, dom, r.point, "vda")
    assert vda.dirty_bitmap is None and vda.blocks.changed == 1
    assert_points_match(pool, dom.uuid, {1: point1, r.point: model.snapshot()}, tmp_path)


def test_no_dirty_bitmaps_makes_no_checkpoint(make_domain, tmp_path: Path):
    dom = make_domain(disks=[DiskSpec("vda", "qcow2", 8 * MiB)])
    model = DiskModel(dom)
    model.write("vda", 0, 64 * KiB, 0x61)
    pool = tmp_path / "pool"
    assert main(["--pool", str(pool), "backup", "--no-dirty-bitmaps", dom.name, "--json"]) == 0
    store = Pool.open(pool).domain(dom.uuid)
    assert store.read_generation(store.current_generation()).checkpoint is None
    assert our_checkpoints(dom) == []
    model.write("vda", 1 * MiB, 64 * KiB, 0x62)
    backup(dom.name, pool, dirty_bitmaps=False)
    assert manifest_disk(pool, dom, 2, "vda").dirty_bitmap is None
    assert json.loads(store.manifest_path(2).read_text())["disks"][0]["blocks"].get(
        "unchanged", 0) == 0


def test_after_a_restart_the_bitmap_is_proven_by_one_full_read(make_domain, tmp_path: Path):
    """While the domain was shut off, anything could have written its image: the first
    point of a new QEMU run reads everything and checks the bitmap against it; the
    next point of that run trusts the bitmap again."""
    dom = make_domain(disks=[DiskSpec("vda", "qcow2", 16 * MiB)])
    model = DiskModel(dom)
    pool = tmp_path / "pool"
    model.write("vda", 1 * MiB, 1 * MiB, 0x71)
    backup(dom.name, pool)
    expected = {1: model.snapshot()}
    cp = generation_checkpoint(pool, dom)
    dom.shutoff()
    dom.start()
    model.write("vda", 5 * MiB, 64 * KiB, 0x72)
    backup(dom.name, pool)
    expected[2] = model.snapshot()
    m1, m2 = (Pool.open(pool).domain(dom.uuid).read_manifest(n) for n in (1, 2))
    assert m1.qemu_run and m2.qemu_run and m1.qemu_run != m2.qemu_run
    vda2 = m2.disk("vda")
    assert vda2.dirty_bitmap is None and vda2.blocks.unchanged == 0 and vda2.blocks.changed == 1
    assert our_checkpoints(dom) == [cp]             # proven right: kept
    model.write("vda", 6 * MiB, 64 * KiB, 0x73)
    backup(dom.name, pool)
    expected[3] = model.snapshot()
    vda3 = manifest_disk(pool, dom, 3, "vda")
    assert vda3.dirty_bitmap == cp and vda3.blocks.unchanged > 0 and vda3.blocks.changed == 2
    assert_points_match(pool, dom.uuid, expected, tmp_path)


def test_a_distrusted_bitmap_stays_distrusted_when_its_deletion_fails(
        make_domain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Injected fault: libvirt refuses to delete the checkpoint that failed its check.
    The point records no QEMU run, so the next point proves the bitmap again (and
    deletes it then) instead of trusting it."""
    from vmsnapbackup.adapters.hypervisor import Hypervisor
    from vmsnapbackup.errors import HypervisorError

    dom = make_domain(disks=[DiskSpec("vda", "qcow2", 16 * MiB)])
    model = DiskModel(dom)
    pool = tmp_path / "pool"
    model.write("vda", 1 * MiB, 2 * MiB, 0x81)
    backup(dom.name, pool)
    expected = {1: model.snapshot()}
    cp = generation_checkpoint(pool, dom)
    write_behind_qemus_back(dom, model, cp, 2 * MiB, 0x82)

    def refuse(self, dom_, name):  # type: ignore[no-untyped-def]
        raise HypervisorError(f"deleting checkpoint {name}: injected failure")

    with monkeypatch.context() as m:
        m.setattr(Hypervisor, "delete_checkpoint", refuse)
        backup(dom.name, pool)
    expected[2] = model.snapshot()
    assert our_checkpoints(dom) == [cp]
    assert Pool.open(pool).domain(dom.uuid).read_manifest(2).qemu_run is None

    model.write("vda", 9 * MiB, 64 * KiB, 0x83)
    backup(dom.name, pool)                          # same QEMU run, but nothing proven
    expected[3] = model.snapshot()
    assert manifest_disk(pool, dom, 3, "vda").dirty_bitmap is None
    assert our_checkpoints(dom) == []
    assert_points_match(pool, dom.uuid, expected, tmp_path)
