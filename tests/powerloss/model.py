"""What a disk keeps after a power cut: replay of a file-system operation log.

The FUSE file system (:mod:`powerloss.fusefs`) writes everything through to a
backing directory and appends one :class:`Op` per mutating call to a log.  This
module replays a prefix of that log (the operations that had completed when the
power went) and builds the *durable* state: what a file system is obliged to
have on its disk after the cut, under a choice of the liberties real file
systems take (:class:`Variant`).

The rules (POSIX fsync plus the Linux convention for directories):

* A file's data and size are durable as of its last ``fsync``/``fdatasync``
  (we do not distinguish the two: both must make the data durable).
* A directory's entries (create, mkdir, link, rename in or out, unlink, rmdir)
  are durable as of its last ``fsync`` of the directory itself.

The variants bound what may survive beyond that:

* names ``strict``: only the entries made durable by a directory fsync exist;
  a rename or create without one is lost (the old name comes back).
  names ``ordered``: every namespace operation up to the cut is kept, in order,
  as a journaling file system commits metadata (ext4, XFS) when it happens to
  commit just before the cut.
* data ``lost``: unsynced writes vanish; the file has its last fsynced content
  and size (a file never fsynced is empty).
  data ``zeros``: the size reached its disk but the data did not: unsynced
  bytes read as zeros (ext4 ``data=writeback``, XFS after a crash).
  data ``kept``: every write reached the disk (page cache written back just in
  time); only names are then in question.

Files are identified by a model id the file system hands out, never by an
inode number (the backing file system reuses those).
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "DIR",
    "FILE",
    "ROOT_ID",
    "VARIANTS",
    "DurableState",
    "Op",
    "Variant",
    "materialize",
    "replay",
]

ROOT_ID = 1
FILE = "file"
DIR = "dir"


@dataclass(frozen=True)
class Op:
    """One completed mutating call.  Fields by ``kind``:

    ``create``  parent, name, node, ftype, mode  (files, directories, hard-link-free)
    ``write``   node, offset, data
    ``truncate`` node, size
    ``fsync``   node  (file: data and size; directory: its entries)
    ``rename``  parent, name, parent2, name2  (replaces an existing target)
    ``unlink``  parent, name  (also rmdir)
    ``link``    node, parent, name
    """

    kind: str
    node: int = 0
    parent: int = 0
    name: str = ""
    parent2: int = 0
    name2: str = ""
    offset: int = 0
    size: int = 0
    data: bytes = b""
    ftype: str = FILE
    mode: int = 0o600


@dataclass(frozen=True)
class Variant:
    names: str  # "strict" | "ordered"
    data: str   # "lost" | "zeros" | "kept"

    def __post_init__(self) -> None:
        if self.names not in ("strict", "ordered") or self.data not in ("lost", "zeros", "kept"):
            raise ValueError(f"unknown variant {self}")

    @property
    def label(self) -> str:
        return f"{self.names}/{self.data}"


#: Every combination; ``strict/lost`` is the minimum POSIX promises.
VARIANTS: tuple[Variant, ...] = tuple(
    Variant(n, d) for n in ("strict", "ordered") for d in ("lost", "zeros", "kept"))


@dataclass
class DurableState:
    """The live and the durable view after replaying a log prefix."""

    ftype: dict[int, str] = field(default_factory=lambda: {ROOT_ID: DIR})
    mode: dict[int, int] = field(default_factory=lambda: {ROOT_ID: 0o700})
    live_entries: dict[int, dict[str, int]] = field(default_factory=lambda: {ROOT_ID: {}})
    synced_entries: dict[int, dict[str, int]] = field(default_factory=lambda: {ROOT_ID: {}})
    live_data: dict[int, bytearray] = field(default_factory=dict)
    synced_data: dict[int, bytes] = field(default_factory=dict)

    def apply(self, op: Op) -> None:
        k = op.kind
        if k == "create":
            self.ftype[op.node] = op.ftype
            self.mode[op.node] = op.mode
            if op.ftype == DIR:
                self.live_entries[op.node] = {}
                self.synced_entries[op.node] = {}
            else:
                self.live_data[op.node] = bytearray()
            self.live_entries[op.parent][op.name] = op.node
        elif k == "write":
            buf = self.live_data[op.node]
            end = op.offset + len(op.data)
            if len(buf) < end:
                buf.extend(bytes(end - len(buf)))
            buf[op.offset:end] = op.data
        elif k == "truncate":
            buf = self.live_data[op.node]
            if op.size < len(buf):
                del buf[op.size:]
            else:
                buf.extend(bytes(op.size - len(buf)))
        elif k == "fsync":
            if self.ftype[op.node] == DIR:
                self.synced_entries[op.node] = dict(self.live_entries[op.node])
            else:
                self.synced_data[op.node] = bytes(self.live_data[op.node])
        elif k == "rename":
            node = self.live_entries[op.parent].pop(op.name)
            self.live_entries[op.parent2][op.name2] = node
        elif k == "unlink":
            del self.live_entries[op.parent][op.name]
        elif k == "link":
            self.live_entries[op.parent][op.name] = op.node
        else:
            raise ValueError(f"unknown op kind {k!r}")

    def content(self, node: int, variant: Variant) -> bytes:
        synced = self.synced_data.get(node, b"")
        if variant.data == "lost":
            return synced
        live = bytes(self.live_data.get(node, b""))
        if variant.data == "kept":
            return live
        # zeros: the live size, the synced bytes where they were, zeros elsewhere
        if len(synced) >= len(live):
            return synced[:len(live)]
        return synced + bytes(len(live) - len(synced))

    def entries(self, node: int, variant: Variant) -> dict[str, int]:
        table = self.synced_entries if variant.names == "strict" else self.live_entries
        return table.get(node, {})


def replay(ops: Iterable[Op]) -> DurableState:
    state = DurableState()
    for op in ops:
        state.apply(op)
    return state


def materialize(state: DurableState, variant: Variant, out: Path) -> list[str]:
    """Write the durable tree of ``variant`` into the new directory ``out``.

    Returns the relative paths written (directories with a trailing ``/``), for
    the tests and the crash tables.  Hard links are recreated as hard links.
    """
    out.mkdir(mode=0o700)
    written: list[str] = []
    made: dict[int, Path] = {}

    def walk(node: int, path: Path, rel: str, seen: Sequence[int]) -> None:
        for name, child in sorted(state.entries(node, variant).items()):
            target = path / name
            crel = f"{rel}{name}"
            if state.ftype[child] == DIR:
                if child in seen:  # a directory renamed into itself cannot happen; guard loops
                    continue
                target.mkdir(mode=state.mode.get(child, 0o700))
                written.append(crel + "/")
                walk(child, target, crel + "/", [*seen, child])
            elif child in made:
                os.link(made[child], target)
                written.append(crel)
            else:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
                fd = os.open(target, flags, state.mode.get(child, 0o600))
                try:
                    os.write(fd, state.content(child, variant))
                finally:
                    os.close(fd)
                made[child] = target
                written.append(crel)

    walk(ROOT_ID, out, "", [ROOT_ID])
    return written


def find_node(state: DurableState, relpath: str, variant: Variant | None = None) -> int | None:
    """The node at ``relpath`` in the live tree (or ``variant``'s durable tree)."""
    node = ROOT_ID
    for part in [p for p in relpath.split("/") if p]:
        if variant is None:
            entries = state.live_entries.get(node, {})
        else:
            entries = state.entries(node, variant)
        nxt = entries.get(part)
        if nxt is None:
            return None
        node = nxt
    return node
