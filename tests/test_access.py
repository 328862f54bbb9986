"""The pure parts of mount/boot: the boot domain's XML, DAC labels, the boot note."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vmsnapbackup.errors import CorruptFileError, NotFoundError, UsageError
from vmsnapbackup.adapters import bootdaemon, domaindefine
from vmsnapbackup.workflows import boot as access
from vmsnapbackup.workflows import bootnote
from vmsnapbackup.workflows.access import BootDisk, boot_domain_xml

SOCK = "/var/lib/libvirt/images/vmsnapbackup-boot/web1-r/nbd.sock"

POINT_XML = """<domain type='kvm' id='7'>
  <name>web1</name>
  <uuid>3f2a4b6c-1d2e-4f30-8a9b-0c1d2e3f4a5b</uuid>
  <memory unit='KiB'>131072</memory>
  <os firmware='efi'>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram>/var/lib/libvirt/qemu/nvram/web1_VARS.fd</nvram>
  </os>
  <seclabel type='dynamic' model='dac' relabel='yes'>
    <label>+64055:+64055</label><imagelabel>+64055:+64055</imagelabel>
  </seclabel>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none' discard='unmap'/>
      <source file='/var/lib/libvirt/images/web1.img' index='1'/>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
      <boot order='1'/>
      <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='/dev/vg/web1-data'/>
      <target dev='vdb' bus='virtio'/>
      <serial>DATA1</serial>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/web1-scratch.qcow2'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/iso/tools.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:12:34:56'/>
      <source network='default'/>
      <target dev='vnet3'/>
      <model type='virtio'/>
      <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>
    </interface>
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-7-web1/org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <graphics type='vnc' port='5901' autoport='no' listen='127.0.0.1'/>
  </devices>
</domain>"""

DISKS = {
    "vda": BootDisk(overlay="/b/web1-r/vda.qcow2", socket=SOCK, export="vda"),
    "vdb": BootDisk(overlay="/b/web1-r/vdb.qcow2", socket=SOCK, export="vdb"),
}


def disks_of(root: ET.Element) -> dict:
    return {d.find("target").get("dev"): d for d in root.findall("./devices/disk")}


def test_identity_is_new() -> None:
    root = ET.fromstring(boot_domain_xml(POINT_XML, "web1-r", DISKS))
    assert root.findtext("name") == "web1-r"
    assert root.find("uuid") is None
    assert "id" not in root.attrib
    assert root.find("./os/nvram") is None          # a fresh NVRAM from the template
    assert root.find("./os/loader") is not None
    iface = root.find("./devices/interface")
    assert iface.find("mac") is None and iface.find("target") is None
    assert iface.find("address") is not None         # the guest keeps its NIC slot
    src = root.find("./devices/channel/source")
    assert src.get("mode") == "bind" and "path" not in src.attrib
    gfx = root.find("./devices/graphics")
    assert gfx.get("autoport") == "yes" and "port" not in gfx.attrib
    # the original's dynamic labels belong to its process: none may be carried over
    assert all(sec.find("label") is None and sec.find("imagelabel") is None
               for sec in root.findall("seclabel"))


def test_point_disks_run_on_overlays_backed_by_the_nbd_export() -> None:
    root = ET.fromstring(boot_domain_xml(POINT_XML, "web1-r", DISKS))
    disks = disks_of(root)
    for target in ("vda", "vdb"):
        d = disks[target]
        assert d.get("type") == "file" and d.get("device") == "disk"
        drv = d.find("driver")
        assert drv.get("name") == "qemu" and drv.get("type") == "qcow2"
        assert d.find("source").attrib == {"file": DISKS[target].overlay}
        (bs,) = d.findall("backingStore")
        assert bs.get("type") == "network"
        assert bs.find("format").get("type") == "raw"
        nbd = bs.find("source")
        assert nbd.attrib == {"protocol": "nbd", "name": target}
        assert nbd.find("host").attrib == {"transport": "unix", "socket": SOCK}
        assert bs.find("backingStore") is not None and len(bs.find("backingStore")) == 0
    # what described the device to the guest is kept
    assert disks["vda"].find("driver").get("cache") == "none"
    assert disks["vda"].find("boot").get("order") == "1"
    assert disks["vda"].find("address").get("bus") == "0x04"
    assert disks["vdb"].findtext("serial") == "DATA1"


def test_disks_not_in_the_point_are_left_out_except_removable_media() -> None:
    root = ET.fromstring(boot_domain_xml(POINT_XML, "web1-r", DISKS))
    disks = disks_of(root)
    assert sorted(disks) == ["sda", "vda", "vdb"]     # vdc was not backed up: never shared
    assert disks["sda"].find("source") is None   # a host file: left out (DESIGN §8), drive empty
    assert "web1.img" not in ET.tostring(root, encoding="unicode")
    assert "/dev/vg/web1-data" not in ET.tostring(root, encoding="unicode")


def test_no_network() -> None:
    root = ET.fromstring(boot_domain_xml(POINT_XML, "web1-r", DISKS, network=False))
    assert root.find("./devices/interface") is None


def test_a_point_disk_missing_from_the_xml_is_refused() -> None:
    with pytest.raises(CorruptFileError, match="vdz"):
        boot_domain_xml(POINT_XML, "x", {"vdz": DISKS["vda"]})
    with pytest.raises(CorruptFileError):
        boot_domain_xml("<domain", "x", DISKS)
    with pytest.raises(CorruptFileError):
        boot_domain_xml("<network/>", "x", DISKS)


@pytest.mark.parametrize("label,want", [
    ("+64055:+994", (64055, 994)),
    ("0:0", (0, 0)),
    ("root:root", (0, 0)),
])
def test_dac_labels(label: str, want: tuple) -> None:
    assert domaindefine.parse_dac_label(label) == want


def test_boot_names_are_safe_path_components(tmp_path: Path) -> None:
    assert access._boot_dir("web1-r", tmp_path) == tmp_path / "web1-r"
    assert access._boot_dir("web1", None) == access.DEFAULT_BOOT_ROOT / "web1"
    for bad in ("", "..", "a/b", ".hidden", "x" * 65, "a b"):
        with pytest.raises(UsageError):
            access._boot_dir(bad, tmp_path)


def test_boot_note_is_checked_before_anything_is_removed(tmp_path: Path) -> None:
    bdir = tmp_path / "web1-r"
    bdir.mkdir()
    with pytest.raises(NotFoundError):
        bootnote.read_note(bdir)
    note = {"format": "vmsnapbackup-boot", "version": 1,
            "disks": {"vda": {"overlay": "../../etc/passwd"}}}
    (bdir / access.BOOT_NOTE).write_text(json.dumps(note))
    with pytest.raises(CorruptFileError, match="outside"):
        bootnote.read_note(bdir)
    note["disks"] = {"vda": {"overlay": "vda.qcow2"}}
    note["version"] = 3
    (bdir / access.BOOT_NOTE).write_text(json.dumps(note))
    with pytest.raises(CorruptFileError, match="version"):
        bootnote.read_note(bdir)
    note["version"] = 1
    (bdir / access.BOOT_NOTE).write_text(json.dumps(note))
    assert bootnote.read_note(bdir)["disks"]["vda"]["overlay"] == "vda.qcow2"


def test_daemon_command_line_serves_read_only(tmp_path: Path) -> None:
    note = {"disks": {"vda": {"volume": "/pool/a,b/point-000002.qcow2", "format": "qcow2",
                              "export": "vda"},
                      "vdb": {"volume": "/pool/base.raw", "format": "raw", "export": "vdb"}}}
    argv = bootdaemon.daemon_args(str(tmp_path), bootnote.served_images(note))
    text = " ".join(argv)
    assert "filename=/pool/a,,b/point-000002.qcow2,read-only=on" in text
    assert "driver=raw,node-name=vsbd1,file=vsbf1,read-only=on" in text
    assert text.count("writable=off") == 2 and "writable=on" not in text
    assert f"addr.path={tmp_path / 'nbd.sock'}" in text
    # not --daemonize: QEMU's daemonize sets umask 027 (a group-readable socket)
    assert "--daemonize" not in argv and argv[-2:] == ["--pidfile", str(tmp_path / "qsd.pid")]
