"""Restoring one disk: write the image under a temp name, prove it against table N,
then give it its final name (or ``.unverified``).

**A raw image is copied and checked in one pass** (``diskpass.run_disk_pass``
with :class:`~.imagewrite.RawImageWriter` as its target).  The point volume is
read through a read-only export of the storage daemon -- QEMU's qcow2 code
reading it through its base volume, exactly what a guest or ``verify`` reads --
and every block is hashed from the read buffer; the non-zero blocks are then
written from *that same buffer* at *that same offset* into a new file, which is
fsynced.  What this proves, when the pass's table equals table N:

* every block that was written holds bytes whose XXH3-128 value is table N's
  entry: the buffer is neither changed nor reused between its hash and its
  write (the pass hands it back only after ``pwrite`` returned for all of it);
* every block that was not written is a hole or an all-zero block, and table
  N's entry for it is the value of zeros; the file was created by us
  (``O_EXCL``) and sized with ``ftruncate``, so those blocks read as zeros;
* the image is on the disk (fsync) before it gets its final name.

What it does not do is read the file back: that would only re-read our own
page cache (``verify`` of the pool is what watches the backups themselves).

**A qcow2 image** is written by ``qemu-img convert -n`` from the point volume
into a qcow2 file this restore created (O_EXCL, 0600: the disk's contents are
never readable by others, not even during the convert), fsynced, then hashed
through a read-only export -- as a guest reads it -- and compared with table
N: there the format is QEMU's, so the check reads what QEMU wrote.
"""
from __future__ import annotations

import contextlib
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapters.host import LOCAL
from ..adapters.nbdclient import NbdClient
from ..adapters.pinnedchain import PinnedImage, check_header, json_filename, secret_objects
from ..adapters.qemuimg import QemuImg
from ..adapters.storagedaemon import StorageDaemon
from ..core.atomic import durable_rename, fsync_dir, fsync_path
from ..core.manifest import PointDisk
from ..errors import VmSnapBackupError
from ..progress import ProgressCallback, ProgressEvent, emit
from .diskpass import run_disk_pass
from .imagewrite import RawImageWriter
from .pointread import BlockMismatch, PointTables, compare_tables, hash_image, with_phase
from .restoretarget import unverified_name

__all__ = ["DiskPlan", "RestoredDisk", "restore_disk", "temp_name"]

log = logging.getLogger(__name__)

#: Restored images are as private as the pool (FORMAT.md).
IMAGE_MODE = 0o600


@dataclass(frozen=True)
class RestoredDisk:
    """One restored disk.  ``path`` is the final image when ``verified``, else the
    ``.unverified`` file kept for inspection (and ``mismatch`` says why).

    Where the time went: ``write_seconds`` writing the image (raw: the one pass
    that reads, hashes and writes; qcow2: ``qemu-img convert``), ``sync_seconds``
    its fsync, ``check_seconds`` the comparison with table N (raw: of the tables
    only; qcow2: reading the image back through an export).
    """

    target: str
    path: str
    format: str
    size: int
    allocated: int
    seconds: float
    write_seconds: float
    sync_seconds: float
    check_seconds: float
    verified: bool
    mismatch: BlockMismatch | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target, "path": self.path, "format": self.format,
            "bytes": self.size, "allocated": self.allocated,
            "seconds": round(self.seconds, 3),
            "write_seconds": round(self.write_seconds, 3),
            "sync_seconds": round(self.sync_seconds, 3),
            "check_seconds": round(self.check_seconds, 3),
            "verified": self.verified,
            "mismatch": self.mismatch.to_dict() if self.mismatch else None,
        }


@dataclass
class DiskPlan:
    """One disk to restore: its manifest entry, table N, its point volume (backing
    chain pinned from the manifest, docs/DESIGN.md §8), its name."""

    disk: PointDisk
    tables: PointTables
    volume: PinnedImage
    final: Path


@dataclass
class _Timing:
    write: float = 0.0
    sync: float = 0.0
    check: float = 0.0


def temp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.restore-{os.getpid()}-{secrets.token_hex(4)}")


def _allocated(path: Path) -> int:
    info = LOCAL.stat(os.fspath(path))
    return info.allocated if info is not None else 0


def restore_disk(plan: DiskPlan, fmt: str, daemon: StorageDaemon,
                 progress: ProgressCallback | None) -> RestoredDisk:
    """Write one disk into a temp file, prove it against table N, then name it."""
    d = plan.disk
    tmp = temp_name(plan.final)
    t0 = time.monotonic()
    timing = _Timing()
    kept = False
    try:
        if fmt == "raw":
            mismatch = _copy_checked(plan, daemon, tmp, timing, progress)
        else:
            mismatch = _convert_then_check(plan, fmt, daemon, tmp, timing, progress)
        if mismatch.ok:
            durable_rename(tmp, plan.final)
            path, verified, bad = plan.final, True, None
            log.info("%s: restored and verified %s", d.target, plan.final)
        else:
            path = unverified_name(plan.final)
            durable_rename(tmp, path)
            verified, bad = False, mismatch
            log.error("%s: restored image %s does not match point %s: %s", d.target, path,
                      plan.final, mismatch.describe())
        kept = True
    finally:
        if not kept:
            LOCAL.unlink(os.fspath(tmp))
            with contextlib.suppress(OSError, VmSnapBackupError):
                fsync_dir(tmp.parent)
    return RestoredDisk(
        target=d.target, path=os.fspath(path), format=fmt, size=d.virtual_size,
        allocated=_allocated(path), seconds=time.monotonic() - t0,
        write_seconds=timing.write, sync_seconds=timing.sync, check_seconds=timing.check,
        verified=verified, mismatch=bad)


def _copy_checked(plan: DiskPlan, daemon: StorageDaemon, tmp: Path, timing: _Timing,
                  progress: ProgressCallback | None) -> BlockMismatch:
    """The raw image in one pass: read the point volume, hash, write (module docstring).

    The export reads with O_DIRECT (``direct``): the point volume is read once
    from end to end, so a page-cache copy per byte would be pure cost, and a
    restore does not evict the host's cache.
    """
    d = plan.disk
    expected = plan.tables.table
    t0 = time.monotonic()
    export = daemon.export_pinned(plan.volume, direct=True)
    assert export.socket_path is not None   # the daemon's private socket
    try:
        with NbdClient.open_unix(export.socket_path, export.name) as client, \
                RawImageWriter.create(tmp, client.size, IMAGE_MODE) as image:
            actual, stats = run_disk_pass(client, image, expected.block_size, None,
                                          disk=d.target,
                                          progress=with_phase(progress, "restore"))
            t1 = time.monotonic()
            image.flush()
            t2 = time.monotonic()
    finally:
        daemon.remove_export(export, force=True)
    log.debug("%s: %d blocks read, %d holes, %d written (%d bytes) in %.2f s", d.target,
              stats.read, stats.holes, stats.changed, stats.bytes_written, stats.seconds)
    mismatch = compare_tables(expected, actual)
    timing.write, timing.sync, timing.check = t1 - t0, t2 - t1, time.monotonic() - t2
    return mismatch


def _convert(plan: DiskPlan, fmt: str, out: Path, progress: ProgressCallback | None) -> None:
    """``qemu-img convert -n`` of the point volume (through its base) into ``out``, a
    file created here 0600 and empty (so zero regions are never written at all)."""
    d = plan.disk
    size = d.virtual_size
    img = QemuImg(LOCAL)
    img.create(os.fspath(out), fmt, size=size, mode=IMAGE_MODE)
    emit(progress, ProgressEvent(d.target, "restore", 0, size))

    def percent(pct: float) -> None:
        emit(progress, ProgressEvent(d.target, "restore", int(size * pct / 100), size))

    # the header is checked, then the chain is given to qemu-img explicitly (json:)
    check_header(plan.volume, LOCAL, img)
    img.convert(json_filename(plan.volume), None, os.fspath(out), fmt,
                target_is_zero=True, progress=percent if progress is not None else None,
                objects=secret_objects(plan.volume))
    emit(progress, ProgressEvent(d.target, "restore", size, size, finished=True))


def _convert_then_check(plan: DiskPlan, fmt: str, daemon: StorageDaemon, tmp: Path,
                        timing: _Timing, progress: ProgressCallback | None) -> BlockMismatch:
    """A qcow2 image: ``qemu-img convert``, fsync, then hash it as a guest reads it."""
    d = plan.disk
    t0 = time.monotonic()
    _convert(plan, fmt, tmp, progress)
    t1 = time.monotonic()
    fsync_path(tmp)
    t2 = time.monotonic()
    mismatch = hash_image(daemon, tmp, fmt, plan.tables.table, disk=d.target,
                          phase="check", progress=progress)
    timing.write, timing.sync, timing.check = t1 - t0, t2 - t1, time.monotonic() - t2
    return mismatch
