"""The ssh connection to a remote hypervisor dies mid-backup; one ``repair`` finishes the job.

The backup server's OpenSSH master is SIGKILLed (as a network cut or a
crashed ssh would end it) once the backup's journal says it is reading, and
once it says it is committing.  The remote storage daemon and the in-flight
holder die with the session (their watchdog), libvirt's own connection lives
on.  Whatever the backup managed itself, after one blind ``repair`` the VM
runs on its original images and the hypervisor holds no daemon, runtime
directory, overlay or in-flight record of ours -- and the backup server, whose
own runtime root the test gives it, holds no runtime directory of its
pool-writing daemon either, also when the server process itself was killed.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from domains import DiskSpec, DomainFactory, TestDomain
from remotecli import blind_cli, blind_popen, ssh_master_of
from test_remote_backup import _leftovers

from vmsnapbackup.adapters import processes
from vmsnapbackup.errors import ExitCode

if TYPE_CHECKING:
    from sshd import SshdServer

pytest_plugins = ("sshd",)   # the shared private sshd fixture: imported by pytest

MiB = 1024 * 1024


def _journal_step(pool: Path) -> str | None:
    for journal in pool.glob("domains/*/journal.json"):
        try:
            return str(json.loads(journal.read_text()).get("step"))
        except (OSError, ValueError):
            return None
    return None


def _local_runtime_dirs(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("qsd-*")) if root.is_dir() else []


@pytest.mark.parametrize("kill, step", [("ssh", "read"), ("ssh", "commit"), ("server", "read")])
def test_killed_ssh_then_repair(kill: str, step: str, sshd: SshdServer,
                                make_domain: DomainFactory, tmp_path: Path,
                                request: pytest.FixtureRequest) -> None:
    """``kill=server``: the backup server process dies itself (SIGKILL, with its ssh
    master, as in a power cut of the server): its pool-writing daemon dies by its
    death signal and only ``repair -c`` can remove that daemon's runtime directory."""
    dom: TestDomain = make_domain(disks=[DiskSpec("vda", "qcow2", 512 * MiB),
                                         DiskSpec("vdb", "raw", 256 * MiB)], start=True)
    for n in range(8):
        dom.write("vda", n * 48 * MiB, 4 * MiB, 0x40 + n)
    dom.write("vdb", 100 * MiB, 8 * MiB, 0x77)
    pool = tmp_path / "pool"
    # the backup server's own runtime root, where its pool-writing daemon lives (short:
    # socket paths under it must fit a sun_path)
    local_run = Path(tempfile.mkdtemp(prefix="vsbrun", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(local_run, ignore_errors=True))
    env = {"VMSNAPBACKUP_RUNTIME_DIR": str(local_run)}
    proc = blind_popen(["-c", sshd.uri(), "--pool", str(pool), "backup", dom.name], env=env)
    killed = False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if _journal_step(pool) == step:
            master = ssh_master_of(proc.pid)
            if master is not None:
                if kill == "server":   # its ssh master must die with it (pdeathsig)
                    os.kill(proc.pid, signal.SIGKILL)
                else:
                    os.kill(master, signal.SIGKILL)
                killed = True
                break
        time.sleep(0.005)   # polling the journal for the step to hit
    _out, err = proc.communicate(timeout=300)
    assert killed, f"the backup ended before step {step}: {proc.returncode} {err}"
    # a cut during the read fails the backup; during the commit it may still end well
    # (libvirt's own connection commits), or leave the rest to repair
    assert proc.returncode != ExitCode.OK or step == "commit", err
    if kill == "ssh":
        assert "Traceback" not in err
        # the local daemon lost nothing with the connection: it is closed, its directory gone
        assert _local_runtime_dirs(local_run) == [], err
    else:   # the writer's directory is left, where repair finds it
        assert processes.wait_gone(master, 10), "the ssh master outlived the server"
        assert [d.split("/")[0] for d in _local_runtime_dirs(local_run)] == ["writers"]
    run = blind_cli(["-c", sshd.uri(), "--pool", str(pool), "repair", dom.name], env=env)
    assert run.returncode == 0, run.stderr
    assert dom.is_active()
    assert _leftovers(dom) == []
    assert _local_runtime_dirs(local_run) == []
    assert not (pool / "domains").exists() or not list(pool.glob("domains/*/journal.json"))
    # and the hypervisor takes the next backup as if nothing happened
    run = blind_cli(["-c", sshd.uri(), "--pool", str(pool), "backup", dom.name, "--json"])
    assert run.returncode == 0, run.stderr
    assert _leftovers(dom) == []
