"""The host seam on the local machine: processes, files, qemu-img, signals."""
from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmsnapbackup.adapters import processes
from vmsnapbackup.adapters.host import LOCAL, LocalHost
from vmsnapbackup.adapters.qemuimg import QemuImg
from vmsnapbackup.errors import HypervisorError, StorageError, UsageError

needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="no qemu-img")


@pytest.fixture
def wide_umask() -> Iterator[None]:
    """The caller's umask must not matter: run with the widest one."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_run_captures_and_children_get_umask_077(wide_umask: None) -> None:
    done = LocalHost().run(["sh", "-c", "umask; echo oops >&2; exit 3"], timeout=10)
    assert done.stdout.strip() == b"0077"
    assert done.returncode == 3 and not done.ok
    assert done.message() == "oops"


def test_run_streams_stdout_and_enforces_the_deadline() -> None:
    seen: list[bytes] = []
    done = LOCAL.run(["sh", "-c", "echo a; echo b"], timeout=10, on_stdout=seen.append)
    assert b"".join(seen) == b"a\nb\n" and done.ok and done.stdout == b""
    with pytest.raises(HypervisorError, match="did not finish within"):
        LOCAL.run(["sleep", "30"], timeout=0.3)
    with pytest.raises(HypervisorError, match="did not finish within"):
        LOCAL.run(["sleep", "30"], timeout=0.3, on_stdout=seen.append)
    with pytest.raises(HypervisorError, match="cannot run"):
        LOCAL.run(["/nonexistent/tool"], timeout=1)


def test_started_process_logs_privately_and_is_stopped(tmp_path: Path,
                                                       wide_umask: None) -> None:
    log = tmp_path / "x.log"
    proc = LOCAL.start([sys.executable, "-c", ("import os,time; print(oct(os.umask(0)),"
                        " flush=True); time.sleep(60)")], log_path=str(log))
    try:
        deadline = time.monotonic() + 10
        while not log.read_text() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert processes.is_alive(proc.pid)
        args = LOCAL.process_arguments(proc.pid)
        assert args is not None and args[0] == sys.executable
        assert processes.program_arguments(proc.pid, "python") is not None
        assert processes.daemon_arguments(proc.pid) is None   # not a storage daemon
        assert processes.stop(proc.pid, timeout=5) is True
        assert proc.wait(5) is not None
        assert not processes.is_alive(proc.pid)
    finally:
        proc.kill()
        proc.wait(5)
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert log.read_text().strip() == "0o77"
    assert processes.stop(proc.pid, timeout=1) is False   # gone: nothing signalled


def test_zombie_is_not_alive() -> None:
    child = subprocess.Popen(["true"])
    assert processes.wait_gone(child.pid, 5)      # exited, not yet reaped: a zombie
    assert LOCAL.process_arguments(child.pid) is None
    child.wait()


def test_files_are_created_with_exact_modes(tmp_path: Path, wide_umask: None) -> None:
    h = LocalHost()
    f = str(tmp_path / "f")
    h.create_file(f)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    with pytest.raises(FileExistsError):
        h.create_file(f)
    h.write_file(str(tmp_path / "note"), b"hello")
    assert stat.S_IMODE(os.stat(tmp_path / "note").st_mode) == 0o600
    assert h.read_file(str(tmp_path / "note")) == b"hello"
    assert h.read_file(str(tmp_path / "note"), limit=2, from_end=True) == b"lo"
    assert h.read_file(str(tmp_path / "missing")) is None
    d = h.make_temp_dir(str(tmp_path), "qsd-")
    assert os.path.basename(d).startswith("qsd-") and stat.S_IMODE(os.stat(d).st_mode) == 0o700
    h.mkdir(str(tmp_path / "a" / "b"), 0o755, parents=True)
    assert stat.S_IMODE(os.stat(tmp_path / "a" / "b").st_mode) == 0o755
    info = h.stat(f)
    assert info is not None and info.is_file and info.permissions == 0o600
    assert h.stat(str(tmp_path / "missing")) is None
    assert h.unlink(f) is True and h.unlink(f) is False


def test_stop_signals_calls_the_handler_and_restores() -> None:
    before = {s: signal.getsignal(s) for s in processes.STOP_SIGNALS}
    got: list[int] = []
    with processes.stop_signals(got.append) as installed:
        assert installed
        os.kill(os.getpid(), signal.SIGHUP)
    assert got == [signal.SIGHUP]
    assert {s: signal.getsignal(s) for s in processes.STOP_SIGNALS} == before
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with processes.stop_signals(got.append, only_if_default=True):
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN   # the app's choice
    finally:
        signal.signal(signal.SIGTERM, before[signal.SIGTERM])


@needs_qemu_img
def test_qemu_img_create_is_private_from_the_start(tmp_path: Path, wide_umask: None) -> None:
    img = QemuImg()
    base = str(tmp_path / "base.qcow2")
    img.create(base, "qcow2", size=1 << 20, cluster_size=65536)
    assert stat.S_IMODE(os.stat(base).st_mode) == 0o600
    point = str(tmp_path / "p" / "point-2.qcow2")
    os.mkdir(tmp_path / "p")
    img.create(point, "qcow2", backing=base, backing_fmt="qcow2")
    info = img.info(point)
    assert info.format == "qcow2" and info.virtual_size == 1 << 20
    assert info.backing == "../base.qcow2" and info.backing_path == base
    assert stat.S_IMODE(os.stat(point).st_mode) == 0o600
    with pytest.raises(UsageError, match="already exists"):
        img.create(point, "qcow2", size=1 << 20)
    assert img.detect_format(base) == "qcow2"


@needs_qemu_img
def test_qemu_img_convert_into_a_precreated_file(tmp_path: Path, wide_umask: None) -> None:
    img = QemuImg()
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(65536) + bytes(65536 * 3))
    dst = str(tmp_path / "dst.qcow2")
    img.create(dst, "qcow2", size=src.stat().st_size)
    seen: list[float] = []
    img.convert(str(src), "raw", dst, "qcow2", progress=seen.append, target_is_zero=True)
    assert seen and seen[-1] == 100.0
    assert stat.S_IMODE(os.stat(dst).st_mode) == 0o600
    cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(src), dst],
                         check=False)
    assert cmp.returncode == 0
    with pytest.raises(HypervisorError, match="qemu-img convert of"):
        img.convert(str(tmp_path / "missing"), "raw", dst, "qcow2")
    assert not issubclass(HypervisorError, StorageError)
