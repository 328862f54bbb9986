"""A pool is data, not instructions (FORMAT.md §13): every read of a pool file is
bounded, stays in the pool, and a name read from a pool is validated before it can
reach a path.  Each refusal is one CorruptFileError naming the file, and one bad
manifest makes one damaged point, never a dead ``list``."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest
from poolfake import fake_backup

from vmsnapbackup.core import manifest as mf
from vmsnapbackup.core import poolread
from vmsnapbackup.core.checktable import read_check_table
from vmsnapbackup.core.pool import DomainStore, Pool
from vmsnapbackup.errors import CorruptFileError
from vmsnapbackup.workflows.listing import list_points

UUID = "3f2a4b6c-1d2e-4f30-8a9b-0c1d2e3f4a5b"


def put(p: Path, _size: int = 1) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")


@pytest.fixture
def store(tmp_path: Path) -> DomainStore:
    s = Pool.create(tmp_path / "pool").domain(UUID, name="web1", create=True)
    for _ in range(3):
        fake_backup(s, put)
    return s


def finishes(fn: Callable[[], Any], seconds: float = 20.0) -> Any:
    """fn's result; fails (instead of hanging the suite) if it blocks."""
    out: List[Any] = []
    errors: List[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as err:  # handed to the test's thread
            errors.append(err)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"blocked for {seconds} s"
    if errors:
        raise errors[0]
    return out[0]


def damaged(store: DomainStore) -> Dict[int, str]:
    infos = finishes(store.list_points)
    assert [i.number for i in infos] == [1, 2, 3]
    return {i.number: i.damaged for i in infos if not i.ok}


def resealed(store: DomainStore, point: int, change: Callable[[Dict[str, Any]], None]) -> None:
    """Rewrite a manifest with a valid version-2 checksum: only the rule under test fails."""
    path = store.manifest_path(point)
    obj = json.loads(path.read_bytes())
    change(obj)
    path.write_bytes(mf.manifest_bytes(obj))


# --- bounded reads --------------------------------------------------------------------------

def test_a_fifo_manifest_is_damaged_and_list_does_not_hang(store: DomainStore) -> None:
    path = store.manifest_path(2)
    path.unlink()
    os.mkfifo(path)
    try:
        got = damaged(store)
    finally:
        _release_readers(path)
    assert list(got) == [2] and "FIFO" in got[2]


def _release_readers(fifo: Path) -> None:
    """Unblock a reader a broken implementation left in open(2), so its thread ends."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass  # ENXIO: nobody is reading


def test_a_manifest_linked_to_dev_zero_is_damaged(store: DomainStore) -> None:
    path = store.manifest_path(3)
    path.unlink()
    path.symlink_to("/dev/zero")
    # /dev/zero lies outside the pool: refused before it is even looked at
    assert "leads out of the pool" in damaged(store)[3]


def test_a_device_inside_the_pool_is_damaged(store: DomainStore, tmp_path: Path) -> None:
    with pytest.raises(CorruptFileError, match="a device, not a regular file"):
        poolread.read_bounded("/dev/zero", 100, "manifest")
    with pytest.raises(CorruptFileError, match="a directory"):
        poolread.read_bounded(tmp_path, 100, "manifest")


def test_a_symlink_out_of_the_pool_is_refused_even_to_a_good_manifest(
        store: DomainStore, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.json"
    outside.write_bytes(store.manifest_path(2).read_bytes())
    store.manifest_path(2).unlink()
    store.manifest_path(2).symlink_to(outside)
    assert "leads out of the pool" in damaged(store)[2]
    # a symlink inside the pool is followed
    store.manifest_path(2).unlink()
    inside = store.path / "moved-000002.json"
    inside.write_bytes(outside.read_bytes())
    store.manifest_path(2).symlink_to(inside)
    assert damaged(store) == {}


def test_a_points_directory_linked_out_of_the_pool_is_refused(
        store: DomainStore, tmp_path: Path) -> None:
    os.rename(store.points_dir, tmp_path / "points")
    store.points_dir.symlink_to(tmp_path / "points")
    got = damaged(store)
    assert set(got) == {1, 2, 3} and all("leads out of the pool" in r for r in got.values())


def test_a_huge_manifest_is_refused_without_reading_it(store: DomainStore) -> None:
    path = store.manifest_path(1)
    with open(path, "r+b") as f:
        f.truncate(poolread.MAX_MANIFEST + 1)   # sparse: costs no disk
    assert "too large for a point manifest" in damaged(store)[1]


def test_deeply_nested_json_is_one_damaged_point(store: DomainStore) -> None:
    store.manifest_path(2).write_bytes(b"[" * 100000 + b"]" * 100000)
    assert "nested too deeply" in damaged(store)[2]


def test_public_list_survives_one_bad_manifest(store: DomainStore) -> None:
    store.manifest_path(2).write_bytes(b'{"a": ' * 50000 + b"1" + b"}" * 50000)
    got = finishes(lambda: list_points(store.pool.root))
    assert [(p.point, p.damaged is None) for p in got] == [(1, True), (2, False), (3, True)]


def test_other_records_are_bounded_too(store: DomainStore) -> None:
    store.journal_path.symlink_to("/dev/zero")
    with pytest.raises(CorruptFileError, match="leads out of the pool"):
        finishes(store.journal.read)
    store.journal_path.unlink()
    os.mkfifo(store.journal_path)
    with pytest.raises(CorruptFileError, match="FIFO"):
        finishes(store.journal.read)
    store.record_path.unlink()
    os.mkfifo(store.record_path)
    with pytest.raises(CorruptFileError, match="FIFO"):
        finishes(store.record)
    assert store.name == UUID        # a damaged record does not hide which domain
    header = store.pool.header_path
    header.unlink()
    os.mkfifo(header)
    with pytest.raises(CorruptFileError, match="FIFO"):
        finishes(lambda: Pool.open(store.pool.root))


def test_a_fifo_table_is_corrupt_not_a_hang(store: DomainStore) -> None:
    table = store.table_path(1, "vda", 1)
    table.unlink()
    os.mkfifo(table)
    with pytest.raises(CorruptFileError, match="FIFO"):
        finishes(lambda: read_check_table(table))


def test_resolve_refuses_a_path_that_leaves_the_pool(store: DomainStore, tmp_path: Path) -> None:
    gen = store.generation_dir(1)
    os.rename(gen, tmp_path / "gen")
    gen.symlink_to(tmp_path / "gen")
    with pytest.raises(CorruptFileError, match="leads out of the pool"):
        store.resolve("generations/000001/vda/base.qcow2")


# --- names from a pool ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../../escaped", "a/b", "..", "x\nInjected: line", ""])
def test_a_manifest_domain_name_that_is_a_path_is_damaged(store: DomainStore, name: str) -> None:
    resealed(store, 2, lambda o: o["domain"].__setitem__("name", name))
    got = damaged(store)
    assert list(got) == [2] and "domain.name" in got[2]


def test_a_domain_record_name_that_is_a_path_is_corrupt(store: DomainStore) -> None:
    obj = json.loads(store.record_path.read_bytes())
    obj["name"] = "../../escaped"
    store.record_path.write_text(json.dumps(obj))
    with pytest.raises(CorruptFileError, match="not a usable domain name"):
        store.record()
    with pytest.raises(Exception, match="no domain '../../escaped'"):
        store.pool.find_domain("../../escaped")


@pytest.mark.parametrize("key,value", [
    ("volume", "generations/000001/vda/../../../../../etc/passwd"),
    ("volume", "generations/000001/vdb/point-000002.qcow2"),       # another disk's volume
    ("difference", "generations/000001/vda/diff-000003.vsbd"),     # another point's diff
    ("target", "../vda"),
    ("dirty_bitmap", "other-tool-checkpoint"),
    ("source", "relative/image.qcow2"),
])
def test_a_manifest_disk_name_or_path_outside_the_layout_is_damaged(
        store: DomainStore, key: str, value: str) -> None:
    resealed(store, 2, lambda o: o["disks"][0].__setitem__(key, value))
    got = damaged(store)
    assert list(got) == [2] and key in got[2]


def test_journal_paths_and_names_are_validated(store: DomainStore) -> None:
    from vmsnapbackup.core.journal import JournalDisk, JournalEntry
    entry = JournalEntry(operation="backup", pid=1, host="h", started=mf.utc_now(),
                         step="start", disks={"vda": JournalDisk("/img/vda.qcow2")})
    store.journal.write(entry)
    obj = json.loads(store.journal_path.read_bytes())
    for path_key, bad in (("overlay", "../overlay.qcow2"), ("frozen", "x\n/etc")):
        obj["disks"]["vda"][path_key] = bad
        store.journal_path.write_text(json.dumps(obj))
        with pytest.raises(CorruptFileError, match=path_key):
            store.journal.read()
        obj["disks"]["vda"][path_key] = None
    obj["files"] = ["../../outside"]
    store.journal_path.write_text(json.dumps(obj))
    with pytest.raises(CorruptFileError, match="files"):
        store.journal.read()
