"""The readers lock (FORMAT.md §8): readers of points and prune never run together.

A reader (restore, verify, mount, boot) reads a manifest and then, seconds or hours
later, the volumes it names; a prune in between would remove them and the reader
would report damage that is not there, or a mount would lose its base.  So
readers share a ``flock(2)`` on ``domains/<uuid>/readers`` and prune takes it
exclusively.  Neither waits (FORMAT says why): the loser fails at once with
LOCKED and a message naming the other side.

A separate file from the domain's ``lock``: readers must not exclude a backup
(which only adds files) and must never write the ``lock`` note.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
from pathlib import Path
from types import TracebackType

from ..errors import LockedError, UsageError
from .atomic import FILE_MODE
from .names import LOCK_FILE

__all__ = ["READERS_FILE", "ReadersLock", "ensure_readers_file", "exclusive_readers_fd"]

log = logging.getLogger(__name__)

#: the readers lock file, beside the domain's ``lock``
READERS_FILE = "readers"

_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
_CANNOT_WRITE = (errno.EROFS, errno.EACCES, errno.EPERM)


def _holder_note(domain_dir: Path) -> str:
    """Who holds the domain's ``lock`` (the prune), from its note, for a message."""
    from .lock import LockHolder, read_note  # lock imports us: import late

    holder = LockHolder.parse(read_note(domain_dir / LOCK_FILE))
    return holder.describe() if holder else "a prune"


class ReadersLock:
    """A shared lock on ``domain_dir/readers`` for the run of one reader.

    ``what`` names the domain in messages.  On a pool we cannot write and where the
    file does not exist yet, :meth:`acquire` holds nothing (no prune can run there).
    """

    def __init__(self, domain_dir: str | os.PathLike[str], what: str) -> None:
        self.path = Path(domain_dir) / READERS_FILE
        self.what = what
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> ReadersLock:
        if self._fd is not None:
            raise UsageError(f"{self.what}: readers lock already held by this object")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                         FILE_MODE)
        except OSError as err:
            if err.errno not in _CANNOT_WRITE:
                raise LockedError(f"{self.what}: cannot open readers lock {self.path}: "
                                  f"{err.strerror}") from err
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except FileNotFoundError:
                log.debug("%s: read-only pool without a readers lock: reading unlocked",
                          self.what)
                return self
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in _BUSY:
                raise
            raise LockedError(f"{self.what} is being pruned by "
                              f"{_holder_note(self.path.parent)}; try again when it is "
                              "done") from None
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def __enter__(self) -> ReadersLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def ensure_readers_file(domain_dir: Path) -> None:
    """Create the (empty, 0600) readers file if it is missing.  Called by every holder of
    the domain's lock, so readers of a pool that was ever backed up with this version
    find it and never change the pool themselves."""
    try:
        os.close(os.open(domain_dir / READERS_FILE,
                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE))
    except OSError as err:
        log.warning("%s: could not create the readers lock file: %s", domain_dir, err.strerror)


def exclusive_readers_fd(domain_dir: Path, what: str) -> int:
    """Prune's side: the readers lock taken exclusively, without waiting; returns the
    descriptor (closing it releases the lock).  A reader present: LockedError."""
    path = domain_dir / READERS_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno not in _BUSY:
            raise
        raise LockedError(f"{what} is being read by a restore, verify, mount or boot; "
                          "prune it when they are done") from None
    return fd
