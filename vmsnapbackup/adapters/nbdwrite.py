"""Writing an export: data, zeroes and flush, pipelined.

Restore and the backup's volume writes go through here.  A refusal that can
be known before sending (a read-only export, an unaligned range) is raised
before any byte leaves, so a failed call never leaves half a request on the
wire; a server-reported error (``ENOSPC`` above all, which the pool turns into
"pool is full") carries its errno.
"""
from __future__ import annotations

import collections
import logging
from collections.abc import Iterable, Iterator

from ..errors import ExportError, UsageError
from . import nbdproto as p
from .nbdread import as_bytes_view
from .nbdrequest import Request
from .nbdsocket import export_error
from .nbdtransport import MAX_LENGTH_FIELD, NbdTransport

__all__ = ["NbdWriter"]

log = logging.getLogger(__name__)

_ZEROS = memoryview(bytes(1024 * 1024))


class NbdWriter(NbdTransport):
    """WRITE, WRITE_ZEROES and FLUSH."""

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
    def can_write_zeroes(self) -> bool:
        return bool(self._flags & p.TF_SEND_WRITE_ZEROES)

    @property
    def can_fast_zero(self) -> bool:
        return bool(self._flags & p.TF_SEND_FAST_ZERO) and self.can_write_zeroes

    def _check_writable(self, offset: int, length: int, what: str) -> None:
        self._check_range(offset, length, what)
        if self.read_only:
            raise export_error(f"{self._peer}: export is read-only, cannot {what}",
                               *p.nbd_errno(p.NBD_EPERM))
        minimum = self._block_sizes.minimum
        if offset % minimum or ((offset + length) % minimum and offset + length != self._size):
            raise UsageError(f"NBD {what} of [{offset}, {offset + length}) is not aligned to "
                             f"the export's minimum block size {minimum}")

    def _start_write(self, offset: int, data: memoryview, flags: int) -> list[Request]:
        self._check_writable(offset, len(data), "write")
        step = self.max_request
        sent: list[Request] = []
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

    def write_many(self, requests: Iterable[tuple[int, object]], *,
                   depth: int | None = None, fua: bool = False) -> None:
        """Pipelined writes of ``(offset, buffer)`` items, up to ``depth`` in flight.

        A buffer may be reused as soon as the next item is pulled: its bytes
        are in the socket by then.  Raises the first error after collecting
        every reply.
        """
        depth = self.depth if depth is None else depth
        if depth < 1:
            raise UsageError("NBD pipeline depth must be at least 1")
        flags = self._fua_flag(fua)
        window: collections.deque[Request] = collections.deque()
        try:
            for offset, data in requests:
                for request in self._start_write(offset, as_bytes_view(data, False), flags):
                    window.append(request)
                    while len(window) >= depth:
                        self._wait_head(window, "write")
            while window:
                self._wait_head(window, "write")
        finally:
            if window:
                self._drain(list(window))

    def _wait_head(self, window: collections.deque[Request], what: str) -> None:
        request = window[0]
        self._wait(request)
        window.popleft()
        if request.error:
            raise self._command_error(
                request, f"{what} of {request.length} bytes at offset {request.offset}")

    def _zero_requests(self, offset: int, length: int, flags: int) -> None:
        minimum = self._block_sizes.minimum
        step = self._block_sizes.maximum - self._block_sizes.maximum % minimum
        step = min(step, MAX_LENGTH_FIELD - MAX_LENGTH_FIELD % minimum)
        window: collections.deque[Request] = collections.deque()
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
            if exc.errno_name == "ENOTSUP" and self._broken is None:
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

        def zero_pieces() -> Iterator[tuple[int, memoryview]]:
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
