"""Restoring into a storage pool of a remote hypervisor (``-c qemu+ssh://``).

The pool is on the backup server, the libvirt storage pool on the hypervisor,
and the restored image must end up there -- where ``--define`` points the new
domain.  So a restore then runs two storage daemons, like a remote backup with
the roles turned round: one *here* exports the point volume read-only (its
backing chain pinned from the manifest, as for a local restore), and one *on
the hypervisor* (:func:`~..adapters.sourceexport.start_source_daemon`: its
private runtime directory there, reached over the ssh connection's unix-socket
forwarding or NBD over TLS; never plain TCP between hosts) creates the image
and exports it writable.  The blocks cross once, from our read buffer to the
remote export, hashed on the way.

What proves the image on the hypervisor: the pass's table (of the bytes we
sent) must equal table N, and then the image is read back *through a read-only
export of the remote daemon* -- what QEMU on the hypervisor reads from the file
-- and hashed again; only when that table equals table N too does the image get
its final name.  The image is 0600 from its creation (``qemu-img create`` into a
file made with noclobber under ``umask 077``), written under a hidden temp name,
flushed (the export's removal fdatasyncs it), fsynced, renamed and its
directory fsynced on the hypervisor, all through the :class:`Host`.

A remote restore never replaces a file: libvirt's storage pool is the
hypervisor's, and whether a running domain there uses a file by another name
(a hard link) cannot be asked without reading the hypervisor's filesystem.
"""
from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ..adapters.host import Host
from ..adapters.hostinflight import host_runtime_root
from ..adapters.nbdclient import NbdClient
from ..adapters.sourceexport import DataPath, open_source, start_source_daemon
from ..adapters.storagedaemon import StorageDaemon
from ..errors import StorageError, UsageError, VmSnapBackupError
from ..progress import ProgressCallback
from .blockcompare import size_mismatch
from .diskpass import run_disk_pass
from .pointread import BlockMismatch, compare_tables, hash_export, with_phase
from .restoreimage import DiskPlan, RestoredDisk, temp_name
from .restoretarget import unverified_name

__all__ = ["RemoteRestore", "remote_volume", "restore_remote_disks"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemoteRestore:
    """Where a remote restore writes: the hypervisor's ``host`` and how blocks get there."""

    host: Host
    data: DataPath


def remote_volume(host: Host, directory: str, name: str) -> str:
    """The path of volume ``name`` in the remote storage pool ``directory``.

    Refused (UsageError) when the name would leave the directory (it is made
    from names a backup pool holds, which are not trusted) or when anything --
    a file, a planted symlink -- already has that name on the hypervisor.
    """
    if not name or "/" in name or "\0" in name or name in (".", "..") or name.startswith("."):
        raise UsageError(f"volume name {name!r} would leave storage pool directory "
                         f"{directory}: refusing it")
    info = host.stat(directory)
    if info is None or not info.is_dir:
        raise StorageError(f"{host.name}:{directory}, the storage pool's directory, is "
                           "not a directory")
    path = posixpath.join(directory, name)
    if host.stat(path, follow=False) is not None:
        raise UsageError(f"{host.name}:{path} exists; a restore onto a remote hypervisor "
                         "never replaces a file (remove it, or --define another name)")
    return path


def restore_remote_disks(plans: Sequence[DiskPlan], fmt: str, local: StorageDaemon,
                         remote: RemoteRestore, tag: str,
                         progress: ProgressCallback | None) -> list[RestoredDisk]:
    """Restore every plan onto the hypervisor through one remote storage daemon."""
    with _remote_daemon(remote, tag) as daemon:
        return [_restore_one(p, fmt, local, daemon, remote.host, progress) for p in plans]


@contextlib.contextmanager
def _remote_daemon(remote: RemoteRestore, tag: str) -> Iterator[StorageDaemon]:
    daemon = start_source_daemon(remote.host, tag, host_runtime_root(remote.host),
                                 remote.data)
    try:
        yield daemon
    finally:
        daemon.close()


@dataclass
class _Timing:
    write: float = 0.0
    sync: float = 0.0
    check: float = 0.0


def _restore_one(plan: DiskPlan, fmt: str, local: StorageDaemon, daemon: StorageDaemon,
                 host: Host, progress: ProgressCallback | None) -> RestoredDisk:
    d = plan.disk
    final = os.fspath(plan.final)
    tmp = os.fspath(temp_name(plan.final))
    t0 = time.monotonic()
    timing = _Timing()
    kept = False
    try:
        mismatch = _send(plan, fmt, local, daemon, host, tmp, timing, progress)
        if mismatch.ok:
            mismatch = _read_back(plan, fmt, daemon, host, tmp, timing, progress)
        path = final if mismatch.ok else os.fspath(unverified_name(plan.final))
        t1 = time.monotonic()
        host.fsync(tmp)
        host.rename(tmp, path)
        host.fsync(posixpath.dirname(path))
        timing.sync += time.monotonic() - t1
        kept = True
    finally:
        if not kept:
            with contextlib.suppress(OSError, VmSnapBackupError):
                host.unlink(tmp)
    if mismatch.ok:
        log.info("%s: restored and verified %s:%s", d.target, host.name, path)
    else:
        log.error("%s: restored image %s:%s does not match point %s: %s", d.target,
                  host.name, path, plan.final, mismatch.describe())
    info = host.stat(path)
    return RestoredDisk(
        target=d.target, path=path, format=fmt, size=d.virtual_size,
        allocated=info.allocated if info is not None else 0,
        seconds=time.monotonic() - t0, write_seconds=timing.write,
        sync_seconds=timing.sync, check_seconds=timing.check, verified=mismatch.ok,
        mismatch=None if mismatch.ok else mismatch)


def _send(plan: DiskPlan, fmt: str, local: StorageDaemon, daemon: StorageDaemon, host: Host,
          tmp: str, timing: _Timing, progress: ProgressCallback | None) -> BlockMismatch:
    """Create the image on the hypervisor and fill it from the point volume in one pass."""
    d = plan.disk
    expected = plan.tables.table
    t0 = time.monotonic()
    # 0600 from its creation, never over an existing file (qemuimg.create)
    out = daemon.create_writable(tmp, size=d.virtual_size, fmt=fmt)
    try:
        src = local.export_pinned(plan.volume, direct=True)
        assert src.socket_path is not None   # our daemon's private socket
        try:
            with NbdClient.open_unix(src.socket_path, src.name) as source, \
                    open_source(out, host) as target:
                bad = size_mismatch(expected, source.size)
                if bad is not None:
                    return bad
                actual, stats = run_disk_pass(source, target, expected.block_size, None,
                                              disk=d.target,
                                              progress=with_phase(progress, "restore"))
                t1 = time.monotonic()
                target.flush()
        finally:
            local.remove_export(src, force=True)
    finally:
        daemon.remove_export(out, force=True)   # closes (and so fdatasyncs) the image
    timing.write, timing.sync = t1 - t0, time.monotonic() - t1
    log.debug("%s: %d blocks read, %d holes, %d written (%d bytes) to %s in %.2f s",
              d.target, stats.read, stats.holes, stats.changed, stats.bytes_written,
              host.name, stats.seconds)
    return compare_tables(expected, actual)


def _read_back(plan: DiskPlan, fmt: str, daemon: StorageDaemon, host: Host, tmp: str,
               timing: _Timing, progress: ProgressCallback | None) -> BlockMismatch:
    """Hash the image as QEMU on the hypervisor reads it and compare with table N."""
    expected = plan.tables.table
    t0 = time.monotonic()
    export = daemon.export_image(tmp, fmt)
    try:
        with open_source(export, host) as client:
            bad = size_mismatch(expected, client.size)
            if bad is not None:
                return bad
            actual = hash_export(client, expected.block_size, disk=plan.disk.target,
                                 progress=with_phase(progress, "check"))
    finally:
        daemon.remove_export(export, force=True)
        timing.check = time.monotonic() - t0
    return compare_tables(expected, actual)
