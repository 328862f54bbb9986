"""vmsnapbackup: back up running libvirt/QEMU virtual machines.

External disk-only snapshot, a read-only NBD export of the frozen image, one
check value per block, and only the blocks that differ from the generation's
first check table (patent US9250824; see docs/FORMAT.md and docs/DESIGN.md).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import (
    BackupInterruptedError,
    CorruptFileError,
    ExitCode,
    ExportError,
    HypervisorError,
    IncompatibleFormatError,
    IntegrityError,
    LockedError,
    NotFoundError,
    PoolFullError,
    PoolReadOnlyError,
    RepairNeededError,
    StorageError,
    UnsupportedDiskError,
    UsageError,
    VerifyMismatchError,
    VmSnapBackupError,
)

__version__ = "0.1.0"

if TYPE_CHECKING:
    # What type checkers see: the real names with their real types.  At run time
    # the same names are imported on first use by ``__getattr__`` below (PEP 562):
    # the libvirt hook imports this package on every domain start and stop, and
    # ``vmsnapbackup --help`` should not wait for numpy and libvirt-python either.
    # tests/test_public_api.py keeps this block and ``_LAZY`` in step.
    from .progress import ProgressCallback, ProgressEvent
    from .workflows.access import (
        BootResult,
        MountedPoint,
        boot_point,
        discard_boot,
        mount_point,
        resume_boot,
    )
    from .workflows.backup import BackupResult, DiskResult, backup
    from .workflows.listing import PointSummary, list_points
    from .workflows.prune import PruneReport, prune
    from .workflows.repair import RepairReport, repair
    from .workflows.restore import RestoreResult, restore
    from .workflows.verify import VerifyReport, verify

#: Where each lazily imported public name lives (progress too: its dataclass
#: machinery alone costs more than the rest of ``--help``).
_LAZY = {
    "ProgressEvent": "progress", "ProgressCallback": "progress",
    "backup": "workflows.backup", "BackupResult": "workflows.backup",
    "DiskResult": "workflows.backup",
    "list_points": "workflows.listing", "PointSummary": "workflows.listing",
    "restore": "workflows.restore", "RestoreResult": "workflows.restore",
    "verify": "workflows.verify", "VerifyReport": "workflows.verify",
    "prune": "workflows.prune", "PruneReport": "workflows.prune",
    "mount_point": "workflows.access", "MountedPoint": "workflows.access",
    "boot_point": "workflows.access", "BootResult": "workflows.access",
    "discard_boot": "workflows.access", "resume_boot": "workflows.access",
    "repair": "workflows.repair", "RepairReport": "workflows.repair",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value: object = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "__version__",
    # backing up and looking at the pool
    "backup", "BackupResult", "DiskResult",
    "list_points", "PointSummary",
    # getting data back
    "restore", "RestoreResult", "verify", "VerifyReport",
    "mount_point", "MountedPoint", "boot_point", "BootResult", "discard_boot", "resume_boot",
    # retention and recovery from interrupted backups
    "prune", "PruneReport", "repair", "RepairReport",
    # progress reports for long work
    "ProgressEvent", "ProgressCallback",
    # errors: one root, VmSnapBackupError; ExitCode says what each means to the CLI
    "VmSnapBackupError", "ExitCode",
    "UsageError", "NotFoundError", "LockedError",
    "IntegrityError", "CorruptFileError", "VerifyMismatchError",
    "HypervisorError", "ExportError",
    "StorageError", "PoolFullError", "PoolReadOnlyError",
    "BackupInterruptedError", "UnsupportedDiskError", "IncompatibleFormatError",
    "RepairNeededError",
]
