"""Power cuts during ``restore --pool-volume`` (issue 17): the target holds only whole images.

The restored images go into a libvirt dir storage pool whose directory lies on
the power-loss file system (inside the mounted tree, next to the backup pool,
which restore only reads).  At a bounded sample of the file-system calls of one
restore of point 2 (see integration/test_crash_power.py for the method) the
power goes; the tree the disk kept under each power-loss variant is judged:

* every image under its final name in the storage pool's directory is whole:
  bit-equal to point 2 (a name never points at data the cut lost);
* no ``.unverified`` image (nothing failed its check);
* the backup pool still lists points 1 and 2, and they verify;
* the next restore (``--force``) succeeds and writes whole images.

Hidden temp files (``.NAME.restore-…``) a cut leaves are reported in the table
("tmp"): they are never mistaken for an image, and the next restore removes them.
"""
from __future__ import annotations

import contextlib
import shutil
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import crashsetup
import libvirt
import pytest
from crashsetup import _power_loss_fs, area, domain  # noqa: F401  (fixtures)
from domains import TestDomain
from powercut import Outcome, campaign, report

import vmsnapbackup

pytestmark = pytest.mark.integration

CUTS = 12
SEED = crashsetup.crash_seed(17)
IMAGES = "images"   # the storage pool's directory, inside the mounted tree


@pytest.fixture
def storage_pool(libvirt_conn, area: Path) -> Iterator[str]:  # type: ignore[no-untyped-def] # noqa: F811
    """A transient libvirt dir pool at ``area/pool/images`` (made anew by each cut)."""
    path = area / "pool" / IMAGES
    path.mkdir(parents=True)
    name = f"vsbtest-crash-{uuidlib.uuid4().hex[:8]}"
    lpool = libvirt_conn.storagePoolCreateXML(
        f"<pool type='dir'><name>{name}</name><target><path>{path}</path></target></pool>", 0)
    shutil.rmtree(area / "pool")
    try:
        yield name
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            lpool.destroy()


def judge_images(o: Outcome, dom: TestDomain, pool: Path, want: dict[str, bytes],
                 lpool: str) -> None:
    images = pool / IMAGES
    names = sorted(p.name for p in images.iterdir()) if images.is_dir() else []
    final = [n for n in names if not n.startswith(".")]
    tmp = [n for n in names if n.startswith(".")]
    o.listed_note = f"{len(final)} images, {len(tmp)} tmp"
    for n in final:
        target = n.removeprefix(f"{dom.name}-").removesuffix(".raw")
        if n.endswith(".unverified") or target not in want:
            o.problems.append(f"unexpected {n}")
        elif (images / n).read_bytes() != want[target]:
            o.problems.append(f"{n} is not whole")
    points = vmsnapbackup.list_points(pool)
    if [s.point for s in points] != [1, 2] or not vmsnapbackup.verify(pool, domain=dom.name).ok:
        o.problems.append(f"backup pool: listed {[s.point for s in points]} or verify failed")
    if o.problems:
        return
    try:
        vmsnapbackup.restore(dom.name, pool, point=2, pool_volume=lpool, force=True)
    except vmsnapbackup.VmSnapBackupError as err:
        o.problems.append(f"next restore: {type(err).__name__}: {err}")
        return
    for target, data in want.items():
        if (images / f"{dom.name}-{target}.raw").read_bytes() != data:
            o.problems.append(f"next restore: {target} is not whole")
    left = [p.name for p in images.iterdir() if p.name.startswith(".")]
    if left:     # the killed restore's temp images: the next restore removes them
        o.problems.append(f"next restore left {left}")


def test_power_cut_during_restore_into_a_pool_volume(domain: TestDomain, area: Path,  # noqa: F811
                                                     storage_pool: str) -> None:
    template = crashsetup.pool_with_points(domain, area, 2)
    (template / IMAGES).mkdir()
    want = crashsetup.point_images(template, domain, 2, area)
    argv = ["restore", domain.name, "--point", "2", "--pool-volume", storage_pool]
    outcomes = campaign("restore", argv, area, template,
                        lambda o, pool: judge_images(o, domain, pool, want, storage_pool),
                        cuts=CUTS, seed=SEED)
    text = report(outcomes, area / "pool")
    assert all(o.ok for o in outcomes), text
