"""Backups of a remote hypervisor (``qemu+ssh``) from a backup server that cannot see it.

127.0.0.1 plays the hypervisor behind a private sshd (:mod:`sshd`); the CLI
runs in a mount namespace where the image root and the runtime directory are
empty (:mod:`remotecli`), so the frozen images can only arrive through ssh
forwarding or NBD over TLS.  Each backup is restored on the backup server and
compared byte for byte with the disks, and the hypervisor is checked for what
a backup must never leave: overlays, storage daemons, runtime directories,
in-flight records.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from domains import TestDomain
from remotecli import RUNTIME_DIR, blind_cli
from test_mount_tls import make_certs

if TYPE_CHECKING:
    from sshd import SshdServer

pytest_plugins = ("sshd",)   # the shared private sshd fixture: imported by pytest

KiB, MiB = 1024, 1024 * 1024


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One directory in QEMU's layout holding the server *and* the client pair, as
    /etc/pki/qemu does on a host that is both (here: one machine plays both)."""
    d = tmp_path_factory.mktemp("pki") / "qemu"
    make_certs(d)
    return d


def _our_daemons(tag: str) -> list[str]:
    out = subprocess.run(["pgrep", "-a", "-f", "qemu-storage-daemon"], capture_output=True,
                         text=True, check=False).stdout
    return [line for line in out.splitlines() if tag in line]


def _leftovers(dom: TestDomain) -> list[str]:
    """What a finished backup must not leave on the hypervisor."""
    found = [str(p) for p in dom.workdir.iterdir() if ".vmsnapbackup-" in p.name]
    for target, image in dom.disks.items():
        if dom.current_source(target) != image:
            found.append(f"{target} runs on {dom.current_source(target)}")
    found += _our_daemons(f"qsd-{dom.name}")
    if os.path.isdir(RUNTIME_DIR):
        found += [n for n in os.listdir(RUNTIME_DIR) if n.startswith(f"qsd-{dom.name}")]
    if os.path.exists(os.path.join(RUNTIME_DIR, "inflight", f"{dom.uuid}.json")):
        found.append("in-flight record")
    return found


@pytest.mark.parametrize("how", ["ssh", "tls"])
def test_remote_backup_restores_bit_exact(how: str, sshd: SshdServer, tls_dir: Path,
                                          running_domain: TestDomain, tmp_path: Path) -> None:
    dom = running_domain
    dom.write("vda", 0, 256 * KiB, 0x3C)
    dom.write("vda", 40 * MiB, 64 * KiB, 0xA7)
    dom.write("vdb", 8 * MiB, 128 * KiB, 0x5E)
    pool = tmp_path / "pool"
    extra = ["--tls-dir", str(tls_dir)] if how == "tls" else []
    run = blind_cli(["-c", sshd.uri(), "--pool", str(pool), "-v", "backup",
                     dom.name, *extra, "--json"])
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["point"] == 1 and [d["target"] for d in doc["disks"]] == ["vda", "vdb"]
    # the frozen images went the asked way: TLS on TCP, or the forwarded unix socket
    if how == "tls":
        assert "as nbds://127.0.0.1:" in run.stderr and "as nbd+unix:///src-" not in run.stderr
    else:
        assert "as nbd+unix:///src-vda" in run.stderr and "nbds://" not in run.stderr
    assert _leftovers(dom) == []
    # a second point through the same path: only what changed is stored
    dom.write("vdb", 0, 64 * KiB, 0x11)
    run = blind_cli(["-c", sshd.uri(), "--pool", str(pool), "backup", dom.name,
                     *extra, "--json"])
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["point"] == 2
    assert _leftovers(dom) == []
    dom.shutoff()
    out = tmp_path / "restored"
    run = blind_cli(["--pool", str(pool), "restore", dom.name, "--to", str(out), "--json"])
    assert run.returncode == 0, run.stderr
    for target in ("vda", "vdb"):
        restored = out / f"{target}.raw"
        assert restored.read_bytes() == dom.read_image(target), f"{target} differs"
