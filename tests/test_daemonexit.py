"""How a command waits for its storage daemon to go, and how often it sweeps what
killed commands left (issues 16/20: the fixed cost of a backup).

Real child processes, no timing asserted: what is checked is *how* we wait
(a pidfd, not ``Popen.wait``'s sleeping poll) and how often we sweep.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import List, Optional

from vmsnapbackup.adapters import daemonleftover
from vmsnapbackup.adapters.daemonlaunch import wait_exit
from vmsnapbackup.adapters.host import LOCAL, HostProcess


class _Recording:
    """A local child whose waits are recorded."""

    def __init__(self, code: str) -> None:
        self._proc = subprocess.Popen([sys.executable, "-c", code])
        self.waits: List[Optional[float]] = []

    @property
    def pid(self) -> int:
        return self._proc.pid

    def poll(self) -> Optional[int]:
        return self._proc.poll()

    def wait(self, timeout: Optional[float]) -> Optional[int]:
        self.waits.append(timeout)
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        self._proc.kill()


def test_the_exit_is_awaited_on_a_pidfd_not_by_polling() -> None:
    proc = _Recording("import time; time.sleep(0.3); raise SystemExit(3)")
    child: HostProcess = proc
    assert wait_exit(LOCAL, child, 10.0) == 3
    assert proc.waits == [0.0]          # only the reaping of a child known to be gone


def test_a_child_that_does_not_exit_in_time_is_none_and_stays_ours() -> None:
    proc = _Recording("import time; time.sleep(30)")
    try:
        assert wait_exit(LOCAL, proc, 0.2) is None
        assert proc.waits == [] and proc.poll() is None
    finally:
        proc.kill()
    assert wait_exit(LOCAL, proc, 10.0) == -9


def test_a_runtime_base_is_swept_once_per_process(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()

    def orphan(name: str) -> Path:
        path = tmp_path / f"qsd-{name}"
        path.mkdir()
        (path / "qsd.pid").write_text(f"{dead.pid}\n")
        return path

    first = orphan("first")
    assert daemonleftover.sweep_once(str(tmp_path), LOCAL) == [str(first)]
    second = orphan("second")           # left while this command runs
    assert daemonleftover.sweep_once(str(tmp_path), LOCAL) == []
    assert second.is_dir()              # the next command's (or repair's) to sweep
    other = tmp_path / "other"
    other.mkdir()
    third = Path(str(orphan("third")).replace(str(tmp_path), str(other)))
    (tmp_path / "qsd-third").rename(third)
    assert daemonleftover.sweep_once(str(other), LOCAL) == [str(third)]
