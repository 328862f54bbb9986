"""``restore --pool-volume [--define]`` onto a remote hypervisor (``qemu+ssh``).

The pool is on the backup server, the libvirt storage pool on the hypervisor:
the restored images must be written *there*, through a storage daemon on the
hypervisor (ssh-forwarded socket or NBD over TLS), and the new domain defined
there on them.  127.0.0.1 is the hypervisor behind a private sshd; the CLI
runs blind (:mod:`remotecli`): the storage pool's directory lies under the
image root, which is an empty tmpfs for the CLI, so only ssh and NBD can have
put the images there.  The images are compared byte for byte with the disks.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from domains import TestDomain
from remotecli import IMAGES_ROOT, blind_cli
from test_mount_tls import make_certs

from vmsnapbackup.errors import ExitCode

if TYPE_CHECKING:
    from sshd import SshdServer

pytest_plugins = ("sshd",)   # the shared private sshd fixture: imported by pytest

KiB, MiB = 1024, 1024 * 1024


def _virsh(*args: str, check: bool = True) -> str:
    done = subprocess.run(["virsh", "-q", *args], capture_output=True, text=True,
                          check=False, timeout=120)
    if check and done.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)}: {done.stderr}")
    return done.stdout


@pytest.fixture
def storage_pool() -> Iterator[tuple[str, Path]]:
    """A transient libvirt dir pool under the image root (hidden from the blind CLI)."""
    name = f"vsb-rr-{uuidlib.uuid4().hex[:8]}"
    path = Path(IMAGES_ROOT, name)
    path.mkdir(mode=0o711)
    try:
        _virsh("pool-create-as", name, "dir", "--target", str(path))
        yield name, path
    finally:
        _virsh("pool-destroy", name, check=False)
        for f in path.iterdir():
            f.unlink()
        path.rmdir()


@pytest.fixture
def tls_dir(tmp_path: Path) -> Path:
    d = tmp_path / "pki" / "qemu"
    d.parent.mkdir()
    make_certs(d)
    return d


def _one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def _remote_daemons() -> list[str]:
    out = subprocess.run(["pgrep", "-a", "-f", "qemu-storage-daemon"], capture_output=True,
                         text=True, check=False).stdout
    return [ln for ln in out.splitlines() if "restore-" in ln]


def test_restore_into_remote_pool_and_define(sshd: SshdServer, running_domain: TestDomain,
                                             storage_pool: tuple[str, Path], tls_dir: Path,
                                             tmp_path: Path) -> None:
    dom = running_domain
    dom.write("vda", 0, 256 * KiB, 0x3C)
    dom.write("vda", 40 * MiB, 64 * KiB, 0xA7)
    dom.write("vdb", 8 * MiB, 128 * KiB, 0x5E)
    pool = tmp_path / "pool"
    uri = sshd.uri()
    sp_name, sp_dir = storage_pool
    run = blind_cli(["-c", uri, "--pool", str(pool), "backup", dom.name, "--json"])
    assert run.returncode == 0, run.stderr
    dom.shutoff()   # the images are now exactly what point 1 holds
    new = f"{dom.name}-r"
    try:
        # raw, over the ssh-forwarded socket, and a new domain defined on the hypervisor
        run = blind_cli(["-c", uri, "--pool", str(pool), "-v", "restore", dom.name,
                         "--pool-volume", sp_name, "--define", new, "--json"])
        assert run.returncode == 0, run.stderr
        doc = json.loads(run.stdout)
        assert doc["ok"] is True and doc["storage_pool"] == sp_name
        assert doc["defined"]["name"] == new
        for target in ("vda", "vdb"):
            image = sp_dir / f"{new}-{target}.raw"
            assert stat.S_IMODE(image.stat().st_mode) == 0o600
            assert image.read_bytes() == dom.read_image(target), f"{target} differs"
        assert sorted(os.listdir(sp_dir)) == [f"{new}-vda.raw", f"{new}-vdb.raw"]
        assert f"{new}-vda.raw" in _virsh("vol-list", sp_name)   # the pool was refreshed
        xml = ET.fromstring(_virsh("dumpxml", new))
        sources = {d.find("target").get("dev"): d.find("source").get("file")  # type: ignore[union-attr]
                   for d in xml.iter("disk")}
        assert sources == {t: str(sp_dir / f"{new}-{t}.raw") for t in ("vda", "vdb")}
        assert xml.findtext("uuid") != dom.uuid
        assert _remote_daemons() == []

        # a path is not a storage pool of the hypervisor
        run = blind_cli(["-c", uri, "--pool", str(pool), "restore", dom.name,
                         "--pool-volume", str(sp_dir), "--format", "qcow2"])
        assert run.returncode == ExitCode.USAGE and "not a path" in _one_line(run.stderr)

        # qcow2, over NBD with TLS, named after the domain (no --define)
        run = blind_cli(["-c", uri, "--pool", str(pool), "-v", "restore", dom.name,
                         "--pool-volume", sp_name, "--format", "qcow2", "--tls-dir",
                         str(tls_dir), "--json"])
        assert run.returncode == 0, run.stderr
        assert "nbds://127.0.0.1:" in run.stderr
        for target in ("vda", "vdb"):
            image = sp_dir / f"{dom.name}-{target}.qcow2"
            assert stat.S_IMODE(image.stat().st_mode) == 0o600
            out = tmp_path / f"{target}.raw"
            subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image),
                            str(out)], check=True, capture_output=True, timeout=120)
            assert out.read_bytes() == dom.read_image(target), f"{target} differs (qcow2)"
        assert not [f for f in os.listdir(sp_dir) if f.startswith(".")]
        # the same again: the volume exists on the hypervisor, refused, nothing touched
        before = {f: (sp_dir / f).stat().st_mtime_ns for f in os.listdir(sp_dir)}
        run = blind_cli(["-c", uri, "--pool", str(pool), "restore", dom.name,
                         "--pool-volume", sp_name, "--disk", "vdb",
                         "--format", "qcow2", "--force"])
        assert run.returncode == ExitCode.USAGE
        assert "exists" in _one_line(run.stderr)
        assert {f: (sp_dir / f).stat().st_mtime_ns for f in os.listdir(sp_dir)} == before
        assert _remote_daemons() == []
    finally:
        _virsh("undefine", new, check=False)
