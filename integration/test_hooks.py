"""The qemu hook as libvirtd really runs it (installed into /etc/libvirt/hooks/qemu.d/).

libvirtd looks for hooks at start-up and on SIGHUP, then lists ``qemu.d`` on
every call, so the module installs the hook once, SIGHUPs the daemon, and at
the end uninstalls it, restores whatever was there before and SIGHUPs again.
While it is installed the hook runs for every domain on this libvirtd (other
tests' too): the policy file points its jobs at a harmless recorder script, so
it starts no real repair or backup for anyone.

With ``VMSNAPBACKUP_RUNTIME_DIR`` unset in libvirtd, the hook reads
``/run/vmsnapbackup/inflight/``; these tests write their records there.
"""
from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest
import tenacity
from domains import DiskSpec, DomainFactory, TestDomain

from vmsnapbackup.adapters.domainxml import find_disk, is_our_overlay, overlay_path
from vmsnapbackup.core import inflight
from vmsnapbackup.core.inflight import InflightRecord
from vmsnapbackup.hooks import install as hookinstall
from vmsnapbackup.hooks.config import DEFAULT_CONFIG_PATH

pytestmark = pytest.mark.integration


@dataclass
class _Saved:
    """A file we replace for the duration of the module, to put back afterwards."""

    path: Path
    data: bytes | None
    mode: int = 0

    @classmethod
    def take(cls, path: Path) -> _Saved:
        if path.exists():
            return cls(path, path.read_bytes(), stat.S_IMODE(path.stat().st_mode))
        return cls(path, None)

    def restore(self) -> None:
        if self.data is None:
            self.path.unlink(missing_ok=True)
        else:
            self.path.write_bytes(self.data)
            os.chmod(self.path, self.mode)


@dataclass
class Hook:
    """The installed hook and the recorder its jobs run."""

    conf: Path
    jobs: Path     # one line per job the hook started: its arguments
    job_log: Path
    recorder: Path

    def write_conf(self, extra: str = "") -> None:
        self.conf.write_text(
            f"[DEFAULT]\npool = /var/lib/vmsnapbackup-hooktest\ncommand = {self.recorder}\n"
            f"job_log = {self.job_log}\n{extra}")

    def job_lines(self, domain: str) -> list[list[str]]:
        try:
            lines = self.jobs.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [line.split() for line in lines if line.split()[-1:] == [domain]]

    def await_job(self, domain: str) -> list[str]:
        """The jobs are detached: wait (bounded) until the recorder has run."""
        for attempt in tenacity.Retrying(stop=tenacity.stop_after_delay(20),
                                         wait=tenacity.wait_exponential(0.01, max=0.2),
                                         retry=tenacity.retry_if_exception_type(AssertionError),
                                         reraise=True):
            with attempt:
                lines = self.job_lines(domain)
                assert lines, f"no job for {domain} in {self.jobs}"
        return lines[-1]


def _daemon_answers(uri: str = "qemu:///system") -> None:
    conn = libvirt.open(uri)
    try:
        conn.getVersion()
    finally:
        conn.close()


def _sighup() -> None:
    hookinstall.reload_libvirtd()
    # The reload runs in a daemon thread; wait until the daemon answers again.
    tenacity.Retrying(stop=tenacity.stop_after_delay(30), wait=tenacity.wait_fixed(0.1),
                      retry=tenacity.retry_if_exception_type(libvirt.libvirtError),
                      reraise=True)(_daemon_answers)


@pytest.fixture(scope="module")
def hook(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hook]:
    if os.geteuid() != 0:
        pytest.fail("the hook tests install into /etc/libvirt/hooks and need root")
    if hookinstall.status().daemon_pid is None:
        pytest.fail("no libvirtd pid file: cannot make libvirtd read the hook")
    work = tmp_path_factory.mktemp("hooktest")
    recorder = work / "recorder"
    jobs = work / "jobs"
    recorder.write_text(f'#!/bin/sh\necho "$@" >> {jobs}\n')
    recorder.chmod(0o755)

    hooks_dir = hookinstall.DEFAULT_HOOKS_DIR
    qemu_d = hooks_dir / "qemu.d"
    made_qemu_d = not qemu_d.exists()
    conf_dir = DEFAULT_CONFIG_PATH.parent
    made_conf_dir = not conf_dir.exists()
    saved = [_Saved.take(hookinstall.hook_path(hooks_dir)), _Saved.take(DEFAULT_CONFIG_PATH)]
    h = Hook(conf=DEFAULT_CONFIG_PATH, jobs=jobs, job_log=work / "job.log", recorder=recorder)
    try:
        conf_dir.mkdir(mode=0o755, exist_ok=True)
        h.write_conf()
        hookinstall.install(hooks_dir)
        _sighup()
        yield h
    finally:
        hookinstall.uninstall(hooks_dir)
        for s in saved:
            s.restore()
        if made_qemu_d and qemu_d.is_dir() and not any(qemu_d.iterdir()):
            qemu_d.rmdir()
        if made_conf_dir and conf_dir.is_dir() and not any(conf_dir.iterdir()):
            conf_dir.rmdir()
        _sighup()


@pytest.fixture
def runtime_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Our records go where libvirtd's hook looks: the real /run/vmsnapbackup."""
    monkeypatch.delenv(inflight.RUNTIME_DIR_ENV, raising=False)
    assert inflight.runtime_root() == Path("/run/vmsnapbackup")
    yield Path("/run/vmsnapbackup")
    for rec in inflight.records():
        if rec.pid == os.getpid():
            inflight.clear(rec.uuid, pid=rec.pid)


def _offline_record(td: TestDomain) -> InflightRecord:
    return InflightRecord.now(td.uuid, td.name, "backup", "/var/lib/vmsnapbackup-hooktest",
                              [str(p) for p in td.disks.values()], offline=True)


def test_start_refused_while_offline_backup_reads_the_disks(
        hook: Hook, runtime_env: Path, make_domain: DomainFactory) -> None:
    td = make_domain(disks=[DiskSpec("vda", "qcow2", 16 * 2**20)], start=False)
    rec = _offline_record(td)
    with inflight.inflight(rec):
        with pytest.raises(libvirt.libvirtError) as info:
            td.dom.create()
        message = str(info.value)
        assert f"domain {td.name} cannot start" in message
        assert f"pid {os.getpid()}" in message
        assert not td.dom.isActive()
    # The record gone, the very same start works.
    td.dom.create()
    assert td.dom.isActive()
    td.shutoff()


def test_start_allowed_when_offline_record_is_stale(
        hook: Hook, runtime_env: Path, make_domain: DomainFactory) -> None:
    td = make_domain(disks=[DiskSpec("vda", "qcow2", 16 * 2**20)], start=False)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    inflight.register(dataclasses.replace(_offline_record(td), pid=dead.pid))
    try:
        td.dom.create()
        assert td.dom.isActive()
        assert inflight.read(td.uuid) is not None  # start leaves it; release removes it
        td.dom.destroy()
        # release runs in libvirtd after destroy() returns only when the domain is cleaned up
        for attempt in tenacity.Retrying(stop=tenacity.stop_after_delay(20),
                                         wait=tenacity.wait_exponential(0.01, max=0.2),
                                         retry=tenacity.retry_if_exception_type(AssertionError),
                                         reraise=True):
            with attempt:
                assert inflight.read(td.uuid) is None
    finally:
        inflight.clear(td.uuid)


def test_started_on_our_overlay_hands_repair_to_a_detached_job(
        hook: Hook, runtime_env: Path, make_domain: DomainFactory) -> None:
    td = make_domain(disks=[DiskSpec("vda", "qcow2", 16 * 2**20)], start=False)
    # What a backup that died between snapshot and commit leaves: the domain on our overlay.
    xml = td.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    base = str(td.disks["vda"])
    overlay = overlay_path(find_disk(xml, "vda"), "hooktest")
    assert is_our_overlay(overlay)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", overlay],
                   check=True)
    td.dom = td.conn.defineXML(xml.replace(f"file='{base}'", f"file='{overlay}'"))
    started = time.monotonic()
    td.dom.create()
    start_seconds = time.monotonic() - started
    assert find_disk(td.dom.XMLDesc(0), "vda").source == overlay
    assert hook.await_job(td.name) == ["--pool=/var/lib/vmsnapbackup-hooktest", "repair", "--", td.name]
    # The job's output went to the job log, not to libvirt.
    assert f"repair -- {td.name}" in hook.job_log.read_text()
    print(f"domain start with the hook spawning a job: {start_seconds:.3f} s")
    td.shutoff()


def test_started_with_live_backup_starts_no_repair(
        hook: Hook, runtime_env: Path, make_domain: DomainFactory) -> None:
    td = make_domain(disks=[DiskSpec("vda", "qcow2", 16 * 2**20)], start=False)
    xml = td.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    base = str(td.disks["vda"])
    overlay = overlay_path(find_disk(xml, "vda"), "hooktest2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", overlay],
                   check=True)
    td.dom = td.conn.defineXML(xml.replace(f"file='{base}'", f"file='{overlay}'"))
    online = InflightRecord.now(td.uuid, td.name, "backup", "/var/lib/vmsnapbackup-hooktest",
                                [overlay], offline=False)
    # The live record names the overlay as an image in use: start must be refused...
    with inflight.inflight(online), pytest.raises(libvirt.libvirtError, match="in use"):
        td.dom.create()
    # ...and with a live record that does not hold its images, started spawns nothing.
    with inflight.inflight(InflightRecord.now(td.uuid, td.name, "backup", "/p", [])):
        td.dom.create()
        td.shutoff()
    # Without a record the next start does spawn one; once it has run, it is the only job
    # (jobs are detached, so "none yet" alone could not tell "none" from "not yet").
    td.dom.create()
    hook.await_job(td.name)
    assert len(hook.job_lines(td.name)) == 1
    td.shutoff()


def test_backup_on_shutdown(hook: Hook, runtime_env: Path, make_domain: DomainFactory) -> None:
    td = make_domain(disks=[DiskSpec("vda", "qcow2", 16 * 2**20)], start=True)
    hook.write_conf(textwrap.dedent(f"""\
        [domain:{td.name}]
        backup_on_shutdown = yes
        pool = /var/lib/vmsnapbackup-hooktest-{td.name}
        """))
    try:
        td.dom.destroy()
        assert hook.await_job(td.name) == [
            f"--pool=/var/lib/vmsnapbackup-hooktest-{td.name}", "backup", "--", td.name]
    finally:
        hook.write_conf()


def test_a_domain_named_like_an_option_is_repaired_by_name(
        hook: Hook, runtime_env: Path, make_domain: DomainFactory) -> None:
    """A domain called ``--all`` left on our overlay: the hook must ask for the repair of
    that one domain, not ``repair --all`` (every domain of the pool)."""
    from vmsnapbackup.cli import build_parser

    td = make_domain(disks=[DiskSpec("vda", "qcow2", 16 * 2**20)], start=False)
    # the fixture's cleanup finds the domain by uuid; td.name stays the work directory's name
    td.dom.rename("--all", 0)
    td.dom = td.conn.lookupByUUIDString(td.uuid)
    try:
        xml = td.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        base = str(td.disks["vda"])
        overlay = overlay_path(find_disk(xml, "vda"), "hooktest3")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2",
                        overlay], check=True)
        td.dom = td.conn.defineXML(xml.replace(f"file='{base}'", f"file='{overlay}'"))
        td.dom.create()
        job = hook.await_job("--all")
        assert job == ["--pool=/var/lib/vmsnapbackup-hooktest", "repair", "--", "--all"]
        args = build_parser().parse_args(job)  # what the real CLI makes of it
        assert args.domain == "--all" and not args.all_domains
        td.shutoff()
    finally:
        Path("/var/log/libvirt/qemu/--all.log").unlink(missing_ok=True)
