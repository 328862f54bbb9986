"""vmsnapbackup: back up running libvirt/QEMU virtual machines.

External disk-only snapshot, a read-only NBD export of the frozen image, one
check value per block, and only the blocks that differ from the generation's
first check table (patent US9250824; see docs/FORMAT.md and DESIGN.md).
"""
from __future__ import annotations

__version__ = "0.1.0"

import importlib
from typing import Any

from .errors import *  # noqa: E402,F401,F403
from .errors import __all__ as _errors_all  # noqa: E402

#: Where each public name lives.  Imported on first use (PEP 562): the libvirt
#: hook imports this package on every domain start and stop, and must not pay
#: for numpy and libvirt-python it does not need.
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


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list:
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
    "ProgressEvent", "ProgressCallback",
    # errors (one root: VmSnapBackupError)
    *_errors_all,
]
