"""A job file run for real: two jobs over three throwaway domains, one shut off, one failing.

Proves on libvirtd + QEMU that ``run`` backs up, prunes and verifies as configured
while a failing domain does not stop the others, that ``status`` reports an RPO
breach as critical, that the metrics file parses with prometheus_client's parser
and holds the expected series, and that the installed units pass systemd-analyze.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from domains import DiskSpec, DomainFactory

from vmsnapbackup.adapters.jobfiles import load_config
from vmsnapbackup.cli import main
from vmsnapbackup.workflows.status import CRITICAL, status

pytestmark = pytest.mark.integration
parser = pytest.importorskip("prometheus_client.parser")

MiB = 2**20


def run_json(capsys: pytest.CaptureFixture[str], argv: list) -> tuple:
    code = main(argv)
    out = capsys.readouterr().out
    return code, json.loads(out)


def test_two_jobs_three_domains(make_domain: DomainFactory, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    running = make_domain(disks=[DiskSpec("vda", "qcow2", 8 * MiB)], name_prefix="vsb-test-jobA")
    stopped = make_domain(disks=[DiskSpec("vda", "raw", 4 * MiB)], start=False,
                          name_prefix="vsb-test-jobB")
    failing = make_domain(disks=[DiskSpec("vda", "qcow2", 4 * MiB)], name_prefix="vsb-test-jobC")
    running.write("vda", 2 * MiB, MiB, 0x5A)      # data the first backup must read
    pool = tmp_path / "pool"
    pool.mkdir()
    cfg = tmp_path / "vmsnapbackup.toml"
    cfg.write_text(f"""
state-dir = "{tmp_path / 'state'}"
[pools.main]
path = "{pool}"

[jobs.alpha]
domains = ["{running.name}", "{stopped.name}"]
pool = "main"
schedule = "*-*-* 02:00"
rpo = "1h"
parallelism = 2
[jobs.alpha.retention]
keep-last = 1
[jobs.alpha.verify]
sample-percent = 50
full-every-days = 1

[jobs.beta]
domains = ["{failing.name}"]
disks = ["vdz"]
pool = "main"
schedule = "hourly"
rpo = "2h"
""")
    os.chmod(cfg, 0o600)
    metrics = tmp_path / "vmsnapbackup.prom"
    base = ["--config", str(cfg)]

    code, dry = run_json(capsys, ["run", *base, "--dry-run", "--json", "alpha"])
    assert code == 0 and dry["jobs"][0]["dry_run"]
    assert not any(pool.iterdir()), "a dry run wrote into the pool"

    code, doc = run_json(capsys, ["run", *base, "--metrics", str(metrics), "--json"])
    assert code == 1 and not doc["ok"]
    jobs: dict[str, Any] = {j["job"]: j for j in doc["jobs"]}
    alpha = {d["domain"]: d for d in jobs["alpha"]["domains"]}
    assert jobs["alpha"]["ok"] and set(alpha) == {running.name, stopped.name}
    assert alpha[running.name]["backup"]["detail"]["bytes_read"] >= MiB
    assert alpha[running.name]["backup"]["detail"]["bytes_written"] >= MiB
    for d in alpha.values():
        assert d["backup"]["detail"]["point"] == 1
        assert d["verify"]["ok"] and d["verify"]["detail"]["sample_percent"] is None  # first: full
    (beta,) = jobs["beta"]["domains"]
    assert beta["domain"] == failing.name and not beta["backup"]["ok"]
    assert beta["prune"] is None and beta["verify"] is None

    code, doc = run_json(capsys, ["run", *base, "--metrics", str(metrics), "--json", "alpha"])
    assert code == 0
    for d in doc["jobs"][0]["domains"]:
        assert d["backup"]["detail"]["point"] == 2
        assert d["prune"]["detail"]["removed"] == [1]            # keep-last = 1
        assert d["verify"]["detail"]["sample_percent"] == 50.0   # full one was < 1 day ago

    # metrics: parse with the reference parser, expected series present
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in parser.text_string_to_metric_families(metrics.read_text())
               for s in f.samples}
    for dom in (running.name, stopped.name):
        key = (("domain", dom), ("job", "alpha"))
        assert samples[("vmsnapbackup_backup_last_success", key)] == 1
        assert samples[("vmsnapbackup_points", key)] == 1
        assert samples[("vmsnapbackup_backup_last_success_timestamp_seconds", key)] \
            > time.time() - 600
        assert samples[("vmsnapbackup_verify_last_ok", key)] == 1
        assert samples[("vmsnapbackup_prune_last_removed_points", key)] == 1
        assert ("vmsnapbackup_backup_last_bytes_read", key) in samples
        assert samples[("vmsnapbackup_stored_bytes", key)] > 0
    bkey = (("domain", failing.name), ("job", "beta"))
    assert samples[("vmsnapbackup_backup_failures_total", bkey)] == 1
    assert samples[("vmsnapbackup_backup_last_success", bkey)] == 0
    assert samples[("vmsnapbackup_run_last_failures", (("job", "beta"),))] == 1

    # status: fresh points are ok; the failing domain has none (critical); two hours on,
    # the RPO of 1 h is broken (critical)
    assert main(["status", *base, running.name, stopped.name]) == 0
    assert "OK: 2 domain(s)" in capsys.readouterr().out
    code, st = run_json(capsys, ["status", *base, "--json", failing.name])
    assert code == 2 and st["domains"][0]["state"] == "critical"
    later = status(load_config(str(cfg)), [running.name], now=time.time() + 7200)
    assert later.level == CRITICAL and later.domains[0].rpo_breached

    if shutil.which("systemd-analyze"):
        assert main(["schedule", "install", *base, "--unit-dir", str(tmp_path / "units")]) == 0
        assert (tmp_path / "units" / "vmsnapbackup-alpha.timer").is_file()
