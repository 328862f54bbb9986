"""A remote backup's pool-writing daemon: what a dead one left is found and removed."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from vmsnapbackup.adapters import processes, writerdirs
from vmsnapbackup.adapters.daemonprocess import LOG_FILE, PID_FILE


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _writer(base: Path, name: str, pid: int | None, extra: str | None = None) -> Path:
    d = base / name
    d.mkdir(parents=True)
    (d / LOG_FILE).write_text("log\n")
    if pid is not None:
        (d / PID_FILE).write_text(f"{pid}\n")
    if extra:
        (d / extra).write_text("not ours\n")
    return d


def test_only_dead_writers_directories_go(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMSNAPBACKUP_RUNTIME_DIR", str(tmp_path))
    base = Path(writerdirs.writers_base())
    assert base == tmp_path / "writers"
    assert writerdirs.sweep_dead_writers() == []          # no writers/ yet: nothing to do
    dead = _writer(base, "qsd-web-3-vol-aaaa", _dead_pid())
    live = _writer(base, "qsd-web-4-vol-bbbb", 4242)
    starting = _writer(base, "qsd-db-1-vol-cccc", None)   # pid file not written yet
    foreign = _writer(base, "qsd-db-2-vol-dddd", _dead_pid(), extra="notes.txt")
    other = _writer(base, "something-else", _dead_pid())
    # 4242 is a live storage daemon started with its directory; nothing else is alive
    monkeypatch.setattr(processes, "is_alive", lambda pid, host=None: pid == 4242)
    monkeypatch.setattr(processes, "started_with",
                        lambda pid, needle, host=None: pid == 4242 and needle == f"{live}/")
    assert writerdirs.sweep_dead_writers() == [str(dead)]
    assert not dead.exists()
    assert live.exists() and starting.exists() and other.exists()
    assert (foreign / "notes.txt").exists()               # not ours: never removed


def test_a_reused_pid_does_not_keep_a_dead_writer(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMSNAPBACKUP_RUNTIME_DIR", str(tmp_path))
    d = _writer(Path(writerdirs.writers_base()), "qsd-web-5-vol-eeee", 4243)
    monkeypatch.setattr(processes, "is_alive", lambda pid, host=None: True)
    monkeypatch.setattr(processes, "started_with", lambda pid, needle, host=None: False)
    assert writerdirs.sweep_dead_writers() == [str(d)]
