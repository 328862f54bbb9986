"""The domain's journal of in-flight work (FORMAT.md §9).

Written (atomically) before the hypervisor is touched and rewritten after every
step that creates something, so that whatever kills a backup, the next process
finds a list of exactly what may need undoing: overlays to commit, a storage
daemon to stop, pool files no sealed manifest refers to.  It is removed last; its
presence after the lock was taken over means an operation died.

``step`` is what the backup last began (FORMAT.md §9 lists them: ``start``,
``snapshot``, ``read``, ``commit``, ``seal``); the reader accepts any non-empty
string, because repair decides from the recorded overlays, daemon and files, not from
the step, and a journal must stay repairable whatever wrote it.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import VmSnapBackupError
from .atomic import atomic_write_bytes, unlink_durable
from .jsonfields import (
    FORMAT_VERSION,
    Fields,
    check_header,
    check_target,
    load_json_object,
    record_bytes,
)
from .poolread import MAX_JOURNAL, read_bounded

__all__ = [
    "JOURNAL_FORMAT",
    "Journal",
    "JournalDaemon",
    "JournalDisk",
    "JournalEntry",
]

JOURNAL_FORMAT = "vmsnapbackup-journal"

@dataclass(frozen=True)
class JournalDisk:
    """What a disk's snapshot changed outside the pool: ``overlay`` is the file the
    guest now writes to (None before the snapshot, and for offline backups), ``frozen``
    the image the export reads."""

    source: str
    overlay: str | None = None
    frozen: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_fields(cls, f: Fields) -> JournalDisk:
        return cls(source=f.host_path("source", allow_empty=True),
                   overlay=f.host_path("overlay", optional=True),
                   frozen=f.host_path("frozen", optional=True))


@dataclass(frozen=True)
class JournalDaemon:
    """The storage daemon serving the exports, so repair can stop it."""

    pid: int
    runtime_dir: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_fields(cls, f: Fields) -> JournalDaemon:
        return cls(pid=f.integer("pid", minimum=1), runtime_dir=f.host_path("runtime_dir"))


@dataclass(frozen=True)
class JournalEntry:
    """The content of ``journal.json``.

    ``files`` are pool paths relative to the domain directory that the operation may
    have created; repair removes those no sealed manifest refers to.
    """

    operation: str
    pid: int
    host: str
    started: str
    step: str
    point: int | None = None
    generation: int | None = None
    new_generation: bool = False
    disks: Mapping[str, JournalDisk] = field(default_factory=dict)
    daemon: JournalDaemon | None = None
    files: tuple[str, ...] = ()
    #: a checkpoint this backup creates for its new generation (FORMAT §9)
    checkpoint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {
            "format": JOURNAL_FORMAT, "version": FORMAT_VERSION,
            "operation": self.operation, "pid": self.pid, "host": self.host,
            "started": self.started, "point": self.point, "generation": self.generation,
            "new_generation": self.new_generation, "step": self.step,
            "disks": {t: d.to_dict() for t, d in sorted(self.disks.items())},
            "daemon": self.daemon.to_dict() if self.daemon else None,
            "files": list(self.files),
        }
        if self.checkpoint is not None:  # optional (FORMAT §12)
            d["checkpoint"] = self.checkpoint
        return d

    def to_json(self) -> bytes:
        d = self.to_dict()
        JournalEntry.from_dict(d, "<new journal>")  # never write what we could not read
        return record_bytes(d)

    def with_files(self, *paths: str) -> JournalEntry:
        """A copy with ``paths`` added to ``files`` (in order, without duplicates)."""
        files = list(self.files)
        for p in paths:
            if p not in files:
                files.append(p)
        return dataclasses.replace(self, files=tuple(files))

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any], path: Any) -> JournalEntry:
        check_header(obj, path, JOURNAL_FORMAT, "journal")
        f = Fields(obj, path)
        disks_f = f.sub("disks")
        disks = {}
        for target in sorted(disks_f.obj):
            check_target(disks_f, target, target)
            disks[target] = JournalDisk.from_fields(disks_f.sub(target))
        daemon = None if f.raw("daemon") is None else JournalDaemon.from_fields(f.sub("daemon"))
        files = []
        for i, p in enumerate(f.items("files")):
            files.append(Fields({"x": p}, path, f"files[{i}]").relpath("x"))
        return cls(
            operation=f.text("operation"),
            pid=f.integer("pid", minimum=1),
            host=f.text("host", allow_empty=True),
            started=f.timestamp("started"),
            step=f.text("step"),
            point=f.integer("point", minimum=1, optional=True),
            generation=f.integer("generation", minimum=1, optional=True),
            new_generation=f.flag("new_generation"),
            disks=disks,
            daemon=daemon,
            files=tuple(files),
            checkpoint=f.checkpoint("checkpoint"),
        )

    @classmethod
    def from_json(cls, data: bytes | str, path: Any) -> JournalEntry:
        return cls.from_dict(load_json_object(data, path), path)


class Journal:
    """``journal.json`` of one domain.  Callers hold the domain's lock for writes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def exists(self) -> bool:
        return self.path.exists()

    def read(self) -> JournalEntry | None:
        """The entry, or None when no operation is in flight (or left over).

        A damaged journal raises CorruptFileError naming it: guessing what a dead
        backup left behind is exactly what we must not do.
        """
        data = read_bounded(self.path, MAX_JOURNAL, "journal", root=self.path.parent)
        if data is None:
            return None
        return JournalEntry.from_json(data, self.path)

    def write(self, entry: JournalEntry) -> JournalEntry:
        atomic_write_bytes(self.path, entry.to_json())
        return entry

    def update(self, **changes: Any) -> JournalEntry:
        """Rewrite the journal with some fields changed (``step=…``, ``daemon=…``).

        Reads the stored entry rather than trusting a caller's copy, so two steps of one
        workflow cannot undo each other's additions.
        """
        current = self.read()
        if current is None:
            raise VmSnapBackupError(f"{self.path}: no journal to update (removed while the "
                                    "operation ran?)")
        if "files" in changes:
            changes["files"] = tuple(changes["files"])
        return self.write(dataclasses.replace(current, **changes))

    def add_files(self, paths: Iterable[str]) -> JournalEntry:
        """Record pool files *before* creating them, so a crash in between leaves them
        listed."""
        current = self.read()
        if current is None:
            raise VmSnapBackupError(f"{self.path}: no journal to update (removed while the "
                                    "operation ran?)")
        return self.write(current.with_files(*paths))

    def clear(self) -> bool:
        """Remove the journal (the operation's last act); True if there was one."""
        return unlink_durable(self.path)
