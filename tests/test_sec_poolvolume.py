"""contained_volume: a storage pool volume path never leaves the pool's directory."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmsnapbackup.adapters.storagepool import contained_volume
from vmsnapbackup.errors import UsageError


@pytest.mark.parametrize("name", ["../../escaped-vda.raw", "a/b.raw", "..", ".", "",
                                  ".hidden.raw", "x\0.raw"])
def test_names_that_leave_the_directory_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(UsageError, match="would leave"):
        contained_volume(tmp_path, name)


def test_symlinks_out_are_refused(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    pool.mkdir()
    (pool / "link.raw").symlink_to(tmp_path / "elsewhere.raw")
    with pytest.raises(UsageError, match="resolves outside"):
        contained_volume(pool, "link.raw")
    (pool / "inside.raw").symlink_to(pool / "x.raw")   # a symlink at all is refused
    with pytest.raises(UsageError, match="resolves outside"):
        contained_volume(pool, "inside.raw")


def test_a_plain_name_in_a_symlinked_pool_directory_is_fine(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "alias")
    assert contained_volume(tmp_path / "alias", "vm1-vda.raw") == tmp_path / "alias" / "vm1-vda.raw"
