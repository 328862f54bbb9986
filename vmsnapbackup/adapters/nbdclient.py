"""A small, self-contained NBD client: how vmsnapbackup reads and writes an export.

Why our own: there is no NBD client on PyPI (libnbd's bindings come only from
distributions), and the backup's hot loop needs exactly one thing done well:
read large ranges into reusable buffers, several requests in flight, and skip
holes.  The client speaks the fixed newstyle handshake (with STARTTLS when
given x509 files), ``NBD_OPT_GO`` with block-size negotiation, structured
replies, the ``base:allocation`` metadata context (and, when asked, QEMU's
``qemu:dirty-bitmap:<name>`` next to it, so that a later backup reads only the
blocks written since the bitmap was created), and the READ / WRITE /
WRITE_ZEROES / FLUSH / BLOCK_STATUS commands (spec: NetworkBlockDevice/nbd
``doc/proto.md``; the dirty-bitmap context: QEMU ``docs/interop/nbd.txt``).

It is built in layers, one module each:

- :mod:`.nbdproto`: wire constants and structures;
- :mod:`.nbdaddress`: where an export is (:class:`NbdAddress`, URIs);
- :mod:`.nbdtls`: the x509 directory turned into a TLS context;
- :mod:`.nbdsocket`: the socket, deadlines, one-line errors, STARTTLS;
- :mod:`.nbdrequest`: one request in flight; its chunks must tile it;
- :mod:`.nbdtransport`: submitting requests and parsing the replies;
- :mod:`.nbdhandshake`: option negotiation;
- :mod:`.nbdread` / :mod:`.nbdwrite`: the commands;
- this module: :class:`NbdClient`, the constructors, and the names other
  modules import.

A broken or hostile server ends in one :class:`~vmsnapbackup.errors.ExportError`
with a one-line message, never a hang or a huge allocation.  After a
*protocol* error (or a timeout, or a dropped connection) the connection is
closed and every later call raises; after an error the server *reported* for
one command (e.g. EIO), the connection stays usable.  Errors the server
reported carry ``err.errno`` (e.g. ``errno.ENOSPC``) and ``err.errno_name``
(``"ENOSPC"``); protocol and connection errors carry ``err.errno = None`` (or
the OSError's errno when connecting failed).

A client is not thread-safe: use one per thread.  When
:attr:`NbdClient.can_multi_conn` is true, several connections to one export
see each other's writes after a flush.
"""
from __future__ import annotations

import logging
import os
import socket
import ssl

from typing_extensions import Self

from ..errors import ExportError, UsageError
from . import nbdproto as p
from .nbdaddress import DEFAULT_PORT, NbdAddress, parse_nbd_uri
from .nbdhandshake import NbdHandshake
from .nbdproto import BlockSizes
from .nbdread import DEFAULT_CHUNK_SIZE, EXTENT_DATA, EXTENT_HOLE, EXTENT_ZERO, Extent, NbdReader
from .nbdsocket import export_error
from .nbdtls import client_tls_context
from .nbdtransport import DEFAULT_DEPTH
from .nbdwrite import NbdWriter

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_DEPTH",
    "DEFAULT_PORT",
    "DEFAULT_TIMEOUT",
    "EXTENT_DATA",
    "EXTENT_HOLE",
    "EXTENT_ZERO",
    "BlockSizes",
    "Extent",
    "NbdAddress",
    "NbdClient",
    "parse_nbd_uri",
]

log = logging.getLogger(__name__)

#: Seconds one request (and the handshake) may take before the connection
#: is given up.
DEFAULT_TIMEOUT = 60.0


class NbdClient(NbdReader, NbdWriter, NbdHandshake):
    """One NBD connection to one export.

    Build it with :meth:`open_unix`, :meth:`connect_tcp`, :meth:`open` or
    :meth:`open_uri`; the constructor takes an already connected socket (the
    tests use a socketpair) and runs the handshake on it.  Use it as a
    context manager: leaving the block sends ``NBD_CMD_DISC`` and closes.

    ``timeout`` bounds each request from the moment we wait for it (and the
    whole handshake), however the server spreads its bytes; None waits
    forever.  ``tls`` (a context from :func:`~.nbdtls.client_tls_context`)
    makes the client insist on STARTTLS and check the server's certificate
    against ``tls_hostname``.
    """

    def __init__(
        self,
        sock: socket.socket,
        export_name: str = "",
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        depth: int = DEFAULT_DEPTH,
        structured_replies: bool = True,
        block_status: bool = True,
        dirty_bitmap: str | None = None,
        peer: str | None = None,
        tls: ssl.SSLContext | None = None,
        tls_hostname: str | None = None,
    ) -> None:
        if depth < 1:
            raise UsageError("NBD pipeline depth must be at least 1")
        if dirty_bitmap is not None and (
                not dirty_bitmap
                or len(p.dirty_bitmap_context(dirty_bitmap).encode("utf-8")) > p.MAX_STRING):
            raise UsageError(f"invalid dirty bitmap name {dirty_bitmap!r}")
        if tls is not None and not tls_hostname:
            raise UsageError("NBD over TLS needs the server's name to check its certificate")
        super().__init__(sock, peer or "NBD server", timeout)
        self.depth = depth
        self.export_name = export_name
        #: The dirty bitmap asked for (see :attr:`can_dirty_status`).
        self.dirty_bitmap = dirty_bitmap
        starttls: tuple[ssl.SSLContext, str] | None = (
            None if tls is None or tls_hostname is None else (tls, tls_hostname))
        try:
            self._handshake(export_name, structured_replies, block_status, starttls)
        except BaseException:
            self._close_socket()
            raise
        log.debug("%s export %r: size %d, flags 0x%x, block sizes %s, structured %s, "
                  "base:allocation %s, dirty bitmap %r %s, TLS %s", self._peer, export_name,
                  self._size, self._flags, self._block_sizes, self._structured,
                  self._context_id is not None, dirty_bitmap,
                  self._dirty_context_id is not None, self.tls)

    # -- constructors -------------------------------------------------------

    @classmethod
    def open_unix(cls, path: str | os.PathLike[str], export_name: str = "", *,
                  timeout: float | None = DEFAULT_TIMEOUT, depth: int = DEFAULT_DEPTH,
                  structured_replies: bool = True, block_status: bool = True,
                  dirty_bitmap: str | None = None) -> NbdClient:
        """Connect to an export served on a unix socket."""
        path = os.fspath(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
        except OSError as exc:
            sock.close()
            raise export_error(f"cannot connect to NBD server at unix:{path}: {exc}",
                               exc.errno) from None
        return cls(sock, export_name, timeout=timeout, depth=depth,
                   structured_replies=structured_replies, block_status=block_status,
                   dirty_bitmap=dirty_bitmap, peer=f"NBD server at unix:{path}")

    @classmethod
    def connect_tcp(cls, host: str, port: int = DEFAULT_PORT, export_name: str = "", *,
                    tls_dir: str | os.PathLike[str] | None = None,
                    tls_hostname: str | None = None,
                    timeout: float | None = DEFAULT_TIMEOUT, depth: int = DEFAULT_DEPTH,
                    structured_replies: bool = True, block_status: bool = True,
                    dirty_bitmap: str | None = None) -> NbdClient:
        """Connect to an export served over TCP, with TLS when ``tls_dir`` is given.

        ``tls_dir`` holds ``ca-cert.pem``, ``client-cert.pem`` and
        ``client-key.pem`` (QEMU's names); the server's certificate must be
        signed by that CA and name ``tls_hostname`` (default: ``host``).
        Missing or bad files are a UsageError before anything is dialled; a
        server that refuses TLS or is not trusted is an ExportError; the
        client never falls back to plain text.
        """
        context = None if tls_dir is None else client_tls_context(tls_dir)
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise export_error(f"cannot connect to NBD server at {where}: {exc}",
                               exc.errno) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock, export_name, timeout=timeout, depth=depth,
                   structured_replies=structured_replies, block_status=block_status,
                   dirty_bitmap=dirty_bitmap, peer=f"NBD server at {where}",
                   tls=context, tls_hostname=tls_hostname or host)

    @classmethod
    def open(cls, address: NbdAddress, *, timeout: float | None = DEFAULT_TIMEOUT,
             depth: int = DEFAULT_DEPTH, structured_replies: bool = True,
             block_status: bool = True, dirty_bitmap: str | None = None) -> NbdClient:
        """Connect to an :class:`NbdAddress` (over TLS when it names a directory)."""
        if address.socket_path is not None:
            return cls.open_unix(address.socket_path, address.export_name, timeout=timeout,
                                 depth=depth, structured_replies=structured_replies,
                                 block_status=block_status, dirty_bitmap=dirty_bitmap)
        assert address.host is not None
        return cls.connect_tcp(address.host, address.port, address.export_name,
                               tls_dir=address.tls_dir, timeout=timeout, depth=depth,
                               structured_replies=structured_replies,
                               block_status=block_status, dirty_bitmap=dirty_bitmap)

    @classmethod
    def open_uri(cls, uri: str, *, timeout: float | None = DEFAULT_TIMEOUT,
                 depth: int = DEFAULT_DEPTH, structured_replies: bool = True,
                 block_status: bool = True, dirty_bitmap: str | None = None) -> NbdClient:
        """Connect to ``nbd://``, ``nbds://...?tls-certificates=DIR`` or ``nbd+unix://``."""
        return cls.open(parse_nbd_uri(uri), timeout=timeout, depth=depth,
                        structured_replies=structured_replies, block_status=block_status,
                        dirty_bitmap=dirty_bitmap)

    # -- closing ------------------------------------------------------------

    def close(self) -> None:
        """Disconnect cleanly (``NBD_CMD_DISC``) when possible; never raises."""
        if self._sock is None:
            return
        if self._broken is None:
            try:
                if self._inflight:
                    self._drain(list(self._inflight.values()))
                if self._sock is not None:
                    self._send(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_DISC,
                                              self._next_cookie, 0, 0), doing="disconnecting")
                    if not self.tls:  # a TLS socket cannot half-close; closing is enough
                        self._sock.shutdown(socket.SHUT_WR)
            except (OSError, ExportError) as exc:
                log.debug("%s: disconnect failed: %s", self._peer, exc)
        self._close_socket()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<NbdClient {self._peer} export={self.export_name!r} size={self._size} "
                f"{'closed' if self._sock is None else 'open'}>")
