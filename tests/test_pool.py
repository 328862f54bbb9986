from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import List

import pytest
from poolfake import fake_backup, point_manifest

from vmsnapbackup.core import manifest as mf
from vmsnapbackup.core.journal import JournalDisk, JournalEntry
from vmsnapbackup.core.pool import DomainStore, Pool, parse_number_name
from vmsnapbackup.errors import (
    CorruptFileError,
    IncompatibleFormatError,
    IntegrityError,
    LockedError,
    NotFoundError,
    UsageError,
)

UUID = "3f2a4b6c-1d2e-4f30-8a9b-0c1d2e3f4a5b"
UUID2 = "9b1c4b6c-1d2e-4f30-8a9b-0c1d2e3f4a5b"


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


# --- helpers that play the backup workflow's part -----------------------------------------

def put(p: Path, data: bytes = b"x") -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def backup(store: DomainStore, new_generation: bool = False, targets=("vda",)) -> int:
    """What a backup does to the pool, in §10's order (without the hypervisor)."""
    return fake_backup(store, lambda p, _size: put(p), new_generation=new_generation,
                       targets=targets, seconds={"read": 0.1})


@pytest.fixture
def pool(tmp_path: Path) -> Pool:
    return Pool.create(tmp_path / "pool")


@pytest.fixture
def store(pool: Pool) -> DomainStore:
    return pool.domain(UUID, name="web1", create=True)


# --- opening and creating -----------------------------------------------------------------

def test_create_makes_private_pool_with_header(tmp_path: Path) -> None:
    p = Pool.create(tmp_path / "a" / "pool")
    assert p.header_path.is_file() and mode(p.header_path) == 0o600
    assert mode(p.root) == 0o700 and mode(p.domains_dir) == 0o700
    hdr = json.loads(p.header_path.read_text())
    assert hdr["format"] == "vmsnapbackup-pool" and hdr["version"] == 2
    again = Pool.open(tmp_path / "a" / "pool")
    assert again.header == p.header
    assert Pool.open(tmp_path / "a" / "pool", create=True).header == p.header


def test_open_without_header_is_not_a_pool(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="does not exist"):
        Pool.open(tmp_path / "missing")
    (tmp_path / "d").mkdir()
    with pytest.raises(NotFoundError, match="not a vmsnapbackup pool"):
        Pool.open(tmp_path / "d")
    assert os.listdir(tmp_path / "d") == []  # nothing created without create=True
    put(tmp_path / "f")
    with pytest.raises(NotFoundError, match="not a directory"):
        Pool.open(tmp_path / "f", create=True)


def test_create_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    put(tmp_path / "images" / "web1.qcow2")
    with pytest.raises(UsageError, match="non-empty"):
        Pool.create(tmp_path / "images")
    assert os.listdir(tmp_path / "images") == ["web1.qcow2"]


@pytest.mark.parametrize("present", [
    [],                                                   # an empty directory
    ["lost+found/"],                                      # a fresh filesystem's root
    ["domains/", ".vmsnapbackup-pool.json.tmp-7-abcd"],   # a create that died half-way
])
def test_create_in_empty_dir_or_fresh_filesystem_root(tmp_path: Path, present: List[str]) -> None:
    root = tmp_path / "p"
    root.mkdir()
    for name in present:
        if name.endswith("/"):
            (root / name).mkdir()
        else:
            put(root / name)
    created = Pool.create(root)
    assert created.root == root and (root / "vmsnapbackup-pool.json").is_file()
    assert (root / "domains").is_dir()
    assert Pool.open(root).header == created.header   # a pool now, to every reader
    for name in present:
        if name.endswith("/"):
            assert (root / name).is_dir()   # nothing of what was there is removed


@pytest.mark.parametrize("content,error", [
    (b"", CorruptFileError), (b'{"format": "vmsnapbackup-pool", "vers', CorruptFileError),
    (b'{"format": "vmsnapbackup-poop", "version": 1, "created": "2026-01-01T00:00:00Z"}',
     CorruptFileError),
    (b'{"format": "vmsnapbackup-pool", "version": 1}', CorruptFileError),
    (b'{"format": "vmsnapbackup-pool", "version": 4, "created": "2026-01-01T00:00:00Z"}',
     IncompatibleFormatError),
    (b"<html/>", CorruptFileError),
])
def test_damaged_header(tmp_path: Path, content: bytes, error: type) -> None:
    p = Pool.create(tmp_path / "pool")
    p.header_path.write_bytes(content)
    with pytest.raises(error) as ei:
        Pool.open(p.root)
    assert str(p.header_path) in str(ei.value)
    if error is IncompatibleFormatError:
        assert "pool format version 4 is newer than this vmsnapbackup (3); upgrade" in str(ei.value)
    with pytest.raises(error):  # create=True must not paper over a damaged header
        Pool.open(p.root, create=True)


# --- domains ------------------------------------------------------------------------------

def test_domain_create_find_and_list(pool: Pool) -> None:
    with pytest.raises(NotFoundError):
        pool.domain(UUID)
    with pytest.raises(UsageError):
        pool.domain("web1", create=True)
    s = pool.domain(UUID.upper(), name="web1", create=True)
    assert s.uuid == UUID and mode(s.path) == 0o700 and mode(s.record_path) == 0o600
    assert s.record() == mf.DomainRecord(UUID, "web1", 0)
    assert pool.find_domain("web1").uuid == UUID
    assert pool.find_domain(UUID).uuid == UUID
    with pytest.raises(NotFoundError):
        pool.find_domain("db1")
    s2 = pool.domain(UUID2, name="db1", create=True)
    assert [d.uuid for d in pool.domains()] == sorted([UUID, UUID2])
    with s2.lock("backup"):
        s2.set_name("web1")  # renamed: two stores now share a name
    with pytest.raises(UsageError, match="several"):
        pool.find_domain("web1")
    assert pool.find_domain(UUID2).name == "web1"


def test_domain_record_corruption(store: DomainStore) -> None:
    for bad in (b"", b"{", b'{"format": "vmsnapbackup-domain", "version": 1}',
                json.dumps({"format": "vmsnapbackup-domain", "version": 1, "uuid": UUID2,
                            "name": "x", "last_point": 0}).encode()):
        store.record_path.write_bytes(bad)
        with pytest.raises(CorruptFileError) as ei:
            store.allocate_point()
        assert ei.value.path == str(store.record_path)
    store.record_path.write_text(json.dumps({"format": "vmsnapbackup-domain", "version": 9}))
    with pytest.raises(IncompatibleFormatError, match="domain record format version 9"):
        store.record()


def test_lock_of_store_names_domain(store: DomainStore) -> None:
    with store.lock("backup"):
        with pytest.raises(LockedError, match=f"domain web1 \\({UUID}\\)"):
            store.lock("prune").acquire()
    assert store.lock_path.exists()


# --- point numbers ------------------------------------------------------------------------

def test_point_numbers_are_never_reused(store: DomainStore) -> None:
    assert backup(store) == 1
    with store.lock("backup"):
        failed = store.allocate_point()  # a backup that dies before sealing
    assert failed == 2
    assert backup(store) == 3
    with store.lock("prune"):
        store.remove_point(3)
    assert backup(store) == 4
    assert [p.number for p in store.points()] == [1, 4]
    assert store.record().last_point == 4


def test_numbers_survive_an_old_domain_record(store: DomainStore) -> None:
    backup(store)
    backup(store)
    # domain.json restored from an old copy: the pool's own files still win
    store.record_path.write_bytes(mf.DomainRecord(UUID, "web1", 0).to_json())
    with store.lock("backup"):
        assert store.allocate_point() == 3
    # domain.json lost: recreating it starts from the highest number on disk
    store.record_path.unlink()
    put(store.disk_dir(1, "vda") / "point-000007.qcow2.partial")
    again = store.pool.domain(UUID, name="web1", create=True)
    assert again.record().last_point == 7
    with again.lock("backup"):
        assert again.allocate_point() == 8


def test_names() -> None:
    assert parse_number_name("000001") == 1
    assert parse_number_name("1234567") == 1234567
    assert parse_number_name("1") is None and parse_number_name("0000001") is None
    assert parse_number_name("000000") is None


# --- listing ------------------------------------------------------------------------------

def test_listing_ignores_generations_and_partials_without_manifest(store: DomainStore) -> None:
    backup(store)
    backup(store)
    with store.lock("backup"):
        n = store.allocate_point()
        g = store.allocate_generation(["vda"])
        put(store.disk_dir(g, "vda") / "base.qcow2.partial")
        put(store.disk_dir(1, "vda") / f"point-{n:06d}.qcow2.partial")
        put(store.points_dir / f".{n:06d}.json.tmp-1-abcd")
    infos = store.list_points()
    assert [(p.number, p.ok) for p in infos] == [(1, True), (2, True)]
    assert store.current_generation() == 1
    assert store.generations() == [1, 2]


def test_damaged_manifest_is_listed_as_damaged(store: DomainStore) -> None:
    backup(store)
    backup(store)
    backup(store)
    path = store.manifest_path(2)
    raw = bytearray(path.read_bytes())
    i = raw.index(b'"bytes_written": ') + len(b'"bytes_written": ')
    raw[i] = ord("7") if raw[i] != ord("7") else ord("8")
    path.write_bytes(bytes(raw))
    store.manifest_path(3).write_bytes(store.manifest_path(3).read_bytes()[:50])
    infos = store.list_points()
    assert [(p.number, p.ok) for p in infos] == [(1, True), (2, False), (3, False)]
    assert "checksum" in (infos[1].damaged or "")
    assert "JSON" in (infos[2].damaged or "")
    assert [p.number for p in store.points()] == [1]
    assert [p.number for p in store.damaged_points()] == [2, 3]
    with pytest.raises(CorruptFileError) as ei:
        store.read_manifest(2)
    assert ei.value.path == str(path)
    with pytest.raises(NotFoundError):
        store.read_manifest(9)


def test_manifest_of_another_point_or_domain_is_damaged(store: DomainStore) -> None:
    backup(store)
    backup(store)
    store.manifest_path(2).write_bytes(store.manifest_path(1).read_bytes())
    info = store.list_points()[1]
    assert not info.ok and "point 1" in (info.damaged or "")


def test_newer_manifest_is_listed_incompatible(store: DomainStore) -> None:
    backup(store)
    store.manifest_path(5).write_text(json.dumps({"format": "vmsnapbackup-point",
                                                  "version": 4}))
    info = store.list_points()[-1]
    assert info.number == 5 and info.incompatible and not info.ok


# --- writing records ----------------------------------------------------------------------

def test_write_manifest_refuses_missing_files_and_overwrite(store: DomainStore) -> None:
    backup(store)
    with store.lock("backup"):
        n = store.allocate_point()
        m = point_manifest(store, n, 1, 1, seconds={"read": 0.1})
        with pytest.raises(IntegrityError, match="missing"):
            store.write_manifest(m)
        assert not store.manifest_path(n).exists()
        put(store.point_volume_path(1, "vda", n))
        put(store.difference_path(1, "vda", n))
        path = store.write_manifest(m)
        assert mode(path) == 0o600 and store.read_manifest(n) == m
        with pytest.raises(IntegrityError, match="already exists"):
            store.write_manifest(m)


def test_generation_record(store: DomainStore) -> None:
    backup(store)
    rec = store.read_generation(1)
    assert rec.first_point == 1 and set(rec.disks) == {"vda"}
    with pytest.raises(NotFoundError):
        store.read_generation(7)
    with pytest.raises(IntegrityError, match="written once"):
        store.write_generation(rec)
    path = store.generation_record_path(1)
    for bad in (b"", path.read_bytes()[:-20], b"[]"):
        path.write_bytes(bad)
        with pytest.raises(CorruptFileError) as ei:
            store.read_generation(1)
        assert ei.value.path == str(path)
    path.write_bytes(rec.to_json().replace(b"\"version\": 2", b'"version": 4'))
    with pytest.raises(IncompatibleFormatError):
        store.read_generation(1)
    path.write_bytes(mf.GenerationRecord(2, 1, mf.utc_now(), 65536, rec.disks).to_json())
    with pytest.raises(CorruptFileError, match="says generation 2"):
        store.read_generation(1)
    path.unlink()
    with pytest.raises(CorruptFileError, match="missing"):
        store.read_generation(1)


# --- removal ------------------------------------------------------------------------------

def files(store: DomainStore) -> List[str]:
    out = []
    for dirpath, _dirs, names in os.walk(store.path):
        out += [os.path.relpath(os.path.join(dirpath, n), store.path) for n in names]
    return sorted(x for x in out if x not in ("domain.json", "lock", "readers"))


def test_remove_point_keeps_base_until_last_point_of_generation(store: DomainStore) -> None:
    for _ in range(3):
        backup(store)
    backup(store, new_generation=True)  # point 4 starts generation 2
    with store.lock("prune"):
        removed = store.remove_point(2)
    assert removed[0] == store.manifest_path(2)  # manifest first
    assert "generations/000001/vda/point-000002.qcow2" not in files(store)
    assert "generations/000001/vda/diff-000002.vsbd" not in files(store)
    with store.lock("prune"):
        store.remove_point(1)  # the generation's first point: base stays, point 3 needs it
    assert "generations/000001/vda/base.qcow2" in files(store)
    assert "generations/000001/vda/table-000001.vsbt" in files(store)
    with store.lock("prune"):
        store.remove_point(3)
    assert not store.generation_dir(1).exists()
    assert store.generations() == [2]
    assert [p.number for p in store.points()] == [4]
    with pytest.raises(NotFoundError):
        store.remove_point(3)


def test_remove_point_never_deletes_a_strangers_file(store: DomainStore) -> None:
    backup(store)
    put(store.disk_dir(1, "vda") / "notes.txt", b"mine")
    with store.lock("prune"):
        store.remove_point(1)
    assert files(store) == ["generations/000001/vda/notes.txt"]


def test_damaged_manifest_protects_its_generation(store: DomainStore) -> None:
    backup(store)
    backup(store)
    backup(store)
    # point 3's manifest is damaged beyond reading any field
    store.manifest_path(3).write_bytes(b"\x00" * 40)
    with store.lock("prune"):
        store.remove_point(1)
        store.remove_point(2)
    assert "generations/000001/vda/base.qcow2" in files(store)  # point 3's files hold it
    assert [(p.number, p.ok) for p in store.list_points()] == [(3, False)]
    with store.lock("prune"):
        store.remove_point(3)  # removing the damaged point on purpose frees the generation
    assert store.generations() == []


def test_damaged_manifest_naming_a_wrong_generation_still_protects_its_own(
        store: DomainStore) -> None:
    backup(store)
    backup(store)
    backup(store, new_generation=True)  # point 3 starts generation 2
    path = store.manifest_path(2)
    path.write_bytes(path.read_bytes().replace(b'"generation": 1', b'"generation": 2'))
    assert not store.list_points()[1].ok  # checksum catches the flip
    with store.lock("prune"):
        store.remove_point(1)
    assert "generations/000001/vda/base.qcow2" in files(store)
    assert "generations/000001/vda/point-000002.qcow2" in files(store)


# --- leftovers ----------------------------------------------------------------------------

def test_leftovers(store: DomainStore) -> None:
    backup(store)
    backup(store)
    with store.lock("backup"):
        n = store.allocate_point()  # 3: died after writing its volume, before sealing
        put(store.point_volume_path(1, "vda", n))
        put(store.disk_dir(1, "vda") / f"diff-{n:06d}.vsbd.partial")
        m = store.allocate_point()  # 4: died while creating a new generation
        g = store.allocate_generation(["vda"])
        put(store.disk_dir(g, "vda") / "base.qcow2.partial")
        put(store.path / ".domain.json.tmp-9-abcd")
    got = {(str(x.path.relative_to(store.path)), x.kind) for x in store.leftovers()}
    assert got == {
        ("generations/000001/vda/point-000003.qcow2", "orphan"),
        ("generations/000001/vda/diff-000003.vsbd.partial", "partial"),
        ("generations/000002", "generation"),
        (".domain.json.tmp-9-abcd", "temp"),
    }
    # while the journal names point 4 and generation 2, they are repair's to judge
    store.journal.write(JournalEntry(operation="backup", pid=1, host="h",
                                     started=mf.utc_now(), step="read", point=m, generation=g,
                                     new_generation=True,
                                     disks={"vda": JournalDisk("/img/vda.qcow2")}))
    kinds = {(str(x.path.relative_to(store.path)), x.kind) for x in store.leftovers()}
    assert ("generations/000002", "generation") not in kinds
    assert ("generations/000002/vda/base.qcow2.partial", "partial") in kinds
    # nothing of a sealed point is ever a leftover
    for x in store.leftovers():
        assert "point-000002" not in str(x.path) and "base.qcow2" != x.path.name
