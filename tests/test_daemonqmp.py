"""First contact with a daemon that takes the QMP connection but never greets.

A real qemu-storage-daemon did that once under load (a soak run waited forever
at the first QMP exchange).  A real daemon cannot be made to do it on demand, so
a small fake stands in: it listens on the QMP socket named on its command line
and, depending on how often it has been started, stays silent or speaks just
enough QMP.  What is checked is ours: the deadline, the one restart, the error,
and that nothing is left behind.
"""
from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from vmsnapbackup import errors
from vmsnapbackup.adapters.daemonprocess import DaemonProcess
from vmsnapbackup.adapters.processes import is_alive

_FAKE = r'''
import json, os, socket, sys, time
count_file, silent_starts = sys.argv[1], int(sys.argv[2])
starts = int(open(count_file).read() or 0) + 1 if os.path.exists(count_file) else 1
with open(count_file, "w") as f:
    f.write(str(starts))
spec = sys.argv[sys.argv.index("--chardev") + 1]
path = [p.split("=", 1)[1] for p in spec.split(",") if p.startswith("path=")][0]
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(path)
server.listen(1)
conn, _ = server.accept()
if starts <= silent_starts:
    time.sleep(600)                      # connected, never a greeting
version = {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "fake"}
conn.sendall(json.dumps({"QMP": {"version": version, "capabilities": []}}).encode() + b"\n")
buf, decoder = "", json.JSONDecoder()
while True:                              # QMP messages need no newline: decode a stream
    chunk = conn.recv(4096).decode()
    if not chunk:
        break
    buf += chunk
    while buf.strip():
        try:
            msg, end = decoder.raw_decode(buf.lstrip())
        except ValueError:
            break
        buf = buf.lstrip()[end:]
        reply = {"return": {}, **({"id": msg["id"]} if "id" in msg else {})}
        conn.sendall(json.dumps(reply).encode() + b"\n")
        if msg.get("execute") == "quit":
            sys.exit(0)
'''


def _fake(tmp_path: Path, silent_starts: int) -> tuple[str, Path]:
    """A fake daemon binary silent for its first ``silent_starts`` starts."""
    count = tmp_path / "starts"
    script = tmp_path / "fake-qsd"
    script.write_text(f"#!{sys.executable}\nimport sys\n"
                      f"sys.argv[1:1] = [{str(count)!r}, {str(silent_starts)!r}]\n{_FAKE}")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script), count


def test_a_silent_daemon_is_replaced_once_and_the_new_one_is_used(
        tmp_path: Path, run_base: str) -> None:
    binary, count = _fake(tmp_path, silent_starts=1)
    d = DaemonProcess(run_base, tag="silent1", binary=binary, start_timeout=1.5,
                      stop_timeout=2, handle_signals=False)
    d.start()
    try:
        assert d.qmp("query-version") == {}
        pid = d.pid
    finally:
        d.close()
    assert count.read_text() == "2"
    assert pid is not None and not is_alive(pid)


def test_a_daemon_silent_twice_fails_with_one_clear_error_and_leaves_nothing(
        tmp_path: Path, run_base: str) -> None:
    binary, count = _fake(tmp_path, silent_starts=2)
    d = DaemonProcess(run_base, tag="silent2", binary=binary, start_timeout=1.0,
                      stop_timeout=1, handle_signals=False)
    with pytest.raises(errors.ExportError, match=r"no QMP greeting.*twice"):
        d.start()
    assert count.read_text() == "2"
    assert d.pid is not None and not is_alive(d.pid)
    assert d.runtime_dir is not None and not os.path.exists(d.runtime_dir)


def test_a_daemon_that_greets_at_once_is_started_once(tmp_path: Path, run_base: str) -> None:
    binary, count = _fake(tmp_path, silent_starts=0)
    d = DaemonProcess(run_base, tag="greets", binary=binary, start_timeout=5,
                      stop_timeout=2, handle_signals=False)
    d.start()
    try:
        assert d.qmp("query-version") == {}
    finally:
        d.close()
    assert count.read_text() == "1"


def test_a_new_daemon_sweeps_the_directories_killed_commands_left(
        tmp_path: Path, run_base: str) -> None:
    import subprocess

    def leftover(name: str, pid: int | None, extra: str | None = None) -> Path:
        path = Path(run_base) / f"qsd-{name}"
        path.mkdir()
        (path / "qsd.log").write_text("log")
        if pid is not None:
            (path / "qsd.pid").write_text(f"{pid}\n")
        if extra:
            (path / extra).write_text("not ours")
        return path

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = leftover("orphan", dead.pid)
    reused = leftover("reused", os.getpid())          # a live pid that is not its daemon
    starting = leftover("starting", None)              # no pid file yet: may be starting
    foreign = leftover("foreign", dead.pid, extra="precious.txt")
    serving = Path(run_base) / "qsd-serving"
    serving.mkdir()
    daemon = subprocess.Popen(["qemu-storage-daemon", "-c", "import time; time.sleep(60)",
                               f"{serving}/qmp.sock"], executable=sys.executable)
    (serving / "qsd.pid").write_text(f"{daemon.pid}\n")
    try:
        binary, _ = _fake(tmp_path, silent_starts=0)
        d = DaemonProcess(run_base, tag="sweeper", binary=binary, start_timeout=5,
                          stop_timeout=2, handle_signals=False)
        d.start()
        d.close()
        assert not orphan.exists() and not reused.exists()
        assert starting.is_dir() and foreign.is_dir() and serving.is_dir()
    finally:
        daemon.kill()
        daemon.wait()
        for path in (starting, foreign, serving):
            for f in path.iterdir():
                f.unlink()
            path.rmdir()
