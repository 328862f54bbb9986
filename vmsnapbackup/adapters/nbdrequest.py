"""One request in flight, and the rule that its answer tiles it exactly.

A structured reply to a READ may come in several chunks (data and holes, in
any order).  :meth:`Request.claim` keeps the runs already answered and
refuses a chunk that overlaps one: together with the byte count checked at
the end, that proves every byte of the caller's buffer was written by this
reply, so no stale bytes of an earlier use of the buffer can pass for disk
contents.  The work is per chunk (a bisect over the runs, which stay one run
when chunks arrive in order), never per byte.
"""
from __future__ import annotations

from bisect import bisect_right

from .nbdsocket import ProtocolViolation

__all__ = ["Request", "zero_fill"]

_ZEROS = memoryview(bytes(1024 * 1024))


def zero_fill(view: memoryview) -> None:
    """Set every byte of ``view`` to zero without allocating."""
    pos, end = 0, len(view)
    while pos < end:
        step = min(end - pos, len(_ZEROS))
        view[pos:pos + step] = _ZEROS[:step]
        pos += step


class Request:
    """One command sent and not yet completely answered."""

    __slots__ = (
        "cmd",
        "cookie",
        "covered",
        "done",
        "error",
        "errors_seen",
        "filled",
        "length",
        "message",
        "offset",
        "statuses",
        "view",
    )

    def __init__(self, cookie: int, cmd: int, offset: int, length: int,
                 view: memoryview | None) -> None:
        self.cookie = cookie
        self.cmd = cmd
        self.offset = offset
        self.length = length
        # READ: where the data lands (None: drop it, the caller went away).
        self.view = view
        self.filled = 0
        # READ, structured: the byte runs already answered, relative to offset,
        # as sorted and merged bounds [start0, end0, start1, end1, ...].
        self.covered: list[int] = []
        self.done = False
        self.error = 0  # NBD error value of the first error chunk, 0 if none
        self.message = ""
        # BLOCK_STATUS: (length, flags) descriptors per metadata context id.
        self.statuses: dict[int, list[tuple[int, int]]] = {}
        self.errors_seen = 0

    def fail(self, error: int, message: str) -> None:
        if not self.error:
            self.error = error
            self.message = message

    def claim(self, start: int, end: int, what: str) -> None:
        """Record that ``[start, end)`` (relative) is answered; refuse a second answer.

        A reply normally arrives in order, so this appends to (or extends)
        the last run: constant work per chunk, never per byte.
        """
        bounds = self.covered
        i = bisect_right(bounds, start)
        if i & 1 or (i < len(bounds) and bounds[i] < end):
            raise ProtocolViolation(
                f"{what} chunk [{self.offset + start}, +{end - start}) overlaps an earlier "
                f"chunk of the reply to [{self.offset}, +{self.length})")
        new: list[int] = []
        lo = i
        if i and bounds[i - 1] == start:
            lo = i - 1
        else:
            new.append(start)
        hi = i
        if i < len(bounds) and bounds[i] == end:
            hi = i + 1
        else:
            new.append(end)
        bounds[lo:hi] = new
        self.filled += end - start
