"""Reading a pool file without trusting it (FORMAT.md §13).

The pool's storage is not trusted: it may be damaged, or written by someone other
than us (a shared NFS export, a restored copy, a tampered disk).  So a read of any
record or table is bounded before a byte is read: only a regular file (a FIFO would
make ``list`` hang, a device like ``/dev/zero`` would never end), no larger than its
kind can be, and never through a symlink that leads out of the pool.  Every refusal
is a :class:`~vmsnapbackup.errors.CorruptFileError` naming the file: one line, exit
code INTEGRITY, and the point it belongs to is listed as damaged instead of taking the
whole listing down.
"""
from __future__ import annotations

import os
import stat
from typing import Union

from ..errors import CorruptFileError

__all__ = [
    "MAX_GENERATION_RECORD",
    "MAX_JOURNAL",
    "MAX_MANIFEST",
    "MAX_SMALL_RECORD",
    "check_inside",
    "check_regular",
    "open_regular",
    "read_bounded",
]

PathArg = Union[str, "os.PathLike[str]"]

#: Pool header and ``domain.json``: a few hundred bytes when we write them.
MAX_SMALL_RECORD = 64 * 1024
#: ``generation.json``: a few hundred bytes per disk.
MAX_GENERATION_RECORD = 1024 * 1024
#: A point manifest: dominated by the domain's XML (tens of KiB for a large domain).
MAX_MANIFEST = 16 * 1024 * 1024
#: ``journal.json``: one relative path per file a backup may create.
MAX_JOURNAL = 16 * 1024 * 1024


def check_inside(path: PathArg, root: PathArg) -> str:
    """The real path of ``path``; CorruptFileError if it resolves outside ``root``.

    Symlinks inside the pool are followed (an admin may move a directory and leave a
    link); one that leads out is refused, so a pool cannot make us read (or a restore
    copy out) a file of the host.
    """
    real = os.path.realpath(os.fspath(path))
    real_root = os.path.realpath(os.fspath(root))
    if real != real_root and not real.startswith(real_root.rstrip("/") + "/"):
        raise CorruptFileError(path, f"is a symlink that leads out of the pool (to {real})")
    return real


def check_regular(path: PathArg, st: os.stat_result) -> None:
    """CorruptFileError unless ``st`` is a regular file's."""
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else
                "a directory" if stat.S_ISDIR(st.st_mode) else
                "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else
                "a socket" if stat.S_ISSOCK(st.st_mode) else "not a file")
        raise CorruptFileError(path, f"is {kind}, not a regular file")


def open_regular(path: PathArg) -> int:
    """A read-only descriptor of ``path``, which must be a regular file.

    stat first, so a FIFO or device is never opened at all (opening some devices has
    effects); then open with ``O_NONBLOCK`` and check the descriptor again, so one
    swapped in between cannot block us either.  FileNotFoundError passes through.
    """
    check_regular(path, os.stat(path))
    fd = os.open(os.fspath(path), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        check_regular(path, os.fstat(fd))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bounded(path: PathArg, limit: int, kind: str,
                 root: PathArg | None = None) -> bytes | None:
    """The bytes of a pool file of at most ``limit`` bytes, or None if it is missing.

    ``kind`` names the file in messages ("point manifest").  With ``root`` the file
    must also resolve inside it (:func:`check_inside`).
    """
    real = check_inside(path, root) if root is not None else os.fspath(path)
    try:
        fd = open_regular(real)
    except FileNotFoundError:
        return None
    except CorruptFileError as err:
        raise CorruptFileError(path, err.reason) from None
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise CorruptFileError(path, f"too large for a {kind} ({size} bytes, "
                                   f"at most {limit})")
        chunks = []
        left = limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise CorruptFileError(path, f"too large for a {kind} (grew past {limit} bytes "
                               "while read)")
    return data
