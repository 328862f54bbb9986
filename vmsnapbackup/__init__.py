"""vmsnapbackup: back up running libvirt/QEMU virtual machines.

External disk-only snapshot, a read-only NBD export of the frozen image, one
check value per block, and only the blocks that differ from the generation's
first check table (patent US9250824; see docs/FORMAT.md and DESIGN.md).
"""
from __future__ import annotations

from .errors import *  # noqa: F401,F403
from .errors import __all__ as _errors_all

__version__ = "0.1.0"

__all__ = ["__version__", *_errors_all]
