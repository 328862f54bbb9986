"""``status`` as a monitoring check, and a bad job file, on libvirtd + QEMU.

The command line's exit codes are what a monitoring system sees, so they are
checked through ``main`` (not the library's ``now=``): 0 after a good run,
1 once the last backup attempt failed while a recent point exists, 2 once the
newest point is older than the RPO (a missed or failing run).  A job file with
a mistake the host must be asked about (a libvirt storage pool that does not
exist) is refused with one line and exit 2 before any domain is touched.
"""
from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest
from domains import DiskSpec, DomainFactory

from vmsnapbackup.cli import main

pytestmark = pytest.mark.integration
log = logging.getLogger("vsb.growth")

MiB = 2**20
BLOCK = 64 * 1024
#: How long status may take to see a point age past an RPO of one second.
RPO_DEADLINE = 30.0


def job_file(path: Path, state: Path, pool: str, domain: str, extra: str = "",
             pool_key: str = "path") -> Path:
    path.write_text(f"""
state-dir = "{state}"
[pools.main]
{pool_key} = "{pool}"
[jobs.watch]
domains = ["{domain}"]
pool = "main"
schedule = "hourly"
{extra}
""")
    os.chmod(path, 0o600)
    return path


def status_of(cfg: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    capsys.readouterr()
    code = main(["status", "--config", str(cfg), "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_status_exit_codes_follow_the_real_runs(make_domain: DomainFactory, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    dom = make_domain(disks=[DiskSpec("vda", "qcow2", 4 * MiB)], name_prefix="vsb-test-stat")
    pool, state = tmp_path / "pool", tmp_path / "state"
    pool.mkdir()
    good = job_file(tmp_path / "good.toml", state, str(pool), dom.name, 'rpo = "1h"')
    # the same job, its disk gone: every backup attempt fails
    broken = job_file(tmp_path / "broken.toml", state, str(pool), dom.name,
                      'rpo = "1h"\ndisks = ["vdz"]')
    # the same job with an RPO any point breaks a moment after it is taken
    strict = job_file(tmp_path / "strict.toml", state, str(pool), dom.name, 'rpo = "1s"')

    code, doc = status_of(good, capsys)
    assert code == 2 and "no good point" in doc["domains"][0]["reasons"][0]   # never ran

    assert main(["run", "--config", str(good)]) == 0
    code, doc = status_of(good, capsys)
    assert code == 0 and doc["state"] == "ok" and doc["domains"][0]["last_point"] == 1

    assert main(["run", "--config", str(broken)]) == 1
    code, doc = status_of(good, capsys)
    assert code == 1 and doc["state"] == "warning"
    assert doc["domains"][0]["last_backup_ok"] is False

    deadline = time.monotonic() + RPO_DEADLINE
    while True:
        code, doc = status_of(strict, capsys)
        if code == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)   # polling a clock-driven verdict, bounded by the deadline
    assert code == 2 and doc["domains"][0]["rpo_breached"], doc


def test_a_pool_libvirt_does_not_know_refuses_the_file(make_domain: DomainFactory,
                                                      tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    dom = make_domain(disks=[DiskSpec("vda", "raw", MiB)], name_prefix="vsb-test-stat")
    state = tmp_path / "state"
    cfg = job_file(tmp_path / "bad.toml", state, "vsb-no-such-pool", dom.name,
                   pool_key="libvirt-pool")
    capsys.readouterr()
    assert main(["run", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "jobs.watch.pool" in err[0] and "vsb-no-such-pool" in err[0], err
    assert not state.exists()                      # nothing ran, nothing recorded
    assert Path(dom.current_source("vda")) == Path(dom.disks["vda"])


def test_status_and_metrics_show_the_pool_outgrowing_the_policy(
        make_domain: DomainFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 19: a job on the older fixed rule (``threshold = 0.5``, which never fires on a
    disk a quarter full) lets its generation grow; status and the metrics file show the
    growth per backup and the predicted next point, and turn to a warning once the newest
    point stores over 1.5 x what the generation policy allows it.  The same job without
    the threshold (the policy) starts a new generation and the warning goes."""
    parser = pytest.importorskip("prometheus_client.parser")
    dom = make_domain(disks=[DiskSpec("vda", "qcow2", 64 * MiB)], start=True,
                      name_prefix="vsb-test-grow")
    data = 16 * MiB
    for k in range(data // MiB):
        dom.write("vda", k * MiB, MiB, 1 + k)
    pool, state, metrics = tmp_path / "pool", tmp_path / "state", tmp_path / "vsb.prom"
    pool.mkdir()
    retention = "[jobs.watch.retention]\nkeep-last = 30\n"
    fixed = job_file(tmp_path / "fixed.toml", state, str(pool), dom.name,
                     f'threshold = 0.5\n{retention}')
    policy = job_file(tmp_path / "policy.toml", state, str(pool), dom.name, retention)
    for cfg in (fixed, policy):
        cfg.write_text(f'metrics = "{metrics}"\n' + cfg.read_text())
    rng = random.Random(19)
    blocks = data // BLOCK
    seen: list[dict[str, Any]] = []
    while True:
        for b in rng.sample(range(blocks), 20):
            dom.write("vda", b * BLOCK, BLOCK, rng.randrange(1, 256))
        assert main(["run", "--config", str(fixed)]) == 0
        code, doc = status_of(fixed, capsys)
        d = doc["domains"][0]
        seen.append(d)
        log.info("run %2d: point %d stores %d, +%s per backup, next about %s; pool %d "
                 "(%.2fx the data); policy limit %s: %s", len(seen), d["last_point"],
                 d["size_bytes"], d["growth_bytes"], d["predicted_next_bytes"],
                 d["stored_bytes"], d["stored_bytes"] / d["data_bytes"],
                 d["policy_limit_bytes"], doc["state"])
        assert d["generation"] == 1, d
        if d["growth_over_policy"] or len(seen) >= 20:
            break
        assert code == 0, d
    assert d["growth_over_policy"], [(s["last_point"], s["size_bytes"],
                                     s["policy_limit_bytes"]) for s in seen]
    assert code == 1 and doc["state"] == "warning"
    assert any("grows past the generation policy" in r for r in d["reasons"]), d
    assert d["size_bytes"] > 1.5 * d["policy_limit_bytes"]
    # the growth the whole way: points grow each backup, the stored bytes add up
    assert seen[0]["growth_bytes"] is None or seen[0]["growth_bytes"] > 0
    assert all(s["growth_bytes"] > 0 for s in seen[1:])
    assert d["predicted_next_bytes"] >= d["size_bytes"] + d["growth_bytes"] * 0.9
    assert d["stored_bytes"] >= data + sum(s["size_bytes"] for s in seen[1:]) * 0.9
    assert 0.9 * data <= d["data_bytes"] <= 1.1 * data
    text = {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in parser.text_string_to_metric_families(metrics.read_text())
            for s in f.samples}
    mine = (("domain", dom.name), ("job", "watch"))
    assert text[("vmsnapbackup_growth_over_policy", mine)] == 1
    assert text[("vmsnapbackup_stored_bytes", mine)] == d["stored_bytes"]
    assert text[("vmsnapbackup_last_point_growth_bytes", mine)] == d["growth_bytes"]
    assert text[("vmsnapbackup_predicted_next_point_bytes", mine)] == d["predicted_next_bytes"]
    capsys.readouterr()
    assert main(["status", "--config", str(fixed)]) == 1
    human = capsys.readouterr().out
    log.info("status:\n%s", human)
    assert "OVER the policy" in human and "per backup" in human, human

    # the policy itself starts a new generation on the next run: the warning goes
    dom.write("vda", 0, BLOCK, 0xAB)
    assert main(["run", "--config", str(policy)]) == 0
    code, doc = status_of(policy, capsys)
    d = doc["domains"][0]
    assert code == 0 and d["generation"] == 2 and not d["growth_over_policy"], d
    text = {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in parser.text_string_to_metric_families(metrics.read_text())
            for s in f.samples}
    assert text[("vmsnapbackup_growth_over_policy", mine)] == 0
