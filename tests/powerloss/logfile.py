"""The operation log of the power-loss file system: a pickle stream of plain tuples.

Plain tuples, not :class:`~powerloss.model.Op` objects, so the log does not
depend on the module name the file system process imported the model under.
The seed (what the backing directory held at mount time) comes first and ends
with a mark; only the operations after the mark count as cut points.
"""
from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from powerloss.model import Op

__all__ = ["LogWriter", "read_log"]

_MARK = ("mark",)


class LogWriter:
    """Append-only writer; ``count`` is the number of operations after the mark."""

    def __init__(self, path: Path) -> None:
        self._f: BinaryIO = open(path, "wb")  # noqa: SIM115 (closed by __exit__)
        self.count = 0
        self._marked = False

    def append(self, op: Op) -> None:
        pickle.dump(dataclasses.astuple(op), self._f, protocol=pickle.HIGHEST_PROTOCOL)
        if self._marked:
            self.count += 1

    def mark(self) -> None:
        pickle.dump(_MARK, self._f)
        self._marked = True
        self.flush()

    def flush(self) -> None:
        self._f.flush()

    def __enter__(self) -> LogWriter:  # noqa: PYI034
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._f.close()


def read_log(path: Path) -> tuple[list[Op], list[Op]]:
    """(seed, operations) of a log; a log cut short in its last record is read up to it."""
    seed: list[Op] = []
    ops: list[Op] = []
    target = seed
    with open(path, "rb") as f:
        while True:
            try:
                rec = pickle.load(f)
            except EOFError:
                break
            except pickle.UnpicklingError:
                break
            if tuple(rec) == _MARK:
                target = ops
                continue
            target.append(Op(*rec))
    return seed, ops
