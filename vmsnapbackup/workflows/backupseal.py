"""Step 6 of a backup: seal the point -- volumes, tables, then the manifest.

In an encrypted pool (FORMAT §15.2) "seal" is also meant literally: the tables
and the domain XML are written as AES-256-GCM envelopes (:mod:`..core.poolkey`).

The order is FORMAT §10 steps 3 to 5: a point exists once its manifest does,
so every file it names is renamed into place (and fsynced) first.  Kept apart
from the recipe in :mod:`.backup` so the recipe reads as the method's steps.
"""
from __future__ import annotations

import logging
from pathlib import Path

from ..adapters.volumeformat import VolumeLayout
from ..core.atomic import durable_rename
from ..core.journal import Journal
from ..core.manifest import (
    BlockCounts,
    DomainInfo,
    GenerationDisk,
    GenerationRecord,
    PointDisk,
    PointManifest,
    digest_hex,
    utc_now,
)
from ..core.pool import DomainStore
from ..core.poolkey import seal_xml, table_checksum, write_check, write_difference
from .backupwork import BackupResult, DiskWork
from .bitmappolicy import BitmapPolicy

__all__ = ["BackupSeal"]

log = logging.getLogger(__name__)


class BackupSeal:
    """The seal and result of :class:`~.backup._BackupRun` (a mixin: it reads its state)."""

    store: DomainStore
    journal: Journal
    bitmaps: BitmapPolicy
    name: str
    uuid: str
    pool_dir: Path
    point: int
    generation: int
    new_gen: bool
    gen_record: GenerationRecord | None
    base_format: str
    block_size: int
    work: list[DiskWork]
    created: list[Path]
    started: str
    snapshot_at: str | None
    consistency: str
    domain_xml: str
    qemu_run: str | None
    sealed: bool
    overlay_seconds: float
    layout: VolumeLayout

    def _seal(self) -> None:
        """Step 6: volumes, then tables, then the manifest (FORMAT §10 steps 3 to 5)."""
        self.journal.update(step="seal")
        g = self.generation
        disks: list[PointDisk] = []
        for w in self.work:
            assert w.volume_partial and w.volume_final and w.table and w.stats
            durable_rename(w.volume_partial, w.volume_final)
            self.created.append(w.volume_final)
        gen_disks: dict[str, GenerationDisk] = {}
        for w in self.work:
            target = w.disk.target
            assert w.table is not None and w.stats is not None and w.volume_final
            body_digest = digest_hex(w.table.body_digest())
            if self.new_gen:
                table_path = self.store.table_path(g, target, self.point)
                self.journal.add_files([self.store.relpath(table_path)])
                checksum = write_check(self.store, table_path, w.table)
                self.created.append(table_path)
                gen_disks[target] = GenerationDisk(
                    virtual_size=w.size, base_format=self.base_format,
                    base=w.volume_final.name, table=table_path.name, table_digest=body_digest)
                table1_digest, diff_rel, diff_digest = digest_hex(checksum), None, None
                base_path, base_fmt = w.volume_final, self.base_format
            else:
                assert self.gen_record is not None
                gdisk = self.gen_record.disks[target]
                table_path = self.store.disk_dir(g, target) / gdisk.table
                assert w.difference is not None   # step 4
                diff_path = self.store.difference_path(g, target, self.point)
                self.journal.add_files([self.store.relpath(diff_path)])
                diff_checksum = write_difference(self.store, diff_path, w.difference)
                self.created.append(diff_path)
                table1_digest = digest_hex(table_checksum(self.store, table_path))
                diff_rel, diff_digest = self.store.relpath(diff_path), digest_hex(diff_checksum)
                base_path = self.store.disk_dir(g, target) / gdisk.base
                base_fmt = gdisk.base_format
            s = w.stats
            disks.append(PointDisk(
                target=target, source=w.disk.source or "", format=w.disk.format or "raw",
                virtual_size=w.size, block_size=self.block_size,
                volume=self.store.relpath(w.volume_final),
                volume_format=self.base_format if self.new_gen else "qcow2",
                base=self.store.relpath(base_path), base_format=base_fmt,
                table=self.store.relpath(table_path), table1_digest=table1_digest,
                difference=diff_rel, difference_digest=diff_digest, table_digest=body_digest,
                blocks=BlockCounts(total=s.total, read=s.read, holes=s.holes,
                                   changed=s.changed, zero=s.zero, unchanged=s.unchanged),
                bytes_written=s.bytes_written,
                seconds={"read": round(s.seconds, 3), "commit": round(w.commit_seconds, 3)},
                dirty_bitmap=w.dirty_bitmap, compression=self.layout.compression,
                volume_bytes=w.volume_final.stat().st_size))
        if self.new_gen:
            self.store.write_generation(GenerationRecord(
                generation=g, first_point=self.point, created=self.started,
                block_size=self.block_size, disks=gen_disks, checkpoint=self.bitmaps.checkpoint))
        xml, xml_sealed = seal_xml(self.store, self.point, self.domain_xml)  # FORMAT §15.2
        manifest = PointManifest(
            point=self.point, generation=g,
            domain=DomainInfo(name=self.name, uuid=self.uuid, xml=xml, xml_sealed=xml_sealed),
            started=self.started, snapshot_at=self.snapshot_at, finished=utc_now(),
            consistency=self.consistency, disks=tuple(disks),
            # a bitmap that failed a check is deleted after the seal; should that fail,
            # no run recorded means the next point proves it by a full read again
            qemu_run=None if self.bitmaps.distrusted else self.qemu_run)
        self.journal.add_files([self.store.relpath(self.store.manifest_path(self.point))])
        self.store.write_manifest(manifest)
        self.sealed = True
        log.info("domain %s: point %d sealed (generation %d)", self.name, self.point, g)

    def _result(self) -> BackupResult:
        return BackupResult(
            domain=self.name, uuid=self.uuid, point=self.point, generation=self.generation,
            new_generation=self.new_gen, consistency=self.consistency,
            pool=str(self.pool_dir),
            disks=[w.result(self.store.relpath(w.volume_final) if w.volume_final else "")
                   for w in self.work],
            seconds={"on_overlay": round(self.overlay_seconds, 3),
                     "commit": round(sum(w.commit_seconds for w in self.work), 3)})
