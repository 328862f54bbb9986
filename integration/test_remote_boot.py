"""``boot`` on a remote hypervisor (``qemu+ssh``): the point served here, the domain run there.

The boot's storage daemon runs on the backup server and its export reaches the
hypervisor's QEMU through an ssh reverse forward; the overlays, the forwarded
socket and the boot note are on the hypervisor.  127.0.0.1 is the hypervisor
behind a private sshd, and every command runs blind (:mod:`remotecli`): the
image root and the runtime directory are empty tmpfs for the CLI, so the
overlays can only have been made through ssh.  The backup server's own
runtime root is a test directory (``VMSNAPBACKUP_RUNTIME_DIR``), so that the
later blind commands (``--resume``, ``--discard``) find the boot's state again.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING

import libvirt
import tenacity

sys.path.insert(0, str(Path(__file__).resolve().parent))

from domains import QEMU_LOG_DIR, DomainFactory, TestDomain
from remotecli import blind_cli
from test_access import qemu_io_read

if TYPE_CHECKING:
    from sshd import SshdServer

pytest_plugins = ("sshd",)   # the shared private sshd fixture: imported by pytest

KiB, MiB = 1024, 1024 * 1024


def _gone(pid: int) -> bool:
    def alive() -> bool:
        return os.path.exists(f"/proc/{pid}") and "State:\tZ" not in \
            Path(f"/proc/{pid}/status").read_text(errors="replace")
    try:
        tenacity.Retrying(retry=tenacity.retry_if_result(bool),
                          stop=tenacity.stop_after_delay(20),
                          wait=tenacity.wait_exponential(multiplier=0.01, max=0.3))(alive)
    except (tenacity.RetryError, OSError):
        return not os.path.exists(f"/proc/{pid}")
    return True


def _forwards(name: str) -> list[str]:
    out = subprocess.run(["pgrep", "-a", "-x", "ssh"], capture_output=True, text=True,
                         check=False).stdout
    return [ln for ln in out.splitlines() if f"/{name}/nbd.sock:" in ln]


def test_remote_boot_runs_the_point_there(sshd: SshdServer, running_domain: TestDomain,
                                          make_domain: DomainFactory,
                                          libvirt_conn: libvirt.virConnect,
                                          tmp_path: Path) -> None:
    dom = running_domain
    dom.write("vda", 512 * KiB, 1 * MiB, 0x33)
    dom.write("vdb", 32 * MiB, 12 * KiB, 0x22)
    pool = tmp_path / "pool"
    uri = sshd.uri()
    run = blind_cli(["-c", uri, "--pool", str(pool), "backup", dom.name, "--json"])
    assert run.returncode == 0, run.stderr
    dom.write("vda", 0, 64 * KiB, 0x55)           # after the point: not in the boot
    there = make_domain.scratch_dir("vsb-rboot")
    server_run = Path(tempfile.mkdtemp(prefix="vsb-srv-"))   # short: socket paths
    env = {"VMSNAPBACKUP_RUNTIME_DIR": str(server_run)}
    name = f"{dom.name}-rb"
    common = ["-c", uri, "--pool", str(pool), "boot"]
    run = blind_cli([*common, dom.name, "--point", "1", "--name", name, "--no-network",
                     "--overlay-dir", str(there), "--json"], env=env)
    try:
        assert run.returncode == 0, run.stderr
        result = json.loads(run.stdout)
        assert result["started"] and result["directory"] == str(there / name)
        # made on the hypervisor through ssh: overlays 0600, the socket the QEMU user's
        sock = Path(result["socket"])
        assert sock.parent == there / name and stat.S_ISSOCK(sock.stat().st_mode)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        for overlay in result["overlays"].values():
            assert stat.S_IMODE(os.stat(overlay).st_mode) == 0o600
        assert _forwards(name), "no ssh forward carries the export"
        vm = libvirt_conn.lookupByName(name)
        assert vm.isActive() and vm.UUIDString() != dom.uuid
        live = ET.fromstring(vm.XMLDesc(0))
        for disk in live.findall("./devices/disk"):
            backing = disk.find("backingStore/source/host")
            assert backing is not None and backing.get("socket") == str(sock)
        # the boot domain's unprivileged QEMU reads the point, through the forward
        assert qemu_io_read(vm, "virtio-disk0", 512 * KiB, 1 * MiB, 0x33).startswith(
            "read 1048576/1048576")
        assert qemu_io_read(vm, "virtio-disk1", 32 * MiB, 12 * KiB, 0x22).startswith(
            "read 12288/12288")
        assert "verification failed" in qemu_io_read(vm, "virtio-disk0", 0, 64 * KiB, 0x55)

        # the backup server "rebooted": its daemon is gone; --resume serves the point again
        vm.destroy()
        os.kill(result["daemon_pid"], signal.SIGKILL)
        assert _gone(result["daemon_pid"])
        run = blind_cli(["-c", uri, "boot", "--resume", name, "--overlay-dir", str(there),
                         "--json"], env=env)
        assert run.returncode == 0, run.stderr
        resumed = json.loads(run.stdout)
        assert resumed["daemon_pid"] != result["daemon_pid"] and vm.isActive()
        assert qemu_io_read(vm, "virtio-disk1", 32 * MiB, 12 * KiB, 0x22).startswith(
            "read 12288/12288")
    finally:
        gone = blind_cli(["-c", uri, "boot", "--discard", name, "--overlay-dir", str(there),
                          "--json"], env=env)
        (QEMU_LOG_DIR / f"{name}.log").unlink(missing_ok=True)
    assert gone.returncode == 0, gone.stderr
    assert json.loads(gone.stdout)["domain_removed"] is True
    assert name not in [d.name() for d in libvirt_conn.listAllDomains(0)]
    assert not (there / name).exists() and os.listdir(there) == []
    assert not (server_run / "boots" / name).exists()
    shutil.rmtree(server_run)
    assert _gone(resumed["daemon_pid"]) and _forwards(name) == []
    assert dom.is_active()   # the original ran on throughout
