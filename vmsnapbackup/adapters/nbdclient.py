"""A small, self-contained NBD client: how vmsnapbackup reads an export.

Why our own: there is no NBD client on PyPI (libnbd's bindings come only from
distributions), and the backup's hot loop needs exactly one thing done well:
read large ranges into reusable buffers, several requests in flight, and skip
holes.  This module speaks the fixed newstyle handshake, ``NBD_OPT_GO`` with
block-size negotiation, structured replies, the ``base:allocation``
metadata context (and, when asked, QEMU's ``qemu:dirty-bitmap:<name>`` next
to it, so that a later backup reads only the blocks written since the
bitmap was created), and the READ / WRITE / WRITE_ZEROES / FLUSH /
BLOCK_STATUS commands (spec: NetworkBlockDevice/nbd ``doc/proto.md``; the
dirty-bitmap context: QEMU ``docs/interop/nbd.txt``).

Everything the server sends is checked before it is trusted: a length is
compared with what was asked before anything is allocated or received, every
reply must name a request in flight, and every socket operation is bounded by
a timeout.  A broken or hostile server therefore ends in one
:class:`~vmsnapbackup.errors.ExportError` with a one-line message, never a
hang or a huge allocation.  After a *protocol* error (or a timeout, or a
dropped connection) the connection is closed and every later call raises;
after an error the server *reported* for one command (e.g. EIO), the
connection stays usable.

Errors the server reported carry ``err.errno`` (a Python errno value, e.g.
``errno.ENOSPC``) and ``err.errno_name`` (``"ENOSPC"``); protocol and
connection errors carry ``err.errno = None`` (or the OSError's errno when
connecting failed).

A client is not thread-safe: use one per thread.  When
:attr:`NbdClient.can_multi_conn` is true, several connections to one export
see each other's writes after a flush.
"""
from __future__ import annotations

import collections
import logging
import os
import socket
import urllib.parse
from dataclasses import dataclass
from typing import (
    Callable,
    Deque,
    Dict,
    Iterable,
    Iterator,
    List,
    NamedTuple,
    Optional,
    Tuple,
)

from ..core.blockruns import whole_block_runs
from ..errors import ExportError, UsageError
from . import nbdproto as p

__all__ = [
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
    "connect",
    "parse_nbd_uri",
]

log = logging.getLogger(__name__)

DEFAULT_PORT = 10809
DEFAULT_TIMEOUT = 60.0
#: Requests kept in flight by the pipelined APIs unless told otherwise.
DEFAULT_DEPTH = 4
#: Request size of :meth:`NbdClient.read_chunks` (1-4 MiB measured fastest).
DEFAULT_CHUNK_SIZE = 1024 * 1024

EXTENT_DATA = "data"
EXTENT_ZERO = "zero"
EXTENT_HOLE = "hole"

#: Longest option reply we accept during the handshake.  Every legitimate
#: reply (export info, a context name, an error message) is a few hundred
#: bytes; the spec caps strings at 4 KiB.
_MAX_OPTION_REPLY = 64 * 1024
#: Most replies we accept to one option before calling the server broken.
_MAX_OPTION_REPLIES = 256
#: Largest structured error chunk: error, message length, message, offset.
_MAX_ERROR_CHUNK = p.ERROR_HEAD.size + p.MAX_STRING + p.ERROR_OFFSET_TAIL.size
#: Most error chunks we accept for one request (each content chunk may have
#: one; more means a server that would otherwise keep us reading forever).
_MAX_ERROR_CHUNKS = 4096
#: Largest block-status chunk we take in one go (QEMU sends at most 1 MiB).
_MAX_STATUS_CHUNK = 16 * 1024 * 1024
#: Length of one BLOCK_STATUS request: servers keep the 32-bit length field
#: in signed integers, so stay well below 2 GiB (then align to the block size).
_MAX_STATUS_REQUEST = (1 << 31) - (1 << 16)
#: Never issue READ/WRITE payloads larger than this, whatever the server
#: offers: it bounds the bounce buffers and a lost request's cost.
_MAX_PAYLOAD = 32 * 1024 * 1024

_ZEROS = memoryview(bytes(1024 * 1024))
_SCRATCH_SIZE = 256 * 1024


# ---------------------------------------------------------------------------
# small value types


class BlockSizes(NamedTuple):
    """The export's block size constraints (``NBD_INFO_BLOCK_SIZE``)."""

    minimum: int
    preferred: int
    maximum: int


class Extent(NamedTuple):
    """One run of the export with one ``base:allocation`` state.

    ``kind`` is what a reader needs: ``"data"`` must be read; ``"zero"``
    (allocated, reads as zeroes) and ``"hole"`` (unallocated, reads as
    zeroes) need not be.  A hole the server does not promise to read as
    zeroes (``NBD_STATE_HOLE`` without ``NBD_STATE_ZERO``, e.g. a qcow2
    cluster that falls through to a backing file) is ``"data"``: only the
    zero flag makes skipping the read safe.
    """

    offset: int
    length: int
    flags: int

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def reads_as_zero(self) -> bool:
        return bool(self.flags & p.STATE_ZERO)

    @property
    def kind(self) -> str:
        if not self.flags & p.STATE_ZERO:
            return EXTENT_DATA
        if self.flags & p.STATE_HOLE:
            return EXTENT_HOLE
        return EXTENT_ZERO


@dataclass(frozen=True)
class NbdAddress:
    """Where an export is: a unix socket path or a TCP host/port, plus a name."""

    export_name: str = ""
    socket_path: Optional[str] = None
    host: Optional[str] = None
    port: int = DEFAULT_PORT

    def __post_init__(self) -> None:
        if (self.socket_path is None) == (self.host is None):
            raise UsageError("an NBD address needs exactly one of a socket path or a host")

    @property
    def uri(self) -> str:
        """The address as an NBD URI (the form ``qemu-img`` and ``nbdinfo`` accept)."""
        name = urllib.parse.quote(self.export_name, safe="")
        if self.socket_path is not None:
            sock = urllib.parse.quote(self.socket_path, safe="/")
            return f"nbd+unix:///{name}?socket={sock}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{name}"

    def __str__(self) -> str:
        return self.uri


def parse_nbd_uri(uri: str) -> NbdAddress:
    """Parse ``nbd://host[:port]/name`` or ``nbd+unix:///name?socket=PATH``.

    TLS (``nbds``) and vsock schemes are refused: the exports we talk to are
    local unix sockets, and a half-understood address is worse than none.
    """
    try:
        parts = urllib.parse.urlsplit(uri)
        port_value = parts.port
    except ValueError as exc:
        raise UsageError(f"not an NBD URI: {uri!r} ({exc})") from None
    scheme = parts.scheme.lower()
    path = parts.path
    if path not in ("", "/") and not path.startswith("/"):
        raise UsageError(f"not an NBD URI: {uri!r}")
    name = urllib.parse.unquote(path[1:] if path.startswith("/") else path)
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    if scheme in ("nbd", "nbd+tcp"):
        if not parts.hostname:
            raise UsageError(f"NBD URI without a host: {uri!r}")
        return NbdAddress(export_name=name, host=parts.hostname, port=port_value or DEFAULT_PORT)
    if scheme == "nbd+unix":
        sockets = query.get("socket")
        if not sockets or not sockets[0]:
            raise UsageError(f"nbd+unix URI without ?socket=PATH: {uri!r}")
        if parts.netloc:
            raise UsageError(f"nbd+unix URI must not name a host: {uri!r}")
        return NbdAddress(export_name=name, socket_path=sockets[0])
    if scheme.startswith("nbds"):
        raise UsageError(f"NBD over TLS is not supported: {uri!r}")
    raise UsageError(f"not an NBD URI (want nbd:// or nbd+unix://): {uri!r}")


# ---------------------------------------------------------------------------
# errors


def _one_line(text: str, limit: int = 300) -> str:
    cleaned = "".join(ch if ch.isprintable() else " " for ch in text).strip()
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


def _export_error(message: str, errno_value: Optional[int] = None,
                  errno_name: Optional[str] = None) -> ExportError:
    err = ExportError(_one_line(message, 1000))
    err.errno = errno_value  # type: ignore[attr-defined]
    err.errno_name = errno_name  # type: ignore[attr-defined]
    return err


class _ProtocolViolation(Exception):
    """Internal: the server broke the protocol; becomes ExportError at the edge."""


# ---------------------------------------------------------------------------
# requests in flight


class _Request:
    """One command sent and not yet completely answered."""

    __slots__ = ("cookie", "cmd", "offset", "length", "view", "filled", "done",
                 "error", "message", "statuses", "errors_seen")

    def __init__(self, cookie: int, cmd: int, offset: int, length: int,
                 view: Optional[memoryview]) -> None:
        self.cookie = cookie
        self.cmd = cmd
        self.offset = offset
        self.length = length
        # READ: where the data lands (None: drop it, the caller went away).
        self.view = view
        self.filled = 0
        self.done = False
        self.error = 0  # NBD error value of the first error chunk, 0 if none
        self.message = ""
        # BLOCK_STATUS: (length, flags) descriptors per metadata context id.
        self.statuses: Dict[int, List[Tuple[int, int]]] = {}
        self.errors_seen = 0

    def fail(self, error: int, message: str) -> None:
        if not self.error:
            self.error = error
            self.message = message


class _ReadOp:
    """One caller read: one or more wire requests, maybe through a bounce buffer."""

    __slots__ = ("offset", "view", "requests", "bounce", "skip")

    def __init__(self, offset: int, view: memoryview) -> None:
        self.offset = offset
        self.view = view
        self.requests: List[_Request] = []
        self.bounce: Optional[bytearray] = None
        self.skip = 0


def _as_bytes_view(buffer: object, writable: bool) -> memoryview:
    try:
        view = memoryview(buffer)  # type: ignore[arg-type]
    except TypeError:
        raise UsageError(f"expected a buffer, got {type(buffer).__name__}") from None
    if writable and view.readonly:
        raise UsageError("the read buffer is read-only")
    if view.format != "B" or view.ndim != 1:
        try:
            view = view.cast("B")
        except TypeError:
            raise UsageError("the buffer must be C-contiguous") from None
    return view


def _zero_fill(view: memoryview) -> None:
    pos, end = 0, len(view)
    while pos < end:
        step = min(end - pos, len(_ZEROS))
        view[pos:pos + step] = _ZEROS[:step]
        pos += step


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


# ---------------------------------------------------------------------------
# the client


class NbdClient:
    """One NBD connection to one export.

    Build it with :meth:`open_unix`, :meth:`open_tcp`, :meth:`open_uri` or
    :func:`connect`; the constructor takes an already connected socket (the
    tests use a socketpair) and runs the handshake on it.  Use it as a
    context manager: leaving the block sends ``NBD_CMD_DISC`` and closes.
    """

    def __init__(
        self,
        sock: socket.socket,
        export_name: str = "",
        *,
        timeout: Optional[float] = DEFAULT_TIMEOUT,
        depth: int = DEFAULT_DEPTH,
        structured_replies: bool = True,
        block_status: bool = True,
        dirty_bitmap: Optional[str] = None,
        peer: Optional[str] = None,
    ) -> None:
        if depth < 1:
            raise UsageError("NBD pipeline depth must be at least 1")
        if dirty_bitmap is not None and (
                not dirty_bitmap
                or len(p.dirty_bitmap_context(dirty_bitmap).encode("utf-8")) > p.MAX_STRING):
            raise UsageError(f"invalid dirty bitmap name {dirty_bitmap!r}")
        self._sock: Optional[socket.socket] = sock
        self._peer = peer or "NBD server"
        self._timeout = timeout
        self.depth = depth
        self.export_name = export_name
        self.description = ""
        self._broken: Optional[str] = None
        self._shutting_down = False
        self._inflight: Dict[int, _Request] = {}
        self._next_cookie = 1
        self._header = bytearray(p.STRUCTURED_REPLY.size)
        self._header_view = memoryview(self._header)
        self._scratch = memoryview(bytearray(_SCRATCH_SIZE))
        self._structured = False
        self._context_id: Optional[int] = None
        #: The dirty bitmap asked for, and its context id once the server chose it.
        self.dirty_bitmap = dirty_bitmap
        self._dirty_context_id: Optional[int] = None
        self._size = 0
        self._flags = 0
        self._block_sizes = BlockSizes(p.DEFAULT_MIN_BLOCK, p.DEFAULT_PREFERRED_BLOCK,
                                       p.DEFAULT_MAX_BLOCK)
        sock.settimeout(timeout)
        try:
            self._handshake(export_name, structured_replies, block_status)
        except BaseException:
            self._close_socket()
            raise
        log.debug("%s export %r: size %d, flags 0x%x, block sizes %s, structured %s, "
                  "base:allocation %s, dirty bitmap %r %s", self._peer, export_name,
                  self._size, self._flags, self._block_sizes, self._structured,
                  self._context_id is not None, dirty_bitmap,
                  self._dirty_context_id is not None)

    # -- constructors -------------------------------------------------------

    @classmethod
    def open_unix(cls, path: "str | os.PathLike[str]", export_name: str = "",
                  **options: object) -> "NbdClient":
        """Connect to an export served on a unix socket."""
        path = os.fspath(path)
        timeout = options.get("timeout", DEFAULT_TIMEOUT)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)  # type: ignore[arg-type]
            sock.connect(path)
        except (OSError, socket.timeout) as exc:
            sock.close()
            raise _export_error(f"cannot connect to NBD server at unix:{path}: {exc}",
                                getattr(exc, "errno", None)) from None
        options.setdefault("peer", f"NBD server at unix:{path}")
        return cls(sock, export_name, **options)  # type: ignore[arg-type]

    @classmethod
    def open_tcp(cls, host: str, port: int = DEFAULT_PORT, export_name: str = "",
                 **options: object) -> "NbdClient":
        """Connect to an export served over TCP."""
        timeout = options.get("timeout", DEFAULT_TIMEOUT)
        try:
            sock = socket.create_connection((host, port), timeout=timeout)  # type: ignore[arg-type]
        except (OSError, socket.timeout) as exc:
            raise _export_error(f"cannot connect to NBD server at {host}:{port}: {exc}",
                                getattr(exc, "errno", None)) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        options.setdefault("peer", f"NBD server at {host}:{port}")
        return cls(sock, export_name, **options)  # type: ignore[arg-type]

    @classmethod
    def open(cls, address: NbdAddress, **options: object) -> "NbdClient":
        """Connect to an :class:`NbdAddress`."""
        if address.socket_path is not None:
            return cls.open_unix(address.socket_path, address.export_name, **options)
        assert address.host is not None
        return cls.open_tcp(address.host, address.port, address.export_name, **options)

    @classmethod
    def open_uri(cls, uri: str, **options: object) -> "NbdClient":
        """Connect to ``nbd://host:port/name`` or ``nbd+unix:///name?socket=PATH``."""
        return cls.open(parse_nbd_uri(uri), **options)

    # -- what the export offers --------------------------------------------

    @property
    def size(self) -> int:
        """Export size in bytes."""
        return self._size

    @property
    def export_flags(self) -> int:
        """Raw transmission flags (``NBD_FLAG_*``)."""
        return self._flags

    @property
    def block_sizes(self) -> BlockSizes:
        """Minimum, preferred and maximum block size we keep to."""
        return self._block_sizes

    @property
    def max_request(self) -> int:
        """Largest READ/WRITE payload sent in one request (larger calls are split)."""
        minimum, _, maximum = self._block_sizes
        limit = min(maximum, _MAX_PAYLOAD)
        return max(minimum, limit - limit % minimum)

    @property
    def structured_replies(self) -> bool:
        return self._structured

    @property
    def can_block_status(self) -> bool:
        """True when ``base:allocation`` was negotiated (holes can be skipped)."""
        return self._context_id is not None

    @property
    def can_dirty_status(self) -> bool:
        """True when the server selected ``qemu:dirty-bitmap:<dirty_bitmap>``.

        False when no bitmap was asked for, and also when the export does not
        carry it: the server simply leaves an unknown context out, and only
        the caller knows whether that means "read everything".
        """
        return self._dirty_context_id is not None

    @property
    def read_only(self) -> bool:
        return bool(self._flags & p.TF_READ_ONLY)

    @property
    def can_flush(self) -> bool:
        return bool(self._flags & p.TF_SEND_FLUSH)

    @property
    def can_fua(self) -> bool:
        return bool(self._flags & p.TF_SEND_FUA)

    @property
    def can_trim(self) -> bool:
        return bool(self._flags & p.TF_SEND_TRIM)

    @property
    def can_write_zeroes(self) -> bool:
        return bool(self._flags & p.TF_SEND_WRITE_ZEROES)

    @property
    def can_fast_zero(self) -> bool:
        return bool(self._flags & p.TF_SEND_FAST_ZERO) and self.can_write_zeroes

    @property
    def can_multi_conn(self) -> bool:
        """True when several connections to this export are coherent."""
        return bool(self._flags & p.TF_CAN_MULTI_CONN)

    @property
    def timeout(self) -> Optional[float]:
        return self._timeout

    @timeout.setter
    def timeout(self, value: Optional[float]) -> None:
        self._timeout = value
        if self._sock is not None:
            self._sock.settimeout(value)

    @property
    def closed(self) -> bool:
        return self._sock is None

    # -- socket primitives --------------------------------------------------

    def _fail(self, reason: str, errno_value: Optional[int] = None) -> ExportError:
        """Mark the connection unusable and build the error to raise."""
        if self._broken is None:
            self._broken = reason
        self._close_socket()
        return _export_error(f"{self._peer}: {reason}", errno_value)

    def _io_error(self, exc: BaseException, doing: str) -> ExportError:
        if isinstance(exc, socket.timeout):
            return self._fail(f"no answer within {self._timeout:g} s while {doing}")
        return self._fail(f"connection failed while {doing}: {exc}",
                          getattr(exc, "errno", None))

    def _usable_socket(self) -> socket.socket:
        if self._broken is not None:
            raise _export_error(f"{self._peer}: connection is unusable after an earlier "
                                f"error ({self._broken})")
        if self._sock is None:
            raise _export_error(f"{self._peer}: connection is closed")
        return self._sock

    def _recv_into(self, view: memoryview, doing: str) -> None:
        sock = self._usable_socket()
        pos, end = 0, len(view)
        try:
            while pos < end:
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

    def _send(self, *parts: "bytes | bytearray | memoryview", doing: str) -> None:
        sock = self._usable_socket()
        try:
            for part in parts:
                sock.sendall(part)
        except (OSError, socket.timeout) as exc:
            raise self._io_error(exc, doing) from None

    def _close_socket(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:  # pragma: no cover - close of a socket hardly fails
                pass

    # -- handshake ----------------------------------------------------------

    def _handshake(self, export_name: str, want_structured: bool, want_status: bool) -> None:
        name = export_name.encode("utf-8")
        if len(name) > p.MAX_STRING:
            raise UsageError("NBD export name longer than 4096 bytes")
        greeting = self._recv_bytes(p.GREETING.size, "reading the greeting")
        magic, second, hflags = p.GREETING.unpack(greeting)
        if magic != p.NBDMAGIC:
            raise self._fail(f"not an NBD server (bad greeting magic 0x{magic:016x})")
        if second == p.OLDSTYLE_MAGIC:
            raise self._fail("server speaks the oldstyle NBD handshake, which is not supported")
        if second != p.IHAVEOPT:
            raise self._fail(f"bad handshake magic 0x{second:016x}")
        fixed = bool(hflags & p.FLAG_FIXED_NEWSTYLE)
        self._no_zeroes = bool(hflags & p.FLAG_NO_ZEROES)
        cflags = (p.FLAG_C_FIXED_NEWSTYLE if fixed else 0) | (
            p.FLAG_C_NO_ZEROES if self._no_zeroes else 0)
        self._send(p.CLIENT_FLAGS.pack(cflags), doing="sending client flags")
        if not fixed:
            # Only NBD_OPT_EXPORT_NAME is allowed without fixed newstyle.
            self._export_name_option(name)
            return
        if want_structured:
            self._structured = self._simple_option(p.OPT_STRUCTURED_REPLY, b"")
        if self._structured and (want_status or self.dirty_bitmap is not None):
            self._set_meta_context(name, want_status)
        if not self._go(name):
            self._export_name_option(name)

    def _send_option(self, option: int, data: bytes) -> None:
        self._send(p.OPTION_HEADER.pack(p.IHAVEOPT, option, len(data)), data,
                   doing=f"sending option {option}")

    def _option_reply(self, option: int) -> Tuple[int, bytearray]:
        head = self._recv_bytes(p.OPTION_REPLY.size, f"reading the reply to option {option}")
        magic, echoed, rtype, length = p.OPTION_REPLY.unpack(head)
        if magic != p.OPTION_REPLY_MAGIC:
            raise self._fail(f"bad option reply magic 0x{magic:x}")
        if echoed != option:
            raise self._fail(f"reply to option {echoed} while option {option} was asked")
        if length > _MAX_OPTION_REPLY:
            raise self._fail(f"option reply too large ({length} bytes) to option {option}")
        data = self._recv_bytes(length, f"reading the reply to option {option}")
        return rtype, data

    def _option_error(self, option: int, rtype: int, data: bytes) -> str:
        what = p.REP_ERROR_NAMES.get(rtype, f"error 0x{rtype:x}")
        text = _one_line(bytes(data).decode("utf-8", "replace")) if data else ""
        return f"{what}: {text}" if text else what

    def _simple_option(self, option: int, data: bytes) -> bool:
        """Send an option answered by ACK or an error; True if acknowledged."""
        self._send_option(option, data)
        rtype, payload = self._option_reply(option)
        if rtype == p.REP_ACK:
            if payload:
                raise self._fail(f"ACK to option {option} carries {len(payload)} bytes")
            return True
        if rtype & p.REP_FLAG_ERROR:
            log.debug("NBD option %d refused: %s", option,
                      self._option_error(option, rtype, payload))
            if rtype == p.REP_ERR_TLS_REQD:
                raise self._fail("server requires TLS, which is not supported")
            return False
        raise self._fail(f"unexpected reply type {rtype} to option {option}")

    def _set_meta_context(self, name: bytes, want_allocation: bool) -> None:
        """Ask for every context we want in one option (a second SET would replace the first)."""
        dirty = (p.dirty_bitmap_context(self.dirty_bitmap)
                 if self.dirty_bitmap is not None else None)
        queries = [q for q in (p.META_BASE_ALLOCATION if want_allocation else None, dirty)
                   if q is not None]
        data = p.U32.pack(len(name)) + name + p.U32.pack(len(queries))
        for query in queries:
            encoded = query.encode("utf-8")
            data += p.U32.pack(len(encoded)) + encoded
        self._send_option(p.OPT_SET_META_CONTEXT, data)
        for _ in range(_MAX_OPTION_REPLIES):
            rtype, payload = self._option_reply(p.OPT_SET_META_CONTEXT)
            if rtype == p.REP_ACK:
                if payload:
                    raise self._fail("ACK to SET_META_CONTEXT carries data")
                if self._context_id is not None and self._context_id == self._dirty_context_id:
                    raise self._fail(f"server gave {p.META_BASE_ALLOCATION} and {dirty} the "
                                     f"same metadata context id {self._context_id}")
                return
            if rtype == p.REP_META_CONTEXT:
                if len(payload) < p.U32.size + 1:
                    raise self._fail("metadata context reply too short")
                (context_id,) = p.U32.unpack_from(payload)
                context = bytes(payload[p.U32.size:]).decode("utf-8", "replace")
                if context == p.META_BASE_ALLOCATION and want_allocation:
                    self._context_id = context_id
                elif context == dirty:
                    self._dirty_context_id = context_id
                else:
                    log.debug("NBD server selected unasked metadata context %r", context)
                continue
            if rtype & p.REP_FLAG_ERROR:
                log.debug("NBD server refused metadata contexts %s: %s", queries,
                          self._option_error(p.OPT_SET_META_CONTEXT, rtype, payload))
                self._context_id = self._dirty_context_id = None
                return
            raise self._fail(f"unexpected reply type {rtype} to SET_META_CONTEXT")
        raise self._fail("too many replies to SET_META_CONTEXT")

    def _context_name(self, context_id: int) -> str:
        if context_id == self._context_id:
            return p.META_BASE_ALLOCATION
        if context_id == self._dirty_context_id and self.dirty_bitmap is not None:
            return p.dirty_bitmap_context(self.dirty_bitmap)
        return f"metadata context {context_id}"

    def _negotiated_contexts(self) -> List[int]:
        return [c for c in (self._context_id, self._dirty_context_id) if c is not None]

    def _go(self, name: bytes) -> bool:
        """NBD_OPT_GO; False if the server does not know the option."""
        data = p.U32.pack(len(name)) + name + p.U16.pack(1) + p.U16.pack(p.INFO_BLOCK_SIZE)
        self._send_option(p.OPT_GO, data)
        have_export = False
        sizes: Optional[BlockSizes] = None
        for _ in range(_MAX_OPTION_REPLIES):
            rtype, payload = self._option_reply(p.OPT_GO)
            if rtype == p.REP_INFO:
                if len(payload) < p.U16.size:
                    raise self._fail("information reply too short")
                (info,) = p.U16.unpack_from(payload)
                if info == p.INFO_EXPORT:
                    if len(payload) != p.INFO_EXPORT_PAYLOAD.size:
                        raise self._fail(f"export information of {len(payload)} bytes")
                    _, self._size, self._flags = p.INFO_EXPORT_PAYLOAD.unpack(payload)
                    have_export = True
                elif info == p.INFO_BLOCK_SIZE:
                    if len(payload) != p.INFO_BLOCK_SIZE_PAYLOAD.size:
                        raise self._fail(f"block size information of {len(payload)} bytes")
                    _, minimum, preferred, maximum = p.INFO_BLOCK_SIZE_PAYLOAD.unpack(payload)
                    sizes = self._checked_block_sizes(minimum, preferred, maximum)
                elif info == p.INFO_DESCRIPTION:
                    self.description = _one_line(bytes(payload[2:]).decode("utf-8", "replace"))
                continue  # other information (e.g. NAME) is not needed
            if rtype == p.REP_ACK:
                if payload:
                    raise self._fail("ACK to NBD_OPT_GO carries data")
                if not have_export:
                    raise self._fail("server entered transmission without export information")
                break
            if rtype == p.REP_ERR_UNSUP:
                return False
            if rtype & p.REP_FLAG_ERROR:
                reason = self._option_error(p.OPT_GO, rtype, payload)
                raise self._fail(f"cannot open export {self.export_name!r}: {reason}")
            raise self._fail(f"unexpected reply type {rtype} to NBD_OPT_GO")
        else:
            raise self._fail("too many replies to NBD_OPT_GO")
        self._check_size()
        if sizes is not None:
            self._block_sizes = sizes
        return True

    def _export_name_option(self, name: bytes) -> None:
        self._send_option(p.OPT_EXPORT_NAME, name)
        reply = self._recv_bytes(p.EXPORT_NAME_REPLY.size, "reading the export information")
        self._size, self._flags = p.EXPORT_NAME_REPLY.unpack(reply)
        if not self._no_zeroes:
            self._discard(124, "reading the handshake padding")
        self._check_size()

    def _check_size(self) -> None:
        if self._size >= 1 << 63:
            raise self._fail(f"export size {self._size} is not plausible")

    def _checked_block_sizes(self, minimum: int, preferred: int, maximum: int) -> BlockSizes:
        if not _is_power_of_two(minimum) or minimum > 64 * 1024:
            raise self._fail(f"invalid minimum block size {minimum}")
        if not _is_power_of_two(preferred) or preferred < minimum:
            raise self._fail(f"invalid preferred block size {preferred}")
        if maximum < minimum:
            raise self._fail(f"invalid maximum block size {maximum}")
        return BlockSizes(minimum, preferred, maximum - maximum % minimum)

    # -- requests and replies ----------------------------------------------

    def _submit(self, cmd: int, offset: int, length: int, flags: int = 0,
                view: Optional[memoryview] = None,
                payload: Optional[memoryview] = None) -> _Request:
        self._usable_socket()
        if self._shutting_down:
            raise _export_error(f"{self._peer}: server is shutting down (ESHUTDOWN)",
                                *p.nbd_errno(p.NBD_ESHUTDOWN))
        cookie = self._next_cookie
        self._next_cookie = (cookie + 1) & 0xFFFFFFFFFFFFFFFF or 1
        request = _Request(cookie, cmd, offset, length, view)
        header = p.REQUEST.pack(p.REQUEST_MAGIC, flags, cmd, cookie, offset, length)
        self._inflight[cookie] = request
        doing = f"sending a {p.CMD_NAMES.get(cmd, cmd)} request"
        if payload is None:
            self._send(header, doing=doing)
        else:
            self._send(header, payload, doing=doing)
        return request

    def _wait(self, request: _Request) -> None:
        while not request.done:
            self._receive_reply()

    def _receive_reply(self) -> None:
        """Receive one reply (simple) or one chunk (structured) and account it."""
        hv = self._header_view
        self._recv_into(hv[:p.SIMPLE_REPLY.size], "waiting for a reply")
        (magic,) = p.U32.unpack_from(hv)
        try:
            if magic == p.SIMPLE_REPLY_MAGIC:
                self._simple_reply()
            elif magic == p.STRUCTURED_REPLY_MAGIC:
                if not self._structured:
                    raise _ProtocolViolation("structured reply without negotiation")
                self._recv_into(hv[p.SIMPLE_REPLY.size:], "reading a reply header")
                self._structured_chunk()
            else:
                raise _ProtocolViolation(f"bad reply magic 0x{magic:08x}")
        except _ProtocolViolation as exc:
            raise self._fail(f"protocol error: {exc}") from None

    def _lookup(self, cookie: int) -> _Request:
        request = self._inflight.get(cookie)
        if request is None:
            raise _ProtocolViolation(f"reply for unknown request cookie 0x{cookie:x}")
        return request

    def _complete(self, request: _Request) -> None:
        del self._inflight[request.cookie]
        request.done = True
        if request.error == p.NBD_ESHUTDOWN:
            self._shutting_down = True

    def _simple_reply(self) -> None:
        _, error, cookie = p.SIMPLE_REPLY.unpack_from(self._header_view)
        request = self._lookup(cookie)
        if error:
            request.fail(error, "")
        elif request.cmd == p.CMD_READ:
            if self._structured:
                raise _ProtocolViolation("simple reply to a read after structured replies")
            self._receive_data(request, 0, request.length)
        elif request.cmd == p.CMD_BLOCK_STATUS:
            raise _ProtocolViolation("simple success reply to a block-status request")
        self._complete(request)

    def _receive_data(self, request: _Request, rel: int, length: int) -> None:
        if request.view is None:
            self._discard(length, "receiving read data")
        else:
            self._recv_into(request.view[rel:rel + length], "receiving read data")
        request.filled += length

    def _structured_chunk(self) -> None:
        _, flags, rtype, cookie, length = p.STRUCTURED_REPLY.unpack_from(self._header_view)
        request = self._lookup(cookie)
        if rtype == p.REPLY_TYPE_OFFSET_DATA:
            self._offset_data(request, length)
        elif rtype == p.REPLY_TYPE_OFFSET_HOLE:
            self._offset_hole(request, length)
        elif rtype == p.REPLY_TYPE_BLOCK_STATUS:
            self._block_status_chunk(request, length)
        elif rtype & p.REPLY_TYPE_ERROR_BIT:
            self._error_chunk(request, rtype, length)
        elif rtype == p.REPLY_TYPE_NONE:
            if length:
                raise _ProtocolViolation(f"NONE chunk with {length} bytes of payload")
            if not flags & p.REPLY_FLAG_DONE:
                raise _ProtocolViolation("NONE chunk without the DONE flag")
        else:
            raise _ProtocolViolation(f"unknown structured reply type {rtype}")
        if flags & p.REPLY_FLAG_DONE:
            if not request.error:
                if request.cmd == p.CMD_READ and request.filled != request.length:
                    raise _ProtocolViolation(
                        f"read reply ended after {request.filled} of {request.length} bytes")
                if request.cmd == p.CMD_BLOCK_STATUS:
                    for context_id in self._negotiated_contexts():
                        if context_id not in request.statuses:
                            raise _ProtocolViolation(
                                f"block-status reply without extents for "
                                f"{self._context_name(context_id)}")
            self._complete(request)

    def _content_range(self, request: _Request, offset: int, length: int,
                       what: str) -> int:
        if request.cmd != p.CMD_READ:
            raise _ProtocolViolation(f"{what} chunk in reply to a "
                                     f"{p.CMD_NAMES.get(request.cmd, request.cmd)} request")
        rel = offset - request.offset
        if rel < 0 or rel + length > request.length:
            raise _ProtocolViolation(
                f"{what} chunk [{offset}, +{length}) outside the request "
                f"[{request.offset}, +{request.length})")
        if request.filled + length > request.length:
            raise _ProtocolViolation(f"{what} chunks overlap: more bytes than asked")
        return rel

    def _offset_data(self, request: _Request, length: int) -> None:
        head = p.OFFSET_DATA_HEAD.size
        if length <= head:
            raise _ProtocolViolation(f"data chunk of {length} bytes")
        if length - head > request.length:
            raise _ProtocolViolation(
                f"data chunk of {length - head} bytes for a request of {request.length}")
        self._recv_into(self._scratch[:head], "reading a data chunk")
        (offset,) = p.OFFSET_DATA_HEAD.unpack_from(self._scratch)
        rel = self._content_range(request, offset, length - head, "data")
        self._receive_data(request, rel, length - head)

    def _offset_hole(self, request: _Request, length: int) -> None:
        if length != p.OFFSET_HOLE_PAYLOAD.size:
            raise _ProtocolViolation(f"hole chunk of {length} bytes")
        self._recv_into(self._scratch[:length], "reading a hole chunk")
        offset, size = p.OFFSET_HOLE_PAYLOAD.unpack_from(self._scratch)
        if not size:
            raise _ProtocolViolation("empty hole chunk")
        rel = self._content_range(request, offset, size, "hole")
        if request.view is not None:
            _zero_fill(request.view[rel:rel + size])
        request.filled += size

    def _block_status_chunk(self, request: _Request, length: int) -> None:
        if request.cmd != p.CMD_BLOCK_STATUS:
            raise _ProtocolViolation("block-status chunk in reply to another command")
        head, desc = p.BLOCK_STATUS_HEAD.size, p.BLOCK_DESCRIPTOR.size
        if length < head + desc or (length - head) % desc:
            raise _ProtocolViolation(f"block-status chunk of {length} bytes")
        if length > _MAX_STATUS_CHUNK:
            raise _ProtocolViolation(f"block-status chunk too large ({length} bytes)")
        payload = self._recv_bytes(length, "reading block status")
        (context_id,) = p.BLOCK_STATUS_HEAD.unpack_from(payload)
        if context_id not in self._negotiated_contexts():
            raise _ProtocolViolation(f"block status for unknown metadata context {context_id}")
        if context_id in request.statuses:
            raise _ProtocolViolation(f"two block-status chunks for one context "
                                     f"({self._context_name(context_id)})")
        extents: List[Tuple[int, int]] = []
        total = 0
        for ext_len, ext_flags in p.BLOCK_DESCRIPTOR.iter_unpack(memoryview(payload)[head:]):
            if not ext_len:
                raise _ProtocolViolation("block-status extent of length 0")
            total += ext_len
            extents.append((ext_len, ext_flags))
        if total > request.length:
            raise _ProtocolViolation(
                f"block status describes {total} bytes for a request of {request.length} "
                f"({self._context_name(context_id)})")
        request.statuses[context_id] = extents

    def _error_chunk(self, request: _Request, rtype: int, length: int) -> None:
        head = p.ERROR_HEAD.size
        if length < head or length > _MAX_ERROR_CHUNK:
            raise _ProtocolViolation(f"error chunk of {length} bytes")
        payload = self._recv_bytes(length, "reading an error chunk")
        error, msg_len = p.ERROR_HEAD.unpack_from(payload)
        tail = length - head - msg_len
        if tail < 0:
            raise _ProtocolViolation("error message longer than its chunk")
        if rtype == p.REPLY_TYPE_ERROR_OFFSET:
            if tail != p.ERROR_OFFSET_TAIL.size:
                raise _ProtocolViolation(f"error-offset chunk of {length} bytes")
            (offset,) = p.ERROR_OFFSET_TAIL.unpack_from(payload, head + msg_len)
            if not request.offset <= offset < request.offset + max(request.length, 1):
                raise _ProtocolViolation(f"error offset {offset} outside the request")
        if not error:
            raise _ProtocolViolation("error chunk with error value 0")
        request.errors_seen += 1
        if request.errors_seen > _MAX_ERROR_CHUNKS:
            raise _ProtocolViolation("endless error chunks for one request")
        message = bytes(payload[head:head + msg_len]).decode("utf-8", "replace")
        request.fail(error, _one_line(message))

    # -- turning replies into results ---------------------------------------

    def _command_error(self, request: _Request, what: str) -> ExportError:
        eno, name = p.nbd_errno(request.error)
        detail = f": {request.message}" if request.message else ""
        return _export_error(f"{self._peer}: {what} failed: {name} "
                             f"({os.strerror(eno)}){detail}", eno, name)

    def _wait_all(self, requests: Iterable[_Request], what: Callable[[_Request], str]) -> None:
        """Wait for every request, then raise the first error among them."""
        first: Optional[_Request] = None
        for request in requests:
            self._wait(request)
            if request.error and first is None:
                first = request
        if first is not None:
            raise self._command_error(first, what(first))

    def _drain(self, requests: Iterable[_Request]) -> None:
        """Collect replies nobody will look at, so the stream stays in sync."""
        requests = list(requests)
        for request in requests:
            request.view = None
        try:
            for request in requests:
                self._wait(request)
        except ExportError as exc:
            log.debug("NBD connection lost while draining abandoned requests: %s", exc)

    # -- reading ------------------------------------------------------------

    def _check_range(self, offset: int, length: int, what: str) -> None:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise UsageError(f"NBD {what} of [{offset}, {offset + length}) is outside the "
                             f"export (size {self._size})")

    def _start_read(self, offset: int, view: memoryview) -> _ReadOp:
        op = _ReadOp(offset, view)
        length = len(view)
        self._check_range(offset, length, "read")
        if not length:
            return op
        minimum = self._block_sizes.minimum
        start = offset - offset % minimum
        end = min(-(-(offset + length) // minimum) * minimum, self._size)
        target = view
        if start != offset or end != offset + length:
            op.bounce = bytearray(end - start)
            op.skip = offset - start
            target = memoryview(op.bounce)
        step = self.max_request
        pos = 0
        total = end - start
        while pos < total:
            piece = min(step, total - pos)
            op.requests.append(self._submit(p.CMD_READ, start + pos, piece,
                                            view=target[pos:pos + piece]))
            pos += piece
        return op

    def _finish_read(self, op: _ReadOp) -> None:
        self._wait_all(op.requests, lambda r: f"read of {r.length} bytes at offset {r.offset}")
        if op.bounce is not None:
            op.view[:] = memoryview(op.bounce)[op.skip:op.skip + len(op.view)]

    def read_into(self, offset: int, buffer: object) -> None:
        """Fill ``buffer`` (any writable buffer) with the export's bytes at ``offset``.

        Large buffers are split into requests of at most :attr:`max_request`
        bytes, all in flight at once; data lands in the buffer directly.
        """
        op = self._start_read(offset, _as_bytes_view(buffer, writable=True))
        try:
            self._finish_read(op)
        except BaseException:
            self._drain(op.requests)
            raise

    def read(self, offset: int, length: int) -> bytes:
        """Convenience: read ``length`` bytes at ``offset`` into new bytes."""
        buf = bytearray(length)
        self.read_into(offset, buf)
        return bytes(buf)

    def read_many(
        self,
        requests: Iterable[Tuple[int, object]],
        *,
        depth: Optional[int] = None,
    ) -> Iterator[Tuple[int, memoryview]]:
        """Pipelined reads into caller buffers; yields ``(offset, view)`` in order.

        ``requests`` yields ``(offset, buffer)``; up to ``depth`` of them
        (default :attr:`depth`) are in flight at once, replies are matched by
        cookie whatever order the server sends them in, and each is yielded,
        filled, in the order asked.  ``view`` is a byte view of the caller's
        buffer.

        Buffer reuse: the next request is pulled from ``requests`` only when
        the caller asks for the next result, so a ring of ``depth`` buffers
        is enough (the buffer just yielded may come back as the next
        request's).  While the caller works on one result, ``depth - 1``
        requests are in flight.

        A server-reported error raises ExportError when its request's turn
        comes; the requests behind it are then collected and dropped (into
        scratch space, not the caller's buffers), also when the caller stops
        iterating early.
        """
        depth = self.depth if depth is None else depth
        if depth < 1:
            raise UsageError("NBD pipeline depth must be at least 1")
        source = iter(requests)
        pending: Deque[_ReadOp] = collections.deque()
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) < depth:
                    try:
                        offset, buffer = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    pending.append(self._start_read(offset, _as_bytes_view(buffer, True)))
                if not pending:
                    return
                op = pending[0]
                self._finish_read(op)
                pending.popleft()
                yield op.offset, op.view
        finally:
            if pending:
                self._drain([r for op in pending for r in op.requests])

    def read_chunks(
        self,
        ranges: Iterable[Tuple[int, int]],
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        depth: Optional[int] = None,
    ) -> Iterator[Tuple[int, memoryview]]:
        """Read ``(offset, length)`` ranges in pipelined chunks of ``chunk_size``.

        The backup's hash loop: each range is cut into pieces of
        ``chunk_size`` bytes starting at the range's offset (so pieces of a
        block-aligned range are block-aligned when ``chunk_size`` is a
        multiple of the block size), read into a ring of ``depth`` buffers
        owned by this call, and yielded in order as ``(offset, view)``.
        A view is valid only until the next item is requested.
        """
        if chunk_size < 1:
            raise UsageError("chunk size must be positive")
        depth = self.depth if depth is None else depth
        ring = [memoryview(bytearray(chunk_size)) for _ in range(max(depth, 1))]

        def pieces() -> Iterator[Tuple[int, memoryview]]:
            index = 0
            for offset, length in ranges:
                end = offset + length
                while offset < end:
                    step = min(chunk_size, end - offset)
                    yield offset, ring[index][:step]
                    index = (index + 1) % len(ring)
                    offset += step

        return self.read_many(pieces(), depth=depth)

    # -- block status -------------------------------------------------------

    def _status_walk(self, context_id: int, offset: int,
                     end: int) -> Iterator[Tuple[int, int, int]]:
        """``(offset, length, flags)`` of one context's descriptors, clipped to the range.

        Requests stay below 2 GiB and are aligned to the minimum block size;
        each next request starts where *this context's* chunk stopped (with
        two contexts negotiated the server answers both, and the chunks may
        cover different lengths, so the other context's chunk is ignored).
        """
        minimum = self._block_sizes.minimum
        limit = _MAX_STATUS_REQUEST - _MAX_STATUS_REQUEST % minimum
        pos = offset - offset % minimum
        while pos < end:
            query_end = min(-(-end // minimum) * minimum, self._size, pos + limit)
            request = self._submit(p.CMD_BLOCK_STATUS, pos, query_end - pos)
            self._wait_all([request], lambda r: f"block status of {r.length} bytes "
                                                f"at offset {r.offset}")
            for ext_len, ext_flags in request.statuses[context_id]:
                ext_start, ext_end = max(pos, offset), min(pos + ext_len, end)
                pos += ext_len
                if ext_start < ext_end:
                    yield ext_start, ext_end - ext_start, ext_flags

    def block_status(self, offset: int = 0, length: Optional[int] = None, *,
                     merge: bool = True) -> Iterator[Extent]:
        """Extents of ``[offset, offset + length)`` (default: to the end) in order.

        Walks the range in requests below 2 GiB, continuing where each reply
        stopped, so any disk size works.  Without ``base:allocation`` the
        whole range is one ``"data"`` extent (everything must be read).
        With ``merge``, neighbours with the same flags become one extent.
        """
        if length is None:
            length = self._size - offset
        self._check_range(offset, length, "block status")
        end = offset + length
        if not length:
            return
        if self._context_id is None:
            yield Extent(offset, length, 0)
            return
        current: Optional[Extent] = None
        for ext_start, ext_len, ext_flags in self._status_walk(self._context_id, offset, end):
            extent = Extent(ext_start, ext_len, ext_flags)
            if current is None:
                current = extent
            elif merge and current.flags == ext_flags:
                current = Extent(current.offset, current.length + ext_len, ext_flags)
            else:
                yield current
                current = extent
        if current is not None:
            yield current

    def data_ranges(self, block_size: int, offset: int = 0,
                    length: Optional[int] = None) -> Iterator[Tuple[int, int]]:
        """``(offset, length)`` ranges that must be read, widened to whole blocks.

        Every extent that does not read as zeroes is widened to multiples of
        ``block_size`` (counted from 0), neighbours are joined, and the result
        is clipped to the range asked and the export.  Blocks outside these
        ranges read as all zeroes.
        """
        if block_size < 1:
            raise UsageError("block size must be positive")
        if length is None:
            length = self._size - offset
        spans = ((e.offset, e.length) for e in self.block_status(offset, length)
                 if not e.reads_as_zero)
        yield from whole_block_runs(spans, block_size, offset, offset + length)

    def dirty_ranges(self, block_size: int, offset: int = 0,
                     length: Optional[int] = None) -> Iterator[Tuple[int, int]]:
        """``(offset, length)`` ranges the dirty bitmap marks, widened to whole blocks.

        The incremental backup's read list: every run with ``NBD_STATE_DIRTY``
        in the ``qemu:dirty-bitmap:<dirty_bitmap>`` context is widened to
        multiples of ``block_size`` (counted from 0), neighbours are joined,
        and the result is clipped to the range asked and the export (the
        same shape as :meth:`data_ranges`).  Blocks outside these ranges were
        not written since the bitmap began.  Raises UsageError at once (not
        on the first ``next``) when the context was not negotiated (see
        :attr:`can_dirty_status`) or the range is bad, so the mistake shows
        where the call is made.
        """
        if block_size < 1:
            raise UsageError("block size must be positive")
        if self._dirty_context_id is None:
            asked = ("no dirty bitmap was asked for" if self.dirty_bitmap is None else
                     f"the server did not offer {p.dirty_bitmap_context(self.dirty_bitmap)}")
            raise UsageError(f"{self._peer}: no dirty ranges: {asked}")
        if length is None:
            length = self._size - offset
        self._check_range(offset, length, "dirty status")
        end = offset + length
        spans = ((start, run) for start, run, flags
                 in self._status_walk(self._dirty_context_id, offset, end)
                 if flags & p.STATE_DIRTY)
        return whole_block_runs(spans, block_size, offset, end)

    # -- writing ------------------------------------------------------------

    def _check_writable(self, offset: int, length: int, what: str) -> None:
        self._check_range(offset, length, what)
        if self.read_only:
            raise _export_error(f"{self._peer}: export is read-only, cannot {what}",
                                *p.nbd_errno(p.NBD_EPERM))
        minimum = self._block_sizes.minimum
        if offset % minimum or ((offset + length) % minimum and offset + length != self._size):
            raise UsageError(f"NBD {what} of [{offset}, {offset + length}) is not aligned to "
                             f"the export's minimum block size {minimum}")

    def _start_write(self, offset: int, data: memoryview, flags: int) -> List[_Request]:
        self._check_writable(offset, len(data), "write")
        step = self.max_request
        sent: List[_Request] = []
        for pos in range(0, len(data), step):
            piece = data[pos:pos + step]
            sent.append(self._submit(p.CMD_WRITE, offset + pos, len(piece), flags,
                                     payload=piece))
        return sent

    def _fua_flag(self, fua: bool) -> int:
        return p.CMD_FLAG_FUA if fua and self.can_fua else 0

    def write(self, offset: int, data: object, *, fua: bool = False) -> None:
        """Write ``data`` (any buffer) at ``offset``; split above :attr:`max_request`."""
        self.write_many([(offset, data)], fua=fua)

    def write_many(self, requests: Iterable[Tuple[int, object]], *,
                   depth: Optional[int] = None, fua: bool = False) -> None:
        """Pipelined writes of ``(offset, buffer)`` items, up to ``depth`` in flight.

        A buffer may be reused as soon as the next item is pulled: its bytes
        are in the socket by then.  Raises the first error after collecting
        every reply.
        """
        depth = self.depth if depth is None else depth
        if depth < 1:
            raise UsageError("NBD pipeline depth must be at least 1")
        flags = self._fua_flag(fua)
        window: Deque[_Request] = collections.deque()
        try:
            for offset, data in requests:
                for request in self._start_write(offset, _as_bytes_view(data, False), flags):
                    window.append(request)
                    while len(window) >= depth:
                        self._wait_head(window, "write")
            while window:
                self._wait_head(window, "write")
        finally:
            if window:
                self._drain(list(window))

    def _wait_head(self, window: Deque[_Request], what: str) -> None:
        request = window[0]
        self._wait(request)
        window.popleft()
        if request.error:
            raise self._command_error(
                request, f"{what} of {request.length} bytes at offset {request.offset}")

    def _zero_requests(self, offset: int, length: int, flags: int) -> None:
        minimum = self._block_sizes.minimum
        step = self._block_sizes.maximum - self._block_sizes.maximum % minimum
        step = min(step, _MAX_STATUS_REQUEST - _MAX_STATUS_REQUEST % minimum)
        window: Deque[_Request] = collections.deque()
        try:
            for pos in range(offset, offset + length, step):
                piece = min(step, offset + length - pos)
                window.append(self._submit(p.CMD_WRITE_ZEROES, pos, piece, flags))
                while len(window) >= self.depth:
                    self._wait_head(window, "write-zeroes")
            while window:
                self._wait_head(window, "write-zeroes")
        finally:
            if window:
                self._drain(list(window))

    def try_fast_zero(self, offset: int, length: int) -> bool:
        """Zero a range only if the server can do it cheaply.

        Sends WRITE_ZEROES with ``NBD_CMD_FLAG_FAST_ZERO`` when the server
        offers it.  Returns False, having changed nothing the caller may
        rely on, when the flag is not offered or the server answers ENOTSUP
        (zeroing would be as slow as writing): the caller then writes or
        skips, as suits it.
        """
        self._check_writable(offset, length, "write zeroes")
        if not length or not self.can_fast_zero:
            return not length
        try:
            self._zero_requests(offset, length, p.CMD_FLAG_FAST_ZERO)
        except ExportError as exc:
            if getattr(exc, "errno_name", None) == "ENOTSUP" and self._broken is None:
                return False
            raise
        return True

    def write_zeroes(self, offset: int, length: int, *, fua: bool = False,
                     no_hole: bool = False, fast: bool = False) -> None:
        """Make ``[offset, offset + length)`` read as zeroes.

        ``fast``: try ``NBD_CMD_FLAG_FAST_ZERO`` first (only when offered) and
        fall back to a plain WRITE_ZEROES.  Without WRITE_ZEROES support the
        zeroes are written with WRITE.  ``no_hole`` asks the server to keep
        the range allocated.
        """
        self._check_writable(offset, length, "write zeroes")
        if not length:
            return
        flags = self._fua_flag(fua)
        if fast and not fua and not no_hole and self.try_fast_zero(offset, length):
            return
        if self.can_write_zeroes:
            self._zero_requests(offset, length, flags | (p.CMD_FLAG_NO_HOLE if no_hole else 0))
            return
        step = min(self.max_request, len(_ZEROS))

        def zero_pieces() -> Iterator[Tuple[int, memoryview]]:
            for pos in range(offset, offset + length, step):
                yield pos, _ZEROS[:min(step, offset + length - pos)]

        self.write_many(zero_pieces(), fua=fua)

    def flush(self) -> None:
        """Ask the server to make every completed write durable (no-op if not offered)."""
        if not self.can_flush:
            self._usable_socket()
            log.debug("%s offers no flush; nothing to do", self._peer)
            return
        request = self._submit(p.CMD_FLUSH, 0, 0)
        self._wait_all([request], lambda r: "flush")

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
                    header = p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_DISC,
                                            self._next_cookie, 0, 0)
                    self._sock.sendall(header)
                    self._sock.shutdown(socket.SHUT_WR)
            except (OSError, socket.timeout) as exc:
                log.debug("%s: disconnect failed: %s", self._peer, exc)
        self._close_socket()

    def __enter__(self) -> "NbdClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        sock = getattr(self, "_sock", None)
        if sock is not None:
            sock.close()

    def __repr__(self) -> str:
        return (f"<NbdClient {self._peer} export={self.export_name!r} size={self._size} "
                f"{'closed' if self._sock is None else 'open'}>")


def connect(target: "str | NbdAddress", export_name: Optional[str] = None,
            **options: object) -> NbdClient:
    """Connect to a URI, an :class:`NbdAddress`, or a unix socket path.

    ``export_name`` overrides the URI's name (a plain socket path has none).
    """
    if isinstance(target, NbdAddress):
        address = target
    elif "://" in target:
        address = parse_nbd_uri(target)
    else:
        address = NbdAddress(export_name="", socket_path=target)
    if export_name is not None:
        address = NbdAddress(export_name, address.socket_path, address.host, address.port)
    return NbdClient.open(address, **options)

