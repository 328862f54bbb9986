"""``vmsnapbackup rebase`` on the real stack (issue 19): a new base from the pool, no VM read.

A running domain with a growing generation (three points, each holding every
block changed since the base); ``rebase`` through the CLI makes point 3's
content the base of a new generation.  Then: the new base reads back as the
guest's disk at point 3; the next backup continues the new generation with a
point holding only what changed since point 3 (and reads through the carried
checkpoint's bitmap); the old generation's points still restore bit-exact; the
whole pool verifies; prune can drop the old generation.
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from domains import DiskModel, DiskSpec, DomainFactory
from test_backup import convert

from vmsnapbackup.core.pool import Pool
from vmsnapbackup.workflows.backup import backup
from vmsnapbackup.workflows.prune import prune
from vmsnapbackup.workflows.verify import verify

pytestmark = pytest.mark.integration

MiB = 2**20
BLOCK = 64 * 1024
DATA = 16 * MiB


def run_cli(pool: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmsnapbackup", "--pool", str(pool), *argv],
                          capture_output=True, text=True, timeout=300)


def scribble(model: DiskModel, rng: random.Random, count: int) -> None:
    for _ in range(count):
        model.write("vda", rng.randrange(DATA // BLOCK) * BLOCK, BLOCK, rng.randrange(1, 256))


def test_rebase_makes_the_next_point_small(make_domain: DomainFactory, tmp_path: Path) -> None:
    dom = make_domain(disks=[DiskSpec("vda", "qcow2", 128 * MiB)], start=True)
    model = DiskModel(dom)
    model.write("vda", 0, DATA, 0x5A)
    rng = random.Random(1919)
    pool = tmp_path / "pool"
    states: dict[int, bytes] = {}
    for n in range(1, 4):
        if n > 1:
            scribble(model, rng, 24)
        r = backup(dom.name, pool)
        assert r.generation == 1 and r.point == n
        states[n] = model.snapshot()["vda"]
    store = Pool.open(pool).domain(dom.uuid)
    p3 = store.read_manifest(3).disk("vda")
    assert p3.bytes_written > 24 * BLOCK   # grows: every block changed since the base

    done = run_cli(pool, "rebase", dom.name, "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert (out["point"], out["generation"], out["source_point"]) == (4, 2, 3), out
    gen1 = store.read_generation(1)
    assert out["checkpoint"] == gen1.checkpoint
    assert not store.journal.exists()

    m4 = store.read_manifest(4)
    assert m4.generation == 2 and m4.is_generation_start
    assert m4.snapshot_at == store.read_manifest(3).snapshot_at
    d4 = m4.disk("vda")
    assert d4.table_digest == p3.table_digest
    # the new base is the disk at point 3, and costs one copy of the data
    assert convert(store.resolve(d4.volume), tmp_path / "b.raw") == states[3]
    assert DATA <= d4.bytes_written <= DATA + 24 * BLOCK
    gen2 = store.read_generation(2)
    assert gen2.first_point == 4 and gen2.checkpoint == gen1.checkpoint

    # the next backup continues generation 2 and stores only what changed since point 3
    scribble(model, rng, 5)
    r5 = backup(dom.name, pool)
    states[5] = model.snapshot()["vda"]
    assert (r5.point, r5.generation, r5.new_generation) == (5, 2, False)
    d5 = store.read_manifest(5).disk("vda")
    assert d5.bytes_written <= 5 * BLOCK, d5.bytes_written
    assert d5.dirty_bitmap == gen1.checkpoint, "the carried checkpoint was not used"
    assert convert(store.resolve(d5.volume), tmp_path / "p5.raw") == states[5]

    # the old generation is untouched and restores as before
    for n in (1, 2, 3):
        vol = store.resolve(store.read_manifest(n).disk("vda").volume)
        assert convert(vol, tmp_path / f"p{n}.raw") == states[n], f"point {n}"
    report = verify(pool, domain=dom.name)
    assert report.ok, report.to_dict()

    # prune may now drop generation 1 whole; what is left verifies
    prune(dom.name, pool, keep_last=2)
    assert sorted(p.number for p in store.points()) == [4, 5]
    assert not store.generation_dir(1).exists()
    assert verify(pool, domain=dom.name).ok


def test_rebase_refusals(make_domain: DomainFactory, tmp_path: Path) -> None:
    """A generation's first point cannot be rebased; a damaged point is refused before any
    write: one line, a distinct exit code, no new point, no journal."""
    dom = make_domain(disks=[DiskSpec("vda", "qcow2", 64 * MiB)], start=True)
    model = DiskModel(dom)
    model.write("vda", 0, 4 * MiB, 0x33)
    pool = tmp_path / "pool"
    backup(dom.name, pool)
    first = run_cli(pool, "rebase", dom.name)
    assert first.returncode == 2 and "already the first point" in first.stderr, first
    assert "Traceback" not in first.stderr
    model.write("vda", 0, BLOCK, 0x44)
    backup(dom.name, pool)
    store = Pool.open(pool).domain(dom.uuid)
    diff = store.resolve(store.read_manifest(2).disk("vda").difference or "")
    raw = bytearray(diff.read_bytes())
    raw[70] ^= 0xFF
    diff.write_bytes(bytes(raw))
    bad = run_cli(pool, "rebase", dom.name)
    assert bad.returncode == 5 and "Traceback" not in bad.stderr, bad
    assert sorted(p.number for p in store.points()) == [1, 2]
    assert store.generations() == [1] and not store.journal.exists()


def _nothing_rebased(pool: Path, uuid: str) -> None:
    store = Pool.open(pool).domain(uuid)
    assert sorted(p.number for p in store.points()) == [1, 2]
    assert store.generations() == [1] and not store.journal.exists()


def test_rebase_pins_the_chain_and_checks_the_new_base(make_domain: DomainFactory,
                                                       tmp_path: Path) -> None:
    """The copy is QEMU's, so two things must still hold: a point whose header names
    another backing file is refused (the pool is data, not instructions), and a new
    base that does not read back as table N -- here the base volume's data damaged
    under intact tables -- is refused after the copy, leaving nothing behind."""
    dom = make_domain(disks=[DiskSpec("vda", "qcow2", 64 * MiB)], start=True)
    model = DiskModel(dom)
    model.write("vda", 0, 4 * MiB, 0x33)
    pool = tmp_path / "pool"
    backup(dom.name, pool)
    model.write("vda", 8 * MiB, BLOCK, 0x44)
    backup(dom.name, pool)
    store = Pool.open(pool).domain(dom.uuid)
    m2 = store.read_manifest(2).disk("vda")
    point, base = store.resolve(m2.volume), store.resolve(m2.base or "")
    decoy = tmp_path / "decoy.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(decoy), str(64 * MiB)],
                   check=True)
    subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", str(decoy), "-F",
                    "qcow2", str(point)], check=True)
    redirected = run_cli(pool, "rebase", dom.name)
    assert redirected.returncode == 5 and "Traceback" not in redirected.stderr, redirected
    assert "backing file" in redirected.stderr, redirected.stderr
    _nothing_rebased(pool, dom.uuid)
    subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", base.name, "-F",
                    "qcow2", str(point)], check=True)
    extents = json.loads(subprocess.run(
        ["qemu-img", "map", "--output=json", "-f", "qcow2", str(base)], check=True,
        capture_output=True, text=True).stdout)
    (data,) = [e for e in extents if e["data"] and e["start"] == 0]
    with open(base, "r+b") as f:          # the base's first block, under intact tables
        f.seek(int(data["offset"]) + 100)
        byte = f.read(1)
        f.seek(int(data["offset"]) + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    damaged = run_cli(pool, "rebase", dom.name)
    assert damaged.returncode == 5 and "Traceback" not in damaged.stderr, damaged
    assert "does not read back as its table" in damaged.stderr, damaged.stderr
    _nothing_rebased(pool, dom.uuid)


def test_rebase_of_a_4_gib_disk_costs_one_read_and_one_write(make_domain: DomainFactory,
                                                             tmp_path: Path) -> None:
    """Issue 19's cost goal: one read of the point and one write of the new base.  The
    pass reads each data block of point 2 once and writes each non-zero one once (its
    counts say so); its time is compared with ``qemu-img convert`` of the same point
    (through its base, into a new qcow2) in the same run, and logged."""
    import logging
    import time

    from vmsnapbackup.workflows.rebase import rebase

    log = logging.getLogger("vsb.rebase")
    size, data = 4 * 2**30, 2**30
    dom = make_domain(disks=[DiskSpec("vda", "qcow2", size)], start=True)
    for k in range(data // (64 * MiB)):     # 1 GiB of data in 64 MiB extents, spread
        dom.write("vda", k * 4 * 64 * MiB, 64 * MiB, 1 + k)
    pool = tmp_path / "pool"
    backup(dom.name, pool)
    dom.write("vda", 0, BLOCK, 0xEE)
    backup(dom.name, pool)
    store = Pool.open(pool).domain(dom.uuid)
    volume = store.resolve(store.read_manifest(2).disk("vda").volume)

    t0 = time.monotonic()
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(volume), str(tmp_path / "c.qcow2")],
                   check=True)
    convert_s = time.monotonic() - t0
    (tmp_path / "c.qcow2").unlink()
    t0 = time.monotonic()
    r = rebase(dom.name, pool)
    rebase_s = time.monotonic() - t0
    (d,) = r.disks
    blocks = data // BLOCK
    assert d.stats.read == blocks and d.stats.holes == size // BLOCK - blocks, d.stats
    assert d.stats.changed == blocks and d.stats.bytes_written == data, d.stats
    log.info("rebase of a %d GiB disk holding %d GiB: %.2f s, qemu-img convert of the point "
             "%.2f s: ratio %.2f", size >> 30, data >> 30, rebase_s, convert_s,
             rebase_s / convert_s)
