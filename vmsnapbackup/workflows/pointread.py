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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np

from ..adapters.keyfile import unlock_pool
from ..adapters.nbdclient import NbdClient
from ..adapters.pinnedchain import PinnedImage
from ..adapters.storagedaemon import StorageDaemon
from ..adapters.storagepool import resolve_pool
from ..core.blockruns import block_runs
from ..core.checktable import CheckTable, hash_blocks
from ..core.defaults import DEFAULT_URI
from ..core.difftable import DifferenceTable, apply
from ..core.manifest import PointDisk, PointManifest
from ..core.pool import DomainStore, Pool
from ..core.poolkey import read_check, read_difference
from ..core.readerslock import ReadersLock
from ..core.tablefile import VALUE_SIZE
from ..errors import CorruptFileError, NotFoundError, UsageError
from ..progress import ProgressCallback, ProgressEvent, emit
from .blockcompare import (
    BlockMismatch,
    compare_sampled,
    compare_tables,
    sample_indexes,
    size_mismatch,
)
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
    "pinned_volume",
    "pool_key_file",
    "point_volume",
    "read_daemon",
    "read_point_tables",
    "reading",
    "read_table1",
    "sample_indexes",
    "select_disks",
    "select_point",
    "with_phase",
]

log = logging.getLogger(__name__)

#: A pool, a directory (``os.PathLike``, or a string with a slash) or a libvirt pool name.
PoolLike = Union[Pool, str, "os.PathLike[str]"]

#: Largest single read while sampling (runs of sampled blocks are cut to this).
SAMPLE_READ_SIZE = 4 << 20


# --- pool, point and disk selection ------------------------------------------------------

def open_pool(pool: PoolLike, uri: str = DEFAULT_URI,
              key_file: str | os.PathLike[str] | None = None, *,
              plain_only: str | None = None) -> Pool:
    """A :class:`Pool` from a pool, a path, or (a string without a slash) the name of a
    libvirt storage pool, as ``--pool`` takes it.  Never created here: a reader must
    not turn a typo into an empty pool.  An encrypted pool is unlocked with
    ``key_file`` (FORMAT §15.2): without it, or with a wrong key, this refuses before
    anything is read.  ``plain_only`` names an operation not built for encrypted
    pools yet, refused (USAGE) in one."""
    if isinstance(pool, Pool):
        the_pool = pool
    elif isinstance(pool, str):
        path, _name = resolve_pool(pool, uri)
        the_pool = Pool.open(path)
    else:
        the_pool = Pool.open(pool)
    if plain_only is not None and the_pool.encryption is not None:
        raise UsageError(f"{plain_only} in an encrypted pool is not available in this "
                         "version (docs/FORMAT.md §15.2)")
    if key_file is not None or the_pool.key is None:
        unlock_pool(the_pool, key_file)
    return the_pool


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


def reading(store: DomainStore) -> ReadersLock:
    """The readers lock of ``store`` (FORMAT.md §8), not yet taken: a reader holds it
    from its first manifest to its last volume, so no prune removes them meanwhile."""
    return ReadersLock(store.path, f"domain {store.name} ({store.uuid})")


def pool_key_file(store: DomainStore) -> str | None:
    """The key file QEMU opens the volumes of an encrypted pool with (None: plain)."""
    return store.pool.key.key_file if store.pool.key is not None else None


def pinned_volume(store: DomainStore, d: PointDisk) -> PinnedImage:
    """The point volume of disk ``d`` with its backing chain pinned from the manifest:
    its generation's base volume (format given), or none for a generation's first
    point.  Readers open it only so (docs/DESIGN.md §8): the backing name in a
    qcow2 header is never followed."""
    path = point_volume(store, d)
    key = pool_key_file(store)
    if d.is_base:
        return PinnedImage(os.fspath(path), d.volume_format, key_file=key)
    base = store.resolve(d.base)
    if not base.is_file():
        raise CorruptFileError(base, f"base volume of disk {d.target} is missing")
    return PinnedImage(os.fspath(path), d.volume_format,
                       PinnedImage(os.fspath(base), d.base_format, key_file=key),
                       key_file=key)


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
    table1 = read_check(store, path, expected_checksum=bytes.fromhex(disk.table1_digest))
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
    diff = read_difference(store, path, table1=table1,
                           expected_checksum=bytes.fromhex(disk.difference_digest))
    table = apply(table1, diff)
    digest = table.body_digest()
    if digest != expected:
        raise CorruptFileError(
            path, f"difference table: rebuilt table {digest.hex()} differs from the "
                  f"manifest's table_digest {disk.table_digest}")
    return PointTables(table1, table, diff)


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
def _exported(daemon: StorageDaemon, image: PinnedImage) -> Iterator[NbdClient]:
    export = daemon.export_pinned(image, direct=True)   # read once, end to end
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
               backing: PinnedImage | None = None, disk: str = "", phase: str = "verify",
               progress: ProgressCallback | None = None,
               key_file: str | None = None) -> BlockMismatch:
    """Export ``path`` read-only, hash all of it and compare with ``expected``.

    A qcow2 point volume is exported with its backing pinned to ``backing`` (None:
    it must have none; a header naming another is damage, docs/DESIGN.md §8), so
    what is hashed is the full disk at that point and never another file.  A raw
    file is read directly: it holds exactly what a guest would read, and the
    export would cost two copies per byte more.  ``key_file``: ``path`` is a LUKS
    volume of an encrypted pool.
    """
    if fmt == "raw":
        with RawImageSource.open(path) as source:
            bad = size_mismatch(expected, source.size)
            if bad is not None:
                return bad
            actual, _stats = run_disk_pass(source, None, expected.block_size, None, disk=disk,
                                           progress=with_phase(progress, phase))
        return compare_tables(expected, actual)
    with _exported(daemon, PinnedImage(os.fspath(path), fmt, backing, key_file)) as client:
        bad = size_mismatch(expected, client.size)
        if bad is not None:
            return bad
        actual = hash_export(client, expected.block_size, disk=disk,
                             progress=with_phase(progress, phase))
    return compare_tables(expected, actual)


def hash_sampled(daemon: StorageDaemon, path: Path, fmt: str, expected: CheckTable,
                 indexes: np.ndarray, *, backing: PinnedImage | None = None,
                 disk: str = "", phase: str = "verify",
                 progress: ProgressCallback | None = None,
                 key_file: str | None = None) -> BlockMismatch:
    """Read only the blocks ``indexes`` (holes included: they read as zeros) and
    compare their values with ``expected`` (``backing`` as for :func:`hash_image`)."""
    bs = expected.block_size
    with _exported(daemon, PinnedImage(os.fspath(path), fmt, backing, key_file)) as client:
        bad = size_mismatch(expected, client.size)
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
