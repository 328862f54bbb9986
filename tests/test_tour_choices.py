"""Unit checks of the small decisions behind issue 18's tour items (the features
themselves are proven on the real stack by integration/test_tour_*.py)."""
from __future__ import annotations

import pytest

from vmsnapbackup.adapters.domainxml import Disk, SkippedDisk
from vmsnapbackup.errors import ExitCode, NotFoundError
from vmsnapbackup.workflows.backupstart import apply_exclude, overlay_dirs
from vmsnapbackup.workflows.backupwork import full_read_reason
from vmsnapbackup.workflows.pruneall import PruneAllReport


def _disk(target: str, kind: str = "file", fmt: str = "qcow2") -> Disk:
    return Disk(target=target, device="disk", type=kind, source=f"/img/{target}", format=fmt)


def test_exclude_drops_the_named_disks_and_says_why() -> None:
    a, b = _disk("vda"), _disk("vdb")
    kept, skipped = apply_exclude("d", ["vda", "vdb", "hdc"], [a, b],
                                  [SkippedDisk(_disk("hdc"), "cdrom device")], ["vdb"])
    assert kept == [a]
    assert [(s.disk.target, s.reason) for s in skipped] == [("hdc", "cdrom device"),
                                                            ("vdb", "excluded")]


def test_exclude_of_an_unknown_disk_is_not_found() -> None:
    with pytest.raises(NotFoundError, match="vdz"):
        apply_exclude("d", ["vda"], [_disk("vda")], [], ["vdz"])


def test_file_disks_of_a_running_domain_keep_their_overlay_beside_the_image() -> None:
    assert overlay_dirs("d", "u", [_disk("vda")], None, running=True) == {"vda": None}
    assert overlay_dirs("d", "u", [_disk("vda", "block")], None, running=False) == {"vda": None}


def test_full_read_reason_names_raw_images_and_block_devices() -> None:
    assert full_read_reason(_disk("vda")) is None
    assert "whole device" in (full_read_reason(_disk("vdb", "block", "raw")) or "")
    assert "no dirty bitmap" in (full_read_reason(_disk("vdc", "file", "raw")) or "")


def test_prune_all_exit_code_says_whether_any_failed() -> None:
    assert PruneAllReport("p").exit_code == 0
    one = PruneAllReport("p", failed=[("a", "busy", int(ExitCode.LOCKED))])
    assert one.exit_code == ExitCode.LOCKED
    mixed = PruneAllReport("p", failed=[("a", "busy", int(ExitCode.LOCKED)),
                                        ("b", "journal", int(ExitCode.REPAIR_NEEDED))])
    assert mixed.exit_code == ExitCode.ERROR
