"""Power cuts of the pool during ``run``: a job of two running domains, backed up in
parallel, then pruned and verified.

As integration/test_crash_power.py does for single commands: the job is run
once without a cut to count the pool's file-system calls, then again on a
fresh copy of the same starting pool (one point of each domain) with the power
going after a sampled number of calls (the first, the last and one per
stratum), under a rotating power-loss variant.  With two backups in flight at
once, a cut finds one domain's backup at one step and the other's at another.
Each cut is judged for *both* domains: the pool opens, ``list`` shows only
complete points, every listed point verifies, ``repair`` puts each VM back on
its original images, and the next backup of each succeeds and verifies.

The method is powercut.campaign; crashsetup says how ``VMSNAPBACKUP_CRASH_CUTS``
and ``VMSNAPBACKUP_CRASH_SEED`` set the sample.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from crashsetup import CUTS, MiB, _power_loss_fs, area, crash_seed  # noqa: F401  (fixtures)
from domains import DiskSpec, DomainFactory, TestDomain
from powercut import Outcome, campaign, judge, report

import vmsnapbackup

pytestmark = pytest.mark.integration

SEED = crash_seed(15)


@pytest.fixture
def domains(make_domain: DomainFactory) -> list[TestDomain]:
    """Two domains with tiny disks: every cut replays the whole job."""
    out = []
    for i, fmt in enumerate(("qcow2", "raw")):
        dom = make_domain(disks=[DiskSpec("vda", fmt, 2 * MiB)], name_prefix="vsb-test-crun")
        dom.write("vda", 0, 64 * 1024, 0x11 + i)
        out.append(dom)
    return out


def job_file(area: Path, pool: Path, doms: list[TestDomain]) -> Path:  # noqa: F811
    """A job over both domains at once, pruning to one point and verifying every block."""
    names = ", ".join(f'"{d.name}"' for d in doms)
    cfg = area / "vmsnapbackup.toml"
    cfg.write_text(f"""
state-dir = "{area / 'state'}"
[pools.main]
path = "{pool}"
[jobs.crash]
domains = [{names}]
pool = "main"
schedule = "daily"
parallelism = 2
[jobs.crash.retention]
keep-last = 1
[jobs.crash.verify]
full-every-days = 1
""")
    os.chmod(cfg, 0o600)
    return cfg


def test_power_cut_during_run_of_two_domains(domains: list[TestDomain],
                                             area: Path) -> None:  # noqa: F811
    pool = area / "pool"     # the mount point: the job file names it
    template = area / "template"
    for dom in domains:
        vmsnapbackup.backup(dom.name, template)
    argv = ["run", "--config", str(job_file(area, pool, domains)), "crash"]

    def before_each() -> None:
        shutil.rmtree(area / "state", ignore_errors=True)
        for i, dom in enumerate(domains):  # something for the point backups to store
            dom.write("vda", MiB, 8192, 0x40 + i)

    def judge_both(merged: Outcome, pool: Path) -> None:
        for n, dom in enumerate(domains):
            o = Outcome("run", merged.cut, merged.total, merged.variant)
            judge(o, dom, pool, next_backup=True)
            if n == 0:  # the first judge saw the pool as the cut left it (list and
                # repair cover every domain); the second sees the first's next backup
                merged.listed, merged.listed_note = o.listed, o.listed_note
                merged.repaired = o.repaired
            merged.problems += [f"{dom.name}: {p}" for p in o.problems]
            merged.seconds += o.seconds

    outcomes = campaign("run", argv, area, template, judge_both, cuts=CUTS, seed=SEED,
                        before_each=before_each)
    text = report(outcomes, pool)
    assert len(outcomes) >= min(CUTS, outcomes[0].total if outcomes else 0), text
    assert all(o.ok for o in outcomes), text
