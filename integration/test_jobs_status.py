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
import os
import time
from pathlib import Path

import pytest
from domains import DiskSpec, DomainFactory

from vmsnapbackup.cli import main

pytestmark = pytest.mark.integration

MiB = 2**20
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


def status_of(cfg: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict]:
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
