"""Sampled verify on the real stack: drawn from what is stored, fresh each run, and
finding one flipped byte as often as the probability it reports (issue 18 item 1)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from test_restore import BS, SyntheticPool, data_offset, flip_byte, patterned

from vmsnapbackup.cli import main
from vmsnapbackup.workflows.verify import verify

pytestmark = pytest.mark.integration

if not all(shutil.which(b) for b in ("qemu-storage-daemon", "qemu-img")):
    pytest.skip("needs qemu-storage-daemon and qemu-img", allow_module_level=True)

BLOCKS = 512          # a 32 MiB disk ...
DATA = 20             # ... storing 20 blocks (1.25 MiB): mostly holes
PERCENT = 25.0


def mostly_empty(tmp_path: Path) -> tuple[SyntheticPool, list[int]]:
    sp = SyntheticPool(tmp_path / "pool")
    disk = bytearray(BLOCKS * BS)
    data_blocks = [7 + 25 * i for i in range(DATA)]
    for b in data_blocks:
        disk[b * BS:(b + 1) * BS] = patterned(BS, b)
    sp.add_point({"vda": bytes(disk)})
    # a second point storing 4 changed blocks in its own volume
    for b in data_blocks[:4]:
        disk[b * BS:b * BS + 8] = b"changed!"
    sp.add_point({"vda": bytes(disk)})
    return sp, data_blocks


def test_sample_reads_a_share_of_what_is_stored(tmp_path: Path) -> None:
    sp, _ = mostly_empty(tmp_path)
    report = verify(sp.pool, sample=PERCENT)
    assert report.ok
    p1, _p2 = report.domains[0].points
    # 25 % of the 20 stored base blocks, not of the 512 blocks of the virtual disk
    assert p1.disks[0].checked == 5
    sample = report.to_dict()["sample"]
    # base 5 of 20, point volume 1 of 4 stored blocks
    assert (sample["stored_blocks"], sample["sampled_blocks"]) == (24, 6)
    assert sample["chance_one_damaged_block"] == pytest.approx(6 / 24)
    assert isinstance(sample["seed"], int)


def test_each_run_draws_a_new_sample_and_a_seed_repeats_one(tmp_path: Path) -> None:
    sp, data_blocks = mostly_empty(tmp_path)
    base = sp.volume(1, "vda")
    bad = data_blocks[11]
    flip_byte(base, data_offset(base, "qcow2", (bad * BS, (bad + 1) * BS)))
    found = []
    seeds = set()
    for _ in range(6):
        r = verify(sp.pool, sample=PERCENT)
        seeds.add(r.seed)
        found.append(not r.ok)
    assert len(seeds) == 6
    # the same seed reads the same blocks, so it gives the same verdict
    again = [not verify(sp.pool, sample=PERCENT, seed=s).ok for s in sorted(seeds)[:2]]
    first = [not verify(sp.pool, sample=PERCENT, seed=s).ok for s in sorted(seeds)[:2]]
    assert again == first


def test_flipped_byte_found_as_often_as_reported(tmp_path: Path) -> None:
    """One damaged block in a mostly empty disk: over many runs the share of runs that
    find it agrees with the probability each run reports (within 3.5 sigma)."""
    sp, data_blocks = mostly_empty(tmp_path)
    base = sp.volume(1, "vda")
    bad = data_blocks[13]
    flip_byte(base, data_offset(base, "qcow2", (bad * BS, (bad + 1) * BS)))
    assert not verify(sp.pool).ok                   # a full verify finds it
    runs, hits = 40, 0
    reported = []
    for _ in range(runs):
        r = verify(sp.pool, domain=sp.name, point=1, sample=PERCENT)
        reported.append(r.tally.chance(1))
        if not r.ok:
            (d,) = [d for d in r.domains[0].points[0].disks if not d.ok]
            assert d.problems[0].mismatch.indexes == (bad,)
            hits += 1
    p = sum(reported) / runs
    assert p == pytest.approx(5 / 20)
    sigma = math.sqrt(runs * p * (1 - p))
    assert abs(hits - runs * p) <= 3.5 * sigma, (hits, runs * p)
    assert hits > 0


def test_cli_names_the_chance_and_the_seed(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    sp, _ = mostly_empty(tmp_path)
    assert main(["--pool", str(sp.pool.root), "verify", "--sample", "25", "--seed", "7"]) == 0
    out = capsys.readouterr().out
    assert "6 of 24" in out and "p=25.0%" in out and "--seed 7" in out
    assert main(["--pool", str(sp.pool.root), "verify", "--sample", "25", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["sample"]["sampled_blocks"] == 6
