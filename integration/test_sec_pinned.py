"""A point volume's backing chain is pinned from the manifest (issue 12, DESIGN §8).

The attacker can write the pool's storage and rewrites a point volume's qcow2
header (``qemu-img rebase -u``) so that it names another qcow2 -- one holding
different data, as a host file would.  Every reader (restore by export and by
``qemu-img convert``, verify, mount, boot) must then refuse the point, or read it
through the pinned base; never return the other file's data.  Each test first
shows the attack works against a reader that follows the header.
"""
from __future__ import annotations

import os
import subprocess
import sys
import uuid as uuidlib
from pathlib import Path

import pytest
from test_restore import MiB, SyntheticPool, read_image, three_points

from vmsnapbackup.adapters.nbdclient import NbdClient
from vmsnapbackup.adapters.pinnedchain import PinnedImage, json_filename
from vmsnapbackup.adapters.qemuimg import QemuImg
from vmsnapbackup.adapters.storagedaemon import StorageDaemon
from vmsnapbackup.errors import CorruptFileError, ExitCode
from vmsnapbackup.workflows.access import boot_point, mount_point
from vmsnapbackup.workflows.restore import restore
from vmsnapbackup.workflows.verify import verify

pytestmark = pytest.mark.integration

EVIL_BYTE = 0xEE


def evil_image(sp: SyntheticPool, size: int, fmt: str = "qcow2") -> Path:
    """Another image of the same size, full of a byte no point holds."""
    raw = sp.scratch / "evil.raw"
    raw.write_bytes(bytes([EVIL_BYTE]) * size)
    if fmt == "raw":
        return raw
    out = sp.scratch / "evil.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out)],
                   check=True, capture_output=True)
    return out


def rebase_header(volume: Path, backing: Path, fmt: str) -> None:
    subprocess.run(["qemu-img", "rebase", "-u", "-b", str(backing), "-F", fmt, str(volume)],
                   check=True, capture_output=True)


def followed(volume: Path) -> bytes:
    """What a reader that follows the header gets (the attack's proof)."""
    return read_image(volume, "qcow2")


@pytest.fixture
def tampered(tmp_path: Path) -> tuple[SyntheticPool, Path]:
    """Three points; point 2's vda header now names the attacker's image."""
    sp = three_points(tmp_path)
    vol = sp.volume(2, "vda")
    evil = evil_image(sp, len(sp.contents[2]["vda"]))
    rebase_header(vol, evil, "qcow2")
    got = followed(vol)
    assert got != sp.contents[2]["vda"] and bytes([EVIL_BYTE]) * 4096 in got  # attack works
    return sp, vol


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_restore_refuses_a_rebased_point(tampered: tuple[SyntheticPool, Path], tmp_path: Path,
                                         fmt: str) -> None:
    sp, _vol = tampered
    out = tmp_path / "out"
    with pytest.raises(CorruptFileError, match="not its generation's base volume"):
        restore(sp.name, sp.pool, point=2, to=out, fmt=fmt)
    assert not out.exists() or not any(out.iterdir())   # refused before writing anything
    # the untouched disk of the same point still restores exactly
    restore(sp.name, sp.pool, point=2, to=out, fmt=fmt, disks=["vdb"])
    assert read_image(out / f"vdb.{fmt}", fmt) == sp.contents[2]["vdb"]


def test_cli_restore_one_line_and_integrity_exit(tampered: tuple[SyntheticPool, Path],
                                                 tmp_path: Path) -> None:
    sp, _vol = tampered
    proc = subprocess.run([sys.executable, "-m", "vmsnapbackup", "--pool", str(sp.pool.root),
                           "restore", sp.name, "--point", "2",
                           "--to", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == ExitCode.INTEGRITY, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "Traceback" in ln or "base volume" in ln]
    assert len(lines) == 1 and "Traceback" not in lines[0]


def test_verify_reports_the_rebased_point_damaged(tampered: tuple[SyntheticPool, Path]) -> None:
    sp, _vol = tampered
    report = verify(sp.pool, domain=sp.name)
    status = {p.number: p.status for p in report.domains[0].points}
    assert status == {1: "good", 2: "damaged", 3: "good"}
    text = str(report.to_dict())
    assert "not its generation's base volume" in text


def test_mount_refuses_the_rebased_point(tampered: tuple[SyntheticPool, Path]) -> None:
    sp, _vol = tampered
    with pytest.raises(CorruptFileError, match="not its generation's base volume"), \
            mount_point(sp.name, sp.pool, 2, "vda"):
        pytest.fail("a tampered point was served")
    with mount_point(sp.name, sp.pool, 3, "vda") as m:   # the others still are
        assert m.size == len(sp.contents[3]["vda"])


def test_boot_refuses_the_rebased_point(tampered: tuple[SyntheticPool, Path], tmp_path: Path,
                                        libvirt_conn) -> None:  # type: ignore[no-untyped-def]
    sp, _vol = tampered
    name = f"vsbtest-pin-{uuidlib.uuid4().hex[:8]}"
    with pytest.raises(CorruptFileError, match="not its generation's base volume"):
        boot_point(sp.name, sp.pool, 2, name, start=False, overlay_dir=tmp_path / "boot")
    assert name not in [d.name() for d in libvirt_conn.listAllDomains()]
    assert not (tmp_path / "boot" / name).exists()


def test_rebased_base_volume_is_refused(tmp_path: Path) -> None:
    """A base volume must have no backing file at all."""
    sp = three_points(tmp_path)
    base = sp.store.resolve(sp.store.read_manifest(1).disk("vda").base)
    rebase_header(base, evil_image(sp, len(sp.contents[1]["vda"])), "qcow2")
    with pytest.raises(CorruptFileError, match="where none belongs"):
        restore(sp.name, sp.pool, point=3, to=tmp_path / "out", disks=["vda"])
    report = verify(sp.pool, domain=sp.name)
    assert all(p.status == "damaged" for p in report.domains[0].points)


def test_backing_format_changed_is_refused(tmp_path: Path) -> None:
    """Same backing file, format claimed raw: read as raw it would be the qcow2's bytes."""
    sp = three_points(tmp_path)
    d = sp.store.read_manifest(2).disk("vda")
    rebase_header(sp.volume(2, "vda"), sp.store.resolve(d.base), "raw")
    with pytest.raises(CorruptFileError, match="backing format 'raw'"):
        restore(sp.name, sp.pool, point=2, to=tmp_path / "out", disks=["vda"])


@pytest.mark.parametrize("how", ["export", "convert"])
def test_pinned_open_ignores_the_header(tampered: tuple[SyntheticPool, Path], tmp_path: Path,
                                        how: str) -> None:
    """The pin itself, without the header check: reads go to the manifest's base even
    while the header names the other image (a header changed after the check)."""
    sp, vol = tampered
    d = sp.store.read_manifest(2).disk("vda")
    pinned = PinnedImage(str(vol), "qcow2",
                         PinnedImage(str(sp.store.resolve(d.base)), d.base_format))
    want = sp.contents[2]["vda"]
    if how == "convert":
        out = tmp_path / "out.raw"
        out.touch(mode=0o600)
        os.truncate(out, len(want))
        QemuImg().convert(json_filename(pinned), None, str(out), "raw")
        assert out.read_bytes() == want
        return
    with StorageDaemon(tag="pintest") as qsd:
        exp = qsd._add_export(pinned.path, "qcow2", False, None, pinned=pinned)
        assert exp.socket_path is not None
        with NbdClient.open_unix(exp.socket_path, exp.name) as client:
            buf = bytearray(client.size)
            for off in range(0, client.size, MiB):
                n = min(MiB, client.size - off)
                view = memoryview(buf)[off:off + n]
                client.read_into(off, view)
        assert bytes(buf[:len(want)]) == want
