"""run and status decisions with injected faults (the real stack: integration/test_jobs.py)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from vmsnapbackup.core.jobconfig import DomainEntry, parse_config
from vmsnapbackup.errors import LockedError
from vmsnapbackup.workflows import run as run_mod
from vmsnapbackup.workflows import status as status_mod
from vmsnapbackup.workflows.listing import PointSummary

CONFIG = """\
state-dir = "{state}"
[pools.p]
path = "/pool"
[jobs.j]
domains = "all"
pool = "p"
schedule = "daily"
rpo = "1h"
parallelism = 3
[jobs.j.retention]
keep-last = 2
[jobs.j.verify]
sample-percent = 10
full-every-days = 7
"""


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Any]:
    calls: dict[str, Any] = {"backup": [], "prune": [], "verify": []}
    inv = [DomainEntry("a", True), DomainEntry("bad", True), DomainEntry("c", False)]

    def backup(domain: str, pool: str, **kw: Any) -> Any:
        calls["backup"].append(domain)
        calls.setdefault("backup_kw", []).append(kw)
        if domain == "bad":
            raise LockedError("domain bad is locked by pid 1")
        return SimpleNamespace(point=3, generation=1, consistency="crash", disks=[],
                               bytes_written=0, bytes_read=0,
                               skipped=[], new_generation=False)

    def prune(domain: str, pool: str, **kw: Any) -> Any:
        calls["prune"].append((domain, kw))
        return SimpleNamespace(removed=[SimpleNamespace(number=1)], kept=[], bytes_freed=5)

    def verify(pool: str, **kw: Any) -> Any:
        calls["verify"].append((kw["domain"], kw["sample"]))
        return SimpleNamespace(ok=True, counts=lambda: {"good": 2})

    def list_points(pool: str, **kw: Any) -> list[PointSummary]:
        return [PointSummary(kw["domain"], "u", 3, taken="2026-01-01T00:00:00+00:00",
                             stored_bytes=7)]
    for mod in (run_mod, status_mod):
        monkeypatch.setattr(mod, "list_domains", lambda uri: inv)
        monkeypatch.setattr(mod, "list_points", list_points)
    monkeypatch.setattr(run_mod, "backup", backup)
    monkeypatch.setattr(run_mod, "prune", prune)
    monkeypatch.setattr(run_mod, "verify", verify)
    calls["config"] = parse_config(CONFIG.format(state=tmp_path / "state"), "c.toml")
    return calls


def test_one_failing_domain_does_not_stop_the_others(host: dict[str, Any]) -> None:
    (result,) = run_mod.run_jobs(host["config"])
    by = {d.domain: d for d in result.domains}
    assert sorted(host["backup"]) == ["a", "bad", "c"]
    assert not result.ok and result.failures == 1
    assert by["bad"].backup is not None and "LockedError" in (by["bad"].backup.error or "")
    assert by["bad"].prune is None and by["bad"].verify is None   # no prune without a new point
    assert [d for d, _ in host["prune"]] == ["a", "c"]
    assert host["prune"][0][1]["keep_last"] == 2
    # no threshold in the job: the generation policy decides, weighing the job's retention
    assert all(kw["options"].threshold is None and kw["options"].retention.keep_last == 2
               for kw in host["backup_kw"])
    assert host["verify"] == [("a", None), ("c", None)]           # first verify is full
    run_mod.run_jobs(host["config"], ["j"])
    assert host["verify"][2:] == [("a", 10.0), ("c", 10.0)]       # then sampled


def test_dry_run_neither_backs_up_nor_records(host: dict[str, Any], tmp_path: Path) -> None:
    (result,) = run_mod.run_jobs(host["config"], dry_run=True)
    assert result.ok and host["backup"] == [] and host["verify"] == []
    assert all(kw["dry_run"] for _, kw in host["prune"])
    assert not (tmp_path / "state").exists()


def test_status_levels(host: dict[str, Any]) -> None:
    run_mod.run_jobs(host["config"])
    now = 1767225600.0 + 600        # ten minutes after the points were taken
    report = status_mod.status(host["config"], now=now)
    levels = {d.domain: d.level for d in report.domains}
    assert levels == {"a": status_mod.OK, "bad": status_mod.WARNING, "c": status_mod.OK}
    assert report.level == status_mod.WARNING
    late = status_mod.status(host["config"], ["a"], now=now + 3600)
    assert late.level == status_mod.CRITICAL and late.domains[0].rpo_breached
