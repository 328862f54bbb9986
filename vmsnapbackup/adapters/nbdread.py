"""Reading an export: its bytes, and which of its ranges hold data or changed.

The backup's hot loop lives here: large ranges read straight into reusable
caller buffers with several requests in flight (:meth:`NbdReader.read_many`,
:meth:`NbdReader.read_chunks`), and the maps that let it skip work --
``base:allocation`` (holes and zeroes need no read) and QEMU's
``qemu:dirty-bitmap:<name>`` (blocks not written since the bitmap began need
no read).  Per-block work is left to the caller: this module works per
request.
"""
from __future__ import annotations

import collections
import mmap
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from ..core.blockruns import whole_block_runs
from ..errors import UsageError
from . import nbdproto as p
from .nbdrequest import Request
from .nbdtransport import MAX_LENGTH_FIELD, NbdTransport

__all__ = ["DEFAULT_CHUNK_SIZE", "EXTENT_DATA", "EXTENT_HOLE", "EXTENT_ZERO", "Extent",
           "NbdReader", "as_bytes_view"]

#: Request size of :meth:`NbdReader.read_chunks` (1-4 MiB measured fastest).
DEFAULT_CHUNK_SIZE = 1024 * 1024

EXTENT_DATA = "data"
EXTENT_ZERO = "zero"
EXTENT_HOLE = "hole"


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


class _ReadOp:
    """One caller read: one or more wire requests, maybe through a bounce buffer."""

    __slots__ = ("bounce", "offset", "requests", "skip", "view")

    def __init__(self, offset: int, view: memoryview) -> None:
        self.offset = offset
        self.view = view
        self.requests: list[Request] = []
        self.bounce: bytearray | None = None
        self.skip = 0


def as_bytes_view(buffer: object, writable: bool) -> memoryview:
    """A flat byte view of any buffer; UsageError for what cannot be one."""
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


class NbdReader(NbdTransport):
    """READ and BLOCK_STATUS, pipelined."""

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

    # -- reading ------------------------------------------------------------

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
        op = self._start_read(offset, as_bytes_view(buffer, writable=True))
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
        requests: Iterable[tuple[int, object]],
        *,
        depth: int | None = None,
    ) -> Iterator[tuple[int, memoryview]]:
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
        pending: collections.deque[_ReadOp] = collections.deque()
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) < depth:
                    try:
                        offset, buffer = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    pending.append(self._start_read(offset, as_bytes_view(buffer, True)))
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
        ranges: Iterable[tuple[int, int]],
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        depth: int | None = None,
    ) -> Iterator[tuple[int, memoryview]]:
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
        # anonymous mappings: only the pages a read fills are ever touched, where a
        # bytearray zero-fills all of it first (about 1 ms per MiB; the dirty-bitmap
        # sample check reads a few blocks through a ring of depth x 1 MiB)
        ring = [memoryview(mmap.mmap(-1, chunk_size, flags=mmap.MAP_PRIVATE))
                for _ in range(max(depth, 1))]

        def pieces() -> Iterator[tuple[int, memoryview]]:
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
                     end: int) -> Iterator[tuple[int, int, int]]:
        """``(offset, length, flags)`` of one context's descriptors, clipped to the range.

        Requests stay below 2 GiB and are aligned to the minimum block size;
        each next request starts where *this context's* chunk stopped (with
        two contexts negotiated the server answers both, and the chunks may
        cover different lengths, so the other context's chunk is ignored).
        """
        minimum = self._block_sizes.minimum
        limit = MAX_LENGTH_FIELD - MAX_LENGTH_FIELD % minimum
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

    def block_status(self, offset: int = 0, length: int | None = None, *,
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
        current: Extent | None = None
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
                    length: int | None = None) -> Iterator[tuple[int, int]]:
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
                     length: int | None = None) -> Iterator[tuple[int, int]]:
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
