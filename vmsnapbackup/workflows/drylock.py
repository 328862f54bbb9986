"""The lock a dry run takes: a look, not a claim.

A dry run must change nothing, so it must not create the lock file, write a
holder note, or "take over" the lock of a dead process (that note is what tells
``list`` and ``repair`` that work was interrupted).  It still refuses to report
while a live backup, prune or repair holds the domain: what it would report is
then someone's work in progress.  A shared ``flock`` on a read-only descriptor
does exactly that, and works on a read-only pool.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator

from ..core.domainstore import DomainStore
from ..core.lock import LockHolder
from ..errors import LockedError

__all__ = ["looking"]


@contextlib.contextmanager
def looking(store: DomainStore) -> Iterator[None]:
    """Hold a shared look at ``store``'s lock for a dry run (LockedError if a live
    process holds the lock); creates and writes nothing."""
    try:
        fd = os.open(store.lock_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        yield   # nobody ever locked this domain
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = LockHolder.parse(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
            who = holder.describe() if holder else "another process (no note yet)"
            raise LockedError(f"domain {store.name} ({store.uuid}) is locked by {who}") \
                from None
        yield
    finally:
        os.close(fd)
