"""mount and boot of an encrypted pool's points on the real stack (FORMAT.md §15.2).

mount --key-file serves the plain bytes of a point (its LUKS chain opened by the
daemon with the pool key read from the file); boot --key-file runs a new domain
whose unprivileged QEMU reads the point through the boot daemon, which opened the
LUKS chain the same way.  The key is never on a command line, the pool is left
bit-for-bit unchanged, and without the key (or with another one) neither serves
anything: one line and its exit code.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Dict

import pytest
from domains import QEMU_LOG_DIR, DiskModel, TestDomain
from test_access import convert, daemon_gone, pool_state, qemu_io_read, read_all
from test_pool_encrypt import _key

from vmsnapbackup.cli import main
from vmsnapbackup.errors import ExitCode
from vmsnapbackup.workflows import access
from vmsnapbackup.workflows.backup import backup

pytestmark = pytest.mark.integration

KiB = 1024
MiB = 1024 * KiB
KEY_TEXT = b"correct horse battery staple, pool key 0001\n"


class EncryptedPoints:
    """Two points of the running domain in an encrypted pool (a base, then a point
    volume over it), and the bytes each disk had at each."""

    def __init__(self, dom: TestDomain, tmp_path: Path) -> None:
        self.dom, self.pool = dom, tmp_path / "pool"
        self.key = _key(tmp_path / "pool.key", KEY_TEXT)
        self.wrong = _key(tmp_path / "other.key", b"another key file of at least 32 bytes\n")
        model = DiskModel(dom)
        model.write("vda", 0, 1 * MiB, 0x11)
        model.write("vdb", 32 * MiB, 12 * KiB, 0x22)
        assert backup(dom.name, self.pool, encrypt=True, key_file=str(self.key)).point == 1
        self.expected: Dict[int, Dict[str, bytes]] = {1: model.snapshot()}
        model.write("vda", 512 * KiB, 1 * MiB, 0x33)
        model.write("vdb", 4 * MiB, 64 * KiB, 0x44)
        assert backup(dom.name, self.pool, key_file=str(self.key)).point == 2
        self.expected[2] = model.snapshot()
        model.write("vda", 0, 64 * KiB, 0x55)           # after the last point: in none


@pytest.fixture
def points(running_domain: TestDomain, tmp_path: Path) -> EncryptedPoints:
    return EncryptedPoints(running_domain, tmp_path)


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    rc = main(argv)
    return rc, capsys.readouterr().err.strip().splitlines()


def _cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


def test_mount_of_an_encrypted_pool(points: EncryptedPoints,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    before = pool_state(points.pool)
    for point in (1, 2):
        for target in ("vda", "vdb"):
            with access.mount_point(points.dom.name, points.pool, point, target,
                             key_file=str(points.key)) as m:
                assert m.size == len(points.expected[point][target])
                assert read_all(m.uri) == points.expected[point][target], (point, target)
    # without the key, or with another: one line, its exit code, no export left behind
    sock = points.pool.parent / "m.sock"
    for extra, code in (([], ExitCode.USAGE),
                        (["--key-file", str(points.wrong)], ExitCode.INTEGRITY)):
        rc, err = _cli(["--pool", str(points.pool), "mount", points.dom.name, "--point", "2",
                        "--disk", "vda", "--socket", str(sock), *extra], capsys)
        assert rc == code and len(err) == 1, (extra, rc, err)
        assert not sock.exists()
    assert pool_state(points.pool) == before


def test_boot_of_an_encrypted_pool(points: EncryptedPoints, make_domain, libvirt_conn,  # type: ignore[no-untyped-def]
                                   tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    overlay_root = make_domain.scratch_dir("vsb-boot")
    name = f"{points.dom.name}-eboot"
    before = pool_state(points.pool)
    base = ["--pool", str(points.pool), "boot", points.dom.name, "--point", "2", "--name",
            name, "--overlay-dir", str(overlay_root)]
    for extra, code in (([], ExitCode.USAGE),
                        (["--key-file", str(points.wrong)], ExitCode.INTEGRITY)):
        rc, err = _cli([*base, *extra], capsys)
        assert rc == code and len(err) == 1, (extra, rc, err)
        assert not (overlay_root / name).exists()
        assert name not in [d.name() for d in libvirt_conn.listAllDomains(0)]

    result = access.boot_point(points.dom.name, points.pool, 2, name, overlay_dir=overlay_root,
                        key_file=str(points.key))
    resumed = None
    try:
        assert result.started
        # the daemon reads the key from its file: the path on its command line, not the key
        argv = _cmdline(result.daemon_pid)
        assert str(points.key).encode() in argv and KEY_TEXT.strip() not in argv
        note = json.loads((overlay_root / name / access.BOOT_NOTE).read_text())
        assert note["version"] == 2 and note["key_file"] == str(points.key)
        assert KEY_TEXT.strip().decode() not in json.dumps(note)
        dom = libvirt_conn.lookupByName(name)
        assert dom.isActive()
        # the boot domain's unprivileged QEMU reads the point's bytes through the export
        assert qemu_io_read(dom, "virtio-disk0", 512 * KiB, 1 * MiB, 0x33).startswith(
            "read 1048576/1048576")
        assert qemu_io_read(dom, "virtio-disk1", 32 * MiB, 12 * KiB, 0x22).startswith(
            "read 12288/12288")
        assert "verification failed" in qemu_io_read(dom, "virtio-disk0", 0, 64 * KiB, 0x55)
        dom.destroy()
        # every byte: each overlay read through its backing (the boot export)
        for target, overlay in result.overlays.items():
            got = convert(overlay, tmp_path / "o.raw", "qcow2")
            assert got == points.expected[2][target], target
        # after a host reboot: resume opens the chain again with the note's key file
        os.kill(result.daemon_pid, signal.SIGKILL)
        resumed = access.resume_boot(name, overlay_dir=overlay_root)
        assert resumed.started and dom.isActive()
        assert qemu_io_read(dom, "virtio-disk0", 512 * KiB, 1 * MiB, 0x33).startswith(
            "read 1048576/1048576")
    finally:
        gone = access.discard_boot(name, overlay_dir=overlay_root)
    assert gone.domain_removed
    assert daemon_gone(result.daemon_pid)
    assert resumed is not None and daemon_gone(resumed.daemon_pid)
    assert not (overlay_root / name).exists()
    assert pool_state(points.pool) == before
    (QEMU_LOG_DIR / f"{name}.log").unlink(missing_ok=True)
