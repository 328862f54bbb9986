from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from vmsnapbackup.core import inflight
from vmsnapbackup.core.inflight import InflightRecord
from vmsnapbackup.errors import CorruptFileError, LockedError, NotFoundError, UsageError

UUID = "3f1c0d1e-7a52-4c1b-9a57-0d7f1c2b9e11"
OTHER = "9b0e7a45-1c2d-4e5f-8a9b-0c1d2e3f4a5b"


@pytest.fixture(autouse=True)
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "run"
    monkeypatch.setenv(inflight.RUNTIME_DIR_ENV, str(root))
    return root


@pytest.fixture
def other_live_pid() -> Iterator[int]:
    """A live python process that is not us."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                            stdin=subprocess.PIPE)
    try:
        yield proc.pid
    finally:
        proc.stdin.close()  # type: ignore[union-attr]
        proc.wait(timeout=10)


def dead_pid() -> int:
    """The pid of a python process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=10)
    return proc.pid


def make(uuid: str = UUID, pid: int | None = None, **kw: object) -> InflightRecord:
    fields = dict(name="web1", operation="backup", pool="/var/lib/vmsnapbackup",
                  images=["/var/lib/libvirt/images/web1.qcow2"])
    fields.update(kw)
    return InflightRecord.now(uuid, pid=pid, **fields)  # type: ignore[arg-type]


def test_runtime_root_override_and_defaults(monkeypatch: pytest.MonkeyPatch, runtime: Path) -> None:
    assert inflight.runtime_root() == runtime
    monkeypatch.delenv(inflight.RUNTIME_DIR_ENV)
    if os.geteuid() == 0:
        assert inflight.runtime_root() == Path("/run/vmsnapbackup")
    else:
        assert inflight.runtime_root().name.startswith("vmsnapbackup")


def test_register_read_clear(runtime: Path) -> None:
    rec = make(offline=True)
    path = inflight.register(rec)
    assert path == runtime / "inflight" / f"{UUID}.json"
    assert (runtime / "inflight").stat().st_mode & 0o777 == 0o700
    assert path.stat().st_mode & 0o777 == 0o600
    doc = json.loads(path.read_text())
    assert doc["format"] == "vmsnapbackup-inflight" and doc["version"] == 1
    assert doc["images"] == ["/var/lib/libvirt/images/web1.qcow2"] and doc["offline"] is True
    assert doc["pid"] == os.getpid()
    assert inflight.read(UUID) == rec
    assert inflight.records() == [rec]
    assert inflight.is_live(rec)
    assert inflight.clear(UUID) is True
    assert inflight.read(UUID) is None
    assert inflight.clear(UUID) is False
    assert inflight.records() == []


def test_read_and_records_without_directory() -> None:
    assert inflight.read(UUID) is None
    assert inflight.records() == []
    assert inflight.clear(UUID) is False


def test_update_changes_fields() -> None:
    inflight.register(make())
    new = inflight.update(UUID, offline=True, images=["/a", "/b"])
    assert new.offline and new.images == ("/a", "/b")
    assert inflight.read(UUID) == new
    with pytest.raises(UsageError):
        inflight.update(UUID, uuid=OTHER)
    with pytest.raises(UsageError):
        inflight.update(UUID, colour="blue")
    with pytest.raises(NotFoundError):
        inflight.update(OTHER, offline=True)


def test_stale_record_is_not_live_and_is_replaced(caplog: pytest.LogCaptureFixture) -> None:
    stale = make(pid=dead_pid())
    inflight.register(stale)
    assert inflight.read(UUID) == stale
    assert not inflight.is_live(stale)
    mine = make(operation="repair")
    inflight.register(mine)
    assert inflight.read(UUID) == mine
    assert "stale" in caplog.text


def test_zombie_is_not_live() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        # Wait for exit without reaping: the pid stays a zombie with an empty cmdline.
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        assert not inflight.is_live(make(pid=proc.pid))
    finally:
        proc.wait(timeout=10)


def test_live_pid_of_foreign_program_is_not_ours() -> None:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        assert not inflight.is_live(make(pid=proc.pid))
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_second_live_registration_refused(other_live_pid: int) -> None:
    theirs = make(pid=other_live_pid)
    inflight.register(theirs)
    assert inflight.is_live(theirs)
    with pytest.raises(LockedError, match=str(other_live_pid)):
        inflight.register(make())
    assert inflight.read(UUID) == theirs
    # Same pid may re-register (say, to rewrite it).
    inflight.register(make(pid=other_live_pid, operation="repair"))
    assert inflight.read(UUID).operation == "repair"  # type: ignore[union-attr]


def test_clear_only_own_pid(other_live_pid: int) -> None:
    inflight.register(make(pid=other_live_pid))
    assert inflight.clear(UUID, pid=os.getpid()) is False
    assert inflight.read(UUID) is not None
    assert inflight.clear(UUID, pid=other_live_pid) is True
    assert inflight.read(UUID) is None


@pytest.mark.parametrize("content", [
    b"",
    b"{not json",
    b"[]",
    b'{"format": "something-else", "version": 1}',
    b"\xff\xfe",
])
def test_corrupt_file_named(runtime: Path, content: bytes) -> None:
    d = runtime / "inflight"
    d.mkdir(parents=True)
    path = d / f"{UUID}.json"
    path.write_bytes(content)
    with pytest.raises(CorruptFileError) as info:
        inflight.read(UUID)
    assert info.value.path == str(path)
    assert inflight.records() == []  # skipped, not fatal
    # A damaged record does not block a new operation, and only a pid-less clear removes it.
    assert inflight.clear(UUID, pid=os.getpid()) is False
    assert path.exists()
    inflight.register(make())
    assert inflight.read(UUID) is not None


@pytest.mark.parametrize("field,value", [
    ("pid", "12"), ("pid", 0), ("pid", True), ("offline", "yes"), ("images", "/a"),
    ("images", [1]), ("name", None), ("uuid", "../etc"),
])
def test_bad_fields_are_corrupt(runtime: Path, field: str, value: object) -> None:
    doc = make().to_json()
    doc[field] = value
    d = runtime / "inflight"
    d.mkdir(parents=True)
    (d / f"{UUID}.json").write_text(json.dumps(doc))
    with pytest.raises(CorruptFileError, match=field if field != "uuid" else "uuid"):
        inflight.read(UUID)


def test_record_of_another_domain_under_wrong_name_is_corrupt(runtime: Path) -> None:
    inflight.register(make(uuid=OTHER))
    d = runtime / "inflight"
    os.rename(d / f"{OTHER}.json", d / f"{UUID}.json")
    with pytest.raises(CorruptFileError, match="another domain"):
        inflight.read(UUID)


def test_uuid_cannot_escape_directory() -> None:
    with pytest.raises(UsageError):
        inflight.read("../../etc/passwd")
    with pytest.raises(UsageError):
        make(uuid="a/b")


def test_context_manager_clears_own_record_even_on_error() -> None:
    with pytest.raises(RuntimeError):
        with inflight.inflight(make()) as rec:
            assert inflight.read(UUID) == rec
            raise RuntimeError("boom")
    assert inflight.read(UUID) is None


def test_context_manager_leaves_a_successor_alone(other_live_pid: int) -> None:
    with inflight.inflight(make()):
        # Someone took over (only possible after we died in real life): not ours to clear.
        inflight.clear(UUID)
        inflight.register(make(pid=other_live_pid))
    assert inflight.read(UUID).pid == other_live_pid  # type: ignore[union-attr]


def test_context_manager_refuses_when_busy(other_live_pid: int) -> None:
    inflight.register(make(pid=other_live_pid))
    with pytest.raises(LockedError):
        with inflight.inflight(make()):
            pytest.fail("entered despite a live record")
    assert inflight.read(UUID).pid == other_live_pid  # type: ignore[union-attr]


def test_records_lists_several_and_ignores_temp_files(runtime: Path) -> None:
    a, b = make(), make(uuid=OTHER, name="db1")
    inflight.register(b)
    inflight.register(a)
    (runtime / "inflight" / f".{UUID}.json.tmp-1-abcd").write_text("{")
    assert inflight.records() == sorted([a, b], key=lambda r: r.uuid)
