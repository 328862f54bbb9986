"""vmsnapbackup: back up running libvirt/QEMU virtual machines.

External disk-only snapshot, a read-only NBD export of the frozen image, one
check value per block, and only the blocks that differ from the generation's
first check table (patent US9250824; see docs/FORMAT.md and DESIGN.md).
"""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import *  # noqa: E402,F401,F403
from .errors import __all__ as _errors_all  # noqa: E402
from .progress import ProgressCallback, ProgressEvent  # noqa: E402
from .workflows.backup import BackupResult, DiskResult, backup  # noqa: E402
from .workflows.listing import PointSummary, list_points  # noqa: E402

__all__ = [
    "__version__",
    # backing up and looking at the pool
    "backup", "BackupResult", "DiskResult",
    "list_points", "PointSummary",
    "ProgressEvent", "ProgressCallback",
    # errors (one root: VmSnapBackupError)
    *_errors_all,
]
