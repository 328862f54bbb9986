from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from vmsnapbackup.core.journal import Journal, JournalDaemon, JournalDisk, JournalEntry
from vmsnapbackup.errors import CorruptFileError, IncompatibleFormatError, VmSnapBackupError


def entry(**kw) -> JournalEntry:
    base = dict(operation="backup", pid=1234, host="h", started="2026-11-25T13:00:00.000Z",
                step="snapshot", point=3, generation=1, new_generation=False,
                disks={"vda": JournalDisk(source="/img/web1.qcow2",
                                          overlay="/img/web1.vmsnapbackup-3f2a.qcow2",
                                          frozen="/img/web1.qcow2")})
    base.update(kw)
    return JournalEntry(**base)  # type: ignore[arg-type]


SPEC = {"format": "vmsnapbackup-journal", "version": 1, "operation": "backup", "pid": 1234,
        "host": "h", "started": "2026-11-25T13:00:00Z", "point": 3, "generation": 1,
        "new_generation": False, "step": "read",
        "disks": {"vda": {"source": "/i/web1.qcow2", "overlay": "/i/web1.vmsnapbackup-3f2a.qcow2",
                          "frozen": "/i/web1.qcow2"}},
        "daemon": {"pid": 5678, "runtime_dir": "/run/vmsnapbackup/x"},
        "files": ["generations/000001/vda/point-000003.qcow2.partial"]}


def test_spec_example_reads(tmp_path: Path) -> None:
    p = tmp_path / "journal.json"
    p.write_text(json.dumps(SPEC))
    e = Journal(p).read()
    assert e is not None
    assert e.daemon == JournalDaemon(5678, "/run/vmsnapbackup/x")
    assert e.disks["vda"].overlay.endswith("3f2a.qcow2")
    assert e.files == ("generations/000001/vda/point-000003.qcow2.partial",)
    assert json.loads(e.to_json()) == {**SPEC, "version": 2}  # read v1, written v2


def test_write_update_add_files_clear(tmp_path: Path) -> None:
    j = Journal(tmp_path / "journal.json")
    assert j.read() is None and not j.exists()
    j.write(entry())
    assert j.read() == entry()
    assert oct((tmp_path / "journal.json").stat().st_mode & 0o777) == oct(0o600)
    j.update(step="export", daemon=JournalDaemon(99, "/run/x"))
    j.add_files(["generations/000001/vda/point-000003.qcow2.partial"])
    j.add_files(["generations/000001/vda/point-000003.qcow2.partial",
                 "generations/000001/vda/diff-000003.vsbd"])
    got = j.read()
    assert got is not None and got.step == "export" and got.daemon.pid == 99
    assert got.files == ("generations/000001/vda/point-000003.qcow2.partial",
                         "generations/000001/vda/diff-000003.vsbd")
    assert sorted(os.listdir(tmp_path)) == ["journal.json"]  # no temp files left
    assert j.clear() is True
    assert j.read() is None and j.clear() is False


def test_update_without_journal_fails(tmp_path: Path) -> None:
    with pytest.raises(VmSnapBackupError, match="no journal"):
        Journal(tmp_path / "journal.json").update(step="seal")


def test_offline_entry_without_overlay_and_daemon(tmp_path: Path) -> None:
    j = Journal(tmp_path / "journal.json")
    e = entry(disks={"vda": JournalDisk(source="/i/a.raw")}, point=None, generation=None)
    j.write(e)
    assert j.read() == e


def test_refuses_to_write_unsafe_paths(tmp_path: Path) -> None:
    with pytest.raises(CorruptFileError):
        Journal(tmp_path / "journal.json").write(entry(files=("../../etc/passwd",)))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("mutate", [
    lambda d: d.pop("step"), lambda d: d.pop("files"), lambda d: d.update(pid="1234"),
    lambda d: d.update(files=["/abs/path"]), lambda d: d.update(files="x"),
    lambda d: d.update(new_generation=0), lambda d: d.update(disks={"a/b": {"source": "x"}}),
    lambda d: d.update(daemon={"pid": 5}), lambda d: d.update(point=0),
    lambda d: d.update(format="vmsnapbackup-point"), lambda d: d.pop("format"),
])
def test_corrupt_journal_is_named(tmp_path: Path, mutate) -> None:
    p = tmp_path / "journal.json"
    d = json.loads(json.dumps(SPEC))
    mutate(d)
    p.write_text(json.dumps(d))
    with pytest.raises(CorruptFileError) as ei:
        Journal(p).read()
    assert ei.value.path == str(p)


def test_truncated_and_flipped_journal(tmp_path: Path) -> None:
    p = tmp_path / "journal.json"
    data = json.dumps(SPEC).encode()
    for bad in (data[:10], data[:-1], b"", data.replace(b":", b";", 1)):
        p.write_bytes(bad)
        with pytest.raises(CorruptFileError):
            Journal(p).read()


def test_newer_journal_is_incompatible(tmp_path: Path) -> None:
    p = tmp_path / "journal.json"
    p.write_text(json.dumps(dict(SPEC, version=4)))
    with pytest.raises(IncompatibleFormatError, match="journal format version 4 is newer"):
        Journal(p).read()


def test_checkpoint_is_optional_and_round_trips() -> None:
    e = JournalEntry.from_dict(SPEC, "j")
    assert e.checkpoint is None and "checkpoint" not in json.loads(e.to_json())
    withcp = dataclasses.replace(e, checkpoint="vmsnapbackup-p3-deadbeef")
    assert JournalEntry.from_json(withcp.to_json(), "j").checkpoint == "vmsnapbackup-p3-deadbeef"
