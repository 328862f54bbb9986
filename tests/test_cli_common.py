"""The CLI's shared output: one-line errors, JSON documents, progress display."""
from __future__ import annotations

import io
import json
import logging

import pytest

from vmsnapbackup.cli import main
from vmsnapbackup.cli.common import Context, ProgressDisplay
from vmsnapbackup.errors import ExitCode, LockedError
from vmsnapbackup.progress import ProgressEvent


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_errors_are_one_line_and_json_when_asked() -> None:
    out, err = io.StringIO(), io.StringIO()
    ctx = Context(uri="qemu:///system", pool="/p", json=True, out=out, err=err)
    ctx.fail(LockedError("domain web1 is locked\nby pid 7"))
    assert err.getvalue() == "vmsnapbackup: error: domain web1 is locked by pid 7\n"
    doc = json.loads(out.getvalue())
    assert doc["error"] == {"kind": "LockedError", "message": "domain web1 is locked by pid 7",
                            "exit_code": int(ExitCode.LOCKED)}


def test_usage_errors_exit_2_without_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["backup"]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("vmsnapbackup: error: ")
    assert main(["no-such-command"]) == ExitCode.USAGE


def test_progress_bar_is_throttled_but_shows_the_end() -> None:
    stream = _Tty()
    show = ProgressDisplay(stream, bar=True)
    for done in range(0, 1000):
        show(ProgressEvent("vda", "read", done, 1000))
    show(ProgressEvent("vda", "read", 1000, 1000, finished=True))
    show.close()
    text = stream.getvalue()
    assert text.count("\r") < 50 and "100.0%" in text and text.endswith("\n")


def test_progress_without_a_terminal_is_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    show = ProgressDisplay(io.StringIO(), bar=False)
    with caplog.at_level(logging.INFO, logger="vmsnapbackup.progress"):
        show(ProgressEvent("vdb", "restore", 5, 10))
        show(ProgressEvent("vdb", "restore", 10, 10, finished=True))
    assert any("vdb restore 100.0%" in r.getMessage() for r in caplog.records)
