"""Metrics text: parses with prometheus_client's parser and holds the series of the state."""
from __future__ import annotations

from pathlib import Path

import pytest

from vmsnapbackup.core.metrics import MetricFamily, render
from vmsnapbackup.workflows.jobstate import load_state, save_state, write_metrics

parser = pytest.importorskip("prometheus_client.parser")


def test_render_escapes_labels_and_parses() -> None:
    fam = MetricFamily("points", "Points.")
    fam.add({"job": "a", "domain": 'we"ird\\dom\n'}, 3)
    text = render([fam, MetricFamily("empty", "No samples.")])
    (parsed,) = list(parser.text_string_to_metric_families(text))
    assert parsed.name == "vmsnapbackup_points"
    assert parsed.samples[0].labels == {"job": "a", "domain": 'we"ird\\dom\n'}
    assert parsed.samples[0].value == 3


def test_state_round_trip_and_metrics_file(tmp_path: Path) -> None:
    state = load_state(str(tmp_path), "nightly")
    state["run"] = {"finished": 1.7e9, "seconds": 12.5, "failures": 1, "ok": False}
    state["domains"] = {"web1": {"backup": {"ok": True, "last_success": 1.7e9,
                                            "bytes_written": 4096, "failures_total": 2},
                                 "pool": {"points": 4, "stored_bytes": 10}}}
    save_state(str(tmp_path), "nightly", state)
    assert load_state(str(tmp_path), "nightly") == state
    out = tmp_path / "m.prom"
    write_metrics(str(out), [state])
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in parser.text_string_to_metric_families(out.read_text()) for s in f.samples}
    key = (("domain", "web1"), ("job", "nightly"))
    assert got[("vmsnapbackup_backup_last_bytes_written", key)] == 4096
    assert got[("vmsnapbackup_backup_failures_total", key)] == 2
    assert got[("vmsnapbackup_points", key)] == 4
    assert got[("vmsnapbackup_run_last_failures", (("job", "nightly"),))] == 1
    assert not list(tmp_path.glob("*.tmp*"))
