"""Every error vmsnapbackup raises, and the exit code each one means.

One root, so a virt-management tool can catch everything we raise with one
``except VmSnapBackupError`` and still tell the kinds apart; and one table of
exit codes (:class:`ExitCode`), so the CLI, the hook scripts and the docs can
never disagree about what a number means.  Only the CLI turns these into exit
codes; the library raises them.

::

    VmSnapBackupError                    exit 1
     +-- UsageError                      exit 2   bad arguments or options
     +-- NotFoundError                   exit 3   unknown domain, disk, point, pool
     +-- LockedError                     exit 4   another process holds the domain
     +-- IntegrityError                  exit 5   a pool file or a restore is wrong
     |    +-- CorruptFileError                    truncated, damaged or foreign file
     |    +-- VerifyMismatchError                 data does not match its table
     +-- HypervisorError                 exit 6   libvirt or QEMU refused or failed
     |    +-- ExportError                         NBD export / storage daemon / NBD protocol
     +-- StorageError                    exit 7   the pool cannot be written
     |    +-- PoolFullError                       no space left (ENOSPC, EDQUOT)
     |    +-- PoolReadOnlyError                   read-only filesystem or no permission
     +-- BackupInterruptedError          exit 8   a signal or a dying domain stopped us
     +-- UnsupportedDiskError            exit 9   cdrom, network, shareable, ... disks
     +-- IncompatibleFormatError         exit 10  pool written by a newer version
     +-- RepairNeededError               exit 11  leftover state; run ``repair``

    (no exception)                       exit 12  a run over several domains: some
                                                  failed, the others have their point
"""
from __future__ import annotations

import enum
import errno
import os
from typing import Optional

__all__ = [
    "ExitCode",
    "VmSnapBackupError",
    "UsageError",
    "NotFoundError",
    "LockedError",
    "IntegrityError",
    "CorruptFileError",
    "VerifyMismatchError",
    "HypervisorError",
    "ExportError",
    "StorageError",
    "PoolFullError",
    "PoolReadOnlyError",
    "BackupInterruptedError",
    "UnsupportedDiskError",
    "IncompatibleFormatError",
    "RepairNeededError",
    "storage_error_for_errno",
    "storage_error_from_oserror",
]


class ExitCode(enum.IntEnum):
    """The process exit codes of the CLI and hook scripts (the only list of them)."""

    OK = 0
    ERROR = 1
    USAGE = 2
    NOT_FOUND = 3
    LOCKED = 4
    INTEGRITY = 5
    HYPERVISOR = 6
    STORAGE = 7
    INTERRUPTED = 8
    UNSUPPORTED_DISK = 9
    INCOMPATIBLE = 10
    REPAIR_NEEDED = 11
    #: A run over several domains (``backup --all``, several names) finished, but
    #: not every domain got its point; the output says which failed and why.
    DOMAINS_FAILED = 12


class VmSnapBackupError(Exception):
    """Root of every error we raise on purpose.

    ``str(err)`` is a single line meant for a person; the CLI prints it as is.
    """

    exit_code: ExitCode = ExitCode.ERROR


class UsageError(VmSnapBackupError):
    """The caller asked for something that cannot mean anything."""

    exit_code = ExitCode.USAGE


class NotFoundError(VmSnapBackupError):
    """A named domain, disk, point or pool does not exist."""

    exit_code = ExitCode.NOT_FOUND


class LockedError(VmSnapBackupError):
    """Another live process holds the domain's lock (a backup, prune or repair)."""

    exit_code = ExitCode.LOCKED


class IntegrityError(VmSnapBackupError):
    """Something stored does not match what it claims to be."""

    exit_code = ExitCode.INTEGRITY


class CorruptFileError(IntegrityError):
    """A pool file is truncated, damaged or not ours; ``path`` names it."""

    def __init__(self, path: "os.PathLike[str] | str", reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class VerifyMismatchError(IntegrityError):
    """Data read back differs from its check table."""


class HypervisorError(VmSnapBackupError):
    """libvirt or QEMU refused or failed; the message carries their own words."""

    exit_code = ExitCode.HYPERVISOR


class ExportError(HypervisorError):
    """An NBD export, the storage daemon or the NBD conversation failed.

    When the NBD server reported an error for one command, ``errno`` holds the
    Python errno value and ``errno_name`` its name (``"ENOSPC"``), so a caller
    writing into the pool can tell a full pool from a broken export.
    """

    errno: Optional[int] = None
    errno_name: Optional[str] = None


class StorageError(VmSnapBackupError):
    """The pool cannot be written."""

    exit_code = ExitCode.STORAGE


class PoolFullError(StorageError):
    """No space left in the pool."""


class PoolReadOnlyError(StorageError):
    """The pool is on a read-only filesystem or we may not write there."""


class BackupInterruptedError(VmSnapBackupError):
    """A signal, or the domain going away, stopped the work half-way."""

    exit_code = ExitCode.INTERRUPTED


class UnsupportedDiskError(VmSnapBackupError):
    """The disk is of a kind we cannot back up (cdrom, floppy, network, shareable)."""

    exit_code = ExitCode.UNSUPPORTED_DISK


class IncompatibleFormatError(VmSnapBackupError):
    """The pool (or one of its files) was written by a newer format version."""

    exit_code = ExitCode.INCOMPATIBLE


class RepairNeededError(VmSnapBackupError):
    """A domain carries leftovers of an interrupted backup; ``repair`` must run first."""

    exit_code = ExitCode.REPAIR_NEEDED


def storage_error_for_errno(code: Optional[int], what: str,
                            detail: str) -> Optional[StorageError]:
    """Map the errno values that mean "the pool cannot take this" to our kinds.

    One place for the mapping, whether the errno came from our own writes
    (an OSError) or from the storage daemon writing a volume for us (an NBD
    error).  Returns None for other errors so the caller re-raises them
    unchanged (a bug should stay a traceback in tests, not become a vague message).
    """
    if code in (errno.ENOSPC, errno.EDQUOT):
        return PoolFullError(f"pool is full while writing {what}: {detail}")
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return PoolReadOnlyError(f"pool is not writable ({what}): {detail}")
    return None


def storage_error_from_oserror(err: OSError, what: str) -> Optional[StorageError]:
    """:func:`storage_error_for_errno` for an OSError of ours."""
    return storage_error_for_errno(err.errno, what, err.strerror or str(err))
