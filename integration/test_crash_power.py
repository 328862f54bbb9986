"""Power cuts of the pool during real backups and prunes of a running domain.

For each scenario the command is first run once without a cut, to count the
pool's file-system calls; then, at a bounded sample of cut points (fixed seed,
one per stratum, plus the first and the last call), the command runs again
on a fresh copy of the same starting pool and the power goes after that many
calls.  The pool is rebuilt under a power-loss variant (rotating through all
six, so every variant is met at several depths) and judged: it opens, lists
only complete points, every listed point verifies, ``repair`` puts the VM back
on its original images, the next backup succeeds and verifies.

The cut-point table goes to the test output (``-s`` or the failure report).
The method is powercut.campaign, the shared fixtures crashsetup's (which says
how ``VMSNAPBACKUP_CRASH_CUTS`` and ``VMSNAPBACKUP_CRASH_SEED`` set the sample).
"""
from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

import pytest
from crashsetup import (  # noqa: F401  (fixtures: _power_loss_fs, area, domain)
    CUTS,
    _power_loss_fs,
    area,
    crash_seed,
    domain,
    pool_with_points,
)
from domains import TestDomain
from powercut import (
    CLI,
    REPO,
    Outcome,
    disks_on_originals,
    judge,
    report,
    restore_pool,
    run_cut,
)
from powercut import campaign as cut_campaign
from powerloss.model import VARIANTS, Variant

pytestmark = pytest.mark.integration

SEED = crash_seed(17)
#: Where the backup under the repair scenario is cut: after the snapshot (the VM is
#: on our overlays) and before the point is sealed, for a point backup of the
#: tiny disks (about 130 calls).
REPAIR_SETUP_CUT = 60
BROKEN_CLI = (sys.executable, str(REPO / "integration" / "brokenorder.py"))


def campaign(scenario: str, dom: TestDomain, area: Path, argv: Sequence[str],  # noqa: F811
             template: Path | Callable[[Path], None], *, cuts: int = CUTS,
             variants: Sequence[Variant] = VARIANTS, cli: Sequence[str] = (CLI,),
             before_each: Callable[[], None] | None = None) -> list[Outcome]:
    """powercut.campaign, each cut judged as a user would (powercut.judge)."""
    return cut_campaign(scenario, argv, area, template,
                        lambda o, pool: judge(o, dom, pool, next_backup=True),
                        cuts=cuts, seed=SEED, variants=variants, cli=cli,
                        before_each=before_each)


def empty_pool(area: Path) -> Path:  # noqa: F811
    t = area / "template-empty"
    t.mkdir()
    return t


def test_power_cut_during_base_backup(domain: TestDomain, area: Path) -> None:  # noqa: F811
    outcomes = campaign("base", domain, area, ["backup", domain.name], empty_pool(area))
    text = report(outcomes, area / "pool")
    assert all(o.ok for o in outcomes), text


def test_power_cut_during_point_backup(domain: TestDomain, area: Path) -> None:  # noqa: F811
    template = pool_with_points(domain, area, 1)
    outcomes = campaign("point", domain, area, ["backup", domain.name], template,
                        before_each=lambda: domain.write("vdb", 0, 8192, 0x5A))
    text = report(outcomes, area / "pool")
    assert all(o.ok for o in outcomes), text


def test_power_cut_during_prune(domain: TestDomain, area: Path) -> None:  # noqa: F811
    template = pool_with_points(domain, area, 3)
    outcomes = campaign("prune", domain, area, ["prune", domain.name, "--keep-last", "1"],
                        template)
    text = report(outcomes, area / "pool")
    assert all(o.ok for o in outcomes), text


def test_power_cut_during_repair(domain: TestDomain, area: Path) -> None:  # noqa: F811
    """Repair itself loses power: a backup was cut while the VM ran on our overlays,
    then the repair of it is cut at each sampled call; the next repair must finish
    the job."""
    base = pool_with_points(domain, area, 1)

    def interrupted_backup(backing: Path) -> None:
        work = area / "interrupted"
        if work.exists():
            shutil.rmtree(work)
        work.mkdir()
        shutil.copytree(base, work / "backing", symlinks=True)
        pool = area / "pool"
        run_cut(["backup", domain.name], pool, work, REPAIR_SETUP_CUT)
        restore_pool(work, Variant("ordered", "kept"), pool, REPAIR_SETUP_CUT)
        assert disks_on_originals(domain), "the cut backup should have left overlays"
        pool.rename(backing)

    outcomes = campaign("repair", domain, area, ["repair", domain.name], interrupted_backup,
                        cuts=12)  # about 10 calls: every one is a cut point
    text = report(outcomes, area / "pool")
    assert all(o.ok for o in outcomes), text


def test_a_broken_write_order_is_caught(domain: TestDomain, area: Path) -> None:  # noqa: F811
    """The checker can fail: with files published before their data is fsynced
    (integration/brokenorder.py), some cut leaves a damaged pool."""
    outcomes = campaign("broken", domain, area, ["backup", domain.name], empty_pool(area),
                        cuts=4, variants=[Variant("ordered", "lost")], cli=BROKEN_CLI)
    text = report(outcomes, area / "pool")
    assert any(not o.ok for o in outcomes), "broken write order not caught:\n" + text
