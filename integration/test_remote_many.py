"""One ``backup --all`` over two connections: ``qemu+ssh`` to 127.0.0.1 and ``qemu:///system``.

Both URIs name this machine's libvirtd, so each domain is listed by both and
backed up once per connection, one after the other (docs/DESIGN.md §10): the
first backup of a domain goes through ssh (remote source daemon, forwarded
NBD socket, in-flight record on the "hypervisor" through ssh), the second
through the local path, into the same pool, as points 1 and 2.  Not blind:
the local connection needs the images.  Every point restores bit-exact and
neither path leaves anything behind.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))

from domains import DiskSpec, DomainFactory, TestDomain
from test_many_domains import _foreign_excludes
from test_remote_backup import _leftovers

from vmsnapbackup.core.defaults import DEFAULT_URI
from vmsnapbackup.errors import ExitCode

if TYPE_CHECKING:
    from sshd import SshdServer

pytest_plugins = ("sshd",)   # the shared private sshd fixture: imported by pytest

KiB, MiB = 1024, 1024 * 1024


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmsnapbackup", *argv], capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL, check=False)


def test_all_over_an_ssh_and_a_local_uri(sshd: SshdServer, make_domain: DomainFactory,
                                         libvirt_conn, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    running: TestDomain = make_domain(disks=[DiskSpec("vda", "qcow2", 32 * MiB)],
                                      name_prefix="vsb-rmany")
    off: TestDomain = make_domain(disks=[DiskSpec("vda", "raw", 16 * MiB)],
                                  name_prefix="vsb-rmany-off")
    running.write("vda", 3 * MiB, 256 * KiB, 0x6B)
    off.write("vda", 5 * MiB, 64 * KiB, 0x2D)
    off.shutoff()
    pool = tmp_path / "pool"
    ssh = sshd.uri()
    run = _cli("-c", ssh, "-c", DEFAULT_URI, "--pool", str(pool), "backup", "--all",
               *_foreign_excludes(libvirt_conn, {running.name, off.name}), "--json")
    assert run.returncode == ExitCode.OK, run.stderr
    doc = json.loads(run.stdout)
    got = [(d["domain"], d["uri"], d["ok"], d["point"]) for d in doc["domains"]]
    # connection by connection, in the order given; the second gives point 2
    assert got == [(running.name, ssh, True, 1), (off.name, ssh, True, 1),
                   (running.name, DEFAULT_URI, True, 2), (off.name, DEFAULT_URI, True, 2)], got
    for dom in (running, off):
        assert _leftovers(dom) == []
    running.shutoff()
    for dom in (running, off):
        for point in ("1", "2"):
            out = tmp_path / f"{dom.name}-{point}"
            restored = _cli("--pool", str(pool), "restore", dom.name, "--point", point,
                            "--to", str(out))
            assert restored.returncode == 0, restored.stderr
            assert (out / "vda.raw").read_bytes() == dom.read_image("vda"), (dom.name, point)
