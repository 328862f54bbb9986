"""File-level access (``mount``) and instant recovery (``boot``, :mod:`.boot`) from a
point, without restoring it first and without ever writing into the pool.

Both rest on one fact (docs/DESIGN.md): a point volume is a qcow2 overlay whose
backing file is its generation's base volume (relative path), so opening it
read-only gives the whole disk as it was at the point; the first point of a
generation *is* the base.

**mount** exports that volume read-only over NBD from a private storage daemon
(:class:`~vmsnapbackup.adapters.storagedaemon.StorageDaemon`) for as long as the
caller holds :func:`mount_point` open; any NBD client (``nbdinfo``, ``guestmount``,
``nbdfuse``, ``qemu-img convert``) can then read files out of it.  A socket the
caller names is 0600 and root's from its creation (the daemon runs with umask
077), whatever the caller's umask: only root can connect.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..adapters.hypervisor import DEFAULT_URI
from ..adapters.storagedaemon import StorageDaemon
from ..errors import UsageError
from .boot import (
    BOOT_NOTE,
    DEFAULT_BOOT_ROOT,
    BootDisk,
    BootResult,
    DiscardResult,
    boot_domain_xml,
    boot_point,
    discard_boot,
    resume_boot,
)
from .pointread import PoolLike, open_pool, point_disk, point_volume

__all__ = [
    "BOOT_NOTE",
    "DEFAULT_BOOT_ROOT",
    "BootDisk",
    "BootResult",
    "DiscardResult",
    "MountedPoint",
    "boot_domain_xml",
    "boot_point",
    "discard_boot",
    "mount_point",
    "resume_boot",
]

log = logging.getLogger(__name__)

_SUN_PATH_MAX = 107


@dataclass(frozen=True)
class MountedPoint:
    """A read-only NBD export of one disk of one point (raw, full disk size)."""

    uri: str
    socket_path: str | None
    export_name: str
    size: int
    volume: str
    domain: str
    point: int
    disk: str
    host: str | None = None
    port: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@contextlib.contextmanager
def mount_point(domain: str, pool: PoolLike, point: int, disk: str | None = None,
                socket: str | None = None, *, port: int | None = None,
                bind: str = "127.0.0.1", uri: str = DEFAULT_URI) -> Iterator[MountedPoint]:
    """Serve disk ``disk`` of point ``point`` read-only over NBD while the block runs.

    Without ``socket``/``port`` the export is on the daemon's private socket (root
    only, in a 0700 directory); ``socket=PATH`` serves on that unix socket (0600),
    ``port`` serves TCP on ``bind`` (default loopback).  Everything is removed when
    the block ends, also on an exception or a signal (StorageDaemon's own handling).
    """
    if socket is not None and port is not None:
        raise UsageError("give either a socket path or a port, not both")
    if port is not None and not 0 < port < 65536:
        raise UsageError(f"not a TCP port: {port}")
    if socket is not None:
        socket = os.path.abspath(socket)
        if os.path.lexists(socket):
            raise UsageError(f"{socket} already exists; choose a new path for the socket")
        if len(os.fsencode(socket)) > _SUN_PATH_MAX:
            raise UsageError(f"socket path {socket} is too long for a unix socket")
    store = open_pool(pool, uri).find_domain(domain)
    manifest = store.read_manifest(point)
    d = point_disk(store, manifest, disk)
    volume = point_volume(store, d)
    address: dict[str, Any] | None = None
    if port is not None:
        address = {"type": "inet", "data": {"host": bind, "port": str(port)}}
    elif socket is not None:
        address = {"type": "unix", "data": {"path": socket}}
    with StorageDaemon(tag=f"mount-{store.name}-{point}-{d.target}",
                       nbd_address=address) as daemon:
        export = daemon.export_image(str(volume), d.volume_format, name=d.target)
        mounted = MountedPoint(uri=export.uri, socket_path=export.socket_path,
                               export_name=export.name, size=export.size, volume=str(volume),
                               domain=store.name, point=point, disk=d.target,
                               host=export.host, port=export.port)
        log.info("domain %s: point %d disk %s served read-only at %s", store.name, point,
                 d.target, export.uri)
        yield mounted
