"""Requests in flight and the replies to them: where the server's words are checked.

:class:`NbdTransport` sends commands and accounts every reply (simple, or
structured chunk by chunk) to the request it names.  It trusts nothing: a
length is compared with what was asked before anything is allocated or
received, every reply must name a request in flight, and the content chunks
of one read must tile the request exactly -- each chunk inside the request,
none overlapping another, together covering every byte.  Without the last
rule a server could answer one range twice and leave another range holding
whatever the caller's buffer held before: stale bytes that would then be
hashed and stored as the disk's contents, and that ``verify`` could never
catch.

After a protocol error the connection is closed (:class:`NbdSocket`); after
an error the server *reported* for one command (e.g. EIO) it stays usable.
"""
from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterable
from typing import Callable

from ..errors import ExportError, UsageError
from . import nbdproto as p
from .nbdrequest import Request, zero_fill
from .nbdsocket import NbdSocket, ProtocolViolation, export_error, one_line

__all__ = ["DEFAULT_DEPTH", "MAX_LENGTH_FIELD", "MAX_PAYLOAD", "NbdTransport"]

log = logging.getLogger(__name__)

#: Largest structured error chunk: error, message length, message, offset.
_MAX_ERROR_CHUNK = p.ERROR_HEAD.size + p.MAX_STRING + p.ERROR_OFFSET_TAIL.size
#: Most error chunks we accept for one request (each content chunk may have
#: one; more means a server that would otherwise keep us reading forever).
_MAX_ERROR_CHUNKS = 4096
#: Largest block-status chunk we take in one go (QEMU sends at most 1 MiB).
_MAX_STATUS_CHUNK = 16 * 1024 * 1024
#: Never issue READ/WRITE payloads larger than this, whatever the server
#: offers: it bounds the bounce buffers and a lost request's cost.
MAX_PAYLOAD = 32 * 1024 * 1024
#: Length of one BLOCK_STATUS or WRITE_ZEROES request: servers keep the 32-bit
#: length field in signed integers, so stay well below 2 GiB (then align to
#: the block size).
MAX_LENGTH_FIELD = (1 << 31) - (1 << 16)

#: Requests kept in flight by the pipelined APIs unless told otherwise.
DEFAULT_DEPTH = 4

class NbdTransport(NbdSocket):
    """Commands out, replies in; the negotiated facts replies are checked against."""

    def __init__(self, sock: socket.socket, peer: str, timeout: float | None) -> None:
        super().__init__(sock, peer, timeout)
        #: Requests the pipelined calls keep in flight unless told otherwise.
        self.depth = DEFAULT_DEPTH
        self._shutting_down = False
        self._inflight: dict[int, Request] = {}
        self._next_cookie = 1
        self._header = bytearray(p.STRUCTURED_REPLY.size)
        self._header_view = memoryview(self._header)
        # What the handshake settled (see nbdhandshake.Negotiated).
        self._size = 0
        self._flags = 0
        self._block_sizes = p.BlockSizes(p.DEFAULT_MIN_BLOCK, p.DEFAULT_PREFERRED_BLOCK,
                                         p.DEFAULT_MAX_BLOCK)
        self._structured = False
        self._context_id: int | None = None
        self._dirty_context_id: int | None = None
        self.dirty_bitmap: str | None = None

    # -- what the export offers (settled by the handshake) -----------------

    @property
    def size(self) -> int:
        """Export size in bytes."""
        return self._size

    @property
    def block_sizes(self) -> p.BlockSizes:
        """Minimum, preferred and maximum block size we keep to."""
        return self._block_sizes

    @property
    def max_request(self) -> int:
        """Largest READ/WRITE payload sent in one request (larger calls are split)."""
        minimum, _, maximum = self._block_sizes
        limit = min(maximum, MAX_PAYLOAD)
        return max(minimum, limit - limit % minimum)

    @property
    def structured_replies(self) -> bool:
        return self._structured

    @property
    def can_multi_conn(self) -> bool:
        """True when several connections to this export are coherent."""
        return bool(self._flags & p.TF_CAN_MULTI_CONN)

    def _check_range(self, offset: int, length: int, what: str) -> None:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise UsageError(f"NBD {what} of [{offset}, {offset + length}) is outside the "
                             f"export (size {self._size})")

    # -- sending ------------------------------------------------------------

    def _submit(self, cmd: int, offset: int, length: int, flags: int = 0,
                view: memoryview | None = None,
                payload: memoryview | None = None) -> Request:
        self._usable_socket()
        if self._shutting_down:
            raise export_error(f"{self._peer}: server is shutting down (ESHUTDOWN)",
                               *p.nbd_errno(p.NBD_ESHUTDOWN))
        cookie = self._next_cookie
        self._next_cookie = (cookie + 1) & 0xFFFFFFFFFFFFFFFF or 1
        request = Request(cookie, cmd, offset, length, view)
        header = p.REQUEST.pack(p.REQUEST_MAGIC, flags, cmd, cookie, offset, length)
        self._inflight[cookie] = request
        doing = f"sending a {p.CMD_NAMES.get(cmd, cmd)} request"
        if payload is None:
            self._send(header, doing=doing)
        else:
            self._send(header, payload, doing=doing)
        return request

    # -- waiting ------------------------------------------------------------

    def _wait(self, request: Request) -> None:
        """Receive until ``request`` is answered, within one timeout from now."""
        if request.done:
            return
        self._start_deadline()
        try:
            while not request.done:
                self._receive_reply()
        finally:
            self._end_deadline()

    def _command_error(self, request: Request, what: str) -> ExportError:
        eno, name = p.nbd_errno(request.error)
        detail = f": {request.message}" if request.message else ""
        return export_error(f"{self._peer}: {what} failed: {name} "
                            f"({os.strerror(eno)}){detail}", eno, name)

    def _wait_all(self, requests: Iterable[Request], what: Callable[[Request], str]) -> None:
        """Wait for every request, then raise the first error among them."""
        first: Request | None = None
        for request in requests:
            self._wait(request)
            if request.error and first is None:
                first = request
        if first is not None:
            raise self._command_error(first, what(first))

    def _drain(self, requests: Iterable[Request]) -> None:
        """Collect replies nobody will look at, so the stream stays in sync."""
        requests = list(requests)
        for request in requests:
            request.view = None
        try:
            for request in requests:
                self._wait(request)
        except ExportError as exc:
            log.debug("NBD connection lost while draining abandoned requests: %s", exc)

    # -- replies ------------------------------------------------------------

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
                    raise ProtocolViolation("structured reply without negotiation")
                self._recv_into(hv[p.SIMPLE_REPLY.size:], "reading a reply header")
                self._structured_chunk()
            else:
                raise ProtocolViolation(f"bad reply magic 0x{magic:08x}")
        except ProtocolViolation as exc:
            raise self._fail(f"protocol error: {exc}") from None

    def _lookup(self, cookie: int) -> Request:
        request = self._inflight.get(cookie)
        if request is None:
            raise ProtocolViolation(f"reply for unknown request cookie 0x{cookie:x}")
        return request

    def _complete(self, request: Request) -> None:
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
                raise ProtocolViolation("simple reply to a read after structured replies")
            self._receive_data(request, 0, request.length)
            request.filled = request.length
        elif request.cmd == p.CMD_BLOCK_STATUS:
            raise ProtocolViolation("simple success reply to a block-status request")
        self._complete(request)

    def _receive_data(self, request: Request, rel: int, length: int) -> None:
        if request.view is None:
            self._discard(length, "receiving read data")
        else:
            self._recv_into(request.view[rel:rel + length], "receiving read data")

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
                raise ProtocolViolation(f"NONE chunk with {length} bytes of payload")
            if not flags & p.REPLY_FLAG_DONE:
                raise ProtocolViolation("NONE chunk without the DONE flag")
        else:
            raise ProtocolViolation(f"unknown structured reply type {rtype}")
        if flags & p.REPLY_FLAG_DONE:
            if not request.error:
                if request.cmd == p.CMD_READ and request.filled != request.length:
                    raise ProtocolViolation(
                        f"read reply ended after {request.filled} of {request.length} bytes")
                if request.cmd == p.CMD_BLOCK_STATUS:
                    for context_id in self._negotiated_contexts():
                        if context_id not in request.statuses:
                            raise ProtocolViolation(
                                f"block-status reply without extents for "
                                f"{self._context_name(context_id)}")
            self._complete(request)

    def _content_range(self, request: Request, offset: int, length: int,
                       what: str) -> int:
        """Check a data or hole chunk against its request; claim it; its relative offset."""
        if request.cmd != p.CMD_READ:
            raise ProtocolViolation(f"{what} chunk in reply to a "
                                    f"{p.CMD_NAMES.get(request.cmd, request.cmd)} request")
        rel = offset - request.offset
        if rel < 0 or rel + length > request.length:
            raise ProtocolViolation(
                f"{what} chunk [{offset}, +{length}) outside the request "
                f"[{request.offset}, +{request.length})")
        request.claim(rel, rel + length, what)
        return rel

    def _offset_data(self, request: Request, length: int) -> None:
        head = p.OFFSET_DATA_HEAD.size
        if length <= head:
            raise ProtocolViolation(f"data chunk of {length} bytes")
        if length - head > request.length:
            raise ProtocolViolation(
                f"data chunk of {length - head} bytes for a request of {request.length}")
        self._recv_into(self._scratch[:head], "reading a data chunk")
        (offset,) = p.OFFSET_DATA_HEAD.unpack_from(self._scratch)
        rel = self._content_range(request, offset, length - head, "data")
        self._receive_data(request, rel, length - head)

    def _offset_hole(self, request: Request, length: int) -> None:
        if length != p.OFFSET_HOLE_PAYLOAD.size:
            raise ProtocolViolation(f"hole chunk of {length} bytes")
        self._recv_into(self._scratch[:length], "reading a hole chunk")
        offset, size = p.OFFSET_HOLE_PAYLOAD.unpack_from(self._scratch)
        if not size:
            raise ProtocolViolation("empty hole chunk")
        rel = self._content_range(request, offset, size, "hole")
        if request.view is not None:
            zero_fill(request.view[rel:rel + size])

    def _block_status_chunk(self, request: Request, length: int) -> None:
        if request.cmd != p.CMD_BLOCK_STATUS:
            raise ProtocolViolation("block-status chunk in reply to another command")
        head, desc = p.BLOCK_STATUS_HEAD.size, p.BLOCK_DESCRIPTOR.size
        if length < head + desc or (length - head) % desc:
            raise ProtocolViolation(f"block-status chunk of {length} bytes")
        if length > _MAX_STATUS_CHUNK:
            raise ProtocolViolation(f"block-status chunk too large ({length} bytes)")
        payload = self._recv_bytes(length, "reading block status")
        (context_id,) = p.BLOCK_STATUS_HEAD.unpack_from(payload)
        if context_id not in self._negotiated_contexts():
            raise ProtocolViolation(f"block status for unknown metadata context {context_id}")
        if context_id in request.statuses:
            raise ProtocolViolation(f"two block-status chunks for one context "
                                    f"({self._context_name(context_id)})")
        extents: list[tuple[int, int]] = []
        total = 0
        for ext_len, ext_flags in p.BLOCK_DESCRIPTOR.iter_unpack(memoryview(payload)[head:]):
            if not ext_len:
                raise ProtocolViolation("block-status extent of length 0")
            total += ext_len
            extents.append((ext_len, ext_flags))
        if total > request.length:
            raise ProtocolViolation(
                f"block status describes {total} bytes for a request of {request.length} "
                f"({self._context_name(context_id)})")
        request.statuses[context_id] = extents

    def _error_chunk(self, request: Request, rtype: int, length: int) -> None:
        head = p.ERROR_HEAD.size
        if length < head or length > _MAX_ERROR_CHUNK:
            raise ProtocolViolation(f"error chunk of {length} bytes")
        payload = self._recv_bytes(length, "reading an error chunk")
        error, msg_len = p.ERROR_HEAD.unpack_from(payload)
        tail = length - head - msg_len
        if tail < 0:
            raise ProtocolViolation("error message longer than its chunk")
        if rtype == p.REPLY_TYPE_ERROR_OFFSET:
            if tail != p.ERROR_OFFSET_TAIL.size:
                raise ProtocolViolation(f"error-offset chunk of {length} bytes")
            (offset,) = p.ERROR_OFFSET_TAIL.unpack_from(payload, head + msg_len)
            if not request.offset <= offset < request.offset + max(request.length, 1):
                raise ProtocolViolation(f"error offset {offset} outside the request")
        if not error:
            raise ProtocolViolation("error chunk with error value 0")
        request.errors_seen += 1
        if request.errors_seen > _MAX_ERROR_CHUNKS:
            raise ProtocolViolation("endless error chunks for one request")
        message = bytes(payload[head:head + msg_len]).decode("utf-8", "replace")
        request.fail(error, one_line(message))

    # -- metadata contexts --------------------------------------------------

    def _context_name(self, context_id: int) -> str:
        if context_id == self._context_id:
            return p.META_BASE_ALLOCATION
        if context_id == self._dirty_context_id and self.dirty_bitmap is not None:
            return p.dirty_bitmap_context(self.dirty_bitmap)
        return f"metadata context {context_id}"

    def _negotiated_contexts(self) -> list[int]:
        return [c for c in (self._context_id, self._dirty_context_id) if c is not None]
