"""Failure paths of the storage daemon adapter that a real daemon does not reach.

The "daemon" here is a tiny fake executable (it never speaks QMP), which is
the only way to get a daemon that dies at once with a message, or one that
never answers. Also the pure helpers (backing path, runtime dir checks).
"""
from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from vmsnapbackup import errors
from vmsnapbackup.adapters import daemonprocess
from vmsnapbackup.adapters.processes import is_alive
from vmsnapbackup.adapters.storagedaemon import (
    RUNTIME_DIR_PREFIX,
    StorageDaemon,
    relative_backing_path,
    stop_leftover_daemon,
)


def fake_binary(tmp_path: Path, body: str) -> str:
    path = tmp_path / "fake-qsd"
    path.write_text(f"#!{sys.executable}\nimport sys, time\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_daemon_that_dies_at_start_reports_its_stderr(tmp_path: Path, run_base: str) -> None:
    binary = fake_binary(
        tmp_path, "sys.stderr.write('qemu-storage-daemon: --chardev: bogus option\\n'); sys.exit(1)"
    )
    d = StorageDaemon(run_base, tag="dies", binary=binary, start_timeout=10)
    with pytest.raises(errors.ExportError) as info:
        d.start()
    msg = str(info.value)
    assert "failed to start" in msg
    assert "exited with status 1" in msg
    assert "bogus option" in msg
    assert d.pid is not None and not is_alive(d.pid)
    assert d.runtime_dir is not None and not os.path.exists(d.runtime_dir)


def test_daemon_that_never_answers_is_killed_after_the_deadline(
    tmp_path: Path, run_base: str
) -> None:
    binary = fake_binary(tmp_path, "time.sleep(600)")
    d = StorageDaemon(run_base, tag="mute", binary=binary, start_timeout=0.5, stop_timeout=0.5)
    with pytest.raises(errors.ExportError, match="did not answer"), d:
        pass  # pragma: no cover - never reached
    assert d.pid is not None and not is_alive(d.pid)
    assert d.runtime_dir is not None and not os.path.exists(d.runtime_dir)


def test_missing_binary(run_base: str) -> None:
    d = StorageDaemon(run_base, tag="nobin", binary="/nonexistent/qemu-storage-daemon")
    with pytest.raises(errors.ExportError, match="cannot start"):
        d.start()
    assert d.runtime_dir is not None and not os.path.exists(d.runtime_dir)


def test_too_long_socket_path_is_refused_before_starting(tmp_path: Path) -> None:
    base = tmp_path / ("x" * 100)
    d = StorageDaemon(str(base), tag="long", binary="/nonexistent/never-run")
    with pytest.raises(errors.UsageError, match="too long for a unix socket"):
        d.start()
    assert d.pid is None
    assert os.listdir(base) == []


def test_started_once_only(tmp_path: Path, run_base: str) -> None:
    d = StorageDaemon(run_base, tag="once", binary="/nonexistent/never-run")
    with pytest.raises(errors.ExportError):
        d.start()
    with pytest.raises(errors.UsageError):
        d.start()
    d.close()  # idempotent after a failed start


def test_signal_handlers_are_restored(tmp_path: Path, run_base: str) -> None:
    import signal

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    binary = fake_binary(tmp_path, "sys.exit(3)")
    with pytest.raises(errors.ExportError):
        StorageDaemon(run_base, tag="sig", binary=binary).start()
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.parametrize(
    "image,backing,expected",
    [
        ("/pool/vm/vda/point-3.qcow2", "/pool/vm/vda/base.raw", "base.raw"),
        ("/pool/vm/vda/points/p.qcow2", "/pool/vm/vda/base.qcow2", "../base.qcow2"),
        ("/pool/a/p.qcow2", "/pool/b/c/base.raw", "../b/c/base.raw"),
        ("/pool/p.qcow2", "/pool/nbd:base.raw", "./nbd:base.raw"),
        ("/pool/p.qcow2", "/pool/d:x/base.raw", "./d:x/base.raw"),
    ],
)
def test_relative_backing_path(image: str, backing: str, expected: str) -> None:
    assert relative_backing_path(image, backing) == expected
    assert os.path.normpath(os.path.join(os.path.dirname(image), expected)) == backing


def test_lock_wording_is_recognised() -> None:
    for qemu in ('Failed to get shared "write" lock', 'Failed to get "write" lock',
                 'Failed to get "consistent read" lock'):
        msg = daemonprocess.image_lock_message("/img.qcow2", qemu)
        assert msg is not None and "is in use by a running QEMU (image lock)" in msg
        assert qemu in msg
    assert daemonprocess.image_lock_message("/img", "Could not open '/img': Permission denied") \
        is None


def test_runtime_dir_removal_refuses_what_is_not_ours(tmp_path: Path) -> None:
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "nbd.sock").touch()
    with pytest.raises(errors.UsageError, match="not a vmsnapbackup runtime directory"):
        stop_leftover_daemon(None, str(foreign))
    assert (foreign / "nbd.sock").exists()

    ours_by_name = tmp_path / (RUNTIME_DIR_PREFIX + "x-abc")
    ours_by_name.mkdir()
    (ours_by_name / "nbd.sock").touch()
    (ours_by_name / "precious.txt").write_text("data")
    with pytest.raises(errors.UsageError, match="precious.txt"):
        stop_leftover_daemon(None, str(ours_by_name))
    assert (ours_by_name / "precious.txt").read_text() == "data"

    clean = tmp_path / (RUNTIME_DIR_PREFIX + "y-def")
    clean.mkdir()
    for name in ("nbd.sock", "qmp.sock", "qsd.log", "qsd.pid"):
        (clean / name).touch()
    assert stop_leftover_daemon(None, str(clean)) is False  # empty pid file: nothing to stop
    assert not clean.exists()
    # already gone: nothing to do, no error
    assert stop_leftover_daemon(12345678, str(clean)) is False
