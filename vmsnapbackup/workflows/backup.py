"""The backup: snapshot, export, one pass per disk, commit back, seal (DESIGN.md §2).

The order of writes is FORMAT.md §10; the journal records each step before it
is taken (FORMAT §9) so that a backup killed at any instant can be undone by
``repair``.  When the backup itself fails it undoes what it did: the VM is
committed back to its original image, the storage daemon stopped, partial
files removed; the journal is cleared only once all of that succeeded.
"""
from __future__ import annotations

import functools
import logging
import os
import secrets
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ..adapters import offline
from ..adapters.domainxml import Disk, is_our_overlay, overlay_path
from ..adapters.hypervisor import Hypervisor, connect
from ..adapters.nbdclient import NbdClient
from ..adapters.storagedaemon import Export, StorageDaemon
from ..adapters.storagepool import refresh_pool, resolve_pool
from ..core import inflight
from ..core.atomic import durable_rename, unlink_durable
from ..core.checktable import CheckTable, read_check_table, write_check_table
from ..core.difftable import compare, write_difference_table
from ..core.journal import JournalDaemon, JournalDisk, JournalEntry
from ..core.manifest import (
    BlockCounts, DomainInfo, GenerationDisk, GenerationRecord, PointDisk, PointManifest,
    digest_hex, utc_now,
)
from ..core.pool import DomainStore, Pool, partial_name
from ..core.tablefile import DEFAULT_BLOCK_SIZE, file_checksum, validate_block_size
from ..errors import (
    ExportError, HypervisorError, RepairNeededError, UnsupportedDiskError, UsageError,
    VmSnapBackupError, storage_error_for_errno,
)
from ..progress import ProgressCallback
from .diskpass import PassStats, run_disk_pass
from .dirtymap import change_outside, new_checkpoint_name, unchanged_blocks_disagree
from .parallel import run_all
from .interrupt import interruptible

__all__ = ["backup", "BackupResult", "DiskResult", "DEFAULT_THRESHOLD"]

log = logging.getLogger(__name__)

#: A point whose difference passes this fraction of a disk's blocks makes the
#: next backup start a new generation (difference tables only grow).
DEFAULT_THRESHOLD = 0.5
BASE_FORMATS = ("qcow2", "raw")


@dataclass
class DiskResult:
    """One disk of a finished point."""

    target: str
    source: str
    format: str
    virtual_size: int
    volume: str
    blocks: Dict[str, int]
    bytes_written: int
    seconds: Dict[str, float]

    def to_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class BackupResult:
    """What ``backup`` did: the point it sealed and how each disk went."""

    domain: str
    uuid: str
    point: int
    generation: int
    new_generation: bool
    consistency: str
    pool: str
    disks: List[DiskResult] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    seconds: Dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        d = dict(self.__dict__)
        d["disks"] = [x.to_dict() for x in self.disks]
        d["skipped"] = [{"target": t, "reason": r} for t, r in self.skipped]
        return d


@dataclass
class _DiskWork:
    """Per-disk state while the backup runs."""

    disk: Disk
    image: str = ""              # what is read: the frozen image, or the image of a shut-off domain
    image_format: str = "raw"
    overlay: Optional[str] = None
    size: int = 0
    source_export: Optional[Export] = None
    volume_partial: Optional[Path] = None
    volume_final: Optional[Path] = None
    table1: Optional[CheckTable] = None   # the generation's first table (None: new generation)
    table: Optional[CheckTable] = None    # this point's table, built by the pass
    stats: Optional[PassStats] = None
    commit_seconds: float = 0.0
    dirty_bitmap: Optional[str] = None    # the bitmap the pass trusted to skip reads


@dataclass(frozen=True)
class _CurrentGeneration:
    """The generation a backup may continue, read once: the pool lock keeps it still."""

    number: Optional[int] = None
    record: Optional[GenerationRecord] = None
    unreadable: Optional[str] = None          # why the record could not be read
    latest: Optional[PointManifest] = None    # its newest sealed point

    @property
    def checkpoint(self) -> Optional[str]:
        return self.record.checkpoint if self.record is not None else None


def backup(
    domain: str,
    pool: Union[str, "os.PathLike[str]"],
    *,
    uri: str = "qemu:///system",
    disks: Optional[Sequence[str]] = None,
    quiesce: Optional[bool] = None,
    new_generation: bool = False,
    threshold: float = DEFAULT_THRESHOLD,
    block_size: int = DEFAULT_BLOCK_SIZE,
    base_format: str = "qcow2",
    overlay_dir: Optional[str] = None,
    progress: Optional[ProgressCallback] = None,
    dirty_bitmaps: bool = True,
) -> BackupResult:
    """Back up ``domain`` (name, UUID or id) into ``pool`` (a path or a libvirt pool name).

    ``quiesce`` None asks the guest agent and falls back to a crash-consistent
    snapshot; True insists; False never asks.  Returns once the point is sealed
    and the domain runs on its original images again.

    ``dirty_bitmaps`` lets a running domain's new generation start with a
    libvirt checkpoint, whose bitmap later points use to skip reading what
    was not written (see :mod:`.dirtymap` for when it is trusted).  False
    creates no checkpoint and reads every data block.
    """
    validate_block_size(block_size)
    if base_format not in BASE_FORMATS:
        raise UsageError(f"base format must be one of {', '.join(BASE_FORMATS)}, "
                         f"not {base_format!r}")
    if not 0.0 < threshold <= 1.0:
        raise UsageError(f"the new-generation threshold must be in (0, 1], not {threshold}")
    started_mono = time.monotonic()
    pool_dir, libvirt_pool = resolve_pool(os.fspath(pool), uri)
    with connect(uri) as hv, interruptible("backup"):
        dom = hv.find_domain(domain)
        name, uuid = hv.domain_name(dom), hv.domain_uuid(dom)
        selected, skipped = hv.backup_disks(dom, disks)
        for s in skipped:
            log.info("domain %s: not backing up %s: %s", name, s.disk.target, s.reason)
        if not selected:
            reasons = "; ".join(f"{s.disk.target}: {s.reason}" for s in skipped) or "no disks"
            raise UnsupportedDiskError(f"domain {name} has no disk that can be backed up "
                                       f"({reasons})")
        # only now, with a domain worth backing up: a typo must not leave a new pool behind
        store = Pool.open(pool_dir, create=True).domain(uuid, name, create=True)
        with store.lock("backup"):
            _repair_first(store, hv, dom, name, pool_dir)
            store.set_name(name)
            run = _BackupRun(hv, dom, store, name, uuid, selected, pool_dir,
                             quiesce=quiesce, new_generation=new_generation,
                             threshold=threshold, block_size=block_size,
                             base_format=base_format, overlay_dir=overlay_dir,
                             progress=progress, dirty_bitmaps=dirty_bitmaps)
            result = run.execute()
    refresh_pool(libvirt_pool, uri)
    result.skipped = [(s.disk.target, s.reason) for s in skipped]
    result.seconds["total"] = round(time.monotonic() - started_mono, 3)
    return result


def _repair_first(store: DomainStore, hv: Hypervisor, dom: Any, name: str,
                  pool_dir: Path) -> None:
    """Never stack a backup on what a dead one left: repair it first, or say how.

    Repair only touches what carries our marker and refuses anything else, so
    running it here is as safe as the user running it; when it refuses (a
    foreign image on top of ours, an unreadable journal, ...) the backup stops
    and names the command, whose output explains the refusal.
    """
    from .repair import needs_repair, repair_held

    reason = needs_repair(store, hv, dom)
    if reason is None:
        return
    log.warning("domain %s: %s; repairing before the backup", name, reason)
    done = repair_held(store, hv, dom)
    for line in done.lines():
        log.warning("%s", line)
    if done.refused or done.error is not None:
        raise RepairNeededError(
            f"domain {name}: {reason}, and it cannot be repaired automatically; run: "
            f"vmsnapbackup --pool {pool_dir} repair {name}")
    still = needs_repair(store, hv, dom)
    if still is not None:
        raise RepairNeededError(f"domain {name}: {still} after a repair; run: "
                                f"vmsnapbackup --pool {pool_dir} repair {name}")


class _BackupRun:
    """One backup of one domain, with the lock held.  Keeps what it created so it can undo it."""

    def __init__(self, hv: Hypervisor, dom: Any, store: DomainStore, name: str, uuid: str,
                 disks: List[Disk], pool_dir: Path, *, quiesce: Optional[bool],
                 new_generation: bool, threshold: float, block_size: int, base_format: str,
                 overlay_dir: Optional[str], progress: Optional[ProgressCallback],
                 dirty_bitmaps: bool = True) -> None:
        self.hv, self.dom, self.store = hv, dom, store
        self.name, self.uuid, self.pool_dir = name, uuid, pool_dir
        self.work = [_DiskWork(d) for d in disks]
        self.quiesce, self.force_new = quiesce, new_generation
        self.threshold, self.block_size, self.base_format = threshold, block_size, base_format
        self.overlay_dir, self.progress = overlay_dir, progress
        self.journal = store.journal
        self.point = 0
        self.generation = 0
        self.new_gen = False
        self.gen_record: Optional[GenerationRecord] = None
        self.consistency = "offline"
        self.committed: List[str] = []
        self.sealed = False
        self.created: List[Path] = []   # pool files and dirs to remove if we fail
        self.started = utc_now()
        self.snapshot_at: Optional[str] = None
        self.snapshot_mono = 0.0
        self.overlay_seconds = 0.0
        self.domain_xml = ""
        self.dirty_bitmaps = dirty_bitmaps
        self.checkpoint: Optional[str] = None          # made by this backup for its new generation
        self.distrusted: Optional[str] = None          # a bitmap that failed its check
        self.previous_checkpoint: Optional[str] = None  # the one a new generation replaces
        self.qemu_run: Optional[str] = None             # the QEMU run at the snapshot
        self.bitmap_proven = False   # the generation's last point was in this QEMU run
        self.current = _CurrentGeneration()

    # -- the happy path ------------------------------------------------------

    def execute(self) -> BackupResult:
        self.active = self.hv.is_active(self.dom)
        self.domain_xml = self._saved_xml()
        record = inflight.InflightRecord(
            uuid=self.uuid, name=self.name, pid=os.getpid(), operation="backup",
            offline=not self.active, since=self.started, pool=str(self.pool_dir),
            images=tuple(w.disk.source or "" for w in self.work))
        # registered before anything is written to the pool: a backup kept away by a
        # live operation of this host (say, a backup into another pool: another pool
        # lock) must leave no journal behind
        with inflight.inflight(record):
            self.point = self.store.allocate_point()
            self.journal.write(JournalEntry(
                operation="backup", pid=os.getpid(), host=socket.gethostname(),
                started=self.started, step="start", point=self.point,
                disks={w.disk.target: JournalDisk(source=w.disk.source or "")
                       for w in self.work}))
            log.info("domain %s: backup point %d (%s)", self.name, self.point,
                     "running: external snapshot" if self.active
                     else "shut off: reading directly")
            try:
                if not self.active and self.hv.is_active(self.dom):
                    # started between our look and the in-flight record that makes the
                    # hook refuse a start: nothing is done yet, so just say so
                    raise HypervisorError(
                        f"domain {self.name} was started while its offline backup began; "
                        "run the backup again")
                self._run()
            except BaseException as exc:
                if not self._undo(exc):
                    raise RepairNeededError(
                        f"{' '.join(str(exc).split()) or type(exc).__name__}; the backup could "
                        f"not undo everything: run vmsnapbackup --pool {self.pool_dir} repair "
                        f"{self.name}") from exc
                raise
            # the journal goes before the in-flight record: while either is there, a
            # dead backup can be found (the record names the pool) and repaired
            self.journal.clear()
        return self._result()

    def _saved_xml(self) -> str:
        """The persistent definition (what a restore would define again), else the live XML."""
        try:
            if self.dom.isPersistent():
                return self.hv.domain_xml(self.dom, inactive=True)
        except Exception:  # a transient domain or a libvirt hiccup: the live XML will do
            log.debug("no persistent XML", exc_info=True)
        return self.hv.domain_xml(self.dom)

    def _run(self) -> None:
        self.current = self._read_current()
        if self.active:
            self._checkpoint_if_new_generation()
            self._snapshot()
            bitmap = self._usable_bitmap()
        else:
            bitmap = None
            for w in self.work:
                w.image, w.image_format = w.disk.source or "", w.disk.format or "raw"
            self.snapshot_at = utc_now()
        with StorageDaemon(tag=f"{self.name}-{self.point}") as daemon:
            assert daemon.pid is not None and daemon.runtime_dir is not None
            self.journal.update(step="read", daemon=JournalDaemon(
                pid=daemon.pid, runtime_dir=daemon.runtime_dir))
            for w in self.work:
                w.source_export = daemon.export_image(
                    w.image, w.image_format, name=f"src-{w.disk.target}", direct=True,
                    bitmap=bitmap if w.image_format == "qcow2" else None)
                w.size = w.source_export.size
            self._plan_generation()
            volumes = [self._open_volume(daemon, w) for w in self.work]
            run_all([functools.partial(self._pass_disk, w, out)
                     for w, out in zip(self.work, volumes)],
                    progress=self.progress)
            for w, out in zip(self.work, volumes):
                self._close_volume(daemon, w, out)
        # every export is gone with the daemon: the frozen images are free to commit into
        if self.active:
            self.dom = self.hv.revive(self.dom)   # libvirtd may have restarted meanwhile
            self._commit_all()
        self._seal()
        self._retire_checkpoints()

    def _snapshot(self) -> None:
        snap_id = f"p{self.point}-{secrets.token_hex(3)}"
        overlays = {w.disk.target: overlay_path(w.disk, snap_id, self.overlay_dir)
                    for w in self.work}
        self.journal.update(step="snapshot", disks={
            w.disk.target: JournalDisk(source=w.disk.source or "",
                                       overlay=overlays[w.disk.target],
                                       frozen=w.disk.source or "")
            for w in self.work})
        snap = self.hv.snapshot(self.dom, [w.disk for w in self.work], overlays,
                                quiesce=self.quiesce)
        self.snapshot_mono = time.monotonic()
        self.snapshot_at = utc_now()
        try:
            self.qemu_run = self.hv.qemu_run(self.dom)
        except HypervisorError as exc:
            log.warning("domain %s: cannot tell its QEMU run (%s)", self.name, exc)
        self.consistency = "quiesced" if snap.quiesced else "crash-consistent"
        for w in self.work:
            w.overlay = snap.overlays[w.disk.target]
            frozen = snap.frozen[w.disk.target]
            w.image, w.image_format = frozen.path, frozen.format or w.disk.format or "raw"
        log.info("domain %s: %s snapshot in %.3f s", self.name, self.consistency, snap.seconds)

    # -- checkpoints (dirty bitmaps) -------------------------------------------

    def _checkpoint_if_new_generation(self) -> None:
        """Before the snapshot of a new generation's first point, start its bitmap.

        Made *before* the snapshot, the bitmap marks a few writes that the
        base volume already holds, which only costs reads; made after, it
        would miss writes the base does not hold.  Whether a generation
        starts is known here for every reason but a resized disk (the sizes
        come from the exports); such a generation just gets no checkpoint.
        """
        if not self.dirty_bitmaps:
            return
        reason, _, _ = self._generation_verdict(sizes=False)
        targets = [w.disk.target for w in self.work if (w.disk.format or "") == "qcow2"]
        if reason is None or not targets:
            return
        name = new_checkpoint_name(self.point)
        self.journal.update(checkpoint=name)   # FORMAT §9: named before it exists
        try:
            self.hv.create_checkpoint(self.dom, name, targets,
                                      f"vmsnapbackup: writes since point {self.point} into "
                                      f"{self.pool_dir}")
        except HypervisorError as exc:
            log.warning("domain %s: no checkpoint for the new generation (%s); its later "
                        "points read every data block", self.name, exc)
            self.journal.update(checkpoint=None)
            return
        self.checkpoint = name

    def _usable_bitmap(self) -> Optional[str]:
        """The current generation's checkpoint, if libvirt still has it (else None)."""
        name = self.current.checkpoint
        if not self.dirty_bitmaps or name is None:
            return None
        try:
            present = name in self.hv.checkpoint_names(self.dom)
        except HypervisorError as exc:
            log.warning("domain %s: cannot list its checkpoints (%s): reading every data block",
                        self.name, exc)
            return None
        if not present:
            log.info("domain %s: checkpoint %s of generation %d is gone (deleted, or the "
                     "domain migrated): reading every data block", self.name, name,
                     self.current.number)
            return None
        latest = self.current.latest
        last_run = latest.qemu_run if latest is not None else None
        self.bitmap_proven = self.qemu_run is not None and last_run == self.qemu_run
        if not self.bitmap_proven:
            log.info("domain %s: first point of generation %d since QEMU started: reading "
                     "every data block to prove bitmap %s", self.name, self.current.number,
                     name)
        return name

    def _trusted_dirty_runs(self, w: _DiskWork, src: NbdClient, dirty: List[Tuple[int, int]],
                            data: List[Tuple[int, int]]) -> Optional[List[Tuple[int, int]]]:
        """The bitmap's dirty runs for this disk, or None when every block must be read."""
        if w.table1 is None or not self.bitmap_proven:
            return None
        doubt = unchanged_blocks_disagree(src, w.table1, dirty, data=data)
        if doubt is not None:
            log.warning("domain %s: dirty bitmap %s of %s cannot be trusted (%s): reading "
                        "every data block, and the checkpoint is deleted", self.name,
                        src.dirty_bitmap, w.disk.target, doubt)
            self.distrusted = src.dirty_bitmap
            return None
        w.dirty_bitmap = src.dirty_bitmap
        return dirty

    def _prove_bitmap(self, w: _DiskWork, name: Optional[str],
                      marked: List[Tuple[int, int]]) -> None:
        """After a full read: did the bitmap see every change since table 1?"""
        assert w.table1 is not None and w.table is not None
        block = change_outside(w.table1, w.table, marked)
        if block is None:
            log.info("domain %s: bitmap %s of %s agrees with a full read", self.name, name,
                     w.disk.target)
            return
        log.warning("domain %s: block %d of %s changed since the generation's first point "
                    "but bitmap %s missed it (the image was written behind QEMU's back?): "
                    "the checkpoint is deleted, later points read every data block",
                    self.name, block, w.disk.target, name)
        self.distrusted = name

    def _retire_checkpoints(self) -> None:
        """After the seal: drop the checkpoint a new generation replaced, or one that lied.

        Best effort: a checkpoint left behind costs QEMU a bitmap to keep,
        never a wrong backup (only the generation record's checkpoint is
        ever trusted, and only after its checks).
        """
        retire = set()
        if self.new_gen and self.previous_checkpoint and \
                self.previous_checkpoint != self.checkpoint:
            retire.add(self.previous_checkpoint)
        if self.distrusted:
            retire.add(self.distrusted)
        for name in sorted(retire):
            try:
                self.hv.delete_checkpoint(self.dom, name)
            except HypervisorError as exc:
                log.warning("domain %s: checkpoint %s not deleted: %s", self.name, name, exc)

    def _plan_generation(self) -> None:
        """Continue the current generation, or start a new one (FORMAT §4 says when)."""
        reason, current, rec = self._generation_verdict(sizes=True)
        if reason is None:
            assert current is not None and rec is not None
            self.generation, self.gen_record = current, rec
            self.journal.update(generation=current, new_generation=False)
            return
        log.info("domain %s: new generation (%s)", self.name, reason)
        self.new_gen = True
        self.gen_record = None
        self.previous_checkpoint = self.current.checkpoint
        before = set(self.store.generations())
        try:
            self.generation = self.store.allocate_generation([w.disk.target for w in self.work])
        except BaseException:
            # it may fail after making the generation's directory (a disk's point
            # store could not be made): that directory is ours to remove as well
            self.created += [self.store.generation_dir(g)
                             for g in sorted(set(self.store.generations()) - before)]
            raise
        gen_dir = self.store.generation_dir(self.generation)
        self.created.append(gen_dir)
        self.journal.update(generation=self.generation, new_generation=True,
                            files=[self.store.relpath(gen_dir)])

    def _generation_verdict(self, sizes: bool) -> Tuple[Optional[str], Optional[int],
                                                         Optional[GenerationRecord]]:
        """Why a new generation starts (None: continue ``current`` with record ``rec``).

        ``sizes`` False leaves out the one reason that needs the exports (a
        resized disk): the verdict before the snapshot.
        """
        if self.force_new:
            return "asked for", None, None
        current, rec = self.current.number, self.current.record
        if current is None:
            return "first backup", None, None
        if rec is None:
            return f"generation {current} is unreadable: {self.current.unreadable}", None, None
        targets = {w.disk.target for w in self.work}
        if set(rec.disks) != targets:
            return (f"disks changed ({', '.join(sorted(rec.disks))} -> "
                    f"{', '.join(sorted(targets))})"), None, None
        if rec.block_size != self.block_size:
            return f"block size changed ({rec.block_size} -> {self.block_size})", None, None
        for w in self.work:
            if sizes and rec.disks[w.disk.target].virtual_size != w.size:
                return (f"disk {w.disk.target} was resized "
                        f"({rec.disks[w.disk.target].virtual_size} -> {w.size} bytes)",
                        None, None)
        latest = self.current.latest
        if latest is not None and not latest.is_generation_start:
            for d in latest.disks:
                total = max(d.blocks.total, 1)
                if d.blocks.changed / total > self.threshold:
                    return (f"point {latest.point} changed {d.blocks.changed} of "
                            f"{d.blocks.total} blocks of {d.target}, over the threshold "
                            f"{self.threshold:g}"), None, None
        return None, current, rec

    def _read_current(self) -> _CurrentGeneration:
        """The current generation's record and newest point, read once per backup."""
        number = self.store.current_generation()
        if number is None:
            return _CurrentGeneration()
        try:
            record = self.store.read_generation(number)
        except VmSnapBackupError as exc:
            return _CurrentGeneration(number, unreadable=str(exc))
        sealed = [p.manifest for p in self.store.points()
                  if p.manifest is not None and p.manifest.generation == number]
        return _CurrentGeneration(number, record, latest=sealed[-1] if sealed else None)

    def _open_volume(self, daemon: StorageDaemon, w: _DiskWork) -> Export:
        """The disk's volume created and exported (QMP: in the main thread); table 1 read."""
        target = w.disk.target
        g = self.generation
        if self.new_gen:
            final = self.store.base_volume_path(g, target, self.base_format)
            fmt = self.base_format
            backing = None
        else:
            assert self.gen_record is not None
            gdisk = self.gen_record.disks[target]
            w.table1 = read_check_table(self.store.disk_dir(g, target) / gdisk.table,
                                        expected_body_digest=bytes.fromhex(gdisk.table_digest))
            final = self.store.point_volume_path(g, target, self.point)
            fmt = "qcow2"
            backing = str(self.store.disk_dir(g, target) / gdisk.base)
        partial = final.with_name(partial_name(final.name))
        self.journal.add_files([self.store.relpath(partial)])
        w.volume_partial, w.volume_final = partial, final
        cluster = min(max(self.block_size, 65536), 2 * 1024 * 1024)
        out = daemon.create_writable(
            str(partial), size=w.size, fmt=fmt, cluster_size=cluster, name=f"dst-{target}",
            backing=backing,
            backing_fmt=self.gen_record.disks[target].base_format if backing else None)
        self.created.append(partial)
        return out

    def _pass_disk(self, w: _DiskWork, out: Export, progress: ProgressCallback) -> None:
        """One disk's pass; runs in a thread of its own when there are several disks."""
        assert w.source_export is not None and w.volume_partial is not None
        try:
            bitmap = w.source_export.bitmap if w.table1 is not None else None
            with NbdClient.open_unix(w.source_export.socket_path, w.source_export.name,
                                     dirty_bitmap=bitmap) as src, \
                    NbdClient.open_unix(out.socket_path, out.name) as dst:
                marked = data = dirty = None
                if bitmap and src.can_dirty_status:
                    marked = list(src.dirty_ranges(self.block_size))
                    data = list(src.data_ranges(self.block_size))   # once, for check and pass
                    dirty = self._trusted_dirty_runs(w, src, marked, data)
                w.table, w.stats = run_disk_pass(src, dst, self.block_size, w.table1,
                                                 disk=w.disk.target, progress=progress,
                                                 dirty=dirty, data=data)
                if marked is not None and dirty is None and self.distrusted is None:
                    self._prove_bitmap(w, src.dirty_bitmap, marked)
                dst.flush()
        except ExportError as exc:
            # the NBD server's ENOSPC/EROFS while writing our volume is the pool's state
            mapped = storage_error_for_errno(exc.errno, str(w.volume_partial), str(exc))
            if mapped is None:
                raise
            raise mapped from exc

    def _close_volume(self, daemon: StorageDaemon, w: _DiskWork, out: Export) -> None:
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

    def _commit_all(self) -> None:
        self.journal.update(step="commit")
        for w in self.work:
            if w.disk.target in self.committed or w.overlay is None:
                continue
            res = self.hv.commit(self.dom, w.disk.target, w.overlay)
            w.commit_seconds = res.seconds
            self.committed.append(w.disk.target)
        self.overlay_seconds = time.monotonic() - self.snapshot_mono
        log.info("domain %s: back on its original images after %.2f s on overlays",
                 self.name, self.overlay_seconds)

    def _seal(self) -> None:
        """Volumes, then tables, then the manifest (FORMAT §10 steps 3–5)."""
        self.journal.update(step="seal")
        g = self.generation
        disks: List[PointDisk] = []
        for w in self.work:
            assert w.volume_partial and w.volume_final and w.table and w.stats
            durable_rename(w.volume_partial, w.volume_final)
            self.created.append(w.volume_final)
        gen_disks: Dict[str, GenerationDisk] = {}
        for w in self.work:
            target = w.disk.target
            assert w.table is not None and w.stats is not None and w.volume_final
            body_digest = digest_hex(w.table.body_digest())
            if self.new_gen:
                table_path = self.store.table_path(g, target, self.point)
                self.journal.add_files([self.store.relpath(table_path)])
                checksum = write_check_table(table_path, w.table)
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
                assert w.table1 is not None   # read (and checked) before the pass
                diff = compare(w.table1, w.table)
                diff_path = self.store.difference_path(g, target, self.point)
                self.journal.add_files([self.store.relpath(diff_path)])
                diff_checksum = write_difference_table(diff_path, diff)
                self.created.append(diff_path)
                table1_digest = digest_hex(file_checksum(table_path))
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
                dirty_bitmap=w.dirty_bitmap))
        if self.new_gen:
            self.store.write_generation(GenerationRecord(
                generation=g, first_point=self.point, created=self.started,
                block_size=self.block_size, disks=gen_disks, checkpoint=self.checkpoint))
        manifest = PointManifest(
            point=self.point, generation=g,
            domain=DomainInfo(name=self.name, uuid=self.uuid, xml=self.domain_xml),
            started=self.started, snapshot_at=self.snapshot_at, finished=utc_now(),
            consistency=self.consistency, disks=tuple(disks),
            # a bitmap that failed a check is deleted after the seal; should that fail,
            # no run recorded means the next point proves it by a full read again
            qemu_run=None if self.distrusted else self.qemu_run)
        self.journal.add_files([self.store.relpath(self.store.manifest_path(self.point))])
        self.store.write_manifest(manifest)
        self.sealed = True
        log.info("domain %s: point %d sealed (generation %d)", self.name, self.point, g)

    def _result(self) -> BackupResult:
        return BackupResult(
            domain=self.name, uuid=self.uuid, point=self.point, generation=self.generation,
            new_generation=self.new_gen, consistency=self.consistency,
            pool=str(self.pool_dir),
            disks=[DiskResult(
                target=w.disk.target, source=w.disk.source or "",
                format=w.disk.format or "raw", virtual_size=w.size,
                volume=self.store.relpath(w.volume_final) if w.volume_final else "",
                blocks={"total": w.stats.total, "read": w.stats.read, "holes": w.stats.holes,
                        "unchanged": w.stats.unchanged, "changed": w.stats.changed,
                        "zero": w.stats.zero} if w.stats else {},
                bytes_written=w.stats.bytes_written if w.stats else 0,
                seconds={"read": round(w.stats.seconds, 3) if w.stats else 0.0,
                         "commit": round(w.commit_seconds, 3)})
                for w in self.work],
            seconds={"on_overlay": round(self.overlay_seconds, 3),
                     "commit": round(sum(w.commit_seconds for w in self.work), 3)})

    # -- undoing a failed backup -----------------------------------------------

    def _undo(self, exc: BaseException) -> bool:
        """Put the VM back and remove what this backup created; keep the journal if we can't.

        Runs with the storage daemon already stopped (its context manager
        unwound first), so the frozen images are free to commit into.
        """
        log.warning("domain %s: backup of point %d failed (%s); undoing it", self.name,
                    self.point, " ".join(str(exc).split()) or type(exc).__name__)
        clean = True
        if self.active:
            # also when the snapshot call itself failed half-way: the live XML says
            clean = self._commit_back() and clean
        if not self.sealed:
            clean = self._remove_created() and clean
            self._drop_own_checkpoint()
        if clean:
            self.journal.clear()
        return clean

    def _commit_back(self) -> bool:
        ok = True
        try:
            self.dom = self.hv.revive(self.dom)
            live = {d.target: d for d in self.hv.disks(self.dom)}
            active = self.hv.is_active(self.dom)
        except VmSnapBackupError as err:
            log.error("domain %s: cannot read its state to commit back: %s", self.name, err)
            return False
        for w in self.work:
            target = w.disk.target
            if target in self.committed:
                continue
            top = live.get(target)
            if top is None or not top.source or not is_our_overlay(top.source):
                continue  # the snapshot never reached this disk
            if not active:
                log.error("domain %s stopped during the backup; its disk %s is defined on "
                          "overlay %s", self.name, target, top.source)
                ok = False
                continue
            try:
                if offline.block_job(self.dom, target) == "active-commit":
                    # our own commit, cut short (interrupted while waiting for it to be
                    # ready, or before its pivot): a new one cannot start beside it
                    offline.cancel_block_job(self.dom, target)
                self.hv.commit(self.dom, target, top.source)
                self.committed.append(target)
            except VmSnapBackupError as err:
                log.error("domain %s: commit of %s failed: %s", self.name, target, err)
                ok = False
        return ok

    def _drop_own_checkpoint(self) -> None:
        """A failed backup's checkpoint names no generation: delete it (best effort).

        Left behind it would only cost QEMU a bitmap; it is never trusted, and
        repair deletes what the journal names.
        """
        if self.checkpoint is None:
            return
        try:
            self.hv.delete_checkpoint(self.dom, self.checkpoint)
            self.journal.update(checkpoint=None)
        except VmSnapBackupError as exc:
            log.warning("domain %s: checkpoint %s of the failed backup not deleted: %s",
                        self.name, self.checkpoint, exc)

    def _remove_created(self) -> bool:
        ok = True
        for path in reversed(self.created):
            try:
                if path.is_dir():
                    shutil.rmtree(path)   # a generation directory this backup made
                else:
                    unlink_durable(path)
            except OSError as err:
                log.error("cannot remove %s: %s", path, err.strerror)
                ok = False
        return ok
