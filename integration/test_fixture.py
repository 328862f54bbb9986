"""The throwaway-domain fixture does what the other integration tests rely on:
guest-like writes land in the running disks exactly, read_image() shows them,
and nothing of a domain survives its factory's close()."""
from __future__ import annotations

import logging
import subprocess

import libvirt
import pytest
from domains import QEMU_LOG_DIR, DiskSpec, DomainFactory, FixtureError, TestDomain

pytestmark = pytest.mark.integration

KiB = 2**10
MiB = 2**20

log = logging.getLogger(__name__)


def _expect(size: int, writes: list) -> bytes:
    """Apply (offset, length, byte) writes to a zero image, in order."""
    image = bytearray(size)
    for offset, length, byte in writes:
        image[offset : offset + length] = bytes([byte]) * length
    return bytes(image)


def test_writes_land_exactly_and_read_back(running_domain: TestDomain) -> None:
    td = running_domain
    assert td.is_active()
    log.info("define %.3f s, start %.3f s (%s)", td.timings["define"], td.timings["start"], td.virt_type)
    vda_size = 64 * MiB
    vdb_size = 32 * MiB + 12 * KiB
    vda_writes = [
        (0, 64 * KiB, 0xAA),
        (1 * MiB + 512, 3 * KiB, 0x5C),  # unaligned to 4 KiB, crosses a 4 KiB boundary
        (vda_size - 4 * KiB, 4 * KiB, 0x11),  # the last 4 KiB
        (8 * MiB, 256 * KiB, 0x77),
    ]
    vdb_writes = [
        (4 * KiB, 8 * KiB, 0xFF),
        (32 * MiB, 12 * KiB, 0x33),  # the partial tail past the last 64 KiB boundary
        (vdb_size - 4 * KiB, 4 * KiB, 0x44),  # the last 4 KiB, overwriting part of it
        (16 * MiB, 1 * MiB, 0xEE),
    ]
    for off, length, byte in vda_writes:
        td.write("vda", off, length, byte)
    for off, length, byte in vdb_writes:
        td.write("vdb", off, length, byte)
    # zeroes over written data must read back as zeroes, on both formats
    td.write_zeroes("vda", 8 * MiB + 64 * KiB, 64 * KiB)
    td.write_zeroes("vdb", 16 * MiB, 4 * KiB)
    vda_writes.append((8 * MiB + 64 * KiB, 64 * KiB, 0))
    vdb_writes.append((16 * MiB, 4 * KiB, 0))

    td.shutoff()
    assert not td.is_active()

    vda = td.read_image("vda")
    vdb = td.read_image("vdb")
    assert len(vda) == vda_size
    assert len(vdb) == vdb_size
    assert vda == _expect(vda_size, vda_writes)
    assert vdb == _expect(vdb_size, vdb_writes)


def test_write_past_end_is_reported(running_domain: TestDomain) -> None:
    """A write the disk refuses must not pass silently (the fixture reads QEMU's verdict)."""
    with pytest.raises(FixtureError, match="failed"):
        running_domain.write("vdb", 32 * MiB + 8 * KiB, 8 * KiB, 0x01)


def test_write_to_unknown_disk_is_reported(running_domain: TestDomain) -> None:
    with pytest.raises(FixtureError):
        running_domain.write("vdz", 0, 512, 0x01)


def test_read_image_refuses_running_domain(running_domain: TestDomain) -> None:
    with pytest.raises(FixtureError, match="shut-off"):
        running_domain.read_image("vda")


def test_backing_chain_disk_reads_through(make_domain: DomainFactory) -> None:
    """A qcow2 on a backing image shows the backing's data where it was not written."""
    base = make_domain.scratch_dir() / "base.raw"
    base.write_bytes(b"\x42" * (1 * MiB))
    td = make_domain(disks=[DiskSpec("vda", "qcow2", 1 * MiB, backing=str(base))], start=True)
    td.write("vda", 64 * KiB, 64 * KiB, 0x99)
    td.shutoff()
    got = td.read_image("vda")
    assert got == b"\x42" * (64 * KiB) + b"\x99" * (64 * KiB) + b"\x42" * (1 * MiB - 128 * KiB)
    chain = subprocess.run(
        ["qemu-img", "info", "--output=json", str(td.disks["vda"])],
        check=True, stdout=subprocess.PIPE, text=True,
    ).stdout
    assert str(base) in chain  # the backing image was left untouched
    assert base.read_bytes() == b"\x42" * (1 * MiB)


def test_factory_close_removes_everything(libvirt_conn: libvirt.virConnect) -> None:
    factory = DomainFactory(libvirt_conn)
    try:
        running = factory(disks=[DiskSpec("vda", "qcow2", 1 * MiB)], start=True)
        stopped = factory(disks=[DiskSpec("vda", "raw", 1 * MiB)], start=False)
        running.write("vda", 0, 4 * KiB, 0x12)
        made = [(td.name, td.uuid, td.workdir) for td in (running, stopped)]
        for name, _, workdir in made:
            assert libvirt_conn.lookupByName(name) is not None
            assert workdir.is_dir() and (workdir.stat().st_mode & 0o777) == 0o755
        assert (QEMU_LOG_DIR / f"{running.name}.log").exists()
    finally:
        factory.close()
    for name, uuid, workdir in made:
        with pytest.raises(libvirt.libvirtError) as exc:
            libvirt_conn.lookupByUUIDString(uuid)
        assert exc.value.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN
        assert not workdir.exists()
        assert not (QEMU_LOG_DIR / f"{name}.log").exists()
    assert factory.domains == []


def test_factory_close_removes_scratch_dirs(libvirt_conn: libvirt.virConnect) -> None:
    factory = DomainFactory(libvirt_conn)
    try:
        scratch = factory.scratch_dir()
        (scratch / "base.raw").write_bytes(b"\0" * 512)
        assert (scratch.stat().st_mode & 0o777) == 0o755
    finally:
        factory.close()
    assert not scratch.exists()
