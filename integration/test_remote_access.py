"""Reading a pool with ``-c qemu+ssh://...``: verify, mount, restore --to, repair --all.

What ``-c`` means for commands that only read the pool (docs/DESIGN.md §10):
``verify`` needs no hypervisor and ``mount`` serves its export on the backup
server, so both work whatever ``-c`` names; ``restore --to DIR --define``
would define a domain there on images here and is refused with one line
(exit 2).  ``repair --all`` finds a stale
in-flight record a dead backup server left *on the hypervisor*.  The CLI runs
blind (:mod:`remotecli`): the hypervisor's directories are empty tmpfs.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid as uuidlib
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))

from domains import TestDomain
from remotecli import RUNTIME_DIR, blind_cli, blind_popen

from vmsnapbackup.core.inflight import InflightRecord
from vmsnapbackup.errors import ExitCode

if TYPE_CHECKING:
    from sshd import SshdServer

pytest_plugins = ("sshd",)   # the shared private sshd fixture: imported by pytest

KiB, MiB = 1024, 1024 * 1024


def _one_line_refusal(run_stderr: str) -> None:
    lines = [ln for ln in run_stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in run_stderr, run_stderr
    assert "qemu+ssh://" in lines[0], lines


def test_verify_mount_work_restore_define_here_refused(sshd: SshdServer,
                                                      running_domain: TestDomain,
                                                      tmp_path: Path) -> None:
    dom = running_domain
    dom.write("vda", 0, 256 * KiB, 0x3C)
    dom.write("vdb", 8 * MiB, 128 * KiB, 0x5E)
    pool = tmp_path / "pool"
    uri = sshd.uri()
    run = blind_cli(["-c", uri, "--pool", str(pool), "backup", dom.name, "--json"])
    assert run.returncode == 0, run.stderr
    dom.shutoff()   # the images are now exactly what point 1 holds

    run = blind_cli(["-c", uri, "--pool", str(pool), "verify", dom.name, "--json"])
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["ok"] is True

    # mount: the export is served here, on the backup server; read it back whole
    sock = tmp_path / "vdb.sock"
    proc = blind_popen(["-c", uri, "--pool", str(pool), "mount", dom.name, "--point", "1",
                        "--disk", "vdb", "--socket", str(sock), "--json"])
    try:
        assert proc.stdout is not None
        text = ""
        for line in proc.stdout:   # the JSON document, printed once the export is up
            text += line
            if line.rstrip() == "}":
                break
        assert text, proc.communicate(timeout=30)[1]
        served = json.loads(text)
        assert served["disk"] == "vdb" and served["socket_path"] == str(sock)
        out = tmp_path / "vdb.raw"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", served["uri"],
                        str(out)], check=True, capture_output=True, timeout=120)
        assert out.read_bytes() == dom.read_image("vdb")
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert not sock.exists()

    # restore --to DIR --define: refused with one line, nothing made (test_remote_restore
    # and test_remote_boot: restore into the hypervisor's pool, boot there)
    name = f"{dom.name}-copy"
    run = blind_cli(["-c", uri, "--pool", str(pool), "restore", dom.name, "--to",
                     str(tmp_path / "r"), "--define", name])
    assert run.returncode == ExitCode.USAGE
    _one_line_refusal(run.stderr)
    assert not (tmp_path / "r").exists()
    assert subprocess.run(["virsh", "-q", "domstate", name], capture_output=True,
                          check=False).returncode != 0


def _dead_pid() -> int:
    done = subprocess.Popen(["true"])
    done.wait()
    return done.pid


def test_repair_all_clears_a_stale_record_on_the_hypervisor(sshd: SshdServer,
                                                            running_domain: TestDomain,
                                                            tmp_path: Path) -> None:
    """A backup server died mid-backup and its pool's journal is gone with it (say, a
    lost local disk): only the hypervisor's in-flight record is left, and the hook
    refuses the domain's migrations until ``repair --all -c`` removes it."""
    dom = running_domain
    pool = tmp_path / "pool"
    record = InflightRecord.now(dom.uuid, dom.name, "backup", str(pool), [])
    stale = json.dumps({**record.to_json(), "pid": _dead_pid()})
    path = Path(RUNTIME_DIR, "inflight", f"{dom.uuid}.json")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.write_text(stale)
    # a live record of another domain (this test's own pid holds it) stays
    other = Path(RUNTIME_DIR, "inflight", f"{uuidlib.uuid4()}.json")
    live = InflightRecord.now(other.stem, "vsb-other", "backup", str(pool), [])
    other.write_text(json.dumps({**live.to_json(), "pid": os.getpid()}))
    try:
        run = blind_cli(["-c", sshd.uri(), "--pool", str(pool), "repair", "--all",
                         "--json"])
        assert run.returncode == 0, run.stderr
        doc = json.loads(run.stdout)
        assert [d["uuid"] for d in doc["domains"]] == [dom.uuid], doc
        assert not path.exists(), "the stale record is still on the hypervisor"
        assert other.exists()
        assert dom.is_active()
    finally:
        path.unlink(missing_ok=True)
        other.unlink(missing_ok=True)
