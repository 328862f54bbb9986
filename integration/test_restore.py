"""Restore on the real stack: qemu-img, qemu-storage-daemon and libvirt.

Two kinds of pools are restored from:

* a pool built here with the core API and the disk pass (what a backup does
  minus libvirt's snapshot), from disk contents the test chooses byte for byte:
  sizes that are not a multiple of the block size, raw and qcow2 base volumes,
  blocks that become zeros;
* pools written by the real ``backup`` of a running domain (once that workflow
  exists), checked against a model of every write the test made.

Every restored image is compared byte for byte with what the disk held.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import uuid as uuidlib
from pathlib import Path
from typing import Dict, Optional, Tuple

import pytest

from domains import DiskModel

from vmsnapbackup.adapters.nbdclient import NbdClient
from vmsnapbackup.adapters.storagedaemon import StorageDaemon
from vmsnapbackup.core.checktable import write_check_table
from vmsnapbackup.core.difftable import compare, write_difference_table
from vmsnapbackup.core.manifest import (
    BlockCounts,
    DomainInfo,
    GenerationDisk,
    GenerationRecord,
    PointDisk,
    PointManifest,
    utc_now,
)
from vmsnapbackup.core.pool import (
    Pool,
    base_volume_name,
    difference_name,
    partial_name,
    point_volume_name,
    table_name,
)
from vmsnapbackup.errors import NotFoundError, UsageError, VerifyMismatchError
from vmsnapbackup.workflows.diskpass import run_disk_pass
from vmsnapbackup.workflows.restore import UNVERIFIED_SUFFIX, restore

pytestmark = pytest.mark.integration

if not all(shutil.which(b) for b in ("qemu-storage-daemon", "qemu-img")):
    pytest.skip("needs qemu-storage-daemon and qemu-img", allow_module_level=True)

KiB = 1024
MiB = 1024 * KiB
BS = 64 * KiB

DOMAIN_XML = """<domain type='kvm'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    {disks}
    <interface type='network'><mac address='52:54:00:12:34:56'/><source network='default'/>
      <model type='virtio'/></interface>
  </devices>
</domain>"""


# --- a pool written the way a backup writes it ----------------------------------------------

class SyntheticPool:
    """A pool whose points hold disk contents chosen by the test.

    Each point is written like a backup writes it: the disk content is exported
    read-only, the disk pass hashes it and writes the base volume (first point of
    a generation) or the blocks differing from table 1 into a point volume laid
    over the base; then tables and the manifest are sealed through the core API.
    """

    def __init__(self, root: Path, name: str = "vm1", block_size: int = BS,
                 base_format: str = "qcow2", disk_format: str = "qcow2") -> None:
        self.pool = Pool.create(root)
        self.uuid = str(uuidlib.uuid4())
        self.name = name
        self.store = self.pool.domain(self.uuid, name, create=True)
        self.block_size = block_size
        self.base_format = base_format
        self.disk_format = disk_format
        self.scratch = root.parent / f"{root.name}-scratch"
        self.scratch.mkdir(exist_ok=True)
        self.contents: Dict[int, Dict[str, bytes]] = {}
        self._gen: Optional[int] = None
        self._gen_first: Dict[str, Tuple[str, object, bytes, str]] = {}

    def xml(self) -> str:
        disks = "".join(
            f"<disk type='file' device='disk'><driver name='qemu' type='{self.disk_format}'/>"
            f"<source file='/nonexistent/{self.name}-{t}.img'/><target dev='{t}' bus='virtio'/>"
            f"</disk>" for t in sorted(next(iter(self.contents.values()), {}) or ["vda"]))
        return DOMAIN_XML.format(name=self.name, uuid=self.uuid, disks=disks)

    def add_point(self, contents: Dict[str, bytes], new_generation: bool = False) -> int:
        with self.store.lock("backup"):
            n = self.store.allocate_point()
            if self._gen is None or new_generation:
                self._gen = self.store.allocate_generation(contents)
                self._gen_first = {}
                first = True
            else:
                first = False
            g = self._gen
            started = utc_now()
            disks = []
            gen_disks = {}
            with StorageDaemon(tag="synthpool") as qsd:
                for target, data in sorted(contents.items()):
                    disks.append(self._write_disk(qsd, g, n, target, data, first))
                    if first:
                        d = disks[-1]
                        gen_disks[target] = GenerationDisk(
                            virtual_size=len(data), base_format=self.base_format,
                            base=base_volume_name(self.base_format), table=table_name(n),
                            table_digest=d.table_digest)
            if first:
                self.store.write_generation(GenerationRecord(
                    generation=g, first_point=n, created=started, block_size=self.block_size,
                    disks=gen_disks))
            self.contents[n] = dict(contents)
            manifest = PointManifest(
                point=n, generation=g,
                domain=DomainInfo(name=self.name, uuid=self.uuid, xml=self.xml()),
                started=started, snapshot_at=started, finished=utc_now(),
                consistency="crash-consistent", disks=tuple(disks))
            self.store.write_manifest(manifest)
        return n

    def _write_disk(self, qsd: StorageDaemon, g: int, n: int, target: str, data: bytes,
                    first: bool) -> PointDisk:
        ddir = self.store.disk_dir(g, target)
        src_path = self.scratch / f"{target}-{n}.raw"
        src_path.write_bytes(data)
        src = qsd.export_image(str(src_path), "raw")
        base = ddir / base_volume_name(self.base_format)
        if first:
            final = base
            dst = qsd.create_writable(str(ddir / partial_name(final.name)), size=len(data),
                                      fmt=self.base_format)
        else:
            final = ddir / point_volume_name(n)
            dst = qsd.create_writable(str(ddir / partial_name(final.name)),
                                      backing=str(base), backing_fmt=self.base_format)
        table1 = None if first else self._gen_first[target][1]
        with NbdClient.open_unix(src.socket_path, src.name) as s, \
                NbdClient.open_unix(dst.socket_path, dst.name) as t:
            table, stats = run_disk_pass(s, t, self.block_size, table1, disk=target)
            t.flush()
        qsd.remove_export(dst)
        qsd.remove_export(src)
        os.replace(ddir / partial_name(final.name), final)
        src_path.unlink()
        rel = self.store.relpath
        if first:
            tpath = ddir / table_name(n)
            t1sum = write_check_table(tpath, table)
            self._gen_first[target] = (rel(tpath), table, t1sum, rel(base))
            difference = diff_sum = None
        else:
            diff = compare(table1, table)  # type: ignore[arg-type]
            dpath = ddir / difference_name(n)
            diff_sum = write_difference_table(dpath, diff).hex()
            difference = rel(dpath)
        tpath_rel, _t1, t1sum, base_rel = self._gen_first[target]
        return PointDisk(
            target=target, source=f"/nonexistent/{self.name}-{target}.img",
            format=self.disk_format, virtual_size=len(data), block_size=self.block_size,
            volume=rel(final), volume_format=self.base_format if first else "qcow2",
            base=base_rel, base_format=self.base_format, table=tpath_rel,
            table1_digest=t1sum.hex(), difference=difference, difference_digest=diff_sum,
            table_digest=table.body_digest().hex(),
            blocks=BlockCounts(total=stats.total, read=stats.read, holes=stats.holes,
                               changed=stats.changed, zero=stats.zero),
            bytes_written=stats.bytes_written, seconds={"read": stats.seconds})

    def volume(self, point: int, target: str) -> Path:
        return self.store.resolve(self.store.read_manifest(point).disk(target).volume)


def read_image(path: Path, fmt: str) -> bytes:
    out = path.with_name(path.name + ".check.raw")
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(path), str(out)],
                   check=True, capture_output=True)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def data_offset(path: Path, fmt: str, within: Tuple[int, int] = (0, 1 << 62)) -> int:
    """The host offset (in the file) of some guest byte stored in ``path`` itself,
    whose guest offset lies in ``within``; from ``qemu-img map``."""
    out = subprocess.run(["qemu-img", "map", "--output=json", "-f", fmt, str(path)],
                         check=True, capture_output=True, text=True).stdout
    for ext in json.loads(out):
        if ext.get("data") and ext.get("depth", 0) == 0 and "offset" in ext:
            lo, hi = max(ext["start"], within[0]), min(ext["start"] + ext["length"], within[1])
            if lo < hi:
                return int(ext["offset"]) + (lo - ext["start"])
    raise AssertionError(f"no data extent of {path} in {within}")


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))
        f.flush()
        os.fsync(f.fileno())


def patterned(size: int, seed: int) -> bytearray:
    rnd = random.Random(seed)
    return bytearray(rnd.getrandbits(8) for _ in range(size))


def three_points(tmp_path: Path, base_format: str = "qcow2") -> SyntheticPool:
    """Three points of two disks: vda 1 MiB + 20 KiB (a short last block), vdb 512 KiB.

    Point 2 changes blocks and zeroes one; point 3 zeroes data of the base and writes
    past it, so a restore of point 3 that showed the base through would fail.
    """
    sp = SyntheticPool(tmp_path / "pool", base_format=base_format)
    vda = bytearray(MiB + 20 * KiB)
    vda[0:3 * BS] = patterned(3 * BS, 1)
    vda[-5000:] = b"\x5a" * 5000
    vdb = bytearray(512 * KiB)
    vdb[BS:2 * BS] = b"\xab" * BS
    sp.add_point({"vda": bytes(vda), "vdb": bytes(vdb)})
    vda[BS:BS + 10] = b"0123456789"
    vda[2 * BS:3 * BS] = bytes(BS)  # data became zeros
    vda[5 * BS:6 * BS] = b"\x11" * BS
    sp.add_point({"vda": bytes(vda), "vdb": bytes(vdb)})
    vda[0:BS] = bytes(BS)
    vdb[3 * BS:3 * BS + 1] = b"\x01"
    vda[-1:] = b"\x00"
    sp.add_point({"vda": bytes(vda), "vdb": bytes(vdb)})
    return sp


# --- tests on a synthetic pool -----------------------------------------------------------------

@pytest.mark.parametrize("base_format", ["qcow2", "raw"])
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_every_point_restores_exactly(tmp_path: Path, base_format: str, fmt: str) -> None:
    sp = three_points(tmp_path, base_format)
    for n, contents in sp.contents.items():
        out = tmp_path / f"out-{n}"
        events = []
        result = restore(sp.name, sp.pool, point=n, to=out, fmt=fmt, progress=events.append)
        assert result.ok and result.point == n
        assert {d.target for d in result.disks} == set(contents)
        for d in result.disks:
            assert d.verified and d.path == str(out / f"{d.target}.{fmt}")
            assert read_image(Path(d.path), fmt) == contents[d.target]
            assert os.stat(d.path).st_mode & 0o777 == 0o600
        # raw: one pass copies and checks; qcow2: qemu-img convert, then the check
        phases = ("restore",) if fmt == "raw" else ("restore", "check")
        assert {(e.disk, e.phase) for e in events if e.finished} == {
            (t, ph) for t in contents for ph in phases}
        last = {(e.disk, e.phase): e for e in events}
        assert all(e.finished and e.done == e.total for e in last.values())
        assert sorted(os.listdir(out)) == sorted(f"{t}.{fmt}" for t in contents)


def test_restore_is_sparse_and_latest_by_default(tmp_path: Path) -> None:
    sp = SyntheticPool(tmp_path / "pool")
    big = bytearray(32 * MiB)
    big[MiB:MiB + BS] = b"\x77" * BS
    sp.add_point({"vda": bytes(big)})
    big[8 * MiB:8 * MiB + 1] = b"\x01"
    last = sp.add_point({"vda": bytes(big)})
    result = restore(sp.name, sp.pool, to=tmp_path / "out")
    assert result.point == last
    (disk,) = result.disks
    assert read_image(Path(disk.path), "raw") == bytes(big)
    assert disk.allocated < 2 * MiB, "zero regions must stay holes"


def test_selected_disk_only(tmp_path: Path) -> None:
    sp = three_points(tmp_path)
    result = restore(sp.name, sp.pool, point=2, disks=["vdb"], to=tmp_path / "out")
    assert [d.target for d in result.disks] == ["vdb"]
    assert os.listdir(tmp_path / "out") == ["vdb.raw"]
    with pytest.raises(NotFoundError):
        restore(sp.name, sp.pool, point=2, disks=["vdz"], to=tmp_path / "out2")
    with pytest.raises(NotFoundError):
        restore(sp.name, sp.pool, point=9, to=tmp_path / "out2")


def test_existing_file_needs_force(tmp_path: Path) -> None:
    sp = three_points(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "vda.raw").write_bytes(b"precious")
    with pytest.raises(UsageError, match="--force"):
        restore(sp.name, sp.pool, point=1, to=out)
    assert (out / "vda.raw").read_bytes() == b"precious"
    assert not (out / "vdb.raw").exists(), "a refused restore writes nothing"
    result = restore(sp.name, sp.pool, point=1, to=out, force=True)
    assert result.ok
    assert read_image(out / "vda.raw", "raw") == sp.contents[1]["vda"]


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_damaged_base_is_caught_and_kept_unverified(tmp_path: Path, fmt: str) -> None:
    sp = three_points(tmp_path)
    base = sp.volume(1, "vda")
    flip_byte(base, data_offset(base, "qcow2", (0, BS)))
    out = tmp_path / "out"
    with pytest.raises(VerifyMismatchError) as info:
        restore(sp.name, sp.pool, point=2, to=out, fmt=fmt)
    msg = str(info.value)
    assert "vda: 1 of 17 blocks differ: 0 (offset 0)" in msg
    assert sorted(os.listdir(out)) == [f"vda.{fmt}" + UNVERIFIED_SUFFIX, f"vdb.{fmt}"]
    result = info.value.result  # type: ignore[attr-defined]
    vda = next(d for d in result.disks if d.target == "vda")
    assert not vda.verified and vda.mismatch.indexes == (0,)
    # the evidence: the whole image as the damaged pool reads, wrong in block 0 only
    kept = read_image(Path(vda.path), fmt)
    expected = sp.contents[2]["vda"]
    assert len(kept) == len(expected) and kept[BS:] == expected[BS:] and kept[:BS] != expected[:BS]
    # point 3 rewrote block 0 in its own volume: it does not read the damaged byte
    assert restore(sp.name, sp.pool, point=3, to=tmp_path / "out3", fmt=fmt).ok


def test_damaged_point_volume_is_caught(tmp_path: Path) -> None:
    sp = three_points(tmp_path)
    volume = sp.volume(2, "vda")
    flip_byte(volume, data_offset(volume, "qcow2", (5 * BS, 6 * BS)) + 7)
    with pytest.raises(VerifyMismatchError, match=r"vda: 1 of 17 blocks differ: 5 "):
        restore(sp.name, sp.pool, point=2, to=tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["vda.raw" + UNVERIFIED_SUFFIX, "vdb.raw"]


def test_damaged_difference_table_refused_before_writing(tmp_path: Path) -> None:
    sp = three_points(tmp_path)
    m = sp.store.read_manifest(2)
    diff = sp.store.resolve(m.disk("vda").difference)
    flip_byte(diff, 70)
    from vmsnapbackup.errors import CorruptFileError

    with pytest.raises(CorruptFileError, match="diff-000002"):
        restore(sp.name, sp.pool, point=2, to=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt,phase", [("raw", "restore"), ("qcow2", "restore"),
                                       ("qcow2", "check")])
def test_interrupted_restore_leaves_nothing(tmp_path: Path, fmt: str, phase: str) -> None:
    import signal

    from vmsnapbackup.errors import BackupInterruptedError

    sp = three_points(tmp_path)
    out = tmp_path / "out"

    def interrupt(ev) -> None:  # type: ignore[no-untyped-def]
        if ev.phase == phase and ev.disk == "vdb" and not ev.finished:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(BackupInterruptedError):
        restore(sp.name, sp.pool, point=2, to=out, fmt=fmt, progress=interrupt)
    assert os.listdir(out) == [f"vda.{fmt}"], "vda was done; vdb's temp file is gone"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_full_target_fails_cleanly(tmp_path: Path) -> None:
    from faults import tmpfs

    from vmsnapbackup.errors import PoolFullError

    sp = SyntheticPool(tmp_path / "pool")
    data = bytearray(4 * MiB)
    data[:] = patterned(4 * MiB, 3)
    sp.add_point({"vda": bytes(data)})
    with tmpfs(tmp_path / "small", "1m") as small:
        with pytest.raises(PoolFullError, match="No space left"):
            restore(sp.name, sp.pool, to=small / "out")
        assert os.listdir(small / "out") == [], "the partial image is removed"


def test_define_rewrites_identity(tmp_path: Path, libvirt_conn) -> None:  # type: ignore[no-untyped-def]
    sp = three_points(tmp_path)
    name = f"vsb-test-restored-{uuidlib.uuid4().hex[:8]}"
    out = tmp_path / "out"
    try:
        result = restore(sp.name, sp.pool, point=3, to=out, fmt="qcow2", define=name)
        assert result.defined is not None and result.defined.name == name
        dom = libvirt_conn.lookupByName(name)
        assert not dom.isActive()
        assert dom.UUIDString() == result.defined.uuid != sp.uuid
        from vmsnapbackup.adapters.domainxml import parse_disks

        xml = dom.XMLDesc(0)
        disks = {d.target: d for d in parse_disks(xml)}
        assert disks["vda"].source == str(out / "vda.qcow2") and disks["vda"].format == "qcow2"
        assert disks["vdb"].source == str(out / "vdb.qcow2")
        assert "52:54:00:12:34:56" not in xml and "<mac address=" in xml
        with pytest.raises(UsageError, match="already exists"):
            restore(sp.name, sp.pool, point=3, to=tmp_path / "out2", define=name)
        assert not (tmp_path / "out2").exists()
    finally:
        import libvirt

        try:
            libvirt_conn.lookupByName(name).undefine()
        except libvirt.libvirtError:
            pass


def test_running_domain_disk_is_never_replaced(tmp_path: Path, make_domain) -> None:  # type: ignore[no-untyped-def]
    from domains import DiskSpec

    td = make_domain(disks=[DiskSpec("vda", "raw", 2 * MiB)], start=True)
    sp = SyntheticPool(tmp_path / "pool")
    sp.add_point({"vda": bytes(2 * MiB)})
    # the domain's disk is <workdir>/vda.img; a restore target that resolves to it
    out = tmp_path / "out"
    out.mkdir()
    (out / "vda.raw").symlink_to(td.disks["vda"])
    before = td.disks["vda"].stat()
    with pytest.raises(UsageError, match=f"running domain {td.name}"):
        restore(sp.name, sp.pool, to=out, force=True)
    after = td.disks["vda"].stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert os.listdir(out) == ["vda.raw"]


# --- restores of real backups of a running domain --------------------------------------------

def three_backups(dom, pool: Path) -> Dict[int, Dict[str, bytes]]:  # type: ignore[no-untyped-def]
    """Three points of ``running_domain`` (vda qcow2 64 MiB, vdb raw 32 MiB + 12 KiB) with
    writes between them, a zero write and a write into vdb's short last block included.

    Blocks of vda at 64-128 KiB and vdb's tail are written before point 1 and never again:
    damage there in a base volume shows in every point of the generation.
    """
    from vmsnapbackup.workflows.backup import backup

    model = DiskModel(dom)
    expected: Dict[int, Dict[str, bytes]] = {}
    model.write("vda", 0, 256 * KiB, 0xAA)
    model.write("vdb", 1 * MiB, 64 * KiB, 0x11)
    model.write("vdb", 32 * MiB, 12 * KiB, 0x77)
    expected[backup(dom.name, pool).point] = model.snapshot()
    model.write("vda", 128 * KiB, 64 * KiB, 0xBB)
    model.zero("vda", 0, 64 * KiB)
    model.write("vdb", 4 * MiB + 512, 4 * KiB, 0x22)
    expected[backup(dom.name, pool).point] = model.snapshot()
    model.write("vda", 60 * MiB, 1 * MiB, 0xCC)
    model.zero("vdb", 1 * MiB, 64 * KiB)
    expected[backup(dom.name, pool).point] = model.snapshot()
    assert sorted(expected) == [1, 2, 3]
    return expected


def test_restores_of_backups_equal_the_disk_at_each_point(running_domain, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                          capsys) -> None:
    from vmsnapbackup.cli import main
    from vmsnapbackup.errors import ExitCode

    pool = tmp_path / "pool"
    expected = three_backups(running_domain, pool)
    for n, disks in expected.items():
        for fmt in ("raw", "qcow2"):
            out = tmp_path / f"p{n}-{fmt}"
            result = restore(running_domain.name, pool, point=n, to=out, fmt=fmt)
            assert result.ok and [d.target for d in result.disks] == ["vda", "vdb"]
            for d in result.disks:
                got = read_image(Path(d.path), fmt)
                if got != disks[d.target]:
                    first = next(i for i, (a, b) in enumerate(zip(got, disks[d.target]))
                                 if a != b) if len(got) == len(disks[d.target]) else -1
                    pytest.fail(f"point {n} {d.target} ({fmt}) differs at byte {first}")
                assert d.allocated < 8 * MiB, "restored images are sparse"
            shutil.rmtree(out)
    # the CLI: latest point, then the same again without and with --force
    out = tmp_path / "cli"
    args = ["--pool", str(pool), "restore", running_domain.name, "--to", str(out)]
    assert main(args + ["--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["point"] == 3 and doc["ok"] and {d["verified"] for d in doc["disks"]} == {True}
    assert main(args + ["--disk", "vdb"]) == ExitCode.USAGE
    assert "--force" in capsys.readouterr().err
    assert main(args + ["--disk", "vdb", "--point", "1", "--force"]) == 0
    assert "vdb: " in capsys.readouterr().out
    assert read_image(out / "vdb.raw", "raw") == expected[1]["vdb"]
    assert read_image(out / "vda.raw", "raw") == expected[3]["vda"]


def test_define_a_restored_domain(running_domain, tmp_path: Path, libvirt_conn) -> None:  # type: ignore[no-untyped-def]
    import libvirt
    from vmsnapbackup.adapters.domainxml import parse_disks
    from vmsnapbackup.workflows.backup import backup

    running_domain.write("vda", 0, 64 * KiB, 0x5C)
    pool = tmp_path / "pool"
    backup(running_domain.name, pool)
    name = f"vsb-test-copy-{uuidlib.uuid4().hex[:8]}"
    out = tmp_path / "copy"
    try:
        result = restore(running_domain.name, pool, to=out, fmt="qcow2", define=name)
        dom = libvirt_conn.lookupByName(name)
        assert not dom.isActive(), "a restore never starts the domain"
        assert dom.UUIDString() == result.defined.uuid != running_domain.uuid
        disks = {d.target: d for d in parse_disks(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))}
        assert {t: (d.source, d.format) for t, d in disks.items()} == {
            "vda": (str(out / "vda.qcow2"), "qcow2"), "vdb": (str(out / "vdb.qcow2"), "qcow2")}
        # the original is untouched and still running on its own disks
        assert running_domain.is_active()
        assert running_domain.current_source("vda") == running_domain.disks["vda"]
    finally:
        try:
            libvirt_conn.lookupByName(name).undefine()
        except libvirt.libvirtError:
            pass


def test_restore_finds_a_damaged_base_of_a_backup(running_domain, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pool = tmp_path / "pool"
    expected = three_backups(running_domain, pool)
    store = Pool.open(pool).domain(running_domain.uuid)
    base = store.resolve(store.read_manifest(1).disk("vda").base)
    flip_byte(base, data_offset(base, "qcow2", (64 * KiB, 128 * KiB)) + 100)
    with pytest.raises(VerifyMismatchError, match=r"vda: 1 of 1024 blocks differ: 1 "):
        restore(running_domain.name, pool, point=3, to=tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["vda.raw.unverified", "vdb.raw"]
    assert read_image(tmp_path / "out" / "vdb.raw", "raw") == expected[3]["vdb"]


def test_restore_into_a_libvirt_storage_pool(tmp_path: Path, make_domain, libvirt_conn) -> None:  # type: ignore[no-untyped-def]
    sp = three_points(tmp_path)
    target = make_domain.scratch_dir("vsb-restore-pool")
    name = f"vsbtest-rp-{uuidlib.uuid4().hex[:8]}"
    lpool = libvirt_conn.storagePoolCreateXML(
        f"<pool type='dir'><name>{name}</name><target><path>{target}</path></target></pool>", 0)
    try:
        result = restore(sp.name, sp.pool, point=2, pool_volume=name, fmt="qcow2")
        assert result.storage_pool == name and result.directory == str(target)
        assert sorted(lpool.listVolumes()) == ["vm1-vda.qcow2", "vm1-vdb.qcow2"]
        for t in ("vda", "vdb"):
            vol = lpool.storageVolLookupByName(f"vm1-{t}.qcow2")
            assert read_image(Path(vol.path()), "qcow2") == sp.contents[2][t]
        with pytest.raises(UsageError, match="exactly one"):
            restore(sp.name, sp.pool, pool_volume=name, to=tmp_path / "x")
        with pytest.raises(UsageError, match="--force"):
            restore(sp.name, sp.pool, point=2, pool_volume=name, fmt="qcow2")
    finally:
        lpool.destroy()
