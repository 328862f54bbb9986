"""The per-domain lock (FORMAT.md §8).

``flock(2)`` rather than a pid file: the kernel drops it when the holder dies,
however it dies, so a crash never leaves a domain locked forever.  The file's
content is only a note for people and for the next holder: who holds it (pid,
host, operation, since).  The holder empties the note when it releases the lock
normally, so a note found by the *next* holder means the previous one died with
the lock held; that process then logs it and exposes :attr:`DomainLock.previous_holder`
so the workflow can look at the journal (§9) and ask for ``repair``.

The lock file is never removed or replaced: another process may hold an open
descriptor on it, and a new inode would let two processes "hold" the lock at once.
For the same reason the note is rewritten in place, never with a rename.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from ..errors import LockedError, UsageError, storage_error_from_oserror
from .atomic import FILE_MODE
from .readerslock import ensure_readers_file, exclusive_readers_fd
from .timefmt import utc_now

__all__ = ["EXCLUDES_READERS", "DomainLock", "LockHolder", "read_note"]

log = logging.getLogger(__name__)

#: The note is one short line; anything larger is not ours and is not worth reading.
_MAX_NOTE = 4096

#: Operations that remove points: they also take the readers lock exclusively
#: (FORMAT.md §8, :mod:`.readerslock`), so no restore, verify, mount or boot is
#: reading the domain while they run.
EXCLUDES_READERS = frozenset({"prune"})


@dataclass(frozen=True)
class LockHolder:
    """The note in the lock file.  Fields are None when the note is unreadable (a crash
    in the middle of writing it, or a foreign file): the lock itself still works."""

    pid: int | None
    host: str | None
    operation: str | None
    since: str | None

    @classmethod
    def parse(cls, text: str) -> LockHolder | None:
        """The holder named by ``text``; None for an empty note (nobody, or released)."""
        text = text.strip()
        if not text:
            return None
        try:
            obj = json.loads(text.splitlines()[0])
        except (ValueError, RecursionError):
            obj = None
        if not isinstance(obj, dict):
            return cls(None, None, None, None)

        def pick(key: str, typ: type) -> Any:
            v = obj.get(key)
            return v if type(v) is typ else None

        return cls(pick("pid", int), pick("host", str), pick("operation", str),
                   pick("since", str))

    def to_line(self) -> bytes:
        d: dict[str, Any] = {"pid": self.pid, "host": self.host,
                             "operation": self.operation, "since": self.since}
        return (json.dumps(d, ensure_ascii=True) + "\n").encode("ascii")

    def describe(self) -> str:
        """``pid 1234 on host web (backup since 2026-…)``, or what is known of it."""
        if self.pid is None:
            return "an unknown process (unreadable lock note)"
        parts = [f"pid {self.pid}"]
        if self.host:
            parts.append(f"on host {self.host}")
        extra = " ".join(x for x in (self.operation, f"since {self.since}" if self.since else "")
                         if x)
        if extra:
            parts.append(f"({extra})")
        return " ".join(parts)


class DomainLock:
    """An exclusive, non-blocking lock on one domain's part of the pool.

    Use as a context manager (or :meth:`acquire` / :meth:`release`).  A second
    holder fails at once with :class:`~vmsnapbackup.errors.LockedError` naming the
    first; waiting would only hide a stuck backup behind a hanging command.
    Not re-entrant: taking it twice, even in one process, is refused like any other
    contention, which catches a workflow calling another that locks again.

    The descriptor is close-on-exec, so a spawned qemu-storage-daemon never holds the
    lock; a bare ``fork()`` without exec would share it, so workflows must not do that
    while holding it.  Dropping the object without :meth:`release` keeps the lock until
    the process exits (safer than releasing it from a garbage collector).
    """

    def __init__(self, path: str | os.PathLike[str], operation: str,
                 what: str | None = None) -> None:
        self.path = Path(path)
        self.operation = operation
        #: how messages name the locked thing ("domain web1 (uuid)")
        self.what = what or f"lock {self.path}"
        #: the note of a holder that died with the lock held, found when we took it
        self.previous_holder: LockHolder | None = None
        self._fd: int | None = None
        self._readers_fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> DomainLock:
        if self._fd is not None:
            raise UsageError(f"{self.what}: lock already held by this object")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        except OSError as err:
            mapped = storage_error_from_oserror(err, f"lock file {self.path}")
            if mapped is not None:
                raise mapped from err
            raise
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                holder = LockHolder.parse(_read_note(fd))
                who = holder.describe() if holder else "another process (no note yet)"
                raise LockedError(f"{self.what} is locked by {who}") from None
            self._fd = fd
            previous = LockHolder.parse(_read_note(fd))
            if previous is not None:
                self.previous_holder = previous
                where = (f" on host {previous.host}"
                         if previous.host and previous.host != os.uname().nodename else "")
                log.warning("%s: took over lock left by dead process %s%s (%s since %s); "
                            "its work may need repair",
                            self.what, previous.pid if previous.pid is not None else "?",
                            where, previous.operation or "unknown operation",
                            previous.since or "?")
            self._write_note(LockHolder(os.getpid(), os.uname().nodename, self.operation,
                                        utc_now()).to_line())
            if self.operation in EXCLUDES_READERS:
                self._readers_fd = exclusive_readers_fd(self.path.parent, self.what)
            else:
                ensure_readers_file(self.path.parent)
        except BaseException:
            if self._fd is None:
                os.close(fd)
            else:
                self.release()
            raise
        return self

    def release(self) -> None:
        """Empty the note (so the next holder knows we finished), then unlock.

        Best effort on the note: if the pool went read-only we must still unlock, and
        the worst outcome is a spurious "dead holder" warning.
        """
        fd, self._fd = self._fd, None
        if fd is None:
            return
        readers, self._readers_fd = self._readers_fd, None
        if readers is not None:
            os.close(readers)   # releases the readers lock
        try:
            os.ftruncate(fd, 0)
        except OSError as err:
            log.warning("%s: could not clear the lock note: %s", self.what, err.strerror)
        finally:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def _write_note(self, line: bytes) -> None:
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, line, 0)
            os.fsync(self._fd)
        except OSError as err:
            mapped = storage_error_from_oserror(err, f"lock file {self.path}")
            if mapped is not None:
                raise mapped from err
            raise

    def __enter__(self) -> DomainLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def _read_note(fd: int) -> str:
    try:
        data = os.pread(fd, _MAX_NOTE, 0)
    except OSError:
        return ""
    return data.decode("utf-8", errors="replace")


def read_note(path: str | os.PathLike[str]) -> str:
    """The note of the lock file at ``path`` ("" when there is none to read)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return ""
    try:
        return _read_note(fd)
    finally:
        os.close(fd)
