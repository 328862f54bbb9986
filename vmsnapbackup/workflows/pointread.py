"""Reading a point back: its tables, its volumes, and how they compare.

Restore and verify share one question -- "does this image hold exactly the
disk of point N?" -- and one way to answer it: rebuild table N from table 1
and difference N (each file checked against the checksums the manifest holds,
and the rebuilt table against the manifest's ``table_digest``), then hash the
image through a read-only export and compare block by block.  Keeping the
answer in one module means a restore is never reported good by a weaker test
than the one ``verify`` applies.

Reading follows FORMAT §10: manifest first, then tables, then volumes; a
reader never locks.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from ..adapters.nbdclient import NbdClient
from ..adapters.storagedaemon import StorageDaemon
from ..adapters.storagepool import resolve_pool
from ..core.blockruns import block_runs
from ..core.checktable import CheckTable, hash_blocks, read_check_table
from ..core.difftable import DifferenceTable, apply, changed_indexes, read_difference_table
from ..core.manifest import PointDisk, PointManifest
from ..core.pool import DomainStore, Pool
from ..core.tablefile import VALUE_SIZE
from ..errors import CorruptFileError, NotFoundError, UsageError
from ..progress import ProgressCallback, ProgressEvent, emit
from .diskpass import RawImageSource, run_disk_pass

__all__ = [
    "BlockMismatch",
    "PointTables",
    "PoolLike",
    "block_runs",
    "compare_sampled",
    "compare_tables",
    "hash_export",
    "hash_image",
    "hash_sampled",
    "open_pool",
    "point_disk",
    "point_volume",
    "read_daemon",
    "read_point_tables",
    "read_table1",
    "sample_indexes",
    "select_disks",
    "select_point",
    "with_phase",
]

log = logging.getLogger(__name__)

#: A pool, a directory (``os.PathLike``, or a string with a slash) or a libvirt pool name.
PoolLike = Union[Pool, str, "os.PathLike[str]"]

DEFAULT_URI = "qemu:///system"

#: Blocks named one by one in a mismatch message; the rest are counted.
NAMED_BLOCKS = 8
#: Largest single read while sampling (runs of sampled blocks are cut to this).
SAMPLE_READ_SIZE = 4 << 20


# --- pool, point and disk selection ------------------------------------------------------

def open_pool(pool: PoolLike, uri: str = DEFAULT_URI) -> Pool:
    """A :class:`Pool` from a pool, a path, or (a string without a slash) the name of a
    libvirt storage pool, as ``--pool`` takes it.  Never created here: a reader must
    not turn a typo into an empty pool."""
    if isinstance(pool, Pool):
        return pool
    if isinstance(pool, str):
        path, _name = resolve_pool(pool, uri)
        return Pool.open(path)
    return Pool.open(pool)


def select_point(store: DomainStore, point: int | None) -> PointManifest:
    """The manifest of point ``point``, or of the newest valid point when None.

    A damaged manifest asked for by number raises its CorruptFileError: a damaged
    point is never one to restore from, and the user must hear why.
    """
    if point is None:
        valid = store.points()
        if not valid:
            damaged = store.damaged_points()
            extra = f" ({len(damaged)} damaged)" if damaged else ""
            raise NotFoundError(f"domain {store.name} has no valid point to restore{extra}")
        manifest = valid[-1].manifest
        assert manifest is not None
        return manifest
    return store.read_manifest(point)


def select_disks(manifest: PointManifest, disks: Sequence[str] | None) -> list[PointDisk]:
    """The point's disks named in ``disks`` (all when None), in the manifest's order."""
    if not disks:
        return list(manifest.disks)
    known = [d.target for d in manifest.disks]
    unknown = [t for t in disks if t not in known]
    if unknown:
        raise NotFoundError(f"point {manifest.point} has no disk {', '.join(unknown)} "
                            f"(its disks: {', '.join(known)})")
    wanted = set(disks)
    return [d for d in manifest.disks if d.target in wanted]


def point_disk(store: DomainStore, manifest: PointManifest, disk: str | None) -> PointDisk:
    """Disk ``disk`` of the point; may be left out for a point with one disk."""
    targets = [d.target for d in manifest.disks]
    if disk is None:
        if len(targets) != 1:
            raise UsageError(f"point {manifest.point} has disks {', '.join(targets)}; "
                             "choose one with --disk")
        return manifest.disks[0]
    try:
        return manifest.disk(disk)
    except KeyError:
        raise NotFoundError(f"point {manifest.point} of domain {store.name} has no disk "
                            f"{disk!r} (it has {', '.join(targets)})") from None


def point_volume(store: DomainStore, d: PointDisk) -> Path:
    """The point volume of disk ``d`` (a reader must not start on a missing one)."""
    path = store.resolve(d.volume)
    if not path.is_file():
        raise CorruptFileError(path, f"point volume of disk {d.target} is missing")
    return path


# --- tables ------------------------------------------------------------------------------

@dataclass(frozen=True)
class PointTables:
    """Table 1 of the disk's generation and the rebuilt table N of the point."""

    table1: CheckTable
    table: CheckTable
    difference: DifferenceTable | None


def read_table1(store: DomainStore, disk: PointDisk) -> CheckTable:
    """Table 1, tied to the manifest by its file checksum (``table1_digest``)."""
    path = store.resolve(disk.table)
    if not path.is_file():
        raise CorruptFileError(path, "check table is missing")
    table1 = read_check_table(path, expected_checksum=bytes.fromhex(disk.table1_digest))
    if table1.block_size != disk.block_size or table1.disk_size != disk.virtual_size:
        raise CorruptFileError(
            path, f"check table: block size {table1.block_size} and disk size "
                  f"{table1.disk_size} differ from the manifest's ({disk.block_size}, "
                  f"{disk.virtual_size})")
    return table1


def read_point_tables(store: DomainStore, disk: PointDisk,
                      table1: CheckTable | None = None) -> PointTables:
    """Table 1 and table N of one disk of a point, every check of FORMAT §5-§7 passed.

    ``table1`` may be passed when the caller already read it for this generation
    (verify reads it once per generation).  For the first point of a generation
    table N is table 1 itself, whose body digest must then be ``table_digest``.
    """
    if table1 is None:
        table1 = read_table1(store, disk)
    expected = bytes.fromhex(disk.table_digest)
    if disk.difference is None:
        if table1.body_digest() != expected:
            raise CorruptFileError(
                store.resolve(disk.table),
                f"check table: body digest {table1.body_digest().hex()} differs from the "
                f"manifest's table_digest {disk.table_digest}")
        return PointTables(table1, table1, None)
    path = store.resolve(disk.difference)
    if not path.is_file():
        raise CorruptFileError(path, "difference table is missing")
    assert disk.difference_digest is not None
    diff = read_difference_table(path, table1=table1,
                                 expected_checksum=bytes.fromhex(disk.difference_digest))
    table = apply(table1, diff)
    digest = table.body_digest()
    if digest != expected:
        raise CorruptFileError(
            path, f"difference table: rebuilt table {digest.hex()} differs from the "
                  f"manifest's table_digest {disk.table_digest}")
    return PointTables(table1, table, diff)


# --- comparing -----------------------------------------------------------------------------

@dataclass(frozen=True)
class BlockMismatch:
    """Which blocks of an image differ from the table they must match.

    ``indexes`` are ascending; ``checked`` is how many blocks were compared (all of
    them, or a sample).  ``size_note`` is set when the image is not even the right
    size (then no block could be compared).
    """

    block_size: int
    total: int
    checked: int
    indexes: tuple[int, ...]
    size_note: str | None = None

    @property
    def ok(self) -> bool:
        return not self.indexes and self.size_note is None

    @property
    def count(self) -> int:
        return len(self.indexes)

    def offsets(self, limit: int = NAMED_BLOCKS) -> list[tuple[int, int]]:
        """(block index, byte offset) of the first ``limit`` differing blocks."""
        return [(i, i * self.block_size) for i in self.indexes[:limit]]

    def describe(self, limit: int = NAMED_BLOCKS) -> str:
        """One phrase for a person: ``2 of 1024 blocks differ: 17 (offset 1114112), 18 (...)``."""
        if self.size_note is not None:
            return self.size_note
        if not self.indexes:
            return f"all {self.checked} checked blocks match"
        named = ", ".join(f"{i} (offset {off})" for i, off in self.offsets(limit))
        more = f", and {self.count - limit} more" if self.count > limit else ""
        of = f"{self.total}" if self.checked == self.total else \
            f"{self.checked} sampled of {self.total}"
        return f"{self.count} of {of} blocks differ: {named}{more}"

    def to_dict(self, limit: int = 1000) -> dict[str, Any]:
        return {"block_size": self.block_size, "total": self.total, "checked": self.checked,
                "differ": self.count, "blocks": list(self.indexes[:limit]),
                "size": self.size_note}


def _size_mismatch(expected: CheckTable, size: int, checked: int = 0) -> BlockMismatch | None:
    if size == expected.disk_size:
        return None
    return BlockMismatch(expected.block_size, expected.count, checked, (),
                         size_note=f"image is {size} bytes, the point's disk "
                                   f"{expected.disk_size}")


def compare_tables(expected: CheckTable, actual: CheckTable) -> BlockMismatch:
    """Every block of ``actual`` against ``expected`` (same block size)."""
    if actual.block_size != expected.block_size:
        raise UsageError("tables of different block sizes cannot be compared")
    bad = _size_mismatch(expected, actual.disk_size, 0)
    if bad is not None:
        return bad
    indexes = changed_indexes(expected, actual)
    return BlockMismatch(expected.block_size, expected.count, expected.count,
                         tuple(int(i) for i in indexes))


def compare_sampled(expected: CheckTable, indexes: np.ndarray,
                    values: np.ndarray) -> BlockMismatch:
    """Sampled blocks: ``values[k]`` is the value read for block ``indexes[k]``."""
    if values.shape != (len(indexes), VALUE_SIZE):
        raise UsageError(f"{values.shape} values for {len(indexes)} sampled blocks")
    idx = np.asarray(indexes, dtype=np.intp)
    rows = expected.values_at(idx)
    differ = np.flatnonzero(np.any(rows != values, axis=1))
    return BlockMismatch(expected.block_size, expected.count, int(idx.size),
                         tuple(int(idx[k]) for k in differ))


def sample_indexes(count: int, percent: float,
                   rng: random.Random | None = None) -> np.ndarray:
    """A sorted random sample of block indexes: ``percent`` of ``count``, at least one.

    ``rng`` lets a caller (and the tests) make the sample reproducible.
    """
    if not 0 < percent <= 100:
        raise UsageError(f"a sample is more than 0 and at most 100 percent, not {percent}")
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    k = max(1, min(count, round(count * percent / 100.0)))
    if k == count:
        return np.arange(count, dtype=np.int64)
    rng = rng or random.Random()
    return np.array(sorted(rng.sample(range(count), k)), dtype=np.int64)


# --- hashing an image through an export ----------------------------------------------------

def with_phase(progress: ProgressCallback | None, phase: str) -> ProgressCallback | None:
    """``progress`` with every event's phase renamed (the disk pass says "read")."""
    if progress is None:
        return None

    def renamed(ev: ProgressEvent) -> None:
        progress(dataclasses.replace(ev, phase=phase))

    return renamed


@contextlib.contextmanager
def read_daemon(tag: str, runtime_base: str | None = None) -> Iterator[StorageDaemon]:
    """One private storage daemon for a whole restore or verify run."""
    with StorageDaemon(runtime_base, tag=tag) as daemon:
        yield daemon


@contextlib.contextmanager
def _exported(daemon: StorageDaemon, path: Path, fmt: str) -> Iterator[NbdClient]:
    export = daemon.export_image(os.fspath(path), fmt, direct=True)   # read once, end to end
    assert export.socket_path is not None   # the daemon's private socket
    try:
        with NbdClient.open_unix(export.socket_path, export.name) as client:
            yield client
    finally:
        daemon.remove_export(export, force=True)


def hash_export(client: NbdClient, block_size: int, *, disk: str = "",
                progress: ProgressCallback | None = None) -> CheckTable:
    """The check table of everything an export serves (holes are not read)."""
    table, _stats = run_disk_pass(client, None, block_size, None, disk=disk, progress=progress)
    return table


def hash_image(daemon: StorageDaemon, path: Path, fmt: str, expected: CheckTable, *,
               disk: str = "", phase: str = "verify",
               progress: ProgressCallback | None = None) -> BlockMismatch:
    """Export ``path`` read-only, hash all of it and compare with ``expected``.

    A qcow2 point volume is exported with its backing base, so what is hashed is
    the full disk at that point.  A raw file is read directly: it holds exactly
    what a guest would read, and the export would cost two copies per byte more.
    """
    if fmt == "raw":
        with RawImageSource.open(path) as source:
            bad = _size_mismatch(expected, source.size)
            if bad is not None:
                return bad
            actual, _stats = run_disk_pass(source, None, expected.block_size, None, disk=disk,
                                           progress=with_phase(progress, phase))
        return compare_tables(expected, actual)
    with _exported(daemon, path, fmt) as client:
        bad = _size_mismatch(expected, client.size)
        if bad is not None:
            return bad
        actual = hash_export(client, expected.block_size, disk=disk,
                             progress=with_phase(progress, phase))
    return compare_tables(expected, actual)


def hash_sampled(daemon: StorageDaemon, path: Path, fmt: str, expected: CheckTable,
                 indexes: np.ndarray, *, disk: str = "", phase: str = "verify",
                 progress: ProgressCallback | None = None) -> BlockMismatch:
    """Read only the blocks ``indexes`` (holes included: they read as zeros) and
    compare their values with ``expected``."""
    bs = expected.block_size
    with _exported(daemon, path, fmt) as client:
        bad = _size_mismatch(expected, client.size)
        if bad is not None:
            return bad
        values = np.empty((len(indexes), VALUE_SIZE), dtype=np.uint8)
        total = sum(expected.block_length(int(i)) for i in indexes)
        done = 0
        pos = 0
        emit(progress, ProgressEvent(disk, phase, 0, total))
        for first, n in block_runs(indexes, max(1, SAMPLE_READ_SIZE // bs)):
            offset = first * bs
            length = min(n * bs, expected.disk_size - offset)
            buf = bytearray(length)
            client.read_into(offset, buf)
            hashed = hash_blocks(buf, bs, first)
            for k, value in enumerate(hashed.values):
                values[pos + k] = np.frombuffer(value, dtype=np.uint8)
            pos += n
            done += length
            emit(progress, ProgressEvent(disk, phase, done, total))
        emit(progress, ProgressEvent(disk, phase, total, total, finished=True))
    return compare_sampled(expected, np.asarray(indexes), values)
