"""A pool written by format version 1 is listed, verified and restored bit-exact by
this version, through the public API, with the real qemu-img and qemu-storage-daemon
(FORMAT.md §12: every reader reads every version ever written).

The pool (tests/data/pool-v1) was made by the version-1 code with a real offline
backup of a throwaway domain; its README says how.  It is copied first: the fixture
in the checkout is never touched.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

import vmsnapbackup
from vmsnapbackup.errors import VerifyMismatchError
from vmsnapbackup.workflows.verify import DAMAGED, GOOD

pytestmark = pytest.mark.integration

if not all(shutil.which(b) for b in ("qemu-storage-daemon", "qemu-img")):
    pytest.skip("needs qemu-storage-daemon and qemu-img", allow_module_level=True)

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "data" / "pool-v1"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
DOMAIN = EXPECTED["domain"]


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    shutil.copytree(FIXTURE / "pool", tmp_path / "pool")
    return tmp_path / "pool"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def test_v1_pool_is_listed(pool: Path) -> None:
    got = vmsnapbackup.list_points(pool)
    assert [(p.domain, p.point, p.generation, p.damaged) for p in got] == [
        (DOMAIN, 1, 1, None), (DOMAIN, 2, 1, None)]
    assert got[0].generation_start and not got[1].generation_start
    assert all(p.consistency == "offline" and p.disks == ["vda"] for p in got)


def test_v1_pool_verifies_and_damage_is_still_found(pool: Path) -> None:
    report = vmsnapbackup.verify(pool)
    assert report.ok
    assert {p.number: p.status for d in report.domains for p in d.points} == {1: GOOD, 2: GOOD}
    # a flipped data byte in the point volume is found by the version-1 tables
    volume = next(pool.glob("domains/*/generations/000001/vda/point-000002.qcow2"))
    data = bytearray(volume.read_bytes())
    at = data.index(b"\x44" * 4096)   # a cluster of the block point 2 changed
    data[at] ^= 0xFF
    volume.write_bytes(bytes(data))
    report = vmsnapbackup.verify(pool, domain=DOMAIN, point=2)
    assert not report.ok
    assert [p.status for d in report.domains for p in d.points] == [DAMAGED]


@pytest.mark.parametrize("point", [1, 2])
def test_v1_points_restore_bit_exact(pool: Path, tmp_path: Path, point: int) -> None:
    out = tmp_path / f"out{point}"
    out.mkdir()
    result = vmsnapbackup.restore(DOMAIN, pool, point=point, to=out, fmt="raw")
    assert result.ok
    (disk,) = result.disks
    restored = Path(disk.path)
    assert restored.stat().st_size == EXPECTED["virtual_size"]
    assert sha256(restored) == EXPECTED["sha256"][str(point)]


def test_v1_point_volume_damage_fails_the_restore(pool: Path, tmp_path: Path) -> None:
    volume = next(pool.glob("domains/*/generations/000001/vda/point-000002.qcow2"))
    data = bytearray(volume.read_bytes())
    data[data.index(b"\x55" * 512)] ^= 0x01
    volume.write_bytes(bytes(data))
    with pytest.raises(VerifyMismatchError):
        vmsnapbackup.restore(DOMAIN, pool, point=2, to=tmp_path, fmt="raw")
