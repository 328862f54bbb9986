"""The typed choices of a backup, and the run's bandwidth budget handed down explicitly.

What reaches the library is one frozen, checked :class:`BackupOptions` (never
an argparse namespace or a ``**kwargs`` dict), and the ``--max-rate`` budget
travels in it down to the disk pass: there is no budget kept in the process.
The budget's effect on real reads is measured in integration/test_many_domains.py.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from vmsnapbackup.cli import build_parser
from vmsnapbackup.cli.backup import _options
from vmsnapbackup.core.retention import Policy
from vmsnapbackup.errors import UsageError
from vmsnapbackup.workflows import ratebudget
from vmsnapbackup.workflows.backup import backup
from vmsnapbackup.workflows.backupoptions import BackupOptions
from vmsnapbackup.workflows.diskpass import RawImageSource, run_disk_pass
from vmsnapbackup.workflows.ratebudget import RateBudget

MiB = 1 << 20


@pytest.mark.parametrize("bad", [
    {"block_size": 1000}, {"base_format": "vmdk"}, {"threshold": 0.0},
    {"threshold": 1.5}, {"compression": "lz4"},
    {"encrypt": True, "compression": "zstd"},
])
def test_a_bad_choice_is_refused_when_the_record_is_made(bad: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        BackupOptions(**bad)   # type: ignore[arg-type]


def test_the_record_is_frozen_and_keeps_no_caller_list() -> None:
    disks = ["vda"]
    options = BackupOptions(disks=disks, exclude=["vdb"])
    disks.append("vdc")
    assert options.disks == ("vda",) and options.exclude == ("vdb",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.quiesce = True  # type: ignore[misc]


def test_backup_takes_options_or_keywords_not_both() -> None:
    # refused before any connection or pool: the pool path need not exist
    with pytest.raises(UsageError, match="not both"):
        backup("web", "/nonexistent/pool", uri="test:///default",
               options=BackupOptions(), quiesce=True)
    with pytest.raises(UsageError):   # the keyword path checks its choices too
        backup("web", "/nonexistent/pool", uri="test:///default", block_size=1000)


def test_the_command_line_builds_the_record_with_the_runs_budget() -> None:
    args = build_parser().parse_args(
        ["backup", "web", "--max-rate", "8M", "--disk", "vda", "--exclude", "vdb",
         "--no-quiesce", "--keep-last", "3", "--block-size", "128K", "--compress", "zstd"])
    options = _options(args)
    assert isinstance(options, BackupOptions)
    assert options.budget is not None and options.budget.rate == 8 * MiB
    assert options.disks == ("vda",) and options.exclude == ("vdb",)
    assert options.quiesce is False and options.block_size == 128 * 1024
    assert options.retention == Policy(3, None, None, None)
    assert options.compression == "zstd"
    plain = _options(build_parser().parse_args(["backup", "web"]))
    assert plain.budget is None and plain.retention is None


def test_no_budget_is_kept_in_the_process() -> None:
    assert not hasattr(ratebudget, "current_budget")
    assert not hasattr(ratebudget, "rate_budget")


def _raw_image(tmp_path: Path, size: int) -> int:
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(size))
    return os.open(path, os.O_RDONLY)


def test_the_disk_pass_reads_through_the_budget_it_is_handed(tmp_path: Path) -> None:
    fd = _raw_image(tmp_path, 2 * MiB)
    slept: list[float] = []
    budget = RateBudget(64 * MiB, burst=0, sleep=slept.append)
    try:
        run_disk_pass(RawImageSource(fd, 2 * MiB), None, 64 * 1024, None, budget=budget)
        assert budget.taken == 2 * MiB and slept
        run_disk_pass(RawImageSource(fd, 2 * MiB), None, 64 * 1024, None)
        assert budget.taken == 2 * MiB   # no budget handed: none taken from
    finally:
        os.close(fd)
