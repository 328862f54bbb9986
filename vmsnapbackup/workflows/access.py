"""File-level access (``mount``) and instant recovery (``boot``, :mod:`.boot`) from a
point, without restoring it first and without ever writing into the pool.

Both rest on one fact (docs/DESIGN.md): a point volume is a qcow2 overlay whose
backing file is its generation's base volume, so opening it read-only -- with
that base pinned from the manifest, never the name in its header (docs/DESIGN.md
§8) -- gives the whole disk as it was at the point; the first point of a
generation *is* the base.

**mount** exports that volume read-only over NBD from a private storage daemon
(:class:`~vmsnapbackup.adapters.storagedaemon.StorageDaemon`) for as long as the
caller holds :func:`mount_point` open; any NBD client (``nbdinfo``, ``guestmount``,
``nbdfuse``, ``qemu-img convert``) can then read files out of it.  A socket the
caller names is 0600 and root's from its creation (the daemon runs with umask
077), whatever the caller's umask: only root can connect.

TCP has no such owner check: any local user (and, off loopback, the network)
could read the whole disk.  So a TCP export is served only with TLS and client
certificates (``tls_dir``), or, when the caller says ``insecure`` explicitly, as
plain NBD on a loopback address; a non-loopback address without TLS is refused.
"""
from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..adapters.storagedaemon import StorageDaemon
from ..core.defaults import DEFAULT_URI
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
from .pointread import PoolLike, open_pool, pinned_volume, point_disk, reading

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

#: the files QEMU's tls-creds-x509 (endpoint=server) reads from its directory
TLS_SERVER_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem")


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def check_tcp_security(bind: str, tls_dir: str | None, insecure: bool) -> str | None:
    """Refuse an unauthenticated TCP export; return the absolute TLS directory.

    Raises :class:`UsageError` (one line) for: TLS and ``insecure`` together,
    neither of them, ``insecure`` on a non-loopback address, a TLS directory
    without QEMU's server files.
    """
    if tls_dir is not None and insecure:
        raise UsageError("give either --tls-dir or --insecure, not both")
    if tls_dir is None:
        if not insecure:
            raise UsageError(
                f"refusing to serve a disk over TCP on {bind} without authentication: "
                "give --tls-dir DIR (x509 certificates), or --insecure for a loopback "
                "address only")
        if not _is_loopback(bind):
            raise UsageError(
                f"refusing to serve a disk without TLS on {bind}, which is not a loopback "
                "address: give --tls-dir DIR (x509 certificates)")
        return None
    tls_dir = os.path.abspath(tls_dir)
    missing = [f for f in TLS_SERVER_FILES if not os.path.isfile(os.path.join(tls_dir, f))]
    if missing:
        raise UsageError(f"TLS directory {tls_dir} lacks {', '.join(missing)}")
    return tls_dir


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
    tls_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@contextlib.contextmanager
def mount_point(domain: str, pool: PoolLike, point: int, disk: str | None = None,
                socket: str | None = None, *, port: int | None = None,
                bind: str = "127.0.0.1", uri: str = DEFAULT_URI, tls_dir: str | None = None,
                insecure: bool = False,
                key_file: str | None = None) -> Iterator[MountedPoint]:
    """Serve disk ``disk`` of point ``point`` read-only over NBD while the block runs.

    Without ``socket``/``port`` the export is on the daemon's private socket (root
    only, in a 0700 directory); ``socket=PATH`` serves on that unix socket (0600),
    ``port`` serves TCP on ``bind`` (default loopback), with TLS from ``tls_dir``
    (client certificates verified) or, with ``insecure``, plain on loopback only
    (:func:`check_tcp_security`).  Everything is removed when
    the block ends, also on an exception or a signal (StorageDaemon's own handling).
    ``key_file`` opens a point of an encrypted pool (FORMAT §15.2); the export then
    serves the plain disk, so keep it on the private socket or behind TLS.
    """
    if socket is not None and port is not None:
        raise UsageError("give either a socket path or a port, not both")
    if port is not None and not 0 < port < 65536:
        raise UsageError(f"not a TCP port: {port}")
    if port is None and (tls_dir is not None or insecure):
        raise UsageError("--tls-dir and --insecure are for a TCP export (--port)")
    if port is not None:
        tls_dir = check_tcp_security(bind, tls_dir, insecure)
    if socket is not None:
        socket = os.path.abspath(socket)
        if os.path.lexists(socket):
            raise UsageError(f"{socket} already exists; choose a new path for the socket")
        if len(os.fsencode(socket)) > _SUN_PATH_MAX:
            raise UsageError(f"socket path {socket} is too long for a unix socket")
    store = open_pool(pool, uri, key_file).find_domain(domain)
    # the readers lock (FORMAT §8) until the daemon holds the volumes open; from then
    # on prune's open-file check keeps this point (and its base) while it is served
    readers = reading(store).acquire()
    try:
        manifest = store.read_manifest(point)
        d = point_disk(store, manifest, disk)
        volume = pinned_volume(store, d)
        address: dict[str, Any] | None = None
        if port is not None:
            address = {"type": "inet", "data": {"host": bind, "port": str(port)}}
        elif socket is not None:
            address = {"type": "unix", "data": {"path": socket}}
        with StorageDaemon(tag=f"mount-{store.name}-{point}-{d.target}",
                           nbd_address=address, tls_dir=tls_dir) as daemon:
            try:
                # the backing chain pinned from the manifest, never the qcow2 header's
                export = daemon.export_pinned(volume, name=d.target)
            finally:
                readers.release()
            mounted = MountedPoint(uri=export.uri, socket_path=export.socket_path,
                                   export_name=export.name, size=export.size, volume=volume.path,
                                   domain=store.name, point=point, disk=d.target,
                                   host=export.host, port=export.port, tls_dir=export.tls_dir)
            log.info("domain %s: point %d disk %s served read-only at %s", store.name, point,
                     d.target, export.uri)
            yield mounted
    finally:
        readers.release()
