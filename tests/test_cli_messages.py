"""The command line's own messages: one error class for a pool path through a
file at any depth, ``--quiet``, the umask, and a progress line that keeps moving."""
from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import List

import pytest

from vmsnapbackup.cli import UMASK, main
from vmsnapbackup.cli import list_points as list_command
from vmsnapbackup.cli.common import PROGRESS_LOGGER, Context, ProgressDisplay, setup_logging
from vmsnapbackup.core.pool import Pool
from vmsnapbackup.errors import ExitCode
from vmsnapbackup.progress import ProgressEvent

MiB = 1 << 20


class _Tty(io.StringIO):
    """A terminal stand-in that the ticker thread and the test may share."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()

    def isatty(self) -> bool:
        return True

    def write(self, s: str) -> int:
        with self.lock:
            return super().write(s)

    def text(self) -> str:
        with self.lock:
            return self.getvalue()


# --pool -------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["list"], ["backup", "web1"], ["verify"]])
def test_a_file_in_the_pool_path_is_one_error_at_any_depth(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], command: List[str]) -> None:
    afile = tmp_path / "file"
    afile.write_text("not a pool")
    results = []
    for pool in (afile, afile / "sub", afile / "sub" / "deeper"):
        rc = main(["--pool", str(pool), *command, "--json"])
        out, err = capsys.readouterr()
        results.append((rc, json.loads(out)["error"]["kind"]))
        assert err.count("\n") == 1 and f"{afile} is not a directory" in err
    assert results == [(ExitCode.NOT_FOUND, "NotFoundError")] * 3
    assert not (afile / "sub").exists()


# --quiet ------------------------------------------------------------------------------

def test_quiet_silences_progress_and_summaries_but_not_data_or_errors() -> None:
    out, err = io.StringIO(), io.StringIO()
    ctx = Context(uri="qemu:///system", pool="/p", quiet=True, out=out, err=err)
    assert ctx.progress() is None
    ctx.emit({"point": 3}, "domain web1: point 3")
    assert out.getvalue() == ""
    ctx.emit({"points": []}, "no points", data=True)
    assert out.getvalue() == "no points\n"
    ctx.fail_message("it broke", ExitCode.ERROR)
    assert err.getvalue() == "vmsnapbackup: error: it broke\n"
    loud = Context(uri="qemu:///system", pool="/p", out=io.StringIO(), err=io.StringIO())
    assert loud.progress() is not None
    loud.close()


def test_quiet_keeps_the_progress_logger_at_warnings() -> None:
    progress_log = logging.getLogger(PROGRESS_LOGGER)
    before = progress_log.level
    try:
        setup_logging(verbose=False, debug=False, quiet=True)
        assert progress_log.getEffectiveLevel() == logging.WARNING
        setup_logging(verbose=False, debug=False, quiet=False)
        assert progress_log.getEffectiveLevel() == logging.INFO
    finally:
        progress_log.setLevel(before)


def test_quiet_list_still_lists(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Pool.create(tmp_path / "pool")
    assert main(["-q", "--pool", str(tmp_path / "pool"), "list"]) == 0
    assert capsys.readouterr().out == "no points\n"


def test_quiet_and_verbose_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-q", "-v", "list"]) == ExitCode.USAGE
    assert "not allowed with" in capsys.readouterr().err


# umask --------------------------------------------------------------------------------

def test_the_command_runs_under_umask_077_and_the_caller_keeps_its_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []

    def run(args: object, ctx: Context) -> int:
        current = os.umask(0)
        os.umask(current)
        seen.append(current)
        (tmp_path / "made-by-the-command").write_text("x")
        return 0

    monkeypatch.setattr(list_command, "run", run)
    before = os.umask(0o022)
    try:
        assert main(["--pool", str(tmp_path), "list"]) == 0
        after = os.umask(0o022)
    finally:
        os.umask(before)
    assert seen == [UMASK] == [0o077]
    assert after == 0o022
    assert (tmp_path / "made-by-the-command").stat().st_mode & 0o777 == 0o600


# progress on a terminal ---------------------------------------------------------------

class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_line_shows_rate_and_eta_and_moves_without_events() -> None:
    stream, clock = _Tty(), _Clock()
    show = ProgressDisplay(stream, bar=True, clock=clock)
    try:
        show(ProgressEvent("vda", "read", 0, 100 * MiB))
        clock.now += 1
        show(ProgressEvent("vda", "read", 10 * MiB, 100 * MiB))
        first = stream.text().split("\r")[-1]
        assert "10.0%" in first and "10.0 MiB/s" in first and "ETA 0:09" in first
        clock.now += 1          # a slow chunk: no event for a second
        show.redraw()           # what the ticker does
        second = stream.text().split("\r")[-1]
        assert "5.0 MiB/s" in second and "ETA 0:18" in second
    finally:
        show.close()


def test_several_disks_share_one_line_and_each_ends_with_its_own() -> None:
    stream, clock = _Tty(), _Clock()
    show = ProgressDisplay(stream, bar=True, clock=clock)
    show(ProgressEvent("vda", "read", 0, 10 * MiB))
    show(ProgressEvent("vdb", "read", 0, 10 * MiB))
    clock.now += 1
    show(ProgressEvent("vda", "read", 5 * MiB, 10 * MiB))
    show(ProgressEvent("vdb", "read", 2 * MiB, 10 * MiB))
    show.redraw()
    line = stream.text().split("\r")[-1]
    assert "vda read 50%" in line and "vdb read 20%" in line and "7.0 MiB/s" in line
    show(ProgressEvent("vda", "read", 10 * MiB, 10 * MiB, finished=True))
    assert "vda read     100.0% 10.0 MiB in" in stream.text()
    show.close()
    assert stream.text().endswith("\n")


def test_a_ticker_redraws_while_no_event_comes_and_stops_with_close() -> None:
    stream = _Tty()
    show = ProgressDisplay(stream, bar=True)
    show.TICK = 0.05
    before = set(threading.enumerate())
    show(ProgressEvent("vda", "read", 1, 10))
    (ticker,) = set(threading.enumerate()) - before
    drawn = stream.text().count("\r")
    deadline = time.monotonic() + 10
    while stream.text().count("\r") < drawn + 2:  # two redraws with no event between
        assert time.monotonic() < deadline, "the line did not move without events"
        threading.Event().wait(0.01)
    show.close()
    assert ticker.name == "vsb-progress" and not ticker.is_alive()
    assert stream.text().endswith("\n")
