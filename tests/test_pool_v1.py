"""A pool written by format version 1 (tests/data/pool-v1, made by the version-1 code)
is still listed and its points verify: manifests by the version-1 checksum rule, tables
against the manifests and against the disk's bytes (rebuilt from how the fixture was
made, and checked by the SHA-256 recorded then).  The volumes are restored bit-exact by
integration/test_pool_v1.py, with the real QEMU."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from vmsnapbackup.core.checktable import CheckTable
from vmsnapbackup.core.pool import DomainStore, Pool
from vmsnapbackup.errors import CorruptFileError
from vmsnapbackup.workflows.pointread import read_point_tables

FIXTURE = Path(__file__).parent / "data" / "pool-v1"
UUID = "6f1d2c3b-0000-4000-8000-00000000f1a1"


def disk_bytes(point: int) -> bytes:
    """The disk at each point, as tests/data/pool-v1/make-fixture.sh wrote it."""
    disk = bytearray(json.loads((FIXTURE / "expected.json").read_text())["virtual_size"])
    disk[0:65536] = b"\x11" * 65536
    disk[262144:266240] = b"\x22" * 4096
    disk[1048576:1052672] = b"\x33" * 4096
    if point == 2:
        disk[65536:131072] = b"\x44" * 65536
        disk[0:65536] = bytes(65536)
        disk[524288:524800] = b"\x55" * 512
    return bytes(disk)


@pytest.fixture
def store(tmp_path: Path) -> DomainStore:
    shutil.copytree(FIXTURE / "pool", tmp_path / "pool")
    return Pool.open(tmp_path / "pool").find_domain(UUID)


def test_the_rebuilt_disks_are_the_ones_backed_up() -> None:
    expected = json.loads((FIXTURE / "expected.json").read_text())["sha256"]
    for n in (1, 2):
        assert hashlib.sha256(disk_bytes(n)).hexdigest() == expected[str(n)]


def test_v1_pool_lists(store: DomainStore) -> None:
    assert store.pool.header.created.startswith("2026-")
    infos = store.list_points()
    assert [(i.number, i.ok, i.damaged) for i in infos] == [(1, True, None), (2, True, None)]
    m1, m2 = (i.manifest for i in infos)
    assert m1 is not None and m2 is not None
    assert (m1.version, m2.version) == (1, 1)
    assert m1.is_generation_start and not m2.is_generation_start
    assert store.current_generation() == 1
    assert store.read_generation(1).first_point == 1
    assert store.leftovers() == []


def test_v1_points_verify_against_their_tables_and_the_disk(store: DomainStore) -> None:
    for n in (1, 2):
        m = store.read_manifest(n)
        disk = m.disk("vda")
        tables = read_point_tables(store, disk)
        data = disk_bytes(n)
        want = CheckTable.empty(len(data), disk.block_size)
        want.hash_into(0, data)
        assert tables.table == want, f"table {n} does not describe the disk at point {n}"
    # and the checks have teeth: one changed value in the difference is caught
    diff = store.resolve(store.read_manifest(2).disk("vda").difference or "")
    raw = bytearray(diff.read_bytes())
    raw[64 + 8] ^= 1
    diff.write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError):
        read_point_tables(store, store.read_manifest(2).disk("vda"))


def test_a_v1_manifest_changed_after_the_fact_is_damaged(store: DomainStore) -> None:
    path = store.manifest_path(2)
    path.write_bytes(path.read_bytes().replace(b'"changed": 3', b'"changed": 4'))
    infos = store.list_points()
    assert [i.ok for i in infos] == [True, False]
    assert "checksum" in (infos[1].damaged or "")
