"""Power cuts of the pool during ``rebase`` (issues 17 and 19).

The pool holds a generation of two points; ``rebase`` makes point 2 the base of
generation 2 as point 3.  At a bounded sample of its file-system calls (see
integration/test_crash_power.py for the method) the power goes; the pool kept
under each power-loss variant must then open, list only complete points (1, 2,
and 3 only once it is sealed), verify, be repaired by one ``repair`` (the
journal's leftovers: generation 2's directory, a partial base), take the next
backup and verify again.  A listed point 3 must be the first point of a
generation whose base reads back as point 2.
"""
from __future__ import annotations

from pathlib import Path

import crashsetup
import pytest
from crashsetup import _power_loss_fs, area, domain  # noqa: F401  (fixtures)
from domains import TestDomain
from powercut import Outcome, campaign, judge, report
from test_backup import convert

import vmsnapbackup
from vmsnapbackup.core.pool import Pool

pytestmark = pytest.mark.integration

CUTS = 12
SEED = crashsetup.crash_seed(17)


def judge_rebase(o: Outcome, dom: TestDomain, pool: Path, want: dict[str, bytes],
                 scratch: Path) -> bool:
    """The rebase's own questions; True when a sealed point 3 was checked."""
    listed = ([s.point for s in vmsnapbackup.list_points(pool)]
              if (pool / "vmsnapbackup-pool.json").exists() else [])
    if listed not in ([1, 2], [1, 2, 3]):
        o.problems.append(f"listed {listed}, expected 1,2 or 1,2,3")
        return False
    if listed == [1, 2]:
        return False
    store = Pool.open(pool).domain(dom.uuid)
    m3 = store.read_manifest(3)
    if not (m3.generation == 2 and m3.is_generation_start):
        o.problems.append(f"point 3 is not generation 2's first point ({m3.generation})")
    for t in dom.disks:
        if convert(store.resolve(m3.disk(t).volume), scratch / f"got-{t}.raw") != want[t]:
            o.problems.append(f"point 3's {t} differs from point 2")
    return True


def test_power_cut_during_rebase(domain: TestDomain, area: Path) -> None:  # noqa: F811
    template = crashsetup.pool_with_points(domain, area, 2)
    want = crashsetup.point_images(template, domain, 2, area)
    sealed = 0

    def judge_cut(o: Outcome, pool: Path) -> None:
        nonlocal sealed
        sealed += judge_rebase(o, domain, pool, want, area)
        judge(o, domain, pool, next_backup=True)

    outcomes = campaign("rebase", ["rebase", domain.name], area, template, judge_cut,
                        cuts=CUTS, seed=SEED)
    text = report(outcomes, area / "pool")
    assert all(o.ok for o in outcomes), text
    assert sealed, "no cut left a sealed point 3 to check:\n" + text
