"""Which disks a backup takes, what their XML says, how overlays are named."""
from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmsnapbackup.adapters.domainxml import (
    OVERLAY_MARKER,
    Disk,
    ImageRef,
    backup_disks,
    find_disk,
    is_our_overlay,
    overlay_id,
    overlay_path,
    parse_disks,
    snapshot_xml,
    unsupported_reason,
)
from vmsnapbackup.errors import HypervisorError, NotFoundError, UnsupportedDiskError, UsageError


def domain(*disks: str) -> str:
    return (
        "<domain type='kvm'><name>d1</name><devices>"
        "<emulator>/usr/bin/qemu-system-x86_64</emulator>"
        + "".join(disks)
        + "<controller type='usb' index='0'/></devices></domain>"
    )


FILE_QCOW2_LIVE = """
<disk type='file' device='disk'>
  <driver name='qemu' type='qcow2' cache='none'/>
  <source file='/var/lib/libvirt/images/d1/vda.qcow2' index='3'/>
  <backingStore type='file' index='2'>
    <format type='qcow2'/>
    <source file='/var/lib/libvirt/images/template.qcow2'/>
    <backingStore type='block' index='1'>
      <format type='raw'/>
      <source dev='/dev/vg0/golden'/>
      <backingStore/>
    </backingStore>
  </backingStore>
  <target dev='vda' bus='virtio'/>
  <alias name='virtio-disk0'/>
</disk>"""

BLOCK_RAW = """
<disk type='block' device='disk'>
  <driver name='qemu' type='raw'/>
  <source dev='/dev/vg0/data' index='1'/>
  <backingStore/>
  <target dev='vdb' bus='virtio'/>
  <alias name='virtio-disk1'/>
</disk>"""

CDROM = """
<disk type='file' device='cdrom'>
  <driver name='qemu' type='raw'/>
  <source file='/isos/install.iso'/>
  <target dev='sda' bus='sata'/>
  <readonly/>
</disk>"""

EMPTY_CDROM = """
<disk type='file' device='cdrom'>
  <driver name='qemu' type='raw'/>
  <target dev='sdb' bus='sata'/>
  <readonly/>
</disk>"""

RBD = """
<disk type='network' device='disk'>
  <driver name='qemu' type='raw'/>
  <source protocol='rbd' name='pool/image'>
    <host name='mon1' port='6789'/>
  </source>
  <target dev='vdc' bus='virtio'/>
</disk>"""

NBD = """
<disk type='network' device='disk'>
  <driver name='qemu' type='raw'/>
  <source protocol='nbd'>
    <host transport='unix' socket='/run/nbd.sock'/>
  </source>
  <target dev='vdd' bus='virtio'/>
</disk>"""

SHAREABLE = """
<disk type='file' device='disk'>
  <driver name='qemu' type='raw' cache='none'/>
  <source file='/shared/cluster.img'/>
  <target dev='vde' bus='virtio'/>
  <shareable/>
</disk>"""

READONLY = """
<disk type='file' device='disk'>
  <driver name='qemu' type='qcow2'/>
  <source file='/images/ro.qcow2'/>
  <target dev='vdf' bus='virtio'/>
  <readonly/>
</disk>"""

VMDK = """
<disk type='file' device='disk'>
  <driver name='qemu' type='vmdk'/>
  <source file='/images/old.vmdk'/>
  <target dev='vdg' bus='virtio'/>
</disk>"""

VOLUME = """
<disk type='volume' device='disk'>
  <driver name='qemu' type='qcow2'/>
  <source pool='default' volume='vol1.qcow2'/>
  <target dev='vdh' bus='virtio'/>
</disk>"""

FLOPPY = """
<disk type='file' device='floppy'>
  <driver name='qemu' type='raw'/>
  <source file='/images/boot.img'/>
  <target dev='fda' bus='fdc'/>
</disk>"""

INACTIVE_FILE_RAW = """
<disk type='file' device='disk'>
  <driver name='qemu' type='raw'/>
  <source file='/images/plain.img'/>
  <target dev='vdi' bus='virtio'/>
</disk>"""


def test_file_qcow2_with_backing_chain() -> None:
    (disk,) = parse_disks(domain(FILE_QCOW2_LIVE))
    assert disk.target == "vda"
    assert (disk.device, disk.type, disk.format, disk.bus) == ("disk", "file", "qcow2", "virtio")
    assert disk.source == "/var/lib/libvirt/images/d1/vda.qcow2"
    assert disk.alias == "virtio-disk0"
    assert not disk.readonly and not disk.shareable
    assert disk.backing_chain == (
        ImageRef("/var/lib/libvirt/images/template.qcow2", "qcow2"),
        ImageRef("/dev/vg0/golden", "raw"),
    )
    assert disk.top == ImageRef("/var/lib/libvirt/images/d1/vda.qcow2", "qcow2")
    assert unsupported_reason(disk) is None


def test_block_raw_with_empty_backing_store() -> None:
    (disk,) = parse_disks(domain(BLOCK_RAW))
    assert (disk.type, disk.source, disk.format) == ("block", "/dev/vg0/data", "raw")
    assert disk.backing_chain == ()
    assert unsupported_reason(disk) is None


def test_inactive_xml_has_no_chain() -> None:
    (disk,) = parse_disks(domain(INACTIVE_FILE_RAW))
    assert disk.source == "/images/plain.img"
    assert disk.alias is None
    assert disk.backing_chain == ()


def test_network_sources() -> None:
    rbd, nbd = parse_disks(domain(RBD, NBD))
    assert (rbd.type, rbd.protocol, rbd.source) == ("network", "rbd", "rbd:pool/image")
    assert (nbd.protocol, nbd.source) == ("nbd", "nbd:/run/nbd.sock")
    assert "network" in (unsupported_reason(rbd) or "") and "rbd" in (unsupported_reason(rbd) or "")


def test_volume_source() -> None:
    (disk,) = parse_disks(domain(VOLUME))
    assert disk.source == "default/vol1.qcow2"
    assert "volume" in (unsupported_reason(disk) or "")


ALL = (FILE_QCOW2_LIVE, BLOCK_RAW, CDROM, EMPTY_CDROM, RBD, NBD, SHAREABLE, READONLY, VMDK,
       VOLUME, FLOPPY)


def test_backup_disks_without_selection_splits_with_reasons() -> None:
    chosen, skipped = backup_disks(domain(*ALL))
    assert [d.target for d in chosen] == ["vda", "vdb"]
    reasons = {s.disk.target: s.reason for s in skipped}
    assert list(reasons) == ["sda", "sdb", "vdc", "vdd", "vde", "vdf", "vdg", "vdh", "fda"]
    assert "cdrom" in reasons["sda"] and "cdrom" in reasons["sdb"]
    assert "network" in reasons["vdc"] and "nbd" in reasons["vdd"]
    assert "shareable" in reasons["vde"]
    assert "read-only" in reasons["vdf"]
    assert "vmdk" in reasons["vdg"]
    assert "volume" in reasons["vdh"]
    assert "floppy" in reasons["fda"]


def test_backup_disks_selection_keeps_xml_order_and_reports_the_rest() -> None:
    chosen, skipped = backup_disks(domain(FILE_QCOW2_LIVE, BLOCK_RAW, CDROM), ["vdb", "vda", "vdb"])
    assert [d.target for d in chosen] == ["vda", "vdb"]
    assert [(s.disk.target, s.reason) for s in skipped] == [("sda", "not selected")]
    chosen, skipped = backup_disks(domain(FILE_QCOW2_LIVE, BLOCK_RAW, CDROM), ["vdb"])
    assert [d.target for d in chosen] == ["vdb"]
    assert [s.disk.target for s in skipped] == ["vda", "sda"]


@pytest.mark.parametrize("target, word", [("sda", "cdrom"), ("vdc", "network"),
                                          ("vde", "shareable"), ("vdf", "read-only"),
                                          ("vdg", "vmdk"), ("fda", "floppy")])
def test_selecting_an_unsupported_disk_raises(target: str, word: str) -> None:
    with pytest.raises(UnsupportedDiskError, match=word) as info:
        backup_disks(domain(*ALL), ["vda", target])
    assert target in str(info.value)


def test_selecting_a_missing_disk_raises_not_found() -> None:
    with pytest.raises(NotFoundError, match="'vdz'.*vda, vdb"):
        backup_disks(domain(FILE_QCOW2_LIVE, BLOCK_RAW), ["vda", "vdz"])
    with pytest.raises(NotFoundError, match="vdz"):
        find_disk(domain(FILE_QCOW2_LIVE), "vdz")
    assert find_disk(domain(FILE_QCOW2_LIVE, BLOCK_RAW), "vdb").source == "/dev/vg0/data"


def test_bad_xml_is_a_hypervisor_error() -> None:
    with pytest.raises(HypervisorError):
        parse_disks("<domain><devices>")


def _disk(source: str, kind: str = "file", target: str = "vda") -> Disk:
    return Disk(target=target, device="disk", type=kind, source=source, format="qcow2")


def test_overlay_beside_the_image() -> None:
    path = overlay_path(_disk("/images/d1/vda.qcow2"), "20240101T000000-ab12")
    assert path == "/images/d1/vda.vmsnapbackup-20240101T000000-ab12.qcow2"
    assert is_our_overlay(path)
    assert overlay_id(path) == "20240101T000000-ab12"


def test_overlay_in_a_directory_names_the_target() -> None:
    a = overlay_path(_disk("/a/disk.img", target="vda"), "x1", "/ovl")
    b = overlay_path(_disk("/b/disk.img", target="vdb"), "x1", "/ovl")
    assert a == "/ovl/disk.vda.vmsnapbackup-x1.qcow2"
    assert a != b and is_our_overlay(a) and is_our_overlay(b)


def test_block_device_needs_an_overlay_directory() -> None:
    with pytest.raises(UsageError, match="overlay directory"):
        overlay_path(_disk("/dev/vg0/data", kind="block"), "x1")
    assert overlay_path(_disk("/dev/vg0/data", kind="block"), "x1", "/ovl") == (
        "/ovl/data.vda.vmsnapbackup-x1.qcow2"
    )


@pytest.mark.parametrize("bad", ["", "a b", "a/b", "a.b", "../x"])
def test_overlay_id_is_validated(bad: str) -> None:
    with pytest.raises(UsageError):
        overlay_path(_disk("/images/vda.qcow2"), bad)


@pytest.mark.parametrize("path", [
    "/images/vda.qcow2",
    "/images/vda.snap1",
    "/images/vda.vmsnapbackup-.qcow2",
    "/images/vda.vmsnapbackup-x1.qcow2.tmp",
    "/images/vmsnapbackup-x1.qcow2",
    "/images/vda.vmsnapbackup-x/y.qcow2",
    "",
])
def test_foreign_names_are_not_ours(path: str) -> None:
    assert not is_our_overlay(path)
    assert overlay_id(path) is None


@given(st.text(alphabet="abcXYZ019_-", min_size=1, max_size=30),
       st.text(alphabet="abc.-_ 019", min_size=1, max_size=20))
def test_every_generated_name_is_recognised(snapshot_id: str, stem: str) -> None:
    path = overlay_path(_disk(f"/images/{stem}.qcow2"), snapshot_id)
    assert is_our_overlay(path)
    assert overlay_id(path) == snapshot_id
    assert OVERLAY_MARKER in path


def test_snapshot_xml_lists_every_disk() -> None:
    xml = snapshot_xml({"vda": "/i/vda.vmsnapbackup-x.qcow2"}, ["vda", "vdb", "sda"])
    root = ET.fromstring(xml)
    assert root.tag == "domainsnapshot"
    disks = root.findall("./disks/disk")
    assert [(d.get("name"), d.get("snapshot")) for d in disks] == [
        ("vda", "external"), ("vdb", "no"), ("sda", "no")]
    assert disks[0].get("type") == "file"
    assert disks[0].find("driver").get("type") == "qcow2"  # type: ignore[union-attr]
    assert disks[0].find("source").get("file") == "/i/vda.vmsnapbackup-x.qcow2"  # type: ignore[union-attr]


def test_snapshot_xml_escapes_paths_and_rejects_unknown_targets() -> None:
    path = "/i/a'b&<c>.vmsnapbackup-x.qcow2"
    root = ET.fromstring(snapshot_xml({"vda": path}, ["vda"]))
    assert root.find("./disks/disk/source").get("file") == path  # type: ignore[union-attr]
    with pytest.raises(NotFoundError):
        snapshot_xml({"vdz": "/x.vmsnapbackup-a.qcow2"}, ["vda"])
