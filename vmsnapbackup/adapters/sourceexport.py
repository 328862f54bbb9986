"""The frozen image's export when the hypervisor is another machine: where it is
served and how our NBD client reaches it.

Why the source daemon runs *on the hypervisor*: the frozen image is a file
there, and only the blocks we ask for should cross the network -- never a
mounted image directory.  Two ways across, never plain TCP between hosts:

* **ssh forwarding** (default): the daemon serves its usual unix socket in its
  private 0700 runtime directory; :meth:`Host.reach_socket` forwards it over
  the same authenticated ssh connection libvirt's URI already names.
* **TLS** (``tls_dir``): the daemon listens on TCP at the hypervisor's address,
  on the first free port of ``ports``, with ``tls-creds-x509`` and
  ``verify-peer`` (a client certificate is required); our client does STARTTLS
  with ``client-cert.pem``/``client-key.pem`` from the *same path* on this
  machine (QEMU's layout: one directory per host holding ``ca-cert.pem``, the
  server pair and the client pair).  The data then bypasses ssh's single
  encrypted stream.

On this machine both collapse to the daemon's private socket, unchanged.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from .. import errors
from .host import Host
from .localhost import LocalHost
from .nbdclient import NbdClient
from .storagedaemon import Export, StorageDaemon

__all__ = ["DEFAULT_NBD_PORTS", "DataPath", "is_remote", "open_source", "parse_port_range",
           "start_source_daemon"]

log = logging.getLogger(__name__)

#: 10809 is NBD's IANA port; a small range so several backups of one host fit.
DEFAULT_NBD_PORTS = (10809, 10872)


def parse_port_range(text: str) -> tuple[int, int]:
    """``"A-B"`` (or one port ``"A"``) as an inclusive range; UsageError otherwise."""
    first, sep, last = text.partition("-")
    try:
        lo, hi = int(first), int(last) if sep else int(first)
    except ValueError:
        raise errors.UsageError(f"--nbd-ports: not a port range: {text!r} "
                                "(give FIRST-LAST, say 10809-10872)") from None
    if not 0 < lo <= hi < 65536:
        raise errors.UsageError(f"--nbd-ports: {text!r} is not a range of TCP ports")
    return lo, hi


@dataclass(frozen=True)
class DataPath:
    """How frozen images travel from a remote hypervisor (see the module docstring)."""

    tls_dir: str | None = None
    ports: tuple[int, int] = DEFAULT_NBD_PORTS

    def describe(self) -> str:
        return f"NBD over TLS ({self.tls_dir})" if self.tls_dir else "NBD over ssh forwarding"


def is_remote(host: Host) -> bool:
    return not isinstance(host, LocalHost)


def start_source_daemon(host: Host, tag: str, runtime_base: str,
                        data: DataPath) -> StorageDaemon:
    """A started read-only export daemon on ``host`` (close it when done)."""
    if data.tls_dir is None:
        daemon = StorageDaemon(runtime_base, tag, host=host)
        daemon.start()
        return daemon
    lo, hi = data.ports
    for port in range(lo, hi + 1):
        address = {"type": "inet", "data": {"host": host.name, "port": str(port)}}
        daemon = StorageDaemon(runtime_base, tag, host=host, nbd_address=address,
                               tls_dir=data.tls_dir)
        try:
            daemon.start()   # a failed start has cleaned up after itself
        except errors.ExportError as err:
            if "in use" in str(err):   # EADDRINUSE: "Address already in use"
                log.debug("%s:%d is taken; trying the next port", host.name, port)
                continue
            raise
        return daemon
    raise errors.ExportError(f"no free NBD port on {host.name} in {lo}-{hi} "
                             "(widen --nbd-ports)")


def open_source(export: Export, host: Host, *, dirty_bitmap: str | None = None) -> NbdClient:
    """Our NBD client on ``export`` of a daemon running on ``host``."""
    if export.socket_path is not None:
        return NbdClient.open_unix(host.reach_socket(export.socket_path), export.name,
                                   dirty_bitmap=dirty_bitmap)
    if export.tls_dir is None or export.host is None or export.port is None:
        raise errors.ExportError(f"refusing plain NBD over TCP to {export.uri}: no TLS")
    return NbdClient.connect_tcp(export.host, export.port, export.name,
                                 tls_dir=export.tls_dir, dirty_bitmap=dirty_bitmap)
