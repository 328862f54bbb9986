"""The NBD connection's socket: bounded receives, one-line errors, STARTTLS.

Every byte the client exchanges with a server goes through
:class:`NbdSocket`, so three promises are kept in one place:

- **Nothing waits forever.**  Each send is bounded by the timeout, and each
  *request* (and the whole handshake) by a deadline: a server that drips one
  byte every few seconds cannot stretch a read beyond the timeout, as a
  timeout per receive call would let it.
- **One line per failure.**  A dropped connection, a timeout or a protocol
  violation closes the socket and becomes one
  :class:`~vmsnapbackup.errors.ExportError`; every later call raises at once
  (a stream that lost its place cannot be trusted again).
- **TLS in place.**  After ``NBD_OPT_STARTTLS`` the socket is swapped for a
  TLS one; the code above never knows which it talks through.
"""
from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import time

from ..errors import ExportError

__all__ = ["NbdSocket", "ProtocolViolation", "export_error", "one_line"]

log = logging.getLogger(__name__)

_SCRATCH_SIZE = 256 * 1024


def one_line(text: str, limit: int = 300) -> str:
    """``text`` made printable, on one line, and at most ``limit`` characters."""
    cleaned = "".join(ch if ch.isprintable() else " " for ch in text).strip()
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


def export_error(message: str, errno_value: int | None = None,
                 errno_name: str | None = None) -> ExportError:
    """An ExportError with a one-line message and the errno fields callers test."""
    err = ExportError(one_line(message, 1000))
    err.errno = errno_value
    err.errno_name = errno_name
    return err


class ProtocolViolation(Exception):
    """Internal: the server broke the protocol; becomes ExportError at the edge."""


class NbdSocket:
    """One connected socket to an NBD server, with deadlines and failure state."""

    def __init__(self, sock: socket.socket, peer: str, timeout: float | None) -> None:
        self._sock: socket.socket | None = sock
        self._peer = peer
        self._timeout = timeout
        #: Why the connection became unusable (None while it is usable).
        self._broken: str | None = None
        #: monotonic() time by which the current request or handshake must end.
        self._deadline: float | None = None
        #: The socket's timeout was shortened to meet a deadline.
        self._tightened = False
        self._tls = False
        self._scratch = memoryview(bytearray(_SCRATCH_SIZE))
        sock.settimeout(timeout)

    # -- deadlines ------------------------------------------------------------

    @property
    def timeout(self) -> float | None:
        """Seconds one request (or the handshake) may take; None waits forever."""
        return self._timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._timeout = value
        if self._sock is not None:
            self._sock.settimeout(value)
            self._tightened = False

    def _start_deadline(self) -> None:
        """Begin the time budget of one request or of the handshake."""
        self._deadline = None if self._timeout is None else time.monotonic() + self._timeout

    def _end_deadline(self) -> None:
        self._deadline = None

    # -- failing --------------------------------------------------------------

    def _fail(self, reason: str, errno_value: int | None = None) -> ExportError:
        """Mark the connection unusable and build the error to raise."""
        if self._broken is None:
            self._broken = reason
        self._close_socket()
        return export_error(f"{self._peer}: {reason}", errno_value)

    def _io_error(self, exc: BaseException, doing: str) -> ExportError:
        if isinstance(exc, socket.timeout):
            return self._fail(f"no answer within {self._timeout:g} s while {doing}")
        if isinstance(exc, ssl.SSLError):
            return self._fail(f"TLS failed while {doing}: "
                              f"{str(exc.reason or exc).lower().replace('_', ' ')}")
        return self._fail(f"connection failed while {doing}: {exc}",
                          getattr(exc, "errno", None))

    def _usable_socket(self) -> socket.socket:
        if self._broken is not None:
            raise export_error(f"{self._peer}: connection is unusable after an earlier "
                               f"error ({self._broken})")
        if self._sock is None:
            raise export_error(f"{self._peer}: connection is closed")
        return self._sock

    # -- receiving and sending ----------------------------------------------

    def _recv_into(self, view: memoryview, doing: str) -> None:
        """Fill ``view`` completely, within the current deadline."""
        sock = self._usable_socket()
        pos, end = 0, len(view)
        deadline = self._deadline
        try:
            while pos < end:
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise socket.timeout()
                    sock.settimeout(left)
                    self._tightened = True
                got = sock.recv_into(view[pos:], end - pos)
                if not got:
                    raise self._fail(f"server closed the connection while {doing} "
                                     f"({pos} of {end} bytes received)")
                pos += got
        except ExportError:
            raise
        except (OSError, socket.timeout) as exc:
            raise self._io_error(exc, doing) from None

    def _recv_bytes(self, length: int, doing: str) -> bytearray:
        """Receive a small message; callers check ``length`` against a limit first."""
        buf = bytearray(length)
        self._recv_into(memoryview(buf), doing)
        return buf

    def _discard(self, length: int, doing: str) -> None:
        while length:
            step = min(length, len(self._scratch))
            self._recv_into(self._scratch[:step], doing)
            length -= step

    def _send(self, *parts: bytes | bytearray | memoryview, doing: str) -> None:
        """Send every part; each ``sendall`` is bounded by the timeout."""
        sock = self._usable_socket()
        try:
            if self._tightened:
                sock.settimeout(self._timeout)
                self._tightened = False
            for part in parts:
                sock.sendall(part)
        except (OSError, socket.timeout) as exc:
            raise self._io_error(exc, doing) from None

    # -- TLS ----------------------------------------------------------------

    @property
    def tls(self) -> bool:
        """True once the connection runs inside TLS."""
        return self._tls

    def _start_tls(self, context: ssl.SSLContext, hostname: str) -> None:
        """Run the TLS handshake on the socket and talk through TLS from now on."""
        sock = self._usable_socket()
        left = self._timeout
        if self._deadline is not None:
            left = max(self._deadline - time.monotonic(), 0.001)
        try:
            sock.settimeout(left)
            tls_sock = context.wrap_socket(sock, server_hostname=hostname)
            tls_sock.settimeout(self._timeout)
        except ssl.SSLCertVerificationError as exc:
            raise self._fail(f"TLS: the server's certificate is not trusted: "
                             f"{exc.verify_message or exc.reason}") from None
        except (OSError, socket.timeout) as exc:
            raise self._io_error(exc, "negotiating TLS") from None
        self._sock = tls_sock
        self._tls = True
        self._tightened = False
        log.debug("%s: TLS %s, cipher %s", self._peer, tls_sock.version(),
                  (tls_sock.cipher() or ("?",))[0])

    # -- closing ------------------------------------------------------------

    def _close_socket(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):  # the close of a socket hardly fails
                sock.close()

    def __del__(self) -> None:
        sock = getattr(self, "_sock", None)
        if sock is not None:
            sock.close()
