"""Rebase without QEMU: what it refuses before writing, and how a failure is undone.

The copy itself needs QEMU's reading of a point volume through its base, so it
is proven on the real stack (integration/test_rebase.py, test_rebase_crash.py);
here faults are injected where a pure pool shows the behaviour.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from poolfake import fake_backup

from vmsnapbackup.core import journal as jr
from vmsnapbackup.core.pool import DomainStore, Pool
from vmsnapbackup.errors import CorruptFileError, RepairNeededError, UsageError
from vmsnapbackup.workflows import rebase as rb

UUID = "0b7f4a4e-1d1c-4c59-9d35-6f0a51d3c001"


def put(p: Path, size: int) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(os.urandom(size))


@pytest.fixture
def store(tmp_path: Path) -> DomainStore:
    return Pool.create(tmp_path / "pool").domain(UUID, name="web1", create=True)


def snapshot(store: DomainStore) -> tuple[int, list[int], list[int], bool]:
    return (store.record().last_point, [p.number for p in store.list_points()],
            store.generations(), store.journal.exists())


def test_a_generations_first_point_is_refused(store: DomainStore) -> None:
    fake_backup(store, put)
    before = snapshot(store)
    with pytest.raises(UsageError, match="already the first point of generation 1"):
        rb.rebase("web1", store.pool.root)
    assert snapshot(store) == before


def test_a_journal_means_repair_first(store: DomainStore) -> None:
    fake_backup(store, put)
    fake_backup(store, put)
    store.journal.write(jr.JournalEntry(operation="backup", pid=1, host="h",
                                        started="2026-01-01T00:00:00.000Z", step="read"))
    with pytest.raises(RepairNeededError, match="run repair"):
        rb.rebase("web1", store.pool.root)
    assert store.record().last_point == 2 and store.generations() == [1]


def test_a_damaged_point_is_refused_before_any_write(store: DomainStore) -> None:
    fake_backup(store, put)
    fake_backup(store, put)        # its tables are random bytes: they fail their checks
    before = snapshot(store)
    with pytest.raises(CorruptFileError):
        rb.rebase("web1", store.pool.root)
    assert snapshot(store) == before      # no number burnt, no generation, no journal


def test_a_failed_copy_removes_the_new_generation_and_the_journal(
        store: DomainStore, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_backup(store, put)
    fake_backup(store, put)
    monkeypatch.setattr(rb, "read_point_tables", lambda s, d: type("T", (), {"table": None}))

    def broken_daemon(*a: object, **k: object) -> object:
        raise OSError(5, "injected: the storage daemon did not start")

    monkeypatch.setattr(rb, "StorageDaemon", broken_daemon)
    with pytest.raises(OSError, match="injected"):
        rb.rebase("web1", store.pool.root)
    # the number is burnt (FORMAT §3), everything else is as before
    assert store.record().last_point == 3
    assert [p.number for p in store.list_points()] == [1, 2]
    assert store.generations() == [1] and not store.journal.exists()


def test_a_copy_that_cannot_be_undone_leaves_the_journal_for_repair(
        store: DomainStore, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_backup(store, put)
    fake_backup(store, put)
    monkeypatch.setattr(rb, "read_point_tables", lambda s, d: type("T", (), {"table": None}))

    def broken_daemon(*a: object, **k: object) -> object:
        raise OSError(5, "injected")

    def no_rmtree(path: object) -> None:
        raise OSError(30, "read-only file system")

    monkeypatch.setattr(rb, "StorageDaemon", broken_daemon)
    monkeypatch.setattr(rb.shutil, "rmtree", no_rmtree)
    with pytest.raises(RepairNeededError, match="repair web1"):
        rb.rebase("web1", store.pool.root)
    entry = store.journal.read()
    assert entry is not None and entry.operation == "rebase" and entry.point == 3
    assert entry.files == ("generations/000002",)


class _Gens:
    """The two things _carried_checkpoint asks of a store."""

    name = "web1"

    def __init__(self, current: int, checkpoints: dict[int, str | None]) -> None:
        self.current, self.checkpoints = current, checkpoints

    def current_generation(self) -> int:
        return self.current

    def read_generation(self, g: int) -> object:
        return type("G", (), {"checkpoint": self.checkpoints[g]})


@pytest.mark.parametrize(("source_gen", "current", "checkpoints", "carried"), [
    (1, 1, {1: "vmsnapbackup-p1-aa"}, "vmsnapbackup-p1-aa"),        # the usual case
    (1, 1, {1: None}, None),                                          # none to carry
    (1, 2, {1: "vmsnapbackup-p1-aa", 2: "vmsnapbackup-p3-bb"}, None),  # retired since
    (1, 2, {1: "vmsnapbackup-p1-aa", 2: "vmsnapbackup-p1-aa"}, "vmsnapbackup-p1-aa"),
    (2, 2, {2: None}, None),
])
def test_the_checkpoint_carries_over_only_while_it_is_the_current_ones(
        source_gen: int, current: int, checkpoints: dict[int, str | None],
        carried: str | None) -> None:
    run = rb._RebaseRun.__new__(rb._RebaseRun)
    run.store = _Gens(current, checkpoints)  # type: ignore[assignment]
    run.source = type("M", (), {"generation": source_gen})  # type: ignore[assignment]
    assert run._carried_checkpoint() == carried


def test_the_new_base_is_fsynced_while_written_and_once_after(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tmp_path / "base.qcow2.partial"
    base.write_bytes(b"x")
    calls: list[str] = []
    synced = threading.Event()

    def fsync(path: Path) -> None:
        calls.append("body" if not done else "after")
        synced.set()

    done = False
    monkeypatch.setattr(rb, "fsync_path", fsync)
    with rb._written_back(base, interval=0.001):
        assert synced.wait(30)        # the writeback runs beside the convert and check
        done = True
    assert calls[0] == "body" and calls[-1] == "after"


def test_a_failed_writeback_fails_the_rebase(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    failed = threading.Event()

    def fsync(path: Path) -> None:   # only the thread's first fsync fails
        if not failed.is_set():
            failed.set()
            raise OSError(5, "injected: the disk failed under the new base")

    monkeypatch.setattr(rb, "fsync_path", fsync)
    with pytest.raises(OSError, match="injected"), \
            rb._written_back(tmp_path / "base.qcow2.partial", interval=0.001):
        assert failed.wait(30)
