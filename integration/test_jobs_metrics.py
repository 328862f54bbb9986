"""Metrics after standalone backup, prune and verify, and the new retention rules, for real.

On libvirtd + QEMU: a backup by hand, a failing one, a prune by ``--keep-hourly``
and a verify each replace the metrics file (parsed with prometheus_client's
parser) with their outcome, a failed backup shows as failed; then a ``run``
whose job prunes by ``keep-yearly`` adds its job's series and keeps theirs.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from domains import DiskSpec, DomainFactory

from vmsnapbackup.cli import main

pytestmark = pytest.mark.integration
parser = pytest.importorskip("prometheus_client.parser")

MiB = 2**20
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(path: Path) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in parser.text_string_to_metric_families(path.read_text())
            for s in f.samples}


def test_standalone_commands_publish_metrics(make_domain: DomainFactory, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    dom = make_domain(disks=[DiskSpec("vda", "qcow2", 4 * MiB)], name_prefix="vsb-test-met")
    pool = tmp_path / "pool"
    pool.mkdir()
    metrics = tmp_path / "vmsnapbackup.prom"
    cfg = tmp_path / "vmsnapbackup.toml"
    cfg.write_text(f"""
state-dir = "{tmp_path / 'state'}"
metrics = "{metrics}"
[pools.main]
path = "{pool}"
[jobs.night]
domains = ["{dom.name}"]
pool = "main"
schedule = "daily"
[jobs.night.retention]
keep-yearly = 1
""")
    os.chmod(cfg, 0o600)
    at = ["--pool", str(pool)]
    conf = ["--config", str(cfg)]          # its metrics key names the file
    alone = (("domain", dom.name),)        # standalone series carry no job label

    assert main([*at, "backup", dom.name, *conf]) == 0
    s = samples(metrics)
    assert s[("vmsnapbackup_backup_last_success", alone)] == 1
    assert s[("vmsnapbackup_points", alone)] == 1
    first_success = s[("vmsnapbackup_backup_last_success_timestamp_seconds", alone)]
    assert first_success > time.time() - 600

    assert main([*at, "backup", dom.name, "--disk", "vdz", *conf]) != 0
    capsys.readouterr()
    s = samples(metrics)
    assert s[("vmsnapbackup_backup_last_success", alone)] == 0
    assert s[("vmsnapbackup_backup_failures_total", alone)] == 1
    assert s[("vmsnapbackup_backup_last_success_timestamp_seconds", alone)] == first_success

    dom.write("vda", MiB, 64 * 1024, 0x5C)
    assert main([*at, "backup", dom.name, *conf, "--metrics", str(tmp_path / "other.prom")]) \
        == 0
    assert samples(tmp_path / "other.prom")[("vmsnapbackup_points", alone)] == 2
    capsys.readouterr()
    assert main([*at, "prune", dom.name, "--keep-hourly", "1", "--json", *conf]) == 0
    assert [p["number"] for p in json.loads(capsys.readouterr().out)["removed"]] == [1]
    s = samples(metrics)
    assert s[("vmsnapbackup_prune_last_removed_points", alone)] == 1
    assert s[("vmsnapbackup_points", alone)] == 1

    assert main([*at, "verify", dom.name, *conf]) == 0
    assert samples(metrics)[("vmsnapbackup_verify_last_ok", alone)] == 1

    # a run of the job: a new point, prune by keep-yearly leaves one; its series join
    dom.write("vda", 2 * MiB, 4096, 0x6D)
    capsys.readouterr()
    assert main(["run", *conf, "--json"]) == 0
    (domain_run,) = json.loads(capsys.readouterr().out)["jobs"][0]["domains"]
    assert domain_run["prune"]["detail"]["removed"] == [2]
    s = samples(metrics)
    in_job = (("domain", dom.name), ("job", "night"))
    assert s[("vmsnapbackup_backup_last_success", in_job)] == 1
    assert s[("vmsnapbackup_points", in_job)] == 1
    assert s[("vmsnapbackup_prune_last_removed_points", in_job)] == 1
    assert s[("vmsnapbackup_verify_last_ok", alone)] == 1      # the standalone ones stay
