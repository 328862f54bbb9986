"""Step 3 of a backup per disk: the volume it writes, the pass that fills it and its table.

The pass (:func:`.diskpass.run_disk_pass`) reads the frozen image's export
block by block into the check table and writes the blocks the volume must
hold: every block into a new generation's base volume, the blocks that differ
from table 1 into a point volume.  Around it: create and export the volume
(in the main thread: QMP), read and check table 1, ask the dirty bitmap which
blocks can be skipped (:mod:`.bitmappolicy`), and close the exports.
"""
from __future__ import annotations

import logging
from pathlib import Path

from ..adapters.hypervisor import Hypervisor
from ..adapters.nbdclient import NbdClient
from ..adapters.pinnedchain import PinnedImage
from ..adapters.sourceexport import open_source
from ..adapters.storagedaemon import Export, StorageDaemon
from ..adapters.volumeformat import VolumeLayout, cluster_size
from ..core.journal import Journal
from ..core.manifest import GenerationRecord
from ..core.pool import DomainStore, partial_name
from ..core.poolkey import read_check
from ..errors import ExportError, storage_error_for_errno
from ..progress import ProgressCallback
from .backupwork import DiskWork
from .bitmappolicy import BitmapPolicy
from .diskpass import run_disk_pass
from .ratebudget import RateBudget

__all__ = ["BackupVolumes"]

log = logging.getLogger(__name__)


class BackupVolumes:
    """The per-disk volume work of :class:`~.backup._BackupRun` (a mixin: it reads its state)."""

    hv: Hypervisor
    store: DomainStore
    journal: Journal
    name: str
    point: int
    generation: int
    new_gen: bool
    gen_record: GenerationRecord | None
    base_format: str
    block_size: int
    created: list[Path]
    bitmaps: BitmapPolicy
    layout: VolumeLayout
    budget: RateBudget | None

    def _open_volume(self, daemon: StorageDaemon, w: DiskWork) -> Export:
        """The disk's volume created and exported (QMP: in the main thread); table 1 read."""
        target = w.disk.target
        g = self.generation
        if self.new_gen:
            final = self.store.base_volume_path(g, target, self.base_format)
            fmt = self.base_format
            backing = backing_fmt = None
        else:
            assert self.gen_record is not None
            gdisk = self.gen_record.disks[target]
            w.table1 = read_check(self.store, self.store.disk_dir(g, target) / gdisk.table,
                                  expected_body_digest=bytes.fromhex(gdisk.table_digest))
            final = self.store.point_volume_path(g, target, self.point)
            fmt = "qcow2"
            backing = str(self.store.disk_dir(g, target) / gdisk.base)
            backing_fmt = gdisk.base_format
        partial = final.with_name(partial_name(final.name))
        self.journal.add_files([self.store.relpath(partial)])
        w.volume_partial, w.volume_final = partial, final
        cluster = cluster_size(self.block_size, self.layout.compression, w.size)
        out = daemon.create_writable(
            str(partial), size=w.size, fmt=fmt, cluster_size=cluster, name=f"dst-{target}",
            backing=backing, backing_fmt=backing_fmt, options=self.layout.create_options(),
            layout_node=self.layout.writer_node(
                PinnedImage(backing, backing_fmt or "qcow2") if backing else None),
            key_file=self.layout.key_file)
        self.created.append(partial)
        return out

    def _pass_disk(self, w: DiskWork, out: Export, progress: ProgressCallback) -> None:
        """One disk's pass; runs in a thread of its own when there are several disks."""
        assert w.source_export is not None and w.volume_partial is not None
        assert out.socket_path is not None
        try:
            bitmap = w.source_export.bitmap if w.table1 is not None else None
            with open_source(w.source_export, self.hv.host, dirty_bitmap=bitmap) as src, \
                    NbdClient.open_unix(out.socket_path, out.name) as dst:
                marked = data = dirty = None
                if bitmap and src.can_dirty_status:
                    marked = list(src.dirty_ranges(self.block_size))
                    data = list(src.data_ranges(self.block_size))   # once, for check and pass
                    dirty = self.bitmaps.trusted_runs(w.disk.target, w.table1, src, marked, data)
                    if dirty is not None:
                        w.dirty_bitmap = src.dirty_bitmap
                w.table, w.stats = run_disk_pass(src, dst, self.block_size, w.table1,
                                                 disk=w.disk.target, progress=progress,
                                                 dirty=dirty, data=data, budget=self.budget)
                if marked is not None and dirty is None and self.bitmaps.distrusted is None:
                    assert w.table1 is not None and w.table is not None
                    self.bitmaps.prove(w.disk.target, w.table1, w.table, src.dirty_bitmap,
                                       marked)
                dst.flush()
        except ExportError as exc:
            # the NBD server's ENOSPC/EROFS while writing our volume is the pool's state
            mapped = storage_error_for_errno(exc.errno, str(w.volume_partial), str(exc))
            if mapped is None:
                raise
            raise mapped from exc

    def _close_volume(self, daemon: StorageDaemon, w: DiskWork, out: Export) -> None:
        target = w.disk.target
        assert w.source_export is not None and w.stats is not None
        # Our clients are closed (the volume's writes flushed and answered), but QEMU
        # may not have seen them go yet: a "safe" delete then fails with "export still
        # in use" (seen under load); "hard" only drops a client that is already gone.
        daemon.remove_export(out, force=True)            # flushes and closes the volume
        daemon.remove_export(w.source_export, force=True)
        w.source_export = None
        s = w.stats
        log.info("domain %s: %s read %d of %d blocks (%d holes, %d unchanged by bitmap), "
                 "wrote %d (%d zero), %.1f MiB in %.2f s", self.name, target, s.read, s.total,
                 s.holes, s.unchanged, s.changed, s.zero, s.bytes_written / 2**20, s.seconds)
