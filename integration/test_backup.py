"""The backup end to end on a real libvirtd + QEMU (issue: the backup itself).

Each test keeps a byte model of every disk (what the "guest" wrote), takes
points while writing, and checks that ``qemu-img convert`` of every point
volume equals the model at the moment of that point's snapshot.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from domains import DiskModel, DiskSpec, TestDomain

from vmsnapbackup.adapters.domainxml import OVERLAY_MARKER
from vmsnapbackup.cli import main
from vmsnapbackup.core.pool import Pool
from vmsnapbackup.progress import ProgressEvent
from vmsnapbackup.workflows.backup import backup

pytestmark = pytest.mark.integration

MiB = 2**20


def convert(volume: Path, out: Path) -> bytes:
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(volume), str(out)], check=True)
    data = out.read_bytes()
    out.unlink()
    return data


def assert_points_match(pool: Path, uuid: str, expected: dict[int, dict[str, bytes]],
                        tmp: Path) -> None:
    store = Pool.open(pool).domain(uuid)
    points = {p.number: p.manifest for p in store.points()}
    assert sorted(points) == sorted(expected)
    for n, disks in expected.items():
        m = points[n]
        assert m is not None
        for d in m.disks:
            got = convert(store.resolve(d.volume), tmp / f"p{n}-{d.target}.raw")
            want = disks[d.target]
            assert len(got) == len(want), (n, d.target)
            if got != want:
                first = next(i for i in range(len(want)) if got[i] != want[i])
                pytest.fail(f"point {n} disk {d.target} differs first at byte {first}")


def assert_clean(dom: TestDomain, images: dict[str, Path]) -> None:
    """Running on the original images, no overlay, no storage daemon, no socket."""
    for target, image in images.items():
        assert dom.current_source(target) == image
    for image in images.values():
        assert not glob.glob(str(image.parent / f"*{OVERLAY_MARKER}*"))
    out = subprocess.run(["pgrep", "-af", f"qemu-storage-daemon.*qsd-{dom.name}-"],
                         check=False, capture_output=True, text=True)
    assert out.stdout.strip() == "", "a storage daemon was left running"
    assert not glob.glob(f"/run/vmsnapbackup/qsd-{dom.name}-*"), "a runtime dir was left behind"
    assert not os.path.exists(f"/run/vmsnapbackup/inflight/{dom.uuid}.json"), \
        "an inflight record was left"


def test_four_points_of_a_running_two_disk_domain(running_domain: TestDomain, tmp_path: Path):
    dom = running_domain
    model = DiskModel(dom)
    pool = tmp_path / "pool"
    expected: dict[int, dict[str, bytes]] = {}

    model.write("vda", 0, 64 * 1024, 0x11)
    model.write("vda", 5 * MiB + 4096, 300 * 1024, 0x22)
    model.write("vdb", 32 * MiB, 12 * 1024, 0x33)       # the short tail of the raw disk
    r1 = backup(dom.name, pool)
    assert r1.point == 1 and r1.new_generation and r1.consistency == "crash-consistent"
    expected[1] = model.snapshot()

    model.write("vda", 64 * 1024, 4096, 0x44)
    model.zero("vda", 0, 64 * 1024)                     # a block that became zeros
    model.write("vdb", 1 * MiB, 1 * MiB, 0x55)
    r2 = backup(dom.name, pool)
    assert r2.point == 2 and not r2.new_generation and r2.generation == 1
    vda = next(d for d in r2.disks if d.target == "vda")
    assert vda.blocks["changed"] == 2 and vda.blocks["zero"] == 1
    expected[2] = model.snapshot()

    # writes while the backup reads: not in this point, but on the disk afterwards
    during: list[str] = []

    def write_during(ev: ProgressEvent) -> None:
        if ev.disk == "vda" and not during:
            during.append("x")
            dom.write("vda", 7 * MiB, 128 * 1024, 0x66)

    model.write("vdb", 2 * MiB, 4096, 0x77)
    expected[3] = model.snapshot()
    r3 = backup(dom.name, pool, progress=write_during)
    assert during and r3.point == 3
    model.disks["vda"][7 * MiB:7 * MiB + 128 * 1024] = b"\x66" * 128 * 1024

    model.write("vda", 63 * MiB, 1 * MiB, 0x88)          # the last MiB of vda
    r4 = backup(dom.name, pool)
    expected[4] = model.snapshot()
    assert r4.point == 4

    assert_clean(dom, dom.disks)
    assert_points_match(pool, dom.uuid, expected, tmp_path)
    # what the guest wrote during backup 3 is on the original image
    dom.shutoff()
    for target in dom.disks:
        assert dom.read_image(target) == bytes(model.disks[target])


def test_shut_off_domain_is_read_directly(make_domain, tmp_path: Path):
    dom = make_domain(disks=[DiskSpec("vda", "qcow2", 8 * MiB)])
    model = DiskModel(dom)
    model.write("vda", 1 * MiB, 64 * 1024, 0xab)
    dom.shutoff()
    r = backup(dom.name, tmp_path / "pool")
    assert r.consistency == "offline" and r.point == 1
    assert_points_match(tmp_path / "pool", dom.uuid, {1: model.snapshot()}, tmp_path)
    assert not dom.is_active()


def test_backing_chain_survives(make_domain, tmp_path: Path):
    factory_dir = tmp_path
    base = make_domain.scratch_dir() / "template.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(8 * MiB)],
                   check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", str(base)],
                   check=True, capture_output=True)
    dom = make_domain(disks=[DiskSpec("vda", "qcow2", 8 * MiB, backing=str(base))])
    model = DiskModel(dom)
    model.disks["vda"][0:MiB] = b"\x5a" * MiB
    model.write("vda", 512 * 1024, 64 * 1024, 0x01)
    backup(dom.name, factory_dir / "pool")
    model.write("vda", 2 * MiB, 64 * 1024, 0x02)
    backup(dom.name, factory_dir / "pool")
    expected = model.snapshot()
    info = json.loads(subprocess.run(
        ["qemu-img", "info", "--output=json", "-U", str(dom.disks["vda"])],
        check=True, capture_output=True, text=True).stdout)
    assert info.get("backing-filename"), "the template backing chain was flattened"
    assert_clean(dom, dom.disks)
    store = Pool.open(factory_dir / "pool").domain(dom.uuid)
    last = store.points()[-1].manifest
    got = convert(store.resolve(last.disks[0].volume), tmp_path / "x.raw")
    assert got == expected["vda"]


def test_cli_backup_and_list(running_domain: TestDomain, tmp_path: Path, capsys):
    pool = str(tmp_path / "pool")
    assert main(["--pool", pool, "backup", running_domain.name, "--disk", "vda", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["point"] == 1 and [d["target"] for d in doc["disks"]] == ["vda"]
    assert main(["--pool", pool, "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["points"]
    assert [(p["domain"], p["point"]) for p in listed] == [(running_domain.name, 1)]
    assert main(["--pool", pool, "list"]) == 0
    assert running_domain.name in capsys.readouterr().out


def test_cli_errors_are_one_line_with_distinct_codes(running_domain: TestDomain,
                                                     tmp_path: Path, capsys):
    pool = str(tmp_path / "pool")
    assert main(["--pool", pool, "backup", "no-such-domain-xyz"]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no-such-domain-xyz" in err
    assert main(["--pool", pool, "backup", running_domain.name, "--disk", "vdz"]) == 3
    capsys.readouterr()
    # a second backup of the same domain at once: the lock is held
    store = Pool.open(tmp_path / "pool", create=True).domain(running_domain.uuid,
                                                             running_domain.name, create=True)
    with store.lock("backup"):
        assert main(["--pool", pool, "backup", running_domain.name]) == 4
    assert "lock" in capsys.readouterr().err.lower()
    assert_clean(running_domain, running_domain.disks)


def test_unknown_libvirt_pool_is_one_line_on_stderr(tmp_path: Path) -> None:
    """The real CLI, as a user runs it: an unknown ``--pool`` name is one line and exit 3,
    without libvirt's own "libvirt: Storage Driver error" line from its default handler."""
    proc = subprocess.run(
        [sys.executable, "-m", "vmsnapbackup", "--pool", "vsb-no-such-libvirt-pool", "list"],
        check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "VMSNAPBACKUP_POOL": ""})
    lines = proc.stderr.splitlines()
    assert proc.returncode == 3, proc.stderr
    assert len(lines) == 1 and "vsb-no-such-libvirt-pool" in lines[0], proc.stderr
    assert not any(line.startswith("libvirt:") for line in lines), proc.stderr


def test_pool_given_as_a_libvirt_storage_pool_name(running_domain: TestDomain, make_domain):
    """--pool NAME uses a libvirt dir pool's target path and refreshes the pool after."""
    conn = running_domain.conn
    target = make_domain.scratch_dir("vsb-libvirt-pool")
    name = f"vsbtest-{running_domain.uuid[:8]}"
    sp = conn.storagePoolCreateXML(
        f"<pool type='dir'><name>{name}</name><target><path>{target}</path></target></pool>", 0)
    try:
        assert main(["--pool", name, "backup", running_domain.name, "--disk", "vdb"]) == 0
        store = Pool.open(target).domain(running_domain.uuid)
        assert [p.number for p in store.points()] == [1]
        assert "vmsnapbackup-pool.json" in sp.listVolumes()
        assert main(["--pool", "no-such-libvirt-pool", "list"]) == 3
    finally:
        sp.destroy()
