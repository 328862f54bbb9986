"""A new raw image file as the target of a disk pass: how a restore writes a disk.

Why the disk pass writes the restored image: the pass already reads an export,
hashes every block from the read buffer and hands the non-zero blocks to a
writer thread (``diskpass.run_disk_pass`` with no table 1, as for a base
volume).  Given this file as its target, the same buffer that was hashed is
written into the image, so one read of the point volume both copies the disk
and proves it (the restore compares the pass's table with table N).

Why a file and not a writable export: a raw image holds exactly the bytes a
guest reads, so ``pwrite`` from the read buffer is the whole job; a storage
daemon in between would cost a socket send, a receive and a bounce buffer
per byte.

What the image holds afterwards, and why (what the restore's check relies on):

* the file is new (``O_EXCL``) and sized with ``ftruncate``, so every byte no
  write touched reads as zero -- holes and all-zero blocks are simply left
  out, and the image stays sparse;
* :meth:`write_many` writes each ``(offset, buffer)`` completely (short writes
  are continued) before it takes the next item, so a buffer is handed back to
  the pass -- and reused -- only once its bytes are in the file;
* :meth:`flush` is ``fsync``: the image is durable before it is renamed.

A full disk (ENOSPC, EDQUOT) or a read-only target becomes the StorageError
subclass ``errors.storage_error_from_oserror`` picks; any other failure to
write a StorageError too (the target cannot be written: exit 7).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable

from typing_extensions import Self

from ..errors import StorageError, storage_error_from_oserror

__all__ = ["RawImageWriter"]

log = logging.getLogger(__name__)

#: Zeros written per call by :meth:`RawImageWriter.write_zeroes`.
_ZERO_CHUNK = 1 << 20


class RawImageWriter:
    """A raw image file this process creates and fills; see the module docstring.

    Use :meth:`create`; the caller owns the path (removes it on failure,
    renames it on success).  :meth:`write_many` may run in another thread than
    the rest (the pass's writer thread): the file offset is never used, every
    write is a positioned ``pwrite``.
    """

    def __init__(self, fd: int, path: str, size: int) -> None:
        self._fd = fd
        self.path = path
        self.size = size

    @classmethod
    def create(cls, path: str | os.PathLike[str], size: int,
               mode: int = 0o600) -> RawImageWriter:
        """A new file of ``size`` bytes, all of them reading as zero (no block allocated).

        ``mode`` defaults to owner-only: a disk's contents are as private as the pool's.
        """
        name = os.fspath(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(name, flags, mode)
        except OSError as err:
            raise cls._error(err, name) from err
        try:
            os.fchmod(fd, mode)  # the umask must not widen or narrow it
            os.ftruncate(fd, size)
        except OSError as err:
            os.close(fd)
            raise cls._error(err, name) from err
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, name, size)

    @staticmethod
    def _error(err: OSError, path: str) -> StorageError:
        """The errno decides the kind (a full or read-only target is a PoolFullError or
        PoolReadOnlyError, as for the pool); the message names the image, not a pool."""
        message = f"cannot write image {path}: {err.strerror or err}"
        mapped = storage_error_from_oserror(err, path)
        return (type(mapped) if mapped is not None else StorageError)(message)

    def _pwrite_all(self, offset: int, data: memoryview) -> None:
        if offset < 0 or offset + len(data) > self.size:
            raise StorageError(f"{self.path}: write of {len(data)} bytes at offset {offset} "
                               f"is outside the image ({self.size} bytes)")
        done = 0
        while done < len(data):
            try:
                n = os.pwrite(self._fd, data[done:], offset + done)
            except OSError as err:
                raise self._error(err, self.path) from err
            if n <= 0:  # pwrite never returns 0 for a non-empty write on a regular file
                raise StorageError(f"cannot write image {self.path}: no progress at "
                                   f"offset {offset + done}")
            done += n

    def write_many(self, items: Iterable[tuple[int, object]],
                   depth: int | None = None) -> None:
        """Write every ``(offset, buffer)``; the next item is taken only once the last
        one is completely written.  ``depth`` is accepted for the pass's writer (which
        pipelines NBD writes); a local write has nothing in flight."""
        for offset, buffer in items:
            view = memoryview(buffer)  # type: ignore[arg-type]
            if view.format != "B" or view.ndim != 1:
                view = view.cast("B")
            self._pwrite_all(offset, view)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Zeros over ``[offset, offset + length)`` (written, so correct on any file)."""
        zeros = memoryview(bytes(min(length, _ZERO_CHUNK)))
        end = offset + length
        while offset < end:
            step = min(len(zeros), end - offset)
            self._pwrite_all(offset, zeros[:step])
            offset += step

    def flush(self) -> None:
        """fsync: the image's data and size are on the disk."""
        try:
            os.fsync(self._fd)
        except OSError as err:
            raise self._error(err, self.path) from err

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
