"""Issue 18 item 2: a running domain with a block-device disk backs up without
``--overlay-dir`` (its overlay goes to a per-domain directory below libvirt's images
directory, and the log says where), a failed attempt before anything is written burns
no point number, and the result and ``list`` say the raw block disk is read whole."""
from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from domains import DiskSpec, DomainFactory, TestDomain

from vmsnapbackup.cli import main
from vmsnapbackup.core.defaults import BLOCK_OVERLAY_ROOT
from vmsnapbackup.core.pool import Pool
from vmsnapbackup.errors import ExitCode

pytestmark = pytest.mark.integration

if not shutil.which("losetup"):
    pytest.skip("needs losetup for a block-device disk", allow_module_level=True)

BLOCK_SIZE = 16 * 2**20


@pytest.fixture
def block_domain(make_domain: DomainFactory) -> Iterator[tuple[TestDomain, str]]:
    """A running domain: qcow2 vda, and vdb a raw loop device with data on it."""
    scratch = make_domain.scratch_dir("vsb-block")
    backing = scratch / "vdb.raw"
    with open(backing, "wb") as f:
        f.truncate(BLOCK_SIZE)
        f.seek(3 * 2**20)
        f.write(b"\x5a" * 2**20)
    loop = subprocess.run(["losetup", "--find", "--show", str(backing)], check=True,
                          capture_output=True, text=True).stdout.strip()
    td = None
    try:
        td = make_domain(disks=[DiskSpec("vda")], start=False)
        td.dom.attachDeviceFlags(
            "<disk type='block' device='disk'><driver name='qemu' type='raw'/>"
            f"<source dev='{loop}'/><target dev='vdb' bus='virtio'/></disk>",
            libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        td.start()
        yield td, loop
    finally:
        if td is not None:
            td.shutoff()   # QEMU lets go of the loop device
        subprocess.run(["losetup", "-d", loop], check=False)
        if td is not None:
            shutil.rmtree(Path(BLOCK_OVERLAY_ROOT) / td.uuid, ignore_errors=True)


def test_block_disk_backs_up_without_overlay_dir(
        block_domain: tuple[TestDomain, str], tmp_path: Path, caplog, capsys) -> None:  # type: ignore[no-untyped-def]
    td, loop = block_domain
    pool = tmp_path / "pool"
    place = Path(BLOCK_OVERLAY_ROOT) / td.uuid

    # a failed attempt before anything is written: an overlay directory that is not there
    rc = main(["--pool", str(pool), "backup", td.name, "--overlay-dir",
               str(tmp_path / "missing")])
    assert rc == int(ExitCode.USAGE)
    assert "--overlay-dir" in capsys.readouterr().err

    caplog.set_level(logging.INFO, logger="vmsnapbackup")
    rc = main(["--pool", str(pool), "backup", td.name])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "domain" in out.out and "point 1 " in out.out   # the failed try burnt no number
    assert "raw block device: every backup reads the whole device" in out.out
    assert str(place) in caplog.text and "--overlay-dir" in caplog.text
    # back on the device, the overlay gone, the data in the pool
    live = td.live_xml()
    assert f"<source dev='{loop}'" in live and "vmsnapbackup-" not in live
    assert not place.exists()     # the default overlay directory goes with its overlay
    store = Pool.open(pool).find_domain(td.name)
    manifest = store.read_manifest(1)
    assert {d.target for d in manifest.disks} == {"vda", "vdb"}
    vdb = next(d for d in manifest.disks if d.target == "vdb")
    assert vdb.source == loop and vdb.bytes_written >= 2**20

    assert main(["--pool", str(pool), "list", td.name]) == 0
    listing = capsys.readouterr().out
    assert "vdb raw (image or block device): every backup reads all of it" in listing
