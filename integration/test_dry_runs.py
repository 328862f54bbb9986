"""Dry runs change nothing (issue 18 item 5): no lock file created, no dead holder's
note taken over, a live holder still refused; on a real pool built through QEMU."""
from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
from test_restore import three_points

from vmsnapbackup.cli import main
from vmsnapbackup.core.lock import LockHolder
from vmsnapbackup.errors import ExitCode

pytestmark = pytest.mark.integration

if not all(shutil.which(b) for b in ("qemu-storage-daemon", "qemu-img")):
    pytest.skip("needs qemu-storage-daemon and qemu-img", allow_module_level=True)


def test_prune_dry_run_takes_no_lock_file(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    sp = three_points(tmp_path)
    lock = sp.store.lock_path
    lock.unlink()
    rc = main(["--pool", str(sp.pool.root), "prune", sp.name, "--keep-last", "1",
               "--dry-run"])
    assert rc == 0, capsys.readouterr()
    assert "would" in capsys.readouterr().out.lower()
    assert not lock.exists()
    assert [i.number for i in sp.store.list_points()] == [1, 2, 3]


def test_prune_dry_run_leaves_a_dead_holders_note(tmp_path: Path) -> None:
    sp = three_points(tmp_path)
    note = LockHolder(999999, socket.gethostname(), "backup", "2026-01-01T00:00:00Z").to_line()
    sp.store.lock_path.write_bytes(note)
    assert main(["--pool", str(sp.pool.root), "prune", sp.name, "--keep-last", "1",
                 "--dry-run"]) == 0
    assert sp.store.lock_path.read_bytes() == note   # not "taken over"


def test_dry_run_still_refuses_a_live_holder(tmp_path: Path) -> None:
    sp = three_points(tmp_path)
    with sp.store.lock("backup"):
        rc = main(["--pool", str(sp.pool.root), "prune", sp.name, "--keep-last", "1",
                   "--dry-run"])
    assert rc == int(ExitCode.LOCKED)


def test_list_shows_that_repair_is_pending(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from vmsnapbackup.core.journal import JournalEntry

    sp = three_points(tmp_path)
    assert main(["--pool", str(sp.pool.root), "list"]) == 0
    assert "REPAIR PENDING" not in capsys.readouterr().out
    # what a killed backup leaves: its journal
    sp.store.journal.write(JournalEntry("backup", 999999, socket.gethostname(),
                                        "2026-01-01T00:00:00Z", "snapshot"))
    assert main(["--pool", str(sp.pool.root), "list"]) == 0
    out = capsys.readouterr().out
    assert "REPAIR PENDING" in out and f"repair {sp.name}" in out
