"""mount and boot on points taken by real backups of a running domain.

mount: the NBD export serves exactly the bytes of ``qemu-img convert`` of the point
volume (and those are the bytes the guest had).  boot: a new domain runs on overlays
over the point, its QEMU (unprivileged) reads the point's data, the overlay read
through its backing gives the point's bytes, and the pool is bit-for-bit, owner,
mode and xattr unchanged after boot + discard.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, Tuple

import libvirt
import libvirt_qemu
import pytest

from domains import QEMU_LOG_DIR, TestDomain

from vmsnapbackup.adapters.nbdclient import NbdClient
from vmsnapbackup.cli import main
from vmsnapbackup.core.pool import Pool
from vmsnapbackup.errors import NotFoundError, UsageError
from vmsnapbackup.workflows.access import (
    BOOT_NOTE,
    boot_point,
    discard_boot,
    mount_point,
    resume_boot,
)
from vmsnapbackup.workflows.backup import backup

pytestmark = pytest.mark.integration

MiB = 2**20


def convert(src: str, out: Path, fmt: str = "") -> bytes:
    argv = ["qemu-img", "convert"] + (["-f", fmt] if fmt else []) + ["-O", "raw", src, str(out)]
    subprocess.run(argv, check=True, capture_output=True)
    data = out.read_bytes()
    out.unlink()
    return data


def read_all(uri: str) -> bytes:
    with NbdClient.open_uri(uri) as c:
        assert c.read_only
        return b"".join(bytes(chunk) for _off, chunk in c.read_chunks([(0, c.size)]))


class Points:
    """Two points of the running domain, and the bytes each disk had at each."""

    def __init__(self, dom: TestDomain, pool: Path) -> None:
        self.dom, self.pool = dom, pool
        model = {t: bytearray(s.size) for t, s in dom.specs.items()}

        def write(t: str, off: int, n: int, pat: int) -> None:
            dom.write(t, off, n, pat)
            model[t][off:off + n] = bytes([pat]) * n

        write("vda", 0, 1 * MiB, 0x11)
        write("vdb", 32 * MiB, 12 * 1024, 0x22)           # the raw disk's odd tail
        assert backup(dom.name, pool).point == 1
        self.expected: Dict[int, Dict[str, bytes]] = {1: {t: bytes(b) for t, b in model.items()}}
        write("vda", 512 * 1024, 1 * MiB, 0x33)
        write("vdb", 4 * MiB, 64 * 1024, 0x44)
        assert backup(dom.name, pool).point == 2
        self.expected[2] = {t: bytes(b) for t, b in model.items()}
        # the guest goes on writing after the last point: not in any point
        write("vda", 0, 64 * 1024, 0x55)
        self.store = Pool.open(pool).domain(dom.uuid)

    def volume(self, point: int, target: str) -> Tuple[str, str]:
        d = self.store.read_manifest(point).disk(target)
        return str(self.store.resolve(d.volume)), d.volume_format


@pytest.fixture
def points(running_domain: TestDomain, tmp_path: Path) -> Points:
    return Points(running_domain, tmp_path / "pool")


def pool_state(root: Path) -> Dict[str, tuple]:
    """Every file and directory of the pool: content digest, owner, mode, xattrs, mtime."""
    out: Dict[str, tuple] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = p.lstat()
            xattrs = tuple(sorted((a, os.getxattr(p, a, follow_symlinks=False))
                                  for a in os.listxattr(p, follow_symlinks=False)))
            digest = None
            if stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
            out[str(p.relative_to(root))] = (digest, st.st_uid, st.st_gid,
                                             stat.S_IMODE(st.st_mode), xattrs, st.st_mtime_ns)
    return out


def daemon_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"


# --- mount ---------------------------------------------------------------------------------------

def test_mount_serves_the_point_volume_bytes(points: Points, tmp_path: Path) -> None:
    for point in (1, 2):
        for target in ("vda", "vdb"):
            volume, fmt = points.volume(point, target)
            want = convert(volume, tmp_path / "c.raw", fmt)
            assert want == points.expected[point][target]
            with mount_point(points.dom.name, points.pool, point, target) as m:
                assert m.size == len(want) and m.export_name == target
                assert read_all(m.uri) == want, (point, target)
                sock = m.socket_path
                assert sock is not None and os.path.exists(sock)
            assert not os.path.exists(sock)


def test_mount_on_a_chosen_socket_path_is_removed_after(points: Points, tmp_path: Path) -> None:
    path = str(tmp_path / "web1.sock")
    with mount_point(points.dom.name, points.pool, 2, "vdb", socket=path) as m:
        assert m.socket_path == path and f"socket={path}" in m.uri
        assert read_all(m.uri) == points.expected[2]["vdb"]
    assert not os.path.lexists(path)
    open(path, "w").close()
    with pytest.raises(UsageError, match="already exists"):
        with mount_point(points.dom.name, points.pool, 2, "vdb", socket=path):
            pass
    with pytest.raises(NotFoundError, match="no disk 'vdz'"):
        with mount_point(points.dom.name, points.pool, 2, "vdz"):
            pass
    with pytest.raises(UsageError, match="--disk"):
        with mount_point(points.dom.name, points.pool, 2):
            pass


def test_mount_on_a_tcp_port_serves_the_point(points: Points) -> None:
    import socket as socketlib

    with socketlib.socket() as probe:      # a free loopback port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with mount_point(points.dom.name, points.pool, 1, "vda", port=port, insecure=True) as m:
        assert m.socket_path is None and m.uri == f"nbd://127.0.0.1:{port}/vda"
        assert read_all(m.uri) == points.expected[1]["vda"]
    with socketlib.socket() as c:
        assert c.connect_ex(("127.0.0.1", port)) != 0, "the port is still served"


def test_cli_mount_runs_until_sigterm_and_cleans_up(points: Points) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmsnapbackup", "--pool", str(points.pool), "mount",
         points.dom.name, "--point", "1", "--disk", "vda", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        text = ""
        doc = None
        while doc is None:
            line = proc.stdout.readline()
            assert line, f"mount ended early: {proc.stderr.read() if proc.stderr else ''}"
            text += line
            try:
                doc = json.loads(text)
            except ValueError:
                continue
        assert doc["point"] == 1 and doc["disk"] == "vda"
        assert read_all(doc["uri"]) == points.expected[1]["vda"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not os.path.exists(doc["socket_path"])
    assert not os.path.exists(os.path.dirname(doc["socket_path"]))


# --- boot ----------------------------------------------------------------------------------------

def qemu_io_read(dom: "libvirt.virDomain", alias: str, offset: int, length: int,
                 pattern: int) -> str:
    """Ask the boot domain's own QEMU to read and compare a pattern; return its verdict."""
    log_path = QEMU_LOG_DIR / f"{dom.name()}.log"
    start = log_path.stat().st_size
    cmd = f'qemu-io -d /machine/peripheral/{alias}/virtio-backend "read -P 0x{pattern:02x} ' \
          f'{offset} {length}"'
    out = libvirt_qemu.qemuMonitorCommand(dom, cmd, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
    assert not out.strip(), out
    import tenacity

    def verdict() -> str:
        with open(log_path, "rb") as f:
            f.seek(start)
            text = f.read().decode("utf-8", "replace")
        for line in text.splitlines():
            if line.startswith(("read ", "Pattern verification failed")):
                return line
        return ""

    return tenacity.Retrying(retry=tenacity.retry_if_result(lambda r: not r),
                             stop=tenacity.stop_after_delay(15),
                             wait=tenacity.wait_exponential(multiplier=0.002, max=0.2))(verdict)


def test_boot_runs_the_point_and_leaves_the_pool_unchanged(points: Points, make_domain,
                                                           libvirt_conn, tmp_path: Path) -> None:
    overlay_root = make_domain.scratch_dir("vsb-boot")
    name = f"{points.dom.name}-boot"
    before = pool_state(points.pool)
    result = boot_point(points.dom.name, points.pool, 2, name, overlay_dir=overlay_root)
    try:
        assert result.started and result.point == 2
        # private from creation: the daemon ran with umask 077, the socket is the QEMU
        # user's alone, the overlays 0600
        with open(f"/proc/{result.daemon_pid}/status") as f:
            assert "Umask:\t0077\n" in f.read()
        assert stat.S_IMODE(os.stat(result.socket).st_mode) == 0o600
        for overlay in result.overlays.values():
            assert stat.S_IMODE(os.stat(overlay).st_mode) == 0o600
        dom = libvirt_conn.lookupByName(name)
        assert dom.isActive() and dom.UUIDString() == result.uuid != points.dom.uuid
        assert points.dom.is_active()                      # the original runs on
        live = ET.fromstring(dom.XMLDesc(0))
        for disk in live.findall("./devices/disk"):
            target = disk.find("target").get("dev")
            assert disk.find("source").get("file") == result.overlays[target]
            assert disk.find("backingStore/source").get("protocol") == "nbd"
        macs = {m.get("address") for m in live.findall("./devices/interface/mac")}
        assert not macs & {m.get("address") for m in
                           ET.fromstring(points.dom.live_xml()).findall(
                               "./devices/interface/mac")}
        # the unprivileged QEMU of the boot domain reads the point's data
        assert qemu_io_read(dom, "virtio-disk0", 512 * 1024, 1 * MiB, 0x33).startswith(
            "read 1048576/1048576")
        assert qemu_io_read(dom, "virtio-disk1", 32 * MiB, 12 * 1024, 0x22).startswith(
            "read 12288/12288")
        # and not the guest's write after the point
        assert "verification failed" in qemu_io_read(dom, "virtio-disk0", 0, 64 * 1024, 0x55)
        dom.destroy()
        for target, overlay in result.overlays.items():
            got = convert(overlay, tmp_path / "o.raw", "qcow2")
            assert got == points.expected[2][target], target
        # a host reboot loses the daemon: resume serves the point again
        os.kill(result.daemon_pid, signal.SIGKILL)
        resumed = resume_boot(name, overlay_dir=overlay_root)
        assert resumed.started and resumed.daemon_pid != result.daemon_pid
        assert dom.isActive()
    finally:
        gone = discard_boot(name, overlay_dir=overlay_root)
    assert gone.domain_removed
    assert name not in [d.name() for d in libvirt_conn.listAllDomains(0)]
    assert daemon_gone(resumed.daemon_pid)
    assert not (overlay_root / name).exists()
    assert os.listdir(overlay_root) == []
    assert pool_state(points.pool) == before
    (QEMU_LOG_DIR / f"{name}.log").unlink(missing_ok=True)


def test_cli_boot_no_start_then_discard(points: Points, make_domain, libvirt_conn,
                                        capsys) -> None:
    overlay_root = make_domain.scratch_dir("vsb-boot")
    name = f"{points.dom.name}-b1"
    before = pool_state(points.pool)
    try:
        assert main(["--pool", str(points.pool), "boot", points.dom.name, "--point", "1",
                     "--name", name, "--no-start", "--no-network", "--overlay-dir",
                     str(overlay_root), "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["started"] is False and doc["name"] == name
        dom = libvirt_conn.lookupByName(name)
        assert not dom.isActive()
        note = json.loads((overlay_root / name / BOOT_NOTE).read_text())
        assert note["uuid"] == dom.UUIDString() and note["source"]["point"] == 1
        # a second boot of that name is refused, and changes nothing
        assert main(["--pool", str(points.pool), "boot", points.dom.name, "--point", "1",
                     "--name", name, "--overlay-dir", str(overlay_root)]) == 2
        assert "already exists" in capsys.readouterr().err
        # the overlay reads as point 1 through the running export
        for target in ("vda", "vdb"):
            got = convert(doc["overlays"][target], overlay_root / "x.raw", "qcow2")
            assert got == points.expected[1][target]
    finally:
        assert main(["boot", "--discard", name, "--overlay-dir", str(overlay_root)]) == 0
    assert "destroyed and undefined" in capsys.readouterr().out
    assert name not in [d.name() for d in libvirt_conn.listAllDomains(0)]
    assert os.listdir(overlay_root) == []
    assert pool_state(points.pool) == before
    assert main(["boot", "--discard", name, "--overlay-dir", str(overlay_root)]) == 3
