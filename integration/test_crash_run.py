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

``VMSNAPBACKUP_CRASH_CUTS`` sets the number of strata (default 10);
``VMSNAPBACKUP_CRASH_SEED`` the seed.
"""
from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from domains import DiskSpec, DomainFactory, TestDomain
from powercut import (
    Outcome,
    cut_points,
    daemon_dirs,
    judge,
    restore_pool,
    run_cut,
    summary,
    sweep_daemon_dirs,
    table,
)
from powerloss.model import VARIANTS
from powerloss.mount import fuse_available

import vmsnapbackup

pytestmark = pytest.mark.integration

log = logging.getLogger(__name__)

MiB = 2**20
CUTS = int(os.environ.get("VMSNAPBACKUP_CRASH_CUTS", "10"))
SEED = int(os.environ.get("VMSNAPBACKUP_CRASH_SEED", "15"))


@pytest.fixture(autouse=True)
def _fuse() -> None:
    why = fuse_available()
    if why is not None or os.geteuid() != 0:
        pytest.skip(f"power-loss file system unavailable: {why or 'not root'}")


@pytest.fixture
def domains(make_domain: DomainFactory) -> list[TestDomain]:
    """Two domains with tiny disks: every cut replays the whole job."""
    out = []
    for i, fmt in enumerate(("qcow2", "raw")):
        dom = make_domain(disks=[DiskSpec("vda", fmt, 2 * MiB)], name_prefix="vsb-test-crun")
        dom.write("vda", 0, 64 * 1024, 0x11 + i)
        out.append(dom)
    return out


@pytest.fixture
def area(tmp_path: Path) -> Iterator[Path]:
    before = daemon_dirs()
    yield tmp_path
    left = sweep_daemon_dirs(before)
    if left:
        print(f"cuts left {len(left)} storage daemon dirs that repair did not remove: "
              + ", ".join(p.name for p in left))
    shutil.rmtree(tmp_path, ignore_errors=True)


def job_file(area: Path, pool: Path, doms: list[TestDomain]) -> Path:
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


def test_power_cut_during_run_of_two_domains(domains: list[TestDomain], area: Path) -> None:
    pool = area / "pool"     # the mount point: the job file names it
    template = area / "template"
    for dom in domains:
        vmsnapbackup.backup(dom.name, template)
    argv = ["run", "--config", str(job_file(area, pool, domains)), "crash"]

    def fresh(work: Path) -> None:
        for d in (work, area / "state"):
            if d.exists():
                shutil.rmtree(d)
        work.mkdir()
        shutil.copytree(template, work / "backing", symlinks=True)
        for i, dom in enumerate(domains):  # something for the point backups to store
            dom.write("vda", MiB, 8192, 0x40 + i)

    work = area / "work"
    fresh(work)
    total = run_cut(argv, pool, work, None)
    log.info("run of two domains: %d pool calls", total)
    outcomes: list[Outcome] = []
    for i, cut in enumerate(cut_points(total, CUTS, SEED)):
        variant = VARIANTS[i % len(VARIANTS)]
        fresh(work)
        run_cut(argv, pool, work, cut)
        restore_pool(work, variant, pool, cut)
        merged = Outcome("run", cut, total, variant.label)
        for n, dom in enumerate(domains):
            o = Outcome("run", cut, total, variant.label)
            judge(o, dom, pool, next_backup=True)
            if n == 0:  # the first judge saw the pool as the cut left it (list and
                # repair cover every domain); the second sees the first's next backup
                merged.listed, merged.listed_note = o.listed, o.listed_note
                merged.repaired = o.repaired
            merged.problems += [f"{dom.name}: {p}" for p in o.problems]
            merged.seconds += o.seconds
        outcomes.append(merged)
    text = table(outcomes, pool)
    print("\n" + text + f"\n{summary(outcomes)}")
    assert len(outcomes) >= min(CUTS, total), text
    assert all(o.ok for o in outcomes), text
