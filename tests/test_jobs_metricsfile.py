"""Metrics after standalone commands: what is recorded, what the file holds, what never
breaks the command (the real stack: integration/test_jobs_metrics.py)."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from vmsnapbackup.errors import LockedError
from vmsnapbackup.workflows import metricsfile
from vmsnapbackup.workflows.jobstate import (
    all_states,
    command_state_path,
    load_state,
    record_step,
    save_state,
)
from vmsnapbackup.workflows.metricsfile import MetricsTarget, metrics_target, recorded


def samples(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(path.read_text()) for s in f.samples}


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "vmsnapbackup.toml"
    path.write_text(f'state-dir = "{tmp_path / "state"}"\n'
                    f'metrics = "{tmp_path / "m.prom"}"\n[jobs.broken]\nbogus = 1\n')
    os.chmod(path, 0o600)
    return path


def test_target_from_config_even_with_broken_jobs(cfg: Path, tmp_path: Path) -> None:
    t = metrics_target(None, str(cfg))
    assert t == MetricsTarget(str(tmp_path / "m.prom"), str(tmp_path / "state"))
    assert metrics_target("/x.prom", str(cfg)) == MetricsTarget("/x.prom",
                                                                str(tmp_path / "state"))


def test_untrusted_config_is_not_used(cfg: Path, tmp_path: Path,
                                      caplog: pytest.LogCaptureFixture) -> None:
    os.chmod(cfg, 0o666)
    with caplog.at_level(logging.WARNING):
        t = metrics_target(str(tmp_path / "x.prom"), str(cfg))
    assert t is not None and t.state_dir == "/var/lib/vmsnapbackup/state"
    assert "writable by group or others" in caplog.text


def test_no_target_no_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metricsfile, "default_metrics_path", lambda: None)
    with recorded("backup", "d", "/pool", "test:///default",
                  config=str(tmp_path / "none.toml")) as rec:
        rec.done("d")
    assert not list(tmp_path.iterdir())


def test_success_then_failure_of_one_domain(cfg: Path, tmp_path: Path) -> None:
    with recorded("backup", "web", str(tmp_path / "nopool"), "test:///default",
                  config=str(cfg)) as rec:
        rec.backup(SimpleNamespace(domain="web", point=4,  # type: ignore[arg-type]
                                   bytes_written=10, bytes_read=30))
    with pytest.raises(LockedError):
        with recorded("backup", "web", str(tmp_path / "nopool"), "test:///default",
                      config=str(cfg)):
            raise LockedError("domain web is locked by pid 1")
    s = samples(tmp_path / "m.prom")
    key = (("domain", "web"),)        # standalone: no job label
    assert s[("vmsnapbackup_backup_last_success", key)] == 0
    assert s[("vmsnapbackup_backup_failures_total", key)] == 1
    assert s[("vmsnapbackup_backup_last_bytes_written", key)] == 10   # of the last good one
    assert s[("vmsnapbackup_backup_last_bytes_read", key)] == 30
    assert s[("vmsnapbackup_backup_last_success_timestamp_seconds", key)] > 0
    state = all_states(str(tmp_path / "state"))
    assert state[0]["domains"]["web"]["backup"]["error"].startswith("LockedError")


def test_job_series_survive_a_standalone_write(cfg: Path, tmp_path: Path) -> None:
    state_dir = str(tmp_path / "state")
    doc = load_state(state_dir, "nightly")
    record_step(doc["domains"].setdefault("db", {}), "backup", ok=True, seconds=1.0,
                error=None, detail={"point": 1, "bytes_written": 5}, now=100.0)
    doc["run"] = {"finished": 100.0, "failures": 0}
    save_state(state_dir, "nightly", doc)
    with recorded("verify", None, str(tmp_path / "nopool"), "test:///default",
                  config=str(cfg)) as rec:
        rec.verify(SimpleNamespace(sample=None, domains=[  # type: ignore[arg-type]
            SimpleNamespace(name="db", damaged=True), SimpleNamespace(name="web",
                                                                      damaged=False)]))
    s = samples(tmp_path / "m.prom")
    assert s[("vmsnapbackup_backup_last_success", (("domain", "db"), ("job", "nightly")))] == 1
    assert s[("vmsnapbackup_run_last_failures", (("job", "nightly"),))] == 0
    assert s[("vmsnapbackup_verify_last_ok", (("domain", "db"),))] == 0
    assert s[("vmsnapbackup_verify_last_ok", (("domain", "web"),))] == 1


def test_a_domain_name_cannot_escape_the_state_dir(tmp_path: Path) -> None:
    path = command_state_path(str(tmp_path), "../../etc/x")
    assert path.parent == tmp_path / "commands" and "/" not in path.name


def test_unwritable_metrics_never_break_the_command(cfg: Path, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "file").write_text("")
    blocked = tmp_path / "file" / "m.prom"        # a file where a directory must be
    result: Any = None
    with caplog.at_level(logging.ERROR):
        with recorded("prune", "d", "/nopool", "test:///default", metrics=str(blocked),
                      config=str(cfg)) as rec:
            result = "done"
            rec.prune(SimpleNamespace(domain="d", removed=[]))  # type: ignore[arg-type]
    assert result == "done" and "cannot write metrics" in caplog.text
