"""A new base volume read straight from its file at the offsets ``qemu-img map`` gives.

Why: the rebase's check of its new base through an NBD export copies each byte
three times (daemon, socket, client); reading the qcow2 file where its clusters lie
copies once, from the page cache the convert just filled.  Only for a plain qcow2
that *we* created a moment ago (no backing, compression, encryption or data file):
:func:`open_mapped` returns None for anything else and the caller keeps the export.
The map is of our own file, never of pool input, so its offsets are trusted.
"""
from __future__ import annotations

import bisect
import os
from collections.abc import Iterable, Iterator

from .qemuimg import MapExtent, QemuImg

__all__ = ["MappedImage", "open_mapped"]


class MappedImage:
    """A :class:`~vmsnapbackup.workflows.passio.BlockSource` over a mapped qcow2 file."""

    def __init__(self, path: str, size: int, extents: list[MapExtent]) -> None:
        self.path = path
        self._size = size
        self._extents = extents
        self._starts = [e.start for e in extents]
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    @property
    def size(self) -> int:
        return self._size

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> MappedImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def data_ranges(self, block_size: int, /) -> Iterable[tuple[int, int]]:
        """Extents stored as data, widened to whole blocks and joined."""
        runs: list[tuple[int, int]] = []
        for e in self._extents:
            if not e.data or e.zero:
                continue
            lo = e.start - e.start % block_size
            hi = min(self._size, -(-(e.start + e.length) // block_size) * block_size)
            if runs and lo <= runs[-1][0] + runs[-1][1]:
                start = runs[-1][0]
                runs[-1] = (start, max(hi, start + runs[-1][1]) - start)
            else:
                runs.append((lo, hi - lo))
        return runs

    def _fill(self, offset: int, view: memoryview) -> None:
        pos, end = offset, offset + len(view)
        i = max(0, bisect.bisect_right(self._starts, pos) - 1)
        while pos < end:
            if i >= len(self._extents):       # past the map: reads as zeros
                view[pos - offset:] = bytes(end - pos)
                return
            e = self._extents[i]
            stop = min(end, e.start + e.length)
            part = view[pos - offset:stop - offset]
            if e.data and not e.zero and e.offset is not None:
                got = os.preadv(self._fd, [part], e.offset + pos - e.start)
                if got != len(part):
                    raise OSError(f"{self.path}: short read at {e.offset + pos - e.start}")
            else:
                part[:] = bytes(len(part))
            pos, i = stop, i + 1

    def read_many(self, requests: Iterable[tuple[int, memoryview]], /, *,
                  depth: int | None = None) -> Iterator[tuple[int, memoryview]]:
        for offset, view in requests:
            self._fill(offset, view)
            yield offset, view


def open_mapped(img: QemuImg, path: str, size: int) -> MappedImage | None:
    """``path`` (a qcow2 we just created) as a :class:`MappedImage`, or None when its
    data is not stored plainly in the file (then read it through an export)."""
    info = img.info(path)
    fmt_info = info.raw.get("format-specific", {}).get("data", {})
    if (info.format != "qcow2" or info.backing or fmt_info.get("data-file")
            or fmt_info.get("encrypt") or info.raw.get("encrypted")
            or info.virtual_size != size):
        return None
    extents = img.map(path, "qcow2")
    if any(e.depth != 0 or (e.data and not e.zero and e.offset is None) for e in extents):
        return None                 # compressed clusters, or a backing layer after all
    return MappedImage(path, size, extents)
