"""qemu-img create of a LUKS volume is run again when QEMU's PBKDF2 benchmark refuses its
own timing ("Unable to get accurate CPU usage", seen on this busy 2-core machine), and
only then: any other failure is reported at once, and the file is removed."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from vmsnapbackup.adapters.host import Completed
from vmsnapbackup.adapters.localhost import LocalHost
from vmsnapbackup.adapters.qemuimg import QemuImg
from vmsnapbackup.errors import StorageError

TIMING = b"qemu-img: x.qcow2: Unable to get accurate CPU usage\n"


class FlakyHost(LocalHost):
    """Fails the first ``fails`` qemu-img runs with ``stderr``, then succeeds."""

    def __init__(self, fails: int, stderr: bytes) -> None:
        super().__init__()
        self.fails, self.stderr, self.runs = fails, stderr, 0

    def run(self, argv: Sequence[str], *, timeout: float | None, **kw: Any) -> Completed:
        self.runs += 1
        if self.runs <= self.fails:
            return Completed(tuple(argv), 1, b"", self.stderr)
        return Completed(tuple(argv), 0, b"", b"")


def test_the_pbkdf_timing_refusal_is_run_again(tmp_path: Path) -> None:
    host = FlakyHost(2, TIMING)
    QemuImg(host, error=StorageError).create(str(tmp_path / "v.qcow2"), "qcow2", size=1 << 20)
    assert host.runs == 3 and (tmp_path / "v.qcow2").exists()


def test_it_gives_up_after_four_runs_and_removes_the_file(tmp_path: Path) -> None:
    host = FlakyHost(9, TIMING)
    with pytest.raises(StorageError, match="accurate CPU usage"):
        QemuImg(host, error=StorageError).create(str(tmp_path / "v.qcow2"), "qcow2",
                                                 size=1 << 20)
    assert host.runs == 4 and not (tmp_path / "v.qcow2").exists()


def test_other_failures_are_not_retried(tmp_path: Path) -> None:
    host = FlakyHost(1, b"qemu-img: Invalid password, cannot unlock any keyslot\n")
    with pytest.raises(StorageError, match="Invalid password"):
        QemuImg(host, error=StorageError).create(str(tmp_path / "v.qcow2"), "qcow2",
                                                 size=1 << 20)
    assert host.runs == 1
