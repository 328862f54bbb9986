"""The NBD handshake: from the server's greeting to the transmission phase.

Fixed newstyle only (the oldstyle handshake is refused), in this order:
``NBD_OPT_STARTTLS`` when TLS is asked for (and then everything after it runs
inside TLS), ``NBD_OPT_STRUCTURED_REPLY`` (needed for holes and block
status), ``NBD_OPT_SET_META_CONTEXT`` with every context we want in one
option (``base:allocation`` and, when asked, QEMU's
``qemu:dirty-bitmap:<name>``: a second SET would replace the first), and
``NBD_OPT_GO`` with block-size negotiation, falling back to
``NBD_OPT_EXPORT_NAME`` for a server that does not know GO.

Every reply is bounded (size and count) and the whole handshake by one
deadline, so a hostile server can neither make us allocate much nor keep us
here.  A server that wants TLS we were not given, or refuses the TLS we
insist on, is one clear line: we never fall back to plain text.
"""
from __future__ import annotations

import logging
import ssl

from ..errors import ExportError, UsageError
from . import nbdproto as p
from .nbdsocket import export_error, one_line
from .nbdtransport import NbdTransport

__all__ = ["NbdHandshake"]

log = logging.getLogger(__name__)

#: Longest option reply we accept during the handshake.  Every legitimate
#: reply (export info, a context name, an error message) is a few hundred
#: bytes; the spec caps strings at 4 KiB.
_MAX_OPTION_REPLY = 64 * 1024
#: Most replies we accept to one option before calling the server broken.
_MAX_OPTION_REPLIES = 256


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


class NbdHandshake(NbdTransport):
    """Option negotiation; fills in the facts :class:`NbdTransport` checks replies with."""

    export_name = ""
    description = ""
    _no_zeroes = False
    #: TLS began and the server has not answered through it yet.
    _tls_unconfirmed = False

    def _handshake(self, export_name: str, want_structured: bool, want_status: bool,
                   tls: tuple[ssl.SSLContext, str] | None) -> None:
        """Negotiate within one timeout; ``tls`` is (context, server name) or None."""
        name = export_name.encode("utf-8")
        if len(name) > p.MAX_STRING:
            raise UsageError("NBD export name longer than 4096 bytes")
        self._start_deadline()
        try:
            self._negotiate(name, want_structured, want_status, tls)
        finally:
            self._end_deadline()

    def _negotiate(self, name: bytes, want_structured: bool, want_status: bool,
                   tls: tuple[ssl.SSLContext, str] | None) -> None:
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
        if tls is not None:
            if not fixed:
                raise self._fail("server cannot negotiate TLS (no fixed newstyle handshake); "
                                 "refusing to continue in plain text")
            self._starttls(*tls)
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

    def _starttls(self, context: ssl.SSLContext, hostname: str) -> None:
        self._send_option(p.OPT_STARTTLS, b"")
        rtype, payload = self._option_reply(p.OPT_STARTTLS)
        if rtype & p.REP_FLAG_ERROR:
            reason = self._option_error(rtype, payload)
            raise self._fail(f"server refused TLS ({reason}); refusing to continue in "
                             f"plain text")
        if rtype != p.REP_ACK or payload:
            raise self._fail(f"unexpected reply type {rtype} to STARTTLS")
        self._start_tls(context, hostname)
        self._tls_unconfirmed = True

    def _send_option(self, option: int, data: bytes) -> None:
        self._send(p.OPTION_HEADER.pack(p.IHAVEOPT, option, len(data)), data,
                   doing=f"sending option {option}")

    def _option_reply(self, option: int) -> tuple[int, bytearray]:
        try:
            head = self._recv_bytes(p.OPTION_REPLY.size, f"reading the reply to option {option}")
        except ExportError:
            if self._tls_unconfirmed:
                # TLS 1.3: the server checks our certificate after the client's
                # handshake ends, and a refusal shows only as a closed stream.
                raise export_error(
                    f"{self._peer}: the server ended the TLS session before answering: it "
                    f"did not accept our client certificate (is client-cert.pem signed by "
                    f"the CA the server trusts?)") from None
            raise
        self._tls_unconfirmed = False
        magic, echoed, rtype, length = p.OPTION_REPLY.unpack(head)
        if magic != p.OPTION_REPLY_MAGIC:
            raise self._fail(f"bad option reply magic 0x{magic:x}")
        if echoed != option:
            raise self._fail(f"reply to option {echoed} while option {option} was asked")
        if length > _MAX_OPTION_REPLY:
            raise self._fail(f"option reply too large ({length} bytes) to option {option}")
        data = self._recv_bytes(length, f"reading the reply to option {option}")
        return rtype, data

    @staticmethod
    def _option_error(rtype: int, data: bytes | bytearray) -> str:
        what = p.REP_ERROR_NAMES.get(rtype, f"error 0x{rtype:x}")
        text = one_line(bytes(data).decode("utf-8", "replace")) if data else ""
        return f"{what}: {text}" if text else what

    def _tls_required(self) -> ExportError:
        return self._fail("server requires TLS: connect with a TLS certificate directory")

    def _simple_option(self, option: int, data: bytes) -> bool:
        """Send an option answered by ACK or an error; True if acknowledged."""
        self._send_option(option, data)
        rtype, payload = self._option_reply(option)
        if rtype == p.REP_ACK:
            if payload:
                raise self._fail(f"ACK to option {option} carries {len(payload)} bytes")
            return True
        if rtype & p.REP_FLAG_ERROR:
            log.debug("NBD option %d refused: %s", option, self._option_error(rtype, payload))
            if rtype == p.REP_ERR_TLS_REQD:
                raise self._tls_required()
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
                          self._option_error(rtype, payload))
                self._context_id = self._dirty_context_id = None
                return
            raise self._fail(f"unexpected reply type {rtype} to SET_META_CONTEXT")
        raise self._fail("too many replies to SET_META_CONTEXT")

    def _go(self, name: bytes) -> bool:
        """NBD_OPT_GO; False if the server does not know the option."""
        data = p.U32.pack(len(name)) + name + p.U16.pack(1) + p.U16.pack(p.INFO_BLOCK_SIZE)
        self._send_option(p.OPT_GO, data)
        have_export = False
        sizes: p.BlockSizes | None = None
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
                    self.description = one_line(bytes(payload[2:]).decode("utf-8", "replace"))
                continue  # other information (e.g. NAME) is not needed
            if rtype == p.REP_ACK:
                if payload:
                    raise self._fail("ACK to NBD_OPT_GO carries data")
                if not have_export:
                    raise self._fail("server entered transmission without export information")
                break
            if rtype == p.REP_ERR_UNSUP:
                return False
            if rtype == p.REP_ERR_TLS_REQD:
                raise self._tls_required()
            if rtype & p.REP_FLAG_ERROR:
                reason = self._option_error(rtype, payload)
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

    def _checked_block_sizes(self, minimum: int, preferred: int,
                             maximum: int) -> p.BlockSizes:
        # the spec caps the minimum at 64 KiB, but QEMU announces a compressed qcow2's
        # cluster (up to 2 MiB) through its compress filter, and we write whole ones
        if not _is_power_of_two(minimum) or minimum > 2 * 1024 * 1024:
            raise self._fail(f"invalid minimum block size {minimum}")
        if not _is_power_of_two(preferred) or preferred < minimum:
            raise self._fail(f"invalid preferred block size {preferred}")
        if maximum < minimum:
            raise self._fail(f"invalid maximum block size {maximum}")
        return p.BlockSizes(minimum, preferred, maximum - maximum % minimum)
