"""The readers lock (FORMAT.md §8): readers share it, prune excludes them, neither waits."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from vmsnapbackup.core.lock import DomainLock
from vmsnapbackup.core.readerslock import READERS_FILE, ReadersLock
from vmsnapbackup.errors import LockedError


def test_readers_share_and_prune_is_refused(tmp_path: Path) -> None:
    with ReadersLock(tmp_path, "domain web"), ReadersLock(tmp_path, "domain web"):
        with pytest.raises(LockedError, match="being read by a restore, verify, mount or boot"):
            DomainLock(tmp_path / "lock", "prune", what="domain web").acquire()
        # the refused prune left the domain lock free and its note empty
        with DomainLock(tmp_path / "lock", "backup", what="domain web") as lk:
            assert lk.previous_holder is None
    assert stat.S_IMODE(os.stat(tmp_path / READERS_FILE).st_mode) == 0o600


def test_a_reader_is_refused_while_prune_runs(tmp_path: Path) -> None:
    with DomainLock(tmp_path / "lock", "prune", what="domain web"), \
            pytest.raises(LockedError, match=r"being pruned by pid \d+"):
        ReadersLock(tmp_path, "domain web").acquire()
    with ReadersLock(tmp_path, "domain web") as r:   # released with the prune's lock
        assert r.held


def test_backup_and_readers_coexist(tmp_path: Path) -> None:
    with DomainLock(tmp_path / "lock", "backup"), ReadersLock(tmp_path, "domain web") as r:
        assert r.held


def test_a_symlinked_readers_file_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / READERS_FILE).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(LockedError, match="cannot open readers lock"):
        ReadersLock(tmp_path, "domain web").acquire()
    assert not (tmp_path / "elsewhere").exists()
