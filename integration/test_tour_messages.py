"""Issue 18 item 4 (the rest): what a backup says when the domain is busy.

* A second backup of a domain that another process is backing up right now (into
  another pool, so under another pool lock) says it is a live backup of that pid and
  exits "busy" -- it used to take the first backup's overlays for leftovers.
* A backup that must wait for another tool's job (a libvirt pull backup, as
  virtnbdbackup starts) says at once what it waits for.
* ``list`` of a pool that is not there yet says so (exit "not found"); ``backup``
  creates it and says so.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from domains import DiskSpec, DomainFactory, TestDomain
from tenacity import Retrying, retry_if_result, stop_after_delay, wait_fixed

from vmsnapbackup.cli import main
from vmsnapbackup.errors import ExitCode

pytestmark = pytest.mark.integration


def _cli(*argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "vmsnapbackup", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _until(check, seconds: float):  # type: ignore[no-untyped-def]
    """Poll ``check`` until it returns something true, for at most ``seconds``."""
    return Retrying(retry=retry_if_result(lambda r: not r), wait=wait_fixed(0.01),
                    stop=stop_after_delay(seconds), reraise=True,
                    retry_error_callback=lambda state: None)(check)


def _on_our_overlay(td: TestDomain) -> bool:
    return "vmsnapbackup-" in td.live_xml()


def test_second_backup_of_a_domain_being_backed_up_is_busy(
        make_domain: DomainFactory, tmp_path: Path, capsys, caplog) -> None:  # type: ignore[no-untyped-def]
    td = make_domain(disks=[DiskSpec("vda", "qcow2", 256 * 2**20)], start=False)
    # data to read, so the first backup stays on its overlay for a while
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x3c 0 200M",
                    str(td.disks["vda"])], check=True, capture_output=True)
    td.start()
    first = _cli("--pool", str(tmp_path / "one"), "backup", td.name)
    stopped = False
    try:
        assert _until(lambda: _on_our_overlay(td) or first.poll() is not None, 60)
        assert first.poll() is None, first.communicate()
        os.kill(first.pid, signal.SIGSTOP)    # hold it there, on its overlay
        stopped = True
        assert _on_our_overlay(td)
        rc = main(["--pool", str(tmp_path / "two"), "backup", td.name])
        err = capsys.readouterr().err
        assert rc == int(ExitCode.LOCKED), err
        assert f"pid {first.pid}" in err and "live backup" in err
        said = err + caplog.text   # in-process, the log lines go to caplog
        assert "repair" not in said and "earlier backup" not in said
        assert not list((tmp_path / "two").glob("domains/*/journal*"))   # nothing begun
    finally:
        if stopped:
            os.kill(first.pid, signal.SIGCONT)
        _, errs = first.communicate(timeout=300)
    assert first.returncode == 0, errs
    assert not _on_our_overlay(td)


def test_backup_says_at_once_what_job_it_waits_for(
        make_domain: DomainFactory, tmp_path: Path) -> None:
    td = make_domain(disks=[DiskSpec("vda", "qcow2", 32 * 2**20)])
    scratch = make_domain.scratch_dir("vsb-pull")
    scratch.chmod(0o1777)   # QEMU (libvirt-qemu) binds the NBD socket here
    sock = scratch / "pull.sock"
    # what virtnbdbackup does: a pull-mode backup job of libvirt's backup API
    td.dom.backupBegin(
        "<domainbackup mode='pull'>"
        f"<server transport='unix' socket='{sock}'/>"
        "<disks><disk name='vda' backup='yes' type='file'>"
        f"<scratch file='{scratch / 'vda.scratch'}'/></disk></disks></domainbackup>",
        None, 0)
    ours = _cli("--pool", str(tmp_path / "pool"), "backup", td.name)
    aborted = False
    try:
        assert ours.stderr is not None
        started = time.monotonic()
        said = ""
        for line in ours.stderr:      # ends when the backup does
            said += line
            if "waiting for" in line:
                break
        waited = time.monotonic() - started
        assert "waiting for a backup job" in said, said
        assert waited < 5.0, f"said only after {waited:.1f} s"
        td.dom.abortJob()
        aborted = True
        _, rest = ours.communicate(timeout=120)
    finally:
        if not aborted:
            td.dom.abortJob()
        if ours.poll() is None:
            ours.communicate(timeout=120)
    assert ours.returncode == 0, said + rest


def test_list_and_backup_agree_about_a_missing_pool(
        make_domain: DomainFactory, tmp_path: Path, capsys, caplog) -> None:  # type: ignore[no-untyped-def]
    pool = tmp_path / "not-yet"
    assert main(["--pool", str(pool), "list"]) == int(ExitCode.NOT_FOUND)
    err = capsys.readouterr().err
    assert f"no pool yet at {pool}" in err
    assert not pool.exists()
    td = make_domain(disks=[DiskSpec("vda", "qcow2", 16 * 2**20)], start=False)
    assert main(["--pool", str(pool), "backup", td.name]) == 0
    assert f"pool {pool} does not exist yet: creating it" in caplog.text
    assert main(["--pool", str(pool), "list"]) == 0
