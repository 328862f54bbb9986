"""The pure parts of restore: the XML of a defined domain, names, the running-disk
rule's path matching, point and disk selection and the table checks a restore
relies on (on pools of table files written with the core API; no QEMU)."""
from __future__ import annotations

import os
import uuid as uuidlib
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import pytest

from vmsnapbackup.adapters.domainxml import parse_disks
from vmsnapbackup.cli.restore import format_result, parse_point
from vmsnapbackup.core.checktable import CheckTable, write_check_table
from vmsnapbackup.core.difftable import compare, write_difference_table
from vmsnapbackup.core.manifest import (
    BlockCounts,
    DomainInfo,
    PointDisk,
    PointManifest,
    utc_now,
)
from vmsnapbackup.core.pool import Pool
from vmsnapbackup.errors import CorruptFileError, NotFoundError, UsageError
from vmsnapbackup.workflows.pointread import (
    read_point_tables,
    select_disks,
    select_point,
)
from vmsnapbackup.workflows.restore import (
    DefinedDomain,
    RestoredDisk,
    RestoreResult,
    image_name,
    paths_in_use,
    rewrite_domain_xml,
    unverified_name,
    users_of,
)

SAVED_XML = """<domain type='kvm' id='7'>
  <name>web1</name>
  <uuid>0f6d1c43-2a5e-4a4e-9d4c-2b8f3f1c0a11</uuid>
  <metadata><app:info xmlns:app='https://example.invalid/app' role='web'/></metadata>
  <memory unit='KiB'>131072</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>
    <nvram>/var/lib/libvirt/qemu/nvram/web1_VARS.fd</nvram></os>
  <devices>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw' cache='none' discard='unmap'/>
      <source dev='/dev/vg0/web1'/>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/images/web1-data.qcow2' index='2'/>
      <backingStore type='file' index='3'><format type='raw'/><source file='/images/tpl.raw'/>
        <backingStore/></backingStore>
      <target dev='vdb' bus='virtio'/>
      <alias name='ua-data'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/images/web1-scratch.raw'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/iso/install.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:aa:bb:cc'/>
      <source network='default'/>
      <target dev='vnet3'/>
      <model type='virtio'/>
    </interface>
    <interface type='bridge'>
      <mac address='52:54:00:aa:bb:dd'/>
      <source bridge='br0'/>
    </interface>
  </devices>
  <seclabel type='dynamic' model='dac' relabel='yes'><label>+64055:+994</label></seclabel>
  <seclabel type='static' model='selinux' relabel='no'><label>system_u:x</label></seclabel>
</domain>"""


# --- rewrite_domain_xml -------------------------------------------------------------------

def rewritten(images: Optional[Dict[str, tuple]] = None) -> tuple:
    images = images if images is not None else {
        "vda": ("/restore/vda.qcow2", "qcow2"), "vdb": ("/restore/vdb.raw", "raw")}
    xml, dropped = rewrite_domain_xml(SAVED_XML, "web1-restored", images)
    return ET.fromstring(xml), xml, dropped


def disk_el(root: ET.Element, target: str) -> ET.Element:
    (el,) = [d for d in root.findall("devices/disk") if d.find("target").get("dev") == target]
    return el


def test_define_xml_gets_new_identity() -> None:
    root, xml, _ = rewritten()
    assert root.findtext("name") == "web1-restored"
    assert root.find("uuid") is None
    assert "id" not in root.attrib
    assert root.findall("devices/interface/mac") == []
    assert "52:54:00:aa:bb" not in xml
    assert len(root.findall("devices/interface")) == 2, "interfaces stay, only MACs go"
    assert root.find("os/nvram") is None, "the new domain must not share the NVRAM file"
    assert root.find("os/loader") is not None
    labels = root.findall("seclabel")
    assert [s.get("type") for s in labels] == ["static"]


def test_define_xml_points_disks_at_restored_images() -> None:
    root, xml, dropped = rewritten()
    disks = {d.target: d for d in parse_disks(xml)}
    assert disks["vda"].type == "file" and disks["vda"].source == "/restore/vda.qcow2"
    assert disks["vda"].format == "qcow2"
    assert disks["vdb"].source == "/restore/vdb.raw" and disks["vdb"].format == "raw"
    assert disks["vdb"].backing_chain == ()
    vda = disk_el(root, "vda")
    assert vda.find("driver").get("cache") == "none", "other driver settings stay"
    assert vda.find("source").attrib == {"file": "/restore/vda.qcow2"}
    assert vda.find("alias") is None
    vdb = disk_el(root, "vdb")
    assert vdb.find("alias").get("name") == "ua-data", "user aliases stay"
    assert vdb.find("backingStore") is None
    # the writable disk that was not restored is dropped; the cdrom stays, empty (DESIGN §8)
    assert dropped == ["vdc"] and "vdc" not in disks
    assert disks["sda"].source is None


def test_define_xml_keeps_metadata_and_source_order() -> None:
    root, _, _ = rewritten()
    assert root.find("metadata/{https://example.invalid/app}info").get("role") == "web"
    vda = disk_el(root, "vda")
    assert [c.tag for c in vda] == ["driver", "source", "target"]


def test_define_xml_refusals() -> None:
    with pytest.raises(CorruptFileError, match="no disk vdz"):
        rewrite_domain_xml(SAVED_XML, "x", {"vdz": ("/r/vdz.raw", "raw")})
    for bad in ("", "a b", "../x", "-x"):
        with pytest.raises(UsageError):
            rewrite_domain_xml(SAVED_XML, bad, {})
    with pytest.raises(CorruptFileError):
        rewrite_domain_xml("<domain><name>x", "y", {})
    with pytest.raises(CorruptFileError):
        rewrite_domain_xml("<network/>", "y", {})


def test_define_xml_disk_without_driver_gets_one() -> None:
    xml = ("<domain><name>a</name><devices><disk type='file' device='disk'>"
           "<source file='/a.img'/><target dev='vda'/></disk></devices></domain>")
    out, dropped = rewrite_domain_xml(xml, "b", {"vda": ("/r/vda.raw", "raw")})
    (disk,) = parse_disks(out)
    assert (disk.source, disk.format, dropped) == ("/r/vda.raw", "raw", [])
    assert ET.fromstring(out).find("devices/disk/driver").get("name") == "qemu"


# --- names and paths ----------------------------------------------------------------------

def test_image_names() -> None:
    assert image_name("vda", "raw") == "vda.raw"
    assert image_name("vdb", "qcow2", "web1") == "web1-vdb.qcow2"
    with pytest.raises(UsageError):
        image_name("vda", "vmdk")
    assert unverified_name(Path("/r/vda.raw")) == Path("/r/vda.raw.unverified")


def _live(name: str, *files: str, backing: str = "") -> tuple:
    disks = "".join(
        f"<disk type='file' device='disk'><source file='{f}'/><target dev='vd{chr(97 + i)}'/>"
        + (f"<backingStore type='file'><format type='qcow2'/><source file='{backing}'/>"
           "<backingStore/></backingStore>" if backing and i == 0 else "")
        + "</disk>" for i, f in enumerate(files))
    return name, f"<domain><name>{name}</name><devices>{disks}</devices></domain>"


def test_users_of_matches_sources_backing_links_and_inodes(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"x")
    frozen = tmp_path / "frozen.qcow2"
    frozen.write_bytes(b"y")
    used = paths_in_use([_live("web1", str(disk), backing=str(frozen)),
                         _live("db", str(tmp_path / "other.img"))])
    assert users_of(disk, used) == ["web1"]
    assert users_of(frozen, used) == ["web1"], "a backing image of a running disk counts"
    link = tmp_path / "link.raw"
    link.symlink_to(disk)
    assert users_of(link, used) == ["web1"]
    hard = tmp_path / "hard.raw"
    os.link(disk, hard)
    assert users_of(hard, used) == ["web1"]
    free = tmp_path / "free.raw"
    free.write_bytes(b"z")
    assert users_of(free, used) == []
    assert users_of(tmp_path / "missing.raw", used) == []


def test_paths_in_use_ignores_network_disks() -> None:
    xml = ("<domain><devices><disk type='network' device='disk'><source protocol='nbd' "
           "name='x'/><target dev='vda'/></disk></devices></domain>")
    assert paths_in_use([("n", xml)]) == {}


# --- CLI helpers --------------------------------------------------------------------------

def test_parse_point() -> None:
    assert parse_point("latest") is None
    assert parse_point("LATEST") is None
    assert parse_point("12") == 12
    for bad in ("0", "-1", "two", ""):
        with pytest.raises(UsageError):
            parse_point(bad)


def test_result_text_and_json() -> None:
    disk = RestoredDisk("vda", "/r/vda.raw", "raw", 64 << 20, 3 << 20, 1.25, 1.0, 0.2, 0.05, True)
    r = RestoreResult("web1", "u", 3, 1, "2026-11-25T13:00:00.000Z", "/r", "raw", (disk,),
                      1.5, defined=DefinedDomain("web1-copy", "u2", ("vdc",)))
    text = format_result(r)
    assert "point 3 (generation 1" in text
    assert "vda: /r/vda.raw (raw, 64.0 MiB, 3.0 MiB allocated" in text and "verified" in text
    assert "defined domain web1-copy (u2)" in text and "disk vdc was not restored" in text
    d = r.to_dict()
    assert d["ok"] is True and d["disks"][0]["bytes"] == 64 << 20
    assert d["defined"]["dropped_disks"] == ["vdc"]


# --- selection and tables (table files only, no volumes) ----------------------------------

BS = 4096


class TablePool:
    """Table files and manifests as a backup writes them (volumes are not needed here)."""

    def __init__(self, root: Path) -> None:
        self.pool = Pool.create(root)
        self.uuid = str(uuidlib.uuid4())
        self.store = self.pool.domain(self.uuid, "web1", create=True)
        self.table1: Optional[CheckTable] = None
        self.t1sum = b""

    def add(self, data: bytes, damaged_digest: bool = False) -> int:
        st = self.store
        with st.lock("backup"):
            n = st.allocate_point()
            g = st.allocate_generation(["vda"]) if self.table1 is None else 1
        table = CheckTable.empty(len(data), BS)
        table.hash_into(0, data)
        ddir = st.disk_dir(g, "vda")
        base = ddir / "base.qcow2"
        base.write_bytes(b"")
        if self.table1 is None:
            self.table1 = table
            self.t1sum = write_check_table(ddir / f"table-{n:06d}.vsbt", table)
            volume, difference, dsum = base, None, None
        else:
            volume = ddir / f"point-{n:06d}.qcow2"
            volume.write_bytes(b"")
            dpath = ddir / f"diff-{n:06d}.vsbd"
            dsum = write_difference_table(dpath, compare(self.table1, table)).hex()
            difference = st.relpath(dpath)
        digest = table.body_digest().hex()
        if damaged_digest:
            digest = ("0" if digest[0] != "0" else "1") + digest[1:]
        disk = PointDisk(
            target="vda", source="/img/web1.qcow2", format="qcow2", virtual_size=len(data),
            block_size=BS, volume=st.relpath(volume), volume_format="qcow2",
            base=st.relpath(base), base_format="qcow2", table="generations/000001/vda/"
            "table-000001.vsbt", table1_digest=self.t1sum.hex(), difference=difference,
            difference_digest=dsum, table_digest=digest,
            blocks=BlockCounts(table.count, 0, 0, 0, 0), bytes_written=0)
        now = utc_now()
        st.write_manifest(PointManifest(
            point=n, generation=g, domain=DomainInfo("web1", self.uuid, "<domain/>"),
            started=now, snapshot_at=now, finished=now, consistency="offline",
            disks=(disk,)))
        return n


def test_select_point_latest_and_damaged(tmp_path: Path) -> None:
    tp = TablePool(tmp_path / "pool")
    with pytest.raises(NotFoundError, match="no valid point"):
        select_point(tp.store, None)
    data = bytearray(10 * BS)
    tp.add(bytes(data))
    data[BS] = 1
    tp.add(bytes(data))
    assert select_point(tp.store, None).point == 2
    assert select_point(tp.store, 1).point == 1
    with pytest.raises(NotFoundError):
        select_point(tp.store, 5)
    path = tp.store.manifest_path(2)
    path.write_bytes(path.read_bytes().replace(b"offline", b"quiesced"))
    assert select_point(tp.store, None).point == 1, "a damaged point is never the latest"
    with pytest.raises(CorruptFileError, match="checksum"):
        select_point(tp.store, 2)
    m = select_point(tp.store, 1)
    assert [d.target for d in select_disks(m, None)] == ["vda"]
    assert [d.target for d in select_disks(m, ["vda"])] == ["vda"]
    with pytest.raises(NotFoundError, match="vdq"):
        select_disks(m, ["vdq"])


def test_read_point_tables_rebuilds_table_n(tmp_path: Path) -> None:
    tp = TablePool(tmp_path / "pool")
    data = bytearray(9 * BS + 100)
    data[0:BS] = b"\x07" * BS
    tp.add(bytes(data))
    data[3 * BS + 5] = 9
    data[0:BS] = bytes(BS)
    n = tp.add(bytes(data))
    m = tp.store.read_manifest(n)
    tables = read_point_tables(tp.store, m.disk("vda"))
    expected = CheckTable.empty(len(data), BS)
    expected.hash_into(0, bytes(data))
    assert tables.table == expected
    assert tables.difference is not None
    assert np.array_equal(tables.difference.indexes, np.array([0, 3], dtype=np.uint64))
    first = read_point_tables(tp.store, tp.store.read_manifest(1).disk("vda"))
    assert first.table is first.table1 and first.difference is None


def test_read_point_tables_refuses_a_wrong_rebuild(tmp_path: Path) -> None:
    tp = TablePool(tmp_path / "pool")
    data = bytearray(4 * BS)
    tp.add(bytes(data))
    data[0] = 1
    n = tp.add(bytes(data), damaged_digest=True)
    with pytest.raises(CorruptFileError, match="rebuilt table"):
        read_point_tables(tp.store, tp.store.read_manifest(n).disk("vda"))


def test_read_point_tables_names_the_damaged_file(tmp_path: Path) -> None:
    tp = TablePool(tmp_path / "pool")
    data = bytearray(4 * BS)
    tp.add(bytes(data))
    data[0] = 1
    n = tp.add(bytes(data))
    disk = tp.store.read_manifest(n).disk("vda")
    table1 = tp.store.resolve(disk.table)
    raw = bytearray(table1.read_bytes())
    raw[70] ^= 1
    table1.write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError, match="table-000001.vsbt"):
        read_point_tables(tp.store, disk)
    os.unlink(table1)
    with pytest.raises(CorruptFileError, match="missing"):
        read_point_tables(tp.store, disk)
