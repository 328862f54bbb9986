"""Rebase: a new generation made from a point already in the pool, without reading the VM.

A point holds every block changed since its generation's first table, so a
long generation's points keep growing (docs/generations.md).  Starting a new
generation normally costs a full read of the running VM; but the pool already
holds the disk as it was at any point, and that is all a base needs.  A rebase
copies point N (its base plus its difference, read through QEMU as ``restore``
reads it) into a new base volume, checking every block against table N as it
goes, and seals it as point M, the first point of a new generation whose table 1
is table N.  The next backup then diffs against the disk as it was at N and
stores only what changed since.  The write order is FORMAT §10.1: nothing is
visible before the manifest, and point N's generation stays restorable until
prune removes it.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapters.nbdclient import NbdClient
from ..adapters.storagedaemon import StorageDaemon
from ..core.atomic import durable_rename, fsync_dir
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
from ..progress import ProgressCallback
from .diskpass import PassStats, run_disk_pass
from .interrupt import interruptible
from .pointread import (
    PoolLike,
    compare_tables,
    open_pool,
    read_point_tables,
    select_point,
    with_phase,
)

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
        """Point N's volume (through its base) into a new base, checked against table N."""
        final = self.store.base_volume_path(self.generation, d.target, BASE_FORMAT)
        partial = final.with_name(partial_name(final.name))
        self.journal.add_files([self.store.relpath(partial)])
        src = daemon.export_image(os.fspath(self.store.resolve(d.volume)), d.volume_format,
                                  name=f"src-{d.target}", direct=True)
        try:
            cluster = min(max(d.block_size, 65536), 2 * 1024 * 1024)
            dst = daemon.create_writable(os.fspath(partial), size=d.virtual_size,
                                         fmt=BASE_FORMAT, cluster_size=cluster,
                                         name=f"dst-{d.target}")
            try:
                assert src.socket_path is not None and dst.socket_path is not None
                with NbdClient.open_unix(src.socket_path, src.name) as reader, \
                        NbdClient.open_unix(dst.socket_path, dst.name) as writer:
                    table, stats = run_disk_pass(
                        reader, writer, d.block_size, None, disk=d.target,
                        progress=with_phase(self.progress, "rebase"))
                    writer.flush()
            finally:
                daemon.remove_export(dst, force=True)   # flushes and closes the new base
        finally:
            daemon.remove_export(src, force=True)
        mismatch = compare_tables(self.tables[d.target], table)
        if not mismatch.ok:
            raise VerifyMismatchError(
                f"domain {self.store.name}: point {self.source.point} disk {d.target} does "
                f"not read back as its table: {mismatch.describe()}; nothing was rebased "
                "(run verify)")
        log.info("domain %s: %s: new base from point %d: %d blocks read, %d written, "
                 "%.1f MiB in %.2f s", self.store.name, d.target, self.source.point,
                 stats.read, stats.changed, stats.bytes_written / 2**20, stats.seconds)
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
