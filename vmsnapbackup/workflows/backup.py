"""The backup: the method's steps, in order, for one domain (the patent US9250824).

:meth:`_BackupRun._run` is the recipe -- snapshot, export, check table,
difference, commit back, seal -- each step a method of that name below.  The
order of writes is FORMAT.md §10; the journal records each step before it is
taken (FORMAT §9) so that a backup killed at any instant can be undone by
``repair``.  When the backup itself fails it undoes what it did: the VM is
committed back to its original image, the storage daemon stopped, partial
files removed; the journal is cleared only once all of that succeeded.

Which generation a point continues is :mod:`.generation`; when a dirty
bitmap is made, trusted and retired is :mod:`.bitmappolicy`.
"""
from __future__ import annotations

import functools
import logging
import os
import secrets
import socket
import time
from collections.abc import Sequence
from pathlib import Path

from ..adapters.checkpoints import checkpoints_wanted
from ..adapters.domain import Domain
from ..adapters.domainjobs import busy_with
from ..adapters.domainxml import Disk, overlay_path
from ..adapters.hostinflight import inflight_on
from ..adapters.hypervisor import Hypervisor, connect
from ..adapters.sourceexport import DataPath
from ..adapters.storagedaemon import StorageDaemon
from ..adapters.storagepool import refresh_pool, resolve_pool
from ..adapters.volumeformat import VolumeLayout
from ..core import inflight
from ..core.defaults import DEFAULT_URI
from ..core.difftable import compare
from ..core.journal import JournalDaemon, JournalDisk, JournalEntry
from ..core.manifest import GenerationRecord, utc_now
from ..core.pool import DomainStore
from ..core.retention import Policy
from ..core.tablefile import DEFAULT_BLOCK_SIZE
from ..errors import (
    HypervisorError,
    RepairNeededError,
    UnsupportedDiskError,
    UsageError,
)
from ..progress import ProgressCallback
from .backupdaemons import backup_daemons
from .backupkey import open_backup_pool
from .backupoptions import BackupOptions
from .backupseal import BackupSeal
from .backupstart import (
    announce_new_pool,
    apply_exclude,
    overlay_dirs,
    refuse_live_backup,
    release_overlay_dirs,
)
from .backupundo import BackupUndo
from .backupvolumes import BackupVolumes
from .backupwork import BackupResult, DiskResult, DiskWork
from .bitmappolicy import BitmapPolicy
from .generation import CurrentGeneration, new_generation_reason, read_current
from .interrupt import interruptible
from .parallel import run_all
from .repair import repair_before_backup

__all__ = ["DEFAULT_THRESHOLD", "BackupOptions", "BackupResult", "DiskResult", "backup"]

log = logging.getLogger(__name__)

#: A point whose difference passes this fraction of a disk's blocks makes the
#: next backup start a new generation (difference tables only grow).
DEFAULT_THRESHOLD = 0.5


def backup(
    domain: str,
    pool: str | os.PathLike[str],
    *,
    uri: str = DEFAULT_URI,
    options: BackupOptions | None = None,
    progress: ProgressCallback | None = None,
    disks: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    quiesce: bool | None = None,
    new_generation: bool = False,
    threshold: float | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    base_format: str = "qcow2",
    overlay_dir: str | None = None,
    dirty_bitmaps: bool | None = None,
    retention: Policy | None = None,
    data_path: DataPath | None = None,
    compression: str | None = None,
    encrypt: bool = False,
    key_file: str | None = None,
) -> BackupResult:
    """Back up ``domain`` (name, UUID or id) into ``pool`` (a path or a libvirt pool name).

    Returns once the point is sealed and the domain runs on its original images again.

    The choices are the fields of :class:`.BackupOptions` (what each means is
    said there): as one ``options`` record, or as keywords of the same names.
    """
    asked = BackupOptions(
        disks=disks, exclude=exclude, quiesce=quiesce, new_generation=new_generation,
        threshold=threshold, block_size=block_size, base_format=base_format,
        overlay_dir=overlay_dir, dirty_bitmaps=dirty_bitmaps, retention=retention,
        data_path=data_path, compression=compression, encrypt=encrypt,
        key_file=key_file)
    if options is None:
        options = asked
    elif asked != BackupOptions():
        raise UsageError("give backup() its choices as options=BackupOptions(...) or as "
                         "keywords, not both")
    return _backup(domain, pool, uri, options, progress)


def _backup(domain: str, pool: str | os.PathLike[str], uri: str, options: BackupOptions,
            progress: ProgressCallback | None) -> BackupResult:
    """:func:`backup` with its choices checked (they were, when ``options`` was made)."""
    started_mono = time.monotonic()
    pool_dir, libvirt_pool = resolve_pool(os.fspath(pool), uri)
    with connect(uri) as hv, interruptible("backup"):
        dom = hv.find_domain(domain)
        name, uuid = hv.domain_name(dom), hv.domain_uuid(dom)
        selected, skipped = hv.backup_disks(dom, options.disks)
        selected, skipped = apply_exclude(name, [d.target for d in hv.disks(dom)], selected,
                                          skipped, options.exclude)
        for s in skipped:
            log.info("domain %s: not backing up %s: %s", name, s.disk.target, s.reason)
        if not selected:
            reasons = "; ".join(f"{s.disk.target}: {s.reason}" for s in skipped) or "no disks"
            raise UnsupportedDiskError(f"domain {name} has no disk that can be backed up "
                                       f"({reasons})")
        # all that can refuse before the pool is made or a point number is burnt
        places = overlay_dirs(name, uuid, selected, options.overlay_dir, hv.is_active(dom))
        dirty_bitmaps = options.dirty_bitmaps
        if dirty_bitmaps is None:
            dirty_bitmaps = checkpoints_wanted(dom)
        # only now, with a domain worth backing up: a typo must not leave a new pool behind
        announce_new_pool(pool_dir)
        the_pool, layout = open_backup_pool(pool_dir, options.compression, options.encrypt,
                                            options.key_file)
        layout.check(options.base_format)
        store = the_pool.domain(uuid, name, create=True)
        with store.lock("backup"):
            # a live backup into another pool is not a leftover to repair
            refuse_live_backup(uuid, name)
            repair_before_backup(store, hv, dom, name, pool_dir)
            store.set_name(name)
            run = _BackupRun(hv, dom, store, name, uuid, selected, pool_dir, options,
                             overlay_dirs=places, progress=progress,
                             dirty_bitmaps=dirty_bitmaps, layout=layout)
            try:
                result = run.execute()
            finally:
                release_overlay_dirs(places)
    refresh_pool(libvirt_pool, uri)
    result.skipped = [(s.disk.target, s.reason) for s in skipped]
    result.seconds["total"] = round(time.monotonic() - started_mono, 3)
    return result


class _BackupRun(BackupVolumes, BackupSeal, BackupUndo):
    """One backup of one domain, with the lock held.  Keeps what it created so it can undo it."""

    def __init__(self, hv: Hypervisor, dom: Domain, store: DomainStore, name: str, uuid: str,
                 disks: list[Disk], pool_dir: Path, options: BackupOptions, *,
                 overlay_dirs: dict[str, str | None], progress: ProgressCallback | None,
                 dirty_bitmaps: bool, layout: VolumeLayout) -> None:
        self.hv, self.dom, self.store = hv, dom, store
        self.layout = layout
        self.name, self.uuid, self.pool_dir = name, uuid, pool_dir
        self.work = [DiskWork(d) for d in disks]
        self.quiesce, self.force_new = options.quiesce, options.new_generation
        self.threshold, self.block_size = options.threshold, options.block_size
        self.base_format = options.base_format
        self.overlay_dirs, self.progress = overlay_dirs, progress
        self.retention = options.retention
        self.budget = options.budget   # the run's bandwidth budget, for every disk pass
        self.journal = store.journal
        self.active = False
        self.point = 0
        self.generation = 0
        self.new_gen = False
        self.gen_record: GenerationRecord | None = None
        self.consistency = "offline"
        self.committed: list[str] = []
        self.sealed = False
        self.created: list[Path] = []   # pool files and dirs to remove if we fail
        self.started = utc_now()
        self.snapshot_at: str | None = None
        self.snapshot_mono = 0.0
        self.overlay_seconds = 0.0
        self.domain_xml = ""
        self.dirty_bitmaps = dirty_bitmaps
        self.bitmaps = BitmapPolicy(hv, self.journal, name, 0, pool_dir, dirty_bitmaps)
        self.qemu_run: str | None = None             # the QEMU run at the snapshot
        self.current = CurrentGeneration()
        self.data_path = options.data_path   # how a remote hypervisor's images reach us

    def execute(self) -> BackupResult:
        self.active = self.hv.is_active(self.dom)
        self.domain_xml = self.dom.saved_xml()
        record = inflight.InflightRecord(
            uuid=self.uuid, name=self.name, pid=os.getpid(), operation="backup",
            offline=not self.active, since=self.started, pool=str(self.pool_dir),
            images=tuple(w.disk.source or "" for w in self.work))
        # registered before anything is written to the pool: a backup kept away by a
        # live operation of this host (say, a backup into another pool: another pool
        # lock) must leave no journal behind
        with inflight_on(self.hv.host, record):   # on the hypervisor, for its hook
            self.point = self.bitmaps.point = self.store.allocate_point()
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

    def _run(self) -> None:
        """The recipe: the method's steps in order, each a method named after it."""
        self.current = read_current(self.store)
        self.bitmaps.clear_when_off(self.dom)
        bitmap: str | None = None
        if self.active:
            bitmap = self._snapshot()
        else:
            self._read_shut_off()
        with backup_daemons(self.hv.host, f"{self.name}-{self.point}",
                            self.data_path) as (source, volumes):
            self._export(source, bitmap)
            self._plan_generation()
            self._check_tables(volumes)
        # every export is gone with the daemon: the frozen images are free to commit into
        self._difference()
        if self.active:
            self._commit_back()
        self._seal()
        self.bitmaps.retire(self.dom, self.current.checkpoint if self.new_gen else None)

    # -- the steps -------------------------------------------------------------

    def _snapshot(self) -> str | None:
        """Step 1: external disk-only snapshot; the guest goes on writing to overlays.

        Returns the generation's dirty bitmap to export with the frozen images, if usable.
        """
        self._say_what_we_wait_for()
        qcow2 = [w.disk.target for w in self.work if (w.disk.format or "") == "qcow2"]
        self.bitmaps.start_generation(self.dom, self._new_generation_reason(sizes=None), qcow2)
        snap_id = f"p{self.point}-{secrets.token_hex(3)}"
        overlays = {w.disk.target: overlay_path(w.disk, snap_id,
                                                self.overlay_dirs.get(w.disk.target))
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
        return self.bitmaps.usable_bitmap(self.dom, self.current, self.qemu_run)

    def _say_what_we_wait_for(self) -> None:
        """Another tool's job makes our checkpoint and snapshot wait: say so at once."""
        try:
            busy = busy_with(self.dom, [w.disk.target for w in self.work])
        except HypervisorError as exc:
            log.debug("domain %s: cannot ask for its jobs: %s", self.name, exc)
            return
        if busy:
            log.warning("domain %s: waiting for %s to finish before the snapshot (libvirt "
                        "gives up after about 30 s)", self.name, "; ".join(busy))

    def _read_shut_off(self) -> None:
        """A shut-off domain needs no snapshot: its images are read as they are."""
        for w in self.work:
            w.image, w.image_format = w.disk.source or "", w.disk.format or "raw"
        self.snapshot_at = utc_now()

    def _export(self, daemon: StorageDaemon, bitmap: str | None) -> None:
        """Step 2: each frozen image as a read-only NBD export (with its bitmap, if any)."""
        assert daemon.pid is not None and daemon.runtime_dir is not None
        self.journal.update(step="read", daemon=JournalDaemon(
            pid=daemon.pid, runtime_dir=daemon.runtime_dir))
        for w in self.work:
            w.source_export = daemon.export_image(
                w.image, w.image_format, name=f"src-{w.disk.target}", direct=True,
                bitmap=bitmap if w.image_format == "qcow2" else None)
            w.size = w.source_export.size

    def _check_tables(self, daemon: StorageDaemon) -> None:
        """Step 3: read every disk block by block into its check table, writing the
        blocks the volume must hold (all of them for a base volume, those that differ
        from table 1 for a point volume); one thread per disk."""
        volumes = [self._open_volume(daemon, w) for w in self.work]
        run_all([functools.partial(self._pass_disk, w, out)
                 for w, out in zip(self.work, volumes)],
                progress=self.progress)
        for w, out in zip(self.work, volumes):
            self._close_volume(daemon, w, out)

    def _difference(self) -> None:
        """Step 4: point N's difference table against the generation's FIRST table."""
        if self.new_gen:
            return   # the first table is this point's own: nothing to compare
        for w in self.work:
            assert w.table1 is not None and w.table is not None   # table 1 checked on read
            w.difference = compare(w.table1, w.table)

    def _commit_back(self) -> None:
        """Step 5: merge each overlay back into its frozen image and pivot (VM keeps running)."""
        self.dom = self.hv.revive(self.dom)   # libvirtd may have restarted meanwhile
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

    # -- the generation ----------------------------------------------------------

    def _new_generation_reason(self, sizes: dict[str, int] | None) -> str | None:
        return new_generation_reason(
            self.current, force=self.force_new, targets={w.disk.target for w in self.work},
            block_size=self.block_size, threshold=self.threshold, sizes=sizes,
            retention=self.retention)

    def _plan_generation(self) -> None:
        """Continue the current generation, or start a new one (FORMAT §4 says when)."""
        reason = self._new_generation_reason({w.disk.target: w.size for w in self.work})
        if reason is None:
            current, rec = self.current.number, self.current.record
            assert current is not None and rec is not None
            self.generation, self.gen_record = current, rec
            self.journal.update(generation=current, new_generation=False)
            return
        log.info("domain %s: new generation (%s)", self.name, reason)
        self.new_gen = True
        self.gen_record = None
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
