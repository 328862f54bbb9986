from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from vmsnapbackup.core.lock import DomainLock, LockHolder
from vmsnapbackup.errors import LockedError

HOLDER = r"""
import sys
from vmsnapbackup.core.lock import DomainLock
lk = DomainLock(sys.argv[1], sys.argv[2]).acquire()
print("locked", flush=True)
if sys.stdin.readline().strip() == "release":
    lk.release()
    print("released", flush=True)
"""


class Holder:
    """A real second process holding the lock until told to release or killed."""

    def __init__(self, path: Path, operation: str = "backup") -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), operation],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        assert line.strip() == "locked", self.proc.stderr.read()  # type: ignore[union-attr]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def release(self) -> None:
        self.proc.stdin.write("release\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        assert self.proc.stdout.readline().strip() == "released"  # type: ignore[union-attr]
        self.close()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f:
                f.close()


@pytest.fixture
def holder_factory(tmp_path: Path) -> Iterator:
    made = []

    def make(operation: str = "backup") -> Holder:
        h = Holder(tmp_path / "lock", operation)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def test_note_written_while_held_and_emptied_on_release(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    with DomainLock(path, "prune") as lk:
        assert lk.held
        note = json.loads(path.read_text())
        assert note["pid"] == os.getpid() and note["operation"] == "prune"
        assert note["host"] == socket.gethostname() and note["since"].endswith("Z")
        assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    assert not lk.held
    assert path.exists() and path.read_bytes() == b""  # never removed, note cleared


def test_second_process_fails_at_once_naming_the_first(tmp_path: Path, holder_factory) -> None:
    h = holder_factory("backup")
    with pytest.raises(LockedError) as ei:
        DomainLock(tmp_path / "lock", "prune", what="domain web1 (u)").acquire()
    msg = str(ei.value)
    assert f"pid {h.pid}" in msg and "backup" in msg and "domain web1 (u)" in msg
    assert socket.gethostname() in msg


def test_takeover_after_sigkill_reports_previous_holder(tmp_path: Path, holder_factory,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "lock"
    h = holder_factory("backup")
    inode = path.stat().st_ino
    h.kill()
    with caplog.at_level(logging.WARNING, logger="vmsnapbackup.core.lock"):
        with DomainLock(path, "repair") as lk:
            assert lk.previous_holder is not None
            assert lk.previous_holder.pid == h.pid
            assert lk.previous_holder.operation == "backup"
            assert json.loads(path.read_text())["pid"] == os.getpid()
    assert f"took over lock left by dead process {h.pid}" in caplog.text
    assert path.stat().st_ino == inode


def test_clean_release_leaves_no_previous_holder(tmp_path: Path, holder_factory) -> None:
    h = holder_factory()
    h.release()
    with DomainLock(tmp_path / "lock", "backup") as lk:
        assert lk.previous_holder is None


def test_not_reentrant_in_one_process(tmp_path: Path) -> None:
    with DomainLock(tmp_path / "lock", "backup"):
        with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
            DomainLock(tmp_path / "lock", "backup").acquire()


def test_lock_is_released_on_exception(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with DomainLock(tmp_path / "lock", "backup"):
            raise RuntimeError
    with DomainLock(tmp_path / "lock", "backup") as lk:
        assert lk.previous_holder is None


def test_garbage_note_does_not_stop_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    path.write_bytes(b"\x00\xffgarbage")
    with DomainLock(path, "backup") as lk:
        assert lk.previous_holder == LockHolder(None, None, None, None)
    path.write_bytes(b"\x00\xffgarbage")
    # a holder whose note is unreadable is still reported as locked, not as free
    lk1 = DomainLock(path, "backup")
    os.truncate(path, 0)
    lk1.acquire()
    try:
        os.truncate(path, 0)
        with pytest.raises(LockedError, match="no note"):
            DomainLock(path, "prune").acquire()
    finally:
        lk1.release()


def test_holder_parse_and_describe() -> None:
    assert LockHolder.parse("") is None
    h = LockHolder.parse('{"pid": 7, "host": "h", "operation": "backup", "since": "t"}\n')
    assert h == LockHolder(7, "h", "backup", "t")
    assert h.describe() == "pid 7 on host h (backup since t)"
    assert LockHolder.parse('{"pid": "7"}').pid is None
