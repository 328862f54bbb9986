"""Crash-safe writes into the pool (FORMAT.md §10).

Every file of the pool is written as a temp file ``.NAME.tmp-<pid>-<random>``
in the target directory, fsynced, renamed onto ``NAME``, and the directory
fsynced.  A reader (or a crash) therefore sees either the old file or the
whole new one, never a prefix: that is what lets "a point exists iff its
manifest does" hold after a power cut.  The leading dot keeps temp files out
of every listing, and ``repair`` removes the ones a crash leaves behind.

OSErrors that mean "the pool cannot take this" (ENOSPC, EDQUOT, EROFS, EACCES,
EPERM) become :class:`~vmsnapbackup.errors.PoolFullError` or
:class:`~vmsnapbackup.errors.PoolReadOnlyError` naming the file, with the
original OSError kept as ``__cause__``; every other OSError is re-raised
unchanged, because it is more likely a bug than a full disk.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, NoReturn, Union

from ..errors import UsageError, storage_error_from_oserror

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "PathLike",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "dumps_json",
    "durable_rename",
    "fsync_dir",
    "fsync_path",
    "is_temp_name",
    "make_private_dir",
    "read_optional",
    "temp_path_for",
    "unlink_durable",
]

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

#: Disk contents are sensitive: nobody but root reads the pool (FORMAT.md §1).
FILE_MODE = 0o600
DIR_MODE = 0o700

#: fsync of a directory is not supported everywhere (some FUSE and CIFS
#: mounts); there is nothing better we could do there, so we go on.
_DIR_FSYNC_UNSUPPORTED = (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP)

#: link(2) is refused by filesystems without hard links; exclusive writes
#: then fall back to check-then-rename.
_LINK_UNSUPPORTED = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK)


def temp_path_for(path: PathLike) -> Path:
    """The temp name §10 prescribes: hidden, in the same directory (same filesystem, so
    the rename is atomic), and unique per process and attempt."""
    p = Path(path)
    return p.with_name(f".{p.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")


def is_temp_name(name: str) -> bool:
    """True for names readers must ignore: dot-files (temp files) and ``*.partial``."""
    return name.startswith(".") or name.endswith(".partial")


def _raise_mapped(err: OSError, path: PathLike) -> NoReturn:
    """Raise our StorageError kind for ``err`` (cause kept), or ``err`` itself when it is
    not about the pool refusing the write."""
    mapped = storage_error_from_oserror(err, os.fspath(path))
    if mapped is None:
        raise err
    raise mapped from err


def fsync_dir(path: PathLike) -> None:
    """Make a rename, create or unlink in directory ``path`` durable.

    Without it, the new name may still be lost in a crash even though the file's
    data is on disk.
    """
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:
        _raise_mapped(err, path)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in _DIR_FSYNC_UNSUPPORTED:
            _raise_mapped(err, path)
        log.debug("fsync of directory %s not supported here: %s", path, err.strerror)
    finally:
        os.close(fd)


def fsync_path(path: PathLike) -> None:
    """fsync a file by name; works on a read-only open under Linux."""
    fd = os.open(os.fspath(path), os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(
    path: PathLike, mode: int = FILE_MODE, *, exclusive: bool = False
) -> Iterator[BinaryIO]:
    """Write ``path`` all-or-nothing: yields a binary file object for the temp file.

    On normal exit: flush, fsync, rename onto ``path``, fsync the directory.  On an
    exception (any, including KeyboardInterrupt) the temp file is removed and ``path``
    is untouched.

    ``exclusive=True`` publishes with link(2) instead of rename, so the write fails with
    :class:`FileExistsError` if ``path`` already exists, atomically: used for records
    that must be created once and never overwritten by a racing creator
    (``domain.json``, manifests).

    OSErrors from the body are mapped too when they concern the temp file (those raised
    by ``f.write`` carry no file name); an OSError naming another file (say, reading a
    source) is left alone so it is not mistaken for a full pool.
    """
    target = Path(path)
    tmp = temp_path_for(target)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except OSError as err:
        _raise_mapped(err, target)
    published = False
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have taken bits away
            f = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            raise
        with f:
            try:
                yield f
            except OSError as err:
                if err.filename in (None, os.fspath(tmp), os.fspath(target)):
                    _raise_mapped(err, target)
                raise
            try:
                f.flush()
                os.fsync(f.fileno())
            except OSError as err:
                _raise_mapped(err, target)
        try:
            if exclusive:
                _publish_exclusive(tmp, target)
            else:
                os.replace(tmp, target)
        except FileExistsError:
            raise  # only from an exclusive write: the caller's signal, not a pool error
        except OSError as err:
            _raise_mapped(err, target)
        published = True
        fsync_dir(target.parent)
    finally:
        if not published:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _publish_exclusive(tmp: Path, target: Path) -> None:
    """Give ``tmp`` the name ``target`` only if ``target`` does not exist yet."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(target)) from None
    except OSError as err:
        if err.errno not in _LINK_UNSUPPORTED or not target.parent.exists():
            raise
        # No hard links on this filesystem: not atomic against a racing creator, but
        # every caller also holds the domain's lock or tolerates the race.
        log.debug("link(2) not supported under %s (%s); using check-then-rename",
                  target.parent, err.strerror)
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST),
                                  os.fspath(target)) from None
        os.replace(tmp, target)
        return
    os.unlink(tmp)


def atomic_write_bytes(
    path: PathLike, data: bytes, mode: int = FILE_MODE, *, exclusive: bool = False
) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path, mode, exclusive=exclusive) as f:
        f.write(data)


def dumps_json(obj: Any) -> bytes:
    """The on-disk JSON form of every record: readable by a person (indented, sorted
    keys), pure ASCII so no encoding question arises, newline-terminated."""
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=True) + "\n").encode("ascii")


def atomic_write_json(
    path: PathLike, obj: Any, mode: int = FILE_MODE, *, exclusive: bool = False
) -> None:
    """Serialise ``obj`` with :func:`dumps_json` and write it atomically."""
    atomic_write_bytes(path, dumps_json(obj), mode, exclusive=exclusive)


def durable_rename(src: PathLike, dst: PathLike) -> None:
    """Rename a filled ``*.partial`` volume onto its final name, durably.

    The data is fsynced first (cheap if the writer already did), so the final name
    can never point at data still in the page cache; then both directories are
    fsynced so the rename survives a crash.  Overwrites ``dst`` like rename(2);
    point numbers are never reused, so a clash means a caller bug upstream.
    """
    s, d = Path(src), Path(dst)
    try:
        fsync_path(s)
        os.replace(s, d)
    except OSError as err:
        _raise_mapped(err, d)
    fsync_dir(d.parent)
    if s.parent.resolve() != d.parent.resolve():
        fsync_dir(s.parent)


def make_private_dir(path: PathLike) -> Path:
    """Create ``path`` and any missing parents with mode 0700, durably.

    Existing directories are left as they are (their mode is the admin's choice; we
    only decide for what we create).  Each directory we create is fsynced into its
    parent so a later file in it cannot outlive its own directory entry in a crash.
    """
    target = Path(path)
    missing = []
    p = target
    while not p.is_dir():
        if os.path.lexists(p):
            raise UsageError(f"{p} exists and is not a directory")
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, DIR_MODE)
        except FileExistsError:
            if not d.is_dir():
                raise UsageError(f"{d} exists and is not a directory") from None
            continue  # a racing creator made it; fine
        except OSError as err:
            _raise_mapped(err, d)
        try:
            os.chmod(d, DIR_MODE)
        except OSError as err:
            _raise_mapped(err, d)
        fsync_dir(d.parent)
    return target


def unlink_durable(path: PathLike, missing_ok: bool = True) -> bool:
    """Remove a file and fsync its directory; True if it existed.

    Used for removals whose order matters (a manifest before its volumes).
    """
    p = Path(path)
    try:
        os.unlink(p)
    except FileNotFoundError:
        if not missing_ok:
            raise
        return False
    except OSError as err:
        _raise_mapped(err, p)
    fsync_dir(p.parent)
    return True


def read_optional(path: PathLike) -> bytes | None:
    """The file's bytes, or None if it does not exist."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
