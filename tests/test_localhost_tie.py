"""A child of ``LocalHost.run`` dies with us (issue 19: a SIGKILLed ``rebase`` left its
``qemu-img convert`` writing into the pool).  Real processes, no mocks."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

CHILD = """
import sys
from vmsnapbackup.adapters.host import LOCAL
LOCAL.run(["sh", "-c", "echo $$ > " + sys.argv[1] + "; exec sleep 60"], timeout=120)
"""


def _wait_for(cond: Callable[[], object], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_run_child_dies_when_we_are_killed(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", CHILD, str(pidfile)])
    try:
        assert _wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 20)
        child = int(pidfile.read_text())
        assert _alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert _wait_for(lambda: not _alive(child), 10), "run()'s child outlived us"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if pidfile.exists() and _alive(int(pidfile.read_text())):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
