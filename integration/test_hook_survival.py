"""A broken hook installation must never stop a domain (issue 18.6), on the real libvirtd.

libvirt refuses every domain start on the host when it cannot run a hook.  The
hook used to be a Python file whose ``#!`` named the venv's interpreter: delete
the venv and no domain could start.  Here the hook is installed for real with
an interpreter reached through a symlink we control, libvirtd is made to read
it (SIGHUP), and then the interpreter disappears, the package breaks, or the
interpreter itself fails; each time ``virsh start`` must succeed.  An offline
backup record of the domain stays in place throughout: a working hook refuses
that start, so a start that succeeds proves the broken hook really ran and let
it through (rather than not being consulted at all).
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from domains import DiskSpec, DomainFactory, TestDomain
from test_hooks import _Saved, _sighup

from vmsnapbackup.core import inflight
from vmsnapbackup.core.inflight import InflightRecord
from vmsnapbackup.hooks import install as hookinstall

pytestmark = pytest.mark.integration

VENV = Path(sys.executable).parent.parent


class Installed:
    """The hook, installed with ``link/bin/python`` as its interpreter."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.link = work / "venv"
        self.interpreter = self.link / "bin" / Path(sys.executable).name

    def point_at(self, target: Path) -> None:
        """Swap what the recorded interpreter path leads to (as an upgrade or rm -rf would)."""
        tmp = self.work / "venv.new"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        os.replace(tmp, self.link)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    if os.geteuid() != 0:
        pytest.fail("the hook tests install into /etc/libvirt/hooks and need root")
    if hookinstall.status().daemon_pid is None:
        pytest.fail("no libvirtd pid file: cannot make libvirtd read the hook")
    work = tmp_path_factory.mktemp("hooksurvival")
    inst = Installed(work)
    inst.point_at(VENV)
    hooks_dir = hookinstall.DEFAULT_HOOKS_DIR
    qemu_d = hooks_dir / "qemu.d"
    made_qemu_d = not qemu_d.exists()
    saved = _Saved.take(hookinstall.hook_path(hooks_dir))
    try:
        hookinstall.install(hooks_dir, interpreter=str(inst.interpreter))
        _sighup()
        yield inst
    finally:
        hookinstall.uninstall(hooks_dir)
        saved.restore()
        if made_qemu_d and qemu_d.is_dir() and not any(qemu_d.iterdir()):
            qemu_d.rmdir()
        _sighup()


@pytest.fixture
def guarded(make_domain: DomainFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestDomain]:
    """A shut-off domain with a live offline-backup record: a working hook refuses its start."""
    monkeypatch.delenv(inflight.RUNTIME_DIR_ENV, raising=False)
    td = make_domain(disks=[DiskSpec("vda", "qcow2", 16 * 2**20)], start=False)
    rec = InflightRecord.now(td.uuid, td.name, "backup", "/var/lib/vmsnapbackup-hooktest",
                             [str(p) for p in td.disks.values()], offline=True)
    with inflight.inflight(rec):
        yield td


def _virsh_start(td: TestDomain) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-c", "qemu:///system", "start", td.name],
                          capture_output=True, text=True, timeout=120, check=False)


def _broken_package(work: Path) -> Path:
    """A venv whose vmsnapbackup raises on import (a half-finished upgrade)."""
    venv = work / "broken-package"
    if not venv.exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                       timeout=120)
        site = next(venv.glob("lib/python*/site-packages"))
        (site / "vmsnapbackup").mkdir()
        (site / "vmsnapbackup" / "__init__.py").write_text(
            "raise RuntimeError('half-upgraded vmsnapbackup')\n")
    return venv


def _broken_interpreter(work: Path) -> Path:
    """An interpreter that runs but dies at start-up (its standard library is gone)."""
    root = work / "broken-interpreter"
    (root / "bin").mkdir(parents=True, exist_ok=True)
    python = root / "bin" / Path(sys.executable).name
    python.write_text("#!/bin/sh\necho 'Fatal Python error: init_fs_encoding' >&2\nexit 1\n")
    python.chmod(0o755)
    return root


def test_the_working_hook_guards_the_start(installed: Installed, guarded: TestDomain) -> None:
    proc = _virsh_start(guarded)
    assert proc.returncode != 0 and "cannot start" in proc.stderr
    assert not guarded.dom.isActive()


def test_the_old_python_hook_stopped_every_start(installed: Installed, guarded: TestDomain) -> None:
    """What issue 18.6 reported, reproduced: a '#!venv-python' hook whose venv is gone."""
    hook = hookinstall.hook_path()
    shim = hook.read_bytes()
    try:
        hook.write_text(f"#!{installed.interpreter}\nimport sys\nsys.exit(0)\n")
        installed.point_at(installed.work / "deleted-venv")
        _sighup()
        proc = _virsh_start(guarded)
        assert proc.returncode != 0 and "hook" in proc.stderr.lower()
        assert not guarded.dom.isActive()
    finally:
        hook.write_bytes(shim)
        installed.point_at(VENV)
        _sighup()


@pytest.mark.parametrize("breakage", ["interpreter deleted", "package broken",
                                      "interpreter fails"])
def test_a_broken_hook_lets_the_domain_start(installed: Installed, guarded: TestDomain,
                                             breakage: str) -> None:
    target = {
        "interpreter deleted": installed.work / "deleted-venv",
        "package broken": _broken_package(installed.work),
        "interpreter fails": _broken_interpreter(installed.work),
    }[breakage]
    installed.point_at(target)
    try:
        _sighup()  # as after a daemon restart: libvirtd reads the hooks anew
        proc = _virsh_start(guarded)
        assert proc.returncode == 0, proc.stderr
        assert guarded.dom.isActive()
        guarded.shutoff()
    finally:
        installed.point_at(VENV)
        _sighup()
    # repaired, the same hook guards again
    proc = _virsh_start(guarded)
    assert proc.returncode != 0 and "cannot start" in proc.stderr
