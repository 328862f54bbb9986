"""Which temp images the next restore removes: only those whose writer is gone."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from vmsnapbackup.workflows.restoresweep import sweep_stale_temps


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_only_temps_of_dead_or_pre_boot_writers_go(tmp_path: Path) -> None:
    dead = tmp_path / f".guest-vda.raw.restore-{_dead_pid()}-0123abcd"
    live = tmp_path / f".guest-vdb.raw.restore-{os.getpid()}-89abcdef"
    before_boot = tmp_path / f".guest-vdc.raw.restore-{os.getpid()}-deadbeef"
    image = tmp_path / "guest-vda.raw"
    other = tmp_path / f".notes.restore-{_dead_pid()}-xyz"
    for p in (dead, live, before_boot, image, other):
        p.write_bytes(b"x")
    os.utime(before_boot, (0, 0))                    # written before this host booted
    a_dir = tmp_path / f".guest-vdd.raw.restore-{_dead_pid()}-00000000"
    a_dir.mkdir()                                     # not a file a restore wrote

    removed = sweep_stale_temps(tmp_path)

    assert sorted(removed) == sorted([dead, before_boot])
    assert not dead.exists() and not before_boot.exists()
    assert live.exists() and image.exists() and other.exists() and a_dir.is_dir()


def test_a_missing_directory_is_nothing_to_sweep(tmp_path: Path) -> None:
    assert sweep_stale_temps(tmp_path / "missing") == []
