"""Rebase: a new generation made from a point already in the pool, without reading the VM.

A point holds every block changed since its generation's first table, so a
long generation's points keep growing (docs/generations.md).  Starting a new
generation normally costs a full read of the running VM; but the pool already
holds the disk as it was at any point, and that is all a base needs.  A rebase
has ``qemu-img convert`` copy point N (its base pinned under it from the
manifest, as ``restore`` reads it) into a new base volume -- one read of the
point, one write of the base -- checks every block of that volume against table
N, and seals it as point M, the first point of a new generation whose table 1
is table N.  The next backup then diffs against the disk as it was at N and
stores only what changed since.  The write order is FORMAT §10.1: nothing is
visible before the manifest, and point N's generation stays restorable until
prune removes it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapters.host import LOCAL
from ..adapters.pinnedchain import PinnedImage, check_header, json_filename
from ..adapters.qemuimg import QemuImg
from ..adapters.storagedaemon import StorageDaemon
from ..core.atomic import durable_rename, fsync_dir, fsync_path
from ..core.checktable import CheckTable, write_check_table
from ..core.defaults import DEFAULT_URI
from ..core.journal import JournalDaemon, JournalDisk, JournalEntry
from ..core.jsonfields import digest_hex
from ..core.manifest import (
    BlockCounts,
    GenerationDisk,
    GenerationRecord,
    PointDisk,
    PointManifest,
)
from ..core.pool import DomainStore, partial_name
from ..core.timefmt import utc_now
from ..errors import (
    CorruptFileError,
    RepairNeededError,
    UsageError,
    VerifyMismatchError,
    VmSnapBackupError,
)
from ..progress import ProgressCallback, ProgressEvent, emit
from .diskpass import PassStats
from .interrupt import interruptible
from .pointread import (
    PoolLike,
    compare_tables,
    open_pool,
    pinned_volume,
    read_point_tables,
    select_point,
)
from .rebasecheck import hash_new_base

__all__ = ["RebaseResult", "rebase"]

log = logging.getLogger(__name__)

#: Rebased bases are qcow2 (FORMAT §10.1): sparse on any file system, like a backup's.
BASE_FORMAT = "qcow2"


@dataclass
class RebasedDisk:
    """One disk's new base: what the pass read and wrote."""

    target: str
    base: str
    stats: PassStats
    table: CheckTable | None = None

    def to_dict(self) -> dict[str, Any]:
        s = self.stats
        return {"target": self.target, "base": self.base, "blocks_read": s.read,
                "holes": s.holes, "blocks_written": s.changed,
                "bytes_written": s.bytes_written, "seconds": round(s.seconds, 3)}


@dataclass
class RebaseResult:
    """What ``rebase`` made: point ``point`` starting generation ``generation`` from ``source``."""

    domain: str
    source: int
    source_generation: int
    point: int
    generation: int
    checkpoint: str | None
    disks: list[RebasedDisk] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def bytes_written(self) -> int:
        return sum(d.stats.bytes_written for d in self.disks)

    def to_dict(self) -> dict[str, Any]:
        return {"domain": self.domain, "source_point": self.source,
                "source_generation": self.source_generation, "point": self.point,
                "generation": self.generation, "checkpoint": self.checkpoint,
                "bytes_written": self.bytes_written, "seconds": round(self.seconds, 3),
                "disks": [d.to_dict() for d in self.disks]}


def rebase(domain: str, pool: PoolLike, *, point: int | None = None, uri: str = DEFAULT_URI,
           progress: ProgressCallback | None = None,
           runtime_base: str | None = None) -> RebaseResult:
    """Make point ``point`` (newest when None) of ``domain`` the base of a new generation."""
    store = open_pool(pool, uri, plain_only="rebase").find_domain(domain)
    with store.lock("rebase"), interruptible("rebase"):
        if store.journal.read() is not None:
            raise RepairNeededError(
                f"domain {store.name}: an interrupted operation left a journal; run repair "
                "first")
        source = select_point(store, point)
        if source.is_generation_start:
            raise UsageError(f"point {source.point} is already the first point of generation "
                             f"{source.generation}: nothing to rebase")
        run = _RebaseRun(store, source, progress, runtime_base)
        return run.execute()


class _RebaseRun:
    """One rebase, with the lock held; keeps what it created so a failure removes it."""

    def __init__(self, store: DomainStore, source: PointManifest,
                 progress: ProgressCallback | None, runtime_base: str | None) -> None:
        self.store, self.source = store, source
        self.progress, self.runtime_base = progress, runtime_base
        self.journal = store.journal
        self.started = utc_now()
        self.point = 0
        self.generation = 0
        self.gen_dir: Path | None = None
        self.sealed = False
        # tables read (and checked) before anything is written: a damaged point is
        # refused without burning a number
        self.tables = {d.target: read_point_tables(store, d).table for d in source.disks}
        for d in source.disks:
            for rel, what in ((d.volume, "point volume"), (d.base, "base volume")):
                if not store.resolve(rel).is_file():
                    raise CorruptFileError(store.resolve(rel), f"{what} is missing")
        self.checkpoint = self._carried_checkpoint()

    def _carried_checkpoint(self) -> str | None:
        """The source generation's checkpoint, if it is the current generation's (§10.1)."""
        try:
            own = self.store.read_generation(self.source.generation).checkpoint
            current = self.store.current_generation()
            if current is None or own is None:
                return None
            if current == self.source.generation:
                return own
            return own if self.store.read_generation(current).checkpoint == own else None
        except VmSnapBackupError as exc:
            log.warning("domain %s: no checkpoint carried over (%s): the next point reads "
                        "every data block", self.store.name, exc)
            return None

    def execute(self) -> RebaseResult:
        t0 = time.monotonic()
        self.point = self.store.allocate_point()
        self.journal.write(JournalEntry(
            operation="rebase", pid=os.getpid(), host=socket.gethostname(),
            started=self.started, step="start", point=self.point,
            disks={d.target: JournalDisk(source="") for d in self.source.disks}))
        log.info("domain %s: rebase of point %d (generation %d) into point %d",
                 self.store.name, self.source.point, self.source.generation, self.point)
        try:
            disks = self._run()
        except BaseException as exc:
            if not self._undo(exc):
                raise RepairNeededError(
                    f"{' '.join(str(exc).split()) or type(exc).__name__}; the rebase could "
                    f"not remove what it wrote: run vmsnapbackup repair {self.store.name}"
                ) from exc
            raise
        self.journal.clear()
        return RebaseResult(domain=self.store.name, source=self.source.point,
                            source_generation=self.source.generation, point=self.point,
                            generation=self.generation, checkpoint=self.checkpoint,
                            disks=disks, seconds=time.monotonic() - t0)

    def _run(self) -> list[RebasedDisk]:
        targets = [d.target for d in self.source.disks]
        before = set(self.store.generations())
        try:
            self.generation = self.store.allocate_generation(targets)
        finally:
            made = sorted(set(self.store.generations()) - before)
            if made:
                self.gen_dir = self.store.generation_dir(made[0])
        assert self.gen_dir is not None
        self.journal.update(generation=self.generation, new_generation=True,
                            files=[self.store.relpath(self.gen_dir)])
        disks = []
        with StorageDaemon(self.runtime_base, tag=f"rebase-{self.store.name}-{self.point}") \
                as daemon:
            # named in the journal so that repair stops it if this process dies
            assert daemon.pid is not None and daemon.runtime_dir is not None
            self.journal.update(step="read", daemon=JournalDaemon(
                pid=daemon.pid, runtime_dir=daemon.runtime_dir))
            for d in self.source.disks:
                disks.append(self._copy_disk(daemon, d))
        self._seal(disks)
        return disks

    def _copy_disk(self, daemon: StorageDaemon, d: PointDisk) -> RebasedDisk:
        """Point N (through its pinned base) into a new base, then checked against table N.

        QEMU moves the bytes: ``qemu-img convert -n`` of the point's pinned chain (the
        ``json:`` tree of :mod:`.pointread`'s :func:`pinned_volume`: the header's backing
        name is never followed) into a base created 0600 and empty, so zero regions are
        not written at all.  One read of the point, one write of the base.  The new base
        is then hashed while what the convert wrote is still in the page cache (read
        straight from the file at ``qemu-img map``'s offsets, :mod:`.rebasecheck`; an
        export for anything but a plain qcow2) and compared block by block with
        table N; only then is it fsynced (the kernel has been writing it back
        meanwhile).  Our own copy (read, hash, write through a writable export) cost
        about 2.5x this (docs/generations.md §8).
        """
        final = self.store.base_volume_path(self.generation, d.target, BASE_FORMAT)
        partial = final.with_name(partial_name(final.name))
        self.journal.add_files([self.store.relpath(partial)])
        t0 = time.monotonic()
        volume = pinned_volume(self.store, d)
        _create_base(partial, d)
        with _written_back(partial):
            _convert_point(volume, partial, d, self.progress)
            table, stats = hash_new_base(daemon, partial, d, self.progress)
        stats.seconds = time.monotonic() - t0
        mismatch = compare_tables(self.tables[d.target], table)
        if not mismatch.ok:
            raise VerifyMismatchError(
                f"domain {self.store.name}: point {self.source.point} disk {d.target} does "
                f"not read back as its table: {mismatch.describe()}; nothing was rebased "
                "(run verify)")
        log.info("domain %s: %s: new base from point %d: %d blocks of data, %d holes, "
                 "%.1f MiB in %.2f s", self.store.name, d.target, self.source.point,
                 stats.read, stats.holes, stats.bytes_written / 2**20, stats.seconds)
        return RebasedDisk(d.target, self.store.relpath(final), stats, table)

    def _seal(self, disks: list[RebasedDisk]) -> None:
        """Bases renamed, then tables, generation record, and the manifest last (§10.1)."""
        self.journal.update(step="seal")
        g, m = self.generation, self.point
        for rd in disks:
            final = self.store.resolve(rd.base)
            durable_rename(final.with_name(partial_name(final.name)), final)
        gen_disks: dict[str, GenerationDisk] = {}
        point_disks: list[PointDisk] = []
        for rd, d in zip(disks, self.source.disks):
            assert rd.table is not None
            table_path = self.store.table_path(g, d.target, m)
            self.journal.add_files([self.store.relpath(table_path)])
            checksum = write_check_table(table_path, rd.table)
            body = digest_hex(rd.table.body_digest())
            assert body == d.table_digest   # the pass's table equals table N (checked)
            base = self.store.resolve(rd.base)
            gen_disks[d.target] = GenerationDisk(
                virtual_size=d.virtual_size, base_format=BASE_FORMAT, base=base.name,
                table=table_path.name, table_digest=body)
            s = rd.stats
            point_disks.append(PointDisk(
                target=d.target, source=d.source, format=d.format,
                virtual_size=d.virtual_size, block_size=d.block_size,
                volume=rd.base, volume_format=BASE_FORMAT, base=rd.base,
                base_format=BASE_FORMAT, table=self.store.relpath(table_path),
                table1_digest=digest_hex(checksum), difference=None,
                difference_digest=None, table_digest=body,
                blocks=BlockCounts(total=s.total, read=s.read, holes=s.holes,
                                   changed=s.changed, zero=s.zero),
                bytes_written=s.bytes_written, seconds={"rebase": round(s.seconds, 3)}))
        self.store.write_generation(GenerationRecord(
            generation=g, first_point=m, created=self.started,
            block_size=self.source.disks[0].block_size, disks=gen_disks,
            checkpoint=self.checkpoint))
        src = self.source
        manifest = PointManifest(
            point=m, generation=g, domain=src.domain, started=self.started,
            snapshot_at=src.snapshot_at, finished=utc_now(), consistency=src.consistency,
            disks=tuple(point_disks), qemu_run=src.qemu_run)
        self.journal.add_files([self.store.relpath(self.store.manifest_path(m))])
        self.store.write_manifest(manifest)
        self.sealed = True
        log.info("domain %s: point %d sealed: generation %d starts from point %d",
                 self.store.name, m, g, src.point)

    def _undo(self, exc: BaseException) -> bool:
        """Remove the new generation's directory; keep the journal if that fails."""
        log.warning("domain %s: rebase into point %d failed (%s); undoing it",
                    self.store.name, self.point, " ".join(str(exc).split()) or type(exc).__name__)
        if self.sealed:   # point M is complete: only the journal is left to forget
            self.journal.clear()
            return True
        if self.gen_dir is not None:
            try:
                shutil.rmtree(self.gen_dir)
                fsync_dir(self.gen_dir.parent)
            except (OSError, VmSnapBackupError) as err:
                log.error("domain %s: cannot remove %s: %s", self.store.name, self.gen_dir,
                          err)
                return False
        self.journal.clear()
        return True


def _convert_point(volume: PinnedImage, partial: Path, d: PointDisk,
                   progress: ProgressCallback | None) -> None:
    """``qemu-img convert -n`` of the pinned point chain into a new, empty qcow2 base."""
    img = QemuImg(LOCAL)
    size = d.virtual_size
    emit(progress, ProgressEvent(d.target, "rebase", 0, size))

    def percent(pct: float) -> None:
        emit(progress, ProgressEvent(d.target, "rebase", int(size * pct / 100), size))

    check_header(volume, LOCAL, img)   # then the chain is given explicitly (json:)
    img.convert(json_filename(volume), None, os.fspath(partial), BASE_FORMAT,
                target_is_zero=True, progress=percent if progress is not None else None)
    emit(progress, ProgressEvent(d.target, "rebase", size, size, finished=True))


def _create_base(partial: Path, d: PointDisk) -> None:
    """The new base, empty and 0600 from its first instant (the convert writes into it)."""
    cluster = min(max(d.block_size, 65536), 2 * 1024 * 1024)
    QemuImg(LOCAL).create(os.fspath(partial), BASE_FORMAT, size=d.virtual_size,
                          cluster_size=cluster, mode=0o600, in_pool=True)


@contextlib.contextmanager
def _written_back(path: Path, interval: float = 0.1) -> Iterator[None]:
    """fsync ``path`` in a thread, over and over, while the body writes and reads it.

    ``qemu-img convert`` leaves what it wrote in the page cache (its default cache
    mode flushes nothing), and one fsync of a 1 GiB base took as long as the
    convert itself.  Syncing while the convert writes and the check reads makes the
    disk write overlap both (measured: 1.9-2.2 s against 2.6-2.9 s with one fsync at
    the end, docs/generations.md §8); the last fsync, after the body, makes the base
    durable.  The pacing ``interval`` only bounds how often an fsync is started.
    """
    stop = threading.Event()
    failed: list[BaseException] = []

    def loop() -> None:
        try:
            while not stop.wait(interval):
                fsync_path(path)
        except BaseException as exc:  # raised in the caller's thread
            failed.append(exc)

    worker = threading.Thread(target=loop, name=f"writeback-{path.name}", daemon=True)
    worker.start()
    try:
        yield
    finally:
        stop.set()
        worker.join()
    if failed:
        raise failed[0]
    fsync_path(path)
