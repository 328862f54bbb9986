"""Which domains a run over many takes, how several -c are parsed, and what it shows."""
from __future__ import annotations

import io

import pytest

from vmsnapbackup.cli import main
from vmsnapbackup.cli._manyview import ManyDisplay, summary_text
from vmsnapbackup.core.jobconfig import DomainEntry
from vmsnapbackup.errors import ExitCode, UsageError
from vmsnapbackup.progress import ProgressEvent
from vmsnapbackup.workflows.backupmany import (
    DomainBackup,
    DomainTarget,
    ManyBackups,
    list_inventories,
    select_domains,
)

A, B = "qemu+ssh://a/system", "qemu+ssh://b/system"
INV = {A: [DomainEntry("web1", True), DomainEntry("web2", False), DomainEntry("db", True)],
       B: [DomainEntry("db", True), DomainEntry("mail", True)]}


def names(targets: list[DomainTarget]) -> list[tuple[str, str]]:
    return [(t.uri, t.name) for t in targets]


def test_all_takes_every_connection_with_filters() -> None:
    got, failed = select_domains(INV, [], every=True)
    assert names(got) == [(A, "web1"), (A, "web2"), (A, "db"), (B, "db"), (B, "mail")]
    assert not failed
    got, _ = select_domains(INV, [], every=True, running=True, exclude=["m*"])
    assert names(got) == [(A, "web1"), (A, "db"), (B, "db")]
    got, _ = select_domains(INV, [], every=True, inactive=True)
    assert names(got) == [(A, "web2")]
    assert got[0].label == f"web2@{A}"


def test_names_over_several_connections_must_be_on_exactly_one() -> None:
    got, failed = select_domains(INV, ["mail", "db", "nope", "mail", "web1"], every=False,
                                 exclude=["web*"])
    assert names(got) == [(B, "mail")]
    assert [(f.target.name, f.exit_code) for f in failed] == [
        ("db", ExitCode.USAGE), ("nope", ExitCode.NOT_FOUND)]
    assert all(not f.ok and not f.started for f in failed)


def test_one_connection_takes_names_as_given() -> None:
    got, failed = select_domains({A: []}, ["3", "some-uuid"], every=False)
    assert [(t.name, t.label) for t in got] == [("3", "3"), ("some-uuid", "some-uuid")]
    assert not failed


@pytest.mark.parametrize("kwargs", [dict(every=True, running=True, inactive=True),
                                    dict(every=False, running=True),
                                    dict(every=False), ])
def test_contradictions_are_usage_errors(kwargs: dict) -> None:
    with pytest.raises(UsageError):
        select_domains({A: []}, [], **kwargs)
    with pytest.raises(UsageError):
        select_domains({A: []}, ["x"], every=True)


def test_a_connection_that_cannot_list_is_a_failure_of_the_run() -> None:
    from vmsnapbackup.errors import HypervisorError

    def lister(uri: str) -> list[DomainEntry]:
        if uri == B:
            raise HypervisorError("cannot connect")
        return INV[uri]

    inventories, failed = list_inventories([A, B, A], lister)
    assert list(inventories) == [A]
    assert [(f.target.uri, f.exit_code) for f in failed] == [(B, ExitCode.HYPERVISOR)]


def test_several_connections_only_for_backup(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-c", A, "-c", B, "list"]) == ExitCode.USAGE
    assert "only backup takes several" in capsys.readouterr().err


def test_backup_needs_a_domain_or_all(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["backup", "--parallel", "2"]) == ExitCode.USAGE
    assert main(["backup", "--parallel", "0", "x"]) == ExitCode.USAGE
    assert main(["backup", "--max-rate", "fast", "x"]) == ExitCode.USAGE
    assert "not a rate" in capsys.readouterr().err


def _run() -> ManyBackups:
    ok = DomainBackup(DomainTarget(A, "web1", "web1"), True, 2.0)
    bad = DomainBackup(DomainTarget(A, "db", "db"), False, 0.5, "UnsupportedDiskError: no disk",
                       9)
    return ManyBackups([ok, bad], seconds=2.5)


def test_summary_and_json_say_which_failed() -> None:
    run = _run()
    text = summary_text(run)
    assert text.splitlines()[0].split()[:2] == ["DOMAIN", "RESULT"]
    assert "FAILED" in text and "UnsupportedDiskError: no disk" in text
    assert text.splitlines()[-1] == "1 of 2 domains backed up in 2.5 s; failed: db"
    doc = run.to_dict()
    assert doc["failed"] == ["db"] and doc["exit_code"] == ExitCode.DOMAINS_FAILED
    assert [d["ok"] for d in doc["domains"]] == [True, False]
    assert ManyBackups(run.domains[:1]).exit_code == ExitCode.OK
    assert ManyBackups(run.domains[:1], interrupted=True).exit_code == ExitCode.INTERRUPTED


def test_display_a_line_per_domain_on_a_terminal() -> None:
    out = io.StringIO()
    now = [0.0]
    display = ManyDisplay(out, True, ["web1", "db"], clock=lambda: now[0])
    run = _run()
    display._stop.set()          # no ticker thread: draw on events only
    display.started(run.domains[0].target)
    now[0] = 2.0
    display.progress(run.domains[0].target, ProgressEvent("vda", "read", 50, 100))
    display.finished(run.domains[1].target, run.domains[1])
    display.close()
    last = out.getvalue().split("\x1b[2A")[-1]
    lines = [line.strip("\r").replace("\x1b[K", "") for line in last.split("\n")]
    assert lines[0].startswith("web1 [##########..........]  50.0%")
    assert lines[1].startswith("db   FAILED UnsupportedDiskError")


def test_display_log_lines_otherwise(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="vmsnapbackup.progress")
    display = ManyDisplay(io.StringIO(), False, ["web1", "db"])
    run = _run()
    display.started(run.domains[0].target)
    display.finished(run.domains[0].target, run.domains[0])
    display.finished(run.domains[1].target, run.domains[1])
    display.close()
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs[0] == "web1: backup started"
    assert msgs[1].startswith("web1: done") and msgs[2].startswith("db: FAILED")
