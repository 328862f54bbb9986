"""In-flight records: which domain an operation of ours is working on, on this host (FORMAT.md §11).

The libvirt hook must decide within a second and must never call back into
libvirt, so it cannot ask the hypervisor or take the pool's domain lock (which
lives in a pool the hook does not know).  Instead every backup or repair writes
``inflight/<domain-uuid>.json`` under the host's runtime directory before it
touches the hypervisor and removes it when it ends; the hook only reads these
files.  A record whose process is gone is *stale*: the operation died, and its
``pool`` tells ``repair`` where to finish the job.

``/run`` is a tmpfs, so records vanish at boot, exactly when every operation
they describe has certainly ended.

Registration and removal are serialised by an ``flock`` on ``inflight/.lock``
so two processes replacing the same stale record cannot both believe they own
the domain.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CorruptFileError, LockedError, NotFoundError, UsageError, VmSnapBackupError
from .atomic import FILE_MODE, atomic_write_json, is_temp_name, make_private_dir, unlink_durable
from .poolread import read_bounded
from .timefmt import utc_now

__all__ = [
    "FORMAT",
    "RUNTIME_DIR_ENV",
    "VERSION",
    "InflightRecord",
    "clear",
    "inflight",
    "inflight_dir",
    "is_live",
    "read",
    "record_path",
    "records",
    "register",
    "runtime_root",
    "update",
]

log = logging.getLogger(__name__)

FORMAT = "vmsnapbackup-inflight"
VERSION = 1

#: Overrides the runtime root (tests; hosts with an unusual /run).
RUNTIME_DIR_ENV = "VMSNAPBACKUP_RUNTIME_DIR"

#: A record is one short JSON object; a larger file is not ours.
_MAX_RECORD = 1 << 20

#: UUIDs become file names: refuse anything that could leave the directory.
_UUID_RE = re.compile(r"^[A-Za-z0-9_-]+$")

#: A live pid is only trusted if its command line is one of ours: pids are reused.
_OUR_COMMANDS = (b"python", b"vmsnapbackup")


def runtime_root() -> Path:
    """The host runtime directory (§11): ``/run/vmsnapbackup`` for root,
    ``$XDG_RUNTIME_DIR/vmsnapbackup`` for other users, else a per-user directory in the temp dir.

    ``$VMSNAPBACKUP_RUNTIME_DIR`` overrides all of these.
    """
    override = os.environ.get(RUNTIME_DIR_ENV)
    if override:
        return Path(override)
    if os.geteuid() == 0:
        return Path("/run/vmsnapbackup")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return Path(xdg) / "vmsnapbackup"
    return Path(tempfile.gettempdir()) / f"vmsnapbackup-{os.getuid()}"


def inflight_dir() -> Path:
    """Where the records live (not created by this call)."""
    return runtime_root() / "inflight"


def _check_uuid(uuid: str) -> str:
    if not isinstance(uuid, str) or not _UUID_RE.match(uuid):
        raise UsageError(f"invalid domain uuid {uuid!r}")
    return uuid


def record_path(uuid: str) -> Path:
    """The record file of the domain with ``uuid``."""
    return inflight_dir() / f"{_check_uuid(uuid)}.json"


@dataclass(frozen=True)
class InflightRecord:
    """One domain an operation of ours is working on.

    ``offline`` is true while a shut-off domain's images are read directly (the
    hook then refuses to start the domain); ``images`` are the source images the
    operation reads, so the hook can also refuse another domain that uses them.
    """

    uuid: str
    name: str
    pid: int
    operation: str
    offline: bool
    since: str
    pool: str
    images: tuple[str, ...]

    def __post_init__(self) -> None:
        _check_uuid(self.uuid)
        object.__setattr__(self, "images", tuple(self.images))

    @classmethod
    def now(
        cls,
        uuid: str,
        name: str,
        operation: str,
        pool: str,
        images: Sequence[str] = (),
        *,
        offline: bool = False,
        pid: int | None = None,
    ) -> InflightRecord:
        """A record for the calling process, stamped with the current time."""
        return cls(
            uuid=uuid,
            name=name,
            pid=os.getpid() if pid is None else pid,
            operation=operation,
            offline=offline,
            since=utc_now(),
            pool=os.fspath(pool),
            images=tuple(os.fspath(i) for i in images),
        )

    def to_json(self) -> dict[str, Any]:
        """The §11 document."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "uuid": self.uuid,
            "name": self.name,
            "pid": self.pid,
            "operation": self.operation,
            "offline": self.offline,
            "since": self.since,
            "pool": self.pool,
            "images": list(self.images),
        }

    @classmethod
    def from_json(cls, obj: Any, path: os.PathLike[str] | str) -> InflightRecord:
        """Parse a §11 document; CorruptFileError names ``path`` for anything else."""
        if not isinstance(obj, dict):
            raise CorruptFileError(path, "not a JSON object")
        if obj.get("format") != FORMAT:
            raise CorruptFileError(path, f"not an in-flight record (format {obj.get('format')!r})")
        version = obj.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise CorruptFileError(path, f"bad version {version!r}")
        if version > VERSION:
            # Written by a newer tool on this host: the fields we read are still there
            # (§12 only adds), so read them rather than ignore a running operation.
            log.debug("%s: in-flight record version %d is newer than %d", path, version, VERSION)
        str_fields = ("uuid", "name", "operation", "since", "pool")
        for key in str_fields:
            if not isinstance(obj.get(key), str):
                raise CorruptFileError(path, f"field {key!r} missing or not a string")
        pid = obj.get("pid")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            raise CorruptFileError(path, f"bad pid {pid!r}")
        if not isinstance(obj.get("offline"), bool):
            raise CorruptFileError(path, "field 'offline' missing or not a boolean")
        images = obj.get("images")
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            raise CorruptFileError(path, "field 'images' missing or not a list of strings")
        if not _UUID_RE.match(obj["uuid"]):
            raise CorruptFileError(path, f"bad uuid {obj['uuid']!r}")
        return cls(
            uuid=obj["uuid"],
            name=obj["name"],
            pid=pid,
            operation=obj["operation"],
            offline=obj["offline"],
            since=obj["since"],
            pool=obj["pool"],
            images=tuple(images),
        )


def _read_path(path: Path) -> InflightRecord | None:
    data = read_bounded(path, _MAX_RECORD, "in-flight record")
    if data is None:
        return None
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise CorruptFileError(path, f"not valid JSON ({err})") from None
    except RecursionError:
        raise CorruptFileError(path, "not valid JSON (nested too deeply)") from None
    record = InflightRecord.from_json(obj, path)
    if path.name != f"{record.uuid}.json":
        raise CorruptFileError(path, f"holds the record of another domain ({record.uuid})")
    return record


def read(uuid: str) -> InflightRecord | None:
    """The record of the domain, or None; a damaged file is CorruptFileError naming it."""
    return _read_path(record_path(uuid))


def is_live(record: InflightRecord) -> bool:
    """True if the record's process still runs and is one of ours.

    The command line check guards against pid reuse after a crash (and reads a
    zombie, whose command line is empty, as dead).  Where ``/proc`` cannot tell,
    a running pid is trusted: refusing too much is safer than too little.
    """
    pid = record.pid
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except FileNotFoundError:
        return False  # exited between the two checks
    except OSError:
        return True
    return any(word in cmdline for word in _OUR_COMMANDS)


@contextlib.contextmanager
def _dir_lock() -> Iterator[Path]:
    """Serialise check-and-replace on the record directory."""
    directory = make_private_dir(inflight_dir())
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield directory
    finally:
        os.close(fd)  # drops the flock


def register(record: InflightRecord) -> Path:
    """Publish ``record``; LockedError if a live record of another process holds the domain.

    A stale record (its process is gone) is replaced, with a warning: the
    operation that left it died, and the caller (a new backup, or repair) is
    about to deal with what it left.  A damaged record is replaced too.
    """
    path = record_path(record.uuid)
    with _dir_lock():
        try:
            existing = _read_path(path)
        except CorruptFileError as err:
            log.warning("replacing damaged in-flight record: %s", err)
            existing = None
        if existing is not None and existing.pid != record.pid:
            if is_live(existing):
                raise LockedError(
                    f"domain {existing.name} ({existing.uuid}) is busy: {existing.operation} "
                    f"by pid {existing.pid} since {existing.since}"
                )
            log.warning(
                "replacing stale in-flight record of domain %s: %s by dead pid %d since %s",
                existing.name, existing.operation, existing.pid, existing.since,
            )
        atomic_write_json(path, record.to_json())
    log.debug("in-flight record %s registered (%s, pid %d)", path, record.operation, record.pid)
    return path


def update(uuid: str, /, **changes: Any) -> InflightRecord:
    """Rewrite some fields of the domain's record (say ``offline`` or ``images``) atomically."""
    if "uuid" in changes and changes["uuid"] != uuid:
        raise UsageError("the uuid of an in-flight record cannot change")
    path = record_path(uuid)
    with _dir_lock():
        current = _read_path(path)
        if current is None:
            raise NotFoundError(f"no in-flight record for domain {uuid}")
        try:
            new = dataclasses.replace(current, **changes)
        except TypeError as err:
            raise UsageError(f"bad in-flight record field: {err}") from None
        atomic_write_json(path, new.to_json())
    return new


def clear(uuid: str, pid: int | None = None) -> bool:
    """Remove the domain's record; True if one was removed.

    With ``pid``, only that process's record is removed, so an operation never
    clears a record a later one has registered after taking over a stale one.
    A damaged record is removed only without ``pid``.
    """
    path = record_path(uuid)
    if not path.parent.is_dir():
        return False
    with _dir_lock():
        try:
            current = _read_path(path)
        except CorruptFileError:
            if pid is not None:
                return False
            return unlink_durable(path)
        if current is None:
            return False
        if pid is not None and current.pid != pid:
            return False
        return unlink_durable(path)


def records() -> list[InflightRecord]:
    """Every readable record on this host, sorted by uuid; damaged files are logged and skipped."""
    directory = inflight_dir()
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return collect_records(names, lambda name: _read_path(directory / name), "")


def collect_records(names: Iterable[str], read: Callable[[str], InflightRecord | None],
                    where: str) -> list[InflightRecord]:
    """The records among the file ``names`` of a records directory, read by ``read``
    (here or, through the host seam, on a hypervisor ``where``): temp files are
    passed over, damaged records logged and skipped, so one bad file never hides
    the others from ``repair --all``."""
    found = []
    for name in sorted(names):
        if is_temp_name(name) or not name.endswith(".json"):
            continue
        try:
            record = read(name)
        except CorruptFileError as err:
            log.warning("ignoring damaged in-flight record%s: %s", where, err)
            continue
        if record is not None:
            found.append(record)
    return found


@contextlib.contextmanager
def inflight(record: InflightRecord) -> Iterator[InflightRecord]:
    """Hold ``record`` for the duration of the block; removed (if still ours) however it ends."""
    register(record)
    try:
        yield record
    finally:
        try:
            clear(record.uuid, pid=record.pid)
        except (OSError, VmSnapBackupError) as err:
            # Never hide the block's own exception behind a clean-up failure; a stale
            # record is harmless (its pid is ours and will die).
            log.warning("could not remove in-flight record of %s: %s", record.name, err)
