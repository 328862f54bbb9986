"""Undoing a failed backup: the VM back on its images, the pool without partial files.

Kept apart from the recipe in :mod:`.backup` because it is the other half of
the first duty (never lose data): whatever step failed, the domain is
committed back to its original images and every file this backup created is
removed; only when all of that succeeded is the journal cleared, otherwise it
stays for ``repair``.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ..adapters.blockjobs import block_job, cancel_block_job
from ..adapters.domain import Domain
from ..adapters.domainxml import is_our_overlay
from ..adapters.hypervisor import Hypervisor
from ..core.atomic import unlink_durable
from ..core.journal import Journal
from ..errors import VmSnapBackupError
from .backupwork import DiskWork
from .bitmappolicy import BitmapPolicy

__all__ = ["BackupUndo"]

log = logging.getLogger(__name__)


class BackupUndo:
    """The undo of :class:`~.backup._BackupRun` (a mixin: it reads the run's state)."""

    hv: Hypervisor
    dom: Domain
    name: str
    point: int
    active: bool
    sealed: bool
    work: list[DiskWork]
    committed: list[str]
    created: list[Path]   # pool files and dirs to remove if we fail
    journal: Journal
    bitmaps: BitmapPolicy

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
            clean = self._commit_back_after_failure() and clean
        if not self.sealed:
            clean = self._remove_created() and clean
            self.bitmaps.drop_own(self.dom)
        if clean:
            self.journal.clear()
        return clean

    def _commit_back_after_failure(self) -> bool:
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
                if block_job(self.dom, target) == "active-commit":
                    # our own commit, cut short (interrupted while waiting for it to be
                    # ready, or before its pivot): a new one cannot start beside it
                    cancel_block_job(self.dom, target)
                self.hv.commit(self.dom, target, top.source)
                self.committed.append(target)
            except VmSnapBackupError as err:
                log.error("domain %s: commit of %s failed: %s", self.name, target, err)
                ok = False
        return ok

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
