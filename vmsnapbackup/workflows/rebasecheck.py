"""The rebase's check of its new base: the check table of what the convert wrote.

Why a module of its own: the check reads the new base one of two ways.  A plain
qcow2 we just created is read straight from its file at the offsets ``qemu-img
map`` gives (:mod:`..adapters.mappedimage`: one copy per byte, from the page cache
the convert filled); anything else (compression, encryption, a data file) through a
read-only export of the storage daemon, as before.  Either way the table is built
by the same disk pass and compared with table N by the caller, so a damaged base
fails the same check.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..adapters.mappedimage import open_mapped
from ..adapters.nbdclient import NbdClient
from ..adapters.pinnedchain import PinnedImage
from ..adapters.qemuimg import QemuImg
from ..adapters.storagedaemon import StorageDaemon
from ..core.checktable import CheckTable
from ..core.manifest import PointDisk
from ..errors import VerifyMismatchError
from ..progress import ProgressCallback
from .diskpass import PassStats, run_disk_pass
from .pointread import with_phase

__all__ = ["hash_new_base"]

BASE_FORMAT = "qcow2"


def hash_new_base(daemon: StorageDaemon, partial: Path, d: PointDisk,
                  progress: ProgressCallback | None) -> tuple[CheckTable, PassStats]:
    """The check table of the new base as a guest reads it (page cache, not O_DIRECT).

    The stats count what the base holds: every block it serves as data was written
    by the convert, holes were not."""
    mapped = open_mapped(QemuImg(), os.fspath(partial), d.virtual_size)
    if mapped is not None:
        with mapped:
            table, stats = run_disk_pass(mapped, None, d.block_size, None, disk=d.target,
                                         progress=with_phase(progress, "check"))
    else:
        table, stats = _through_export(daemon, partial, d, progress)
    stats.changed, stats.bytes_written = stats.read, stats.bytes_read
    return table, stats


def _through_export(daemon: StorageDaemon, partial: Path, d: PointDisk,
                    progress: ProgressCallback | None) -> tuple[CheckTable, PassStats]:
    export = daemon.export_pinned(PinnedImage(os.fspath(partial), BASE_FORMAT),
                                  name=f"new-{d.target}")
    assert export.socket_path is not None   # the daemon's private socket
    try:
        with NbdClient.open_unix(export.socket_path, export.name) as client:
            if client.size != d.virtual_size:
                raise VerifyMismatchError(
                    f"disk {d.target}: the new base is {client.size} bytes, the point's "
                    f"disk {d.virtual_size}; nothing was rebased")
            return run_disk_pass(client, None, d.block_size, None, disk=d.target,
                                 progress=with_phase(progress, "check"))
    finally:
        daemon.remove_export(export, force=True)
