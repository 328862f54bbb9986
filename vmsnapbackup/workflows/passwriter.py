"""The disk pass's writer thread: it owns the target and keeps its writes pipelined.

Why a thread of its own: the storage daemon serves the read and the write
connection from one event loop, and a write's reply only comes once its data
is in the volume.  Waiting for those replies between two chunks left the
daemon idle half of the time, so the pass reads and hashes in its own thread
while this one sends the writes (see :mod:`.diskpass`).
"""
from __future__ import annotations

import mmap
import queue
import threading
from collections.abc import Iterator
from typing import Any

from ..core.blockruns import Run
from .passio import BlockTarget

__all__ = ["PassWriter"]

_STOP = object()
_ABORT = object()


class PassWriter:
    """Owns the target in its own thread; see the module docstring.

    Data writes are sent through one ``write_many`` over the whole pass, so
    they stay pipelined across chunks.  WRITE_ZEROES runs are rare (blocks
    that became zeros) and touch no buffer: they are sent after the data.
    A buffer goes back to ``free`` only once its writes are in the socket;
    on a failure ``None`` goes there instead, to wake the reading thread.
    """

    def __init__(self, target: BlockTarget, free: queue.Queue[mmap.mmap | None], depth: int,
                 disk: str) -> None:
        self._target = target
        self._free = free
        self._depth = depth
        self._queue: queue.Queue[Any] = queue.Queue()
        self._zeros: list[Run] = []
        self._aborted = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"vsb-write-{disk}",
                                        daemon=True)
        self._thread.start()

    def submit(self, writes: list[tuple[int, memoryview]], zeros: list[Run],
               buffer: mmap.mmap) -> None:
        self._queue.put((writes, zeros, buffer))

    def finish(self) -> None:
        """Wait until every write was answered; raise the first failure."""
        self._queue.put(_STOP)
        self._thread.join()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        """Stop sending (requests already sent are still collected) and wait for the thread."""
        self._queue.put(_ABORT)
        self._thread.join()

    def _main(self) -> None:
        try:
            self._target.write_many(self._items(), depth=self._depth)
            if not self._aborted:
                for offset, length in self._zeros:
                    self._target.write_zeroes(offset, length)
        except BaseException as exc:
            self.error = exc
            self._free.put(None)

    def _items(self) -> Iterator[tuple[int, memoryview]]:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if item is _ABORT:
                self._aborted = True
                return
            writes, zeros, buffer = item
            self._zeros.extend(zeros)
            yield from writes
            # resumed by write_many: the last of these writes is in the socket
            self._free.put(buffer)
