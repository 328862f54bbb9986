"""Where a restore onto a remote hypervisor may write (``restoreremote.remote_volume``).

The checks go through the :class:`Host` seam; this machine's ``LOCAL`` host
stands in for the hypervisor's (the same calls, run here).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmsnapbackup.adapters.host import LOCAL
from vmsnapbackup.errors import StorageError, UsageError
from vmsnapbackup.workflows.restoreremote import remote_volume


def test_a_new_name_in_the_pool_directory(tmp_path: Path) -> None:
    assert remote_volume(LOCAL, str(tmp_path), "copy-vda.raw") == str(tmp_path / "copy-vda.raw")


@pytest.mark.parametrize("name", ["", "../x.raw", "a/b.raw", ".", "..", ".hidden.raw",
                                  "nul\0.raw"])
def test_names_that_leave_the_directory_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(UsageError, match="would leave storage pool directory"):
        remote_volume(LOCAL, str(tmp_path), name)


def test_an_existing_file_is_never_replaced(tmp_path: Path) -> None:
    (tmp_path / "copy-vda.raw").write_bytes(b"x")
    with pytest.raises(UsageError, match="never replaces a file"):
        remote_volume(LOCAL, str(tmp_path), "copy-vda.raw")


def test_a_planted_symlink_is_refused_even_dangling(tmp_path: Path) -> None:
    os.symlink(tmp_path / "nowhere" / "etc-shadow", tmp_path / "copy-vda.raw")
    with pytest.raises(UsageError, match="never replaces a file"):
        remote_volume(LOCAL, str(tmp_path), "copy-vda.raw")


def test_the_pool_directory_must_be_a_directory(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    for d in (tmp_path / "f", tmp_path / "missing"):
        with pytest.raises(StorageError, match="not a directory"):
            remote_volume(LOCAL, str(d), "copy-vda.raw")
