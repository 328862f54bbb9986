"""When a backup makes, trusts, proves and retires a dirty bitmap (a libvirt checkpoint).

The checks themselves are in :mod:`.dirtymap`; this is the policy a backup
follows around its steps, kept out of the backup's recipe so that the recipe
reads as the method's steps:

* before the snapshot of a new generation's first point, a checkpoint starts
  the generation's bitmap (:meth:`BitmapPolicy.start_generation`);
* after the snapshot, the generation's bitmap is used only if libvirt still
  has it, and it is *trusted* to skip reads only if the previous point was
  taken in the same QEMU run (:meth:`BitmapPolicy.usable_bitmap`) and its
  unchanged blocks agree with table 1 (:meth:`BitmapPolicy.trusted_runs`);
* the first point of a QEMU run reads everything and proves the bitmap
  against that full read (:meth:`BitmapPolicy.prove`);
* after the seal, the checkpoint a new generation replaced, or one that
  failed a check, is deleted (:meth:`BitmapPolicy.retire`); a failed backup
  deletes the checkpoint it made (:meth:`BitmapPolicy.drop_own`);
* with bitmaps off (``--no-dirty-bitmaps``, or the domain's setting), the
  backup first deletes every checkpoint of ours on the domain
  (:func:`remove_our_checkpoints`): other users of libvirt's backup API
  refuse to run beside a checkpoint they did not make.

Any doubt means reading every data block: slower, never wrong.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from ..adapters.domain import Domain
from ..adapters.hypervisor import Hypervisor
from ..adapters.nbdclient import NbdClient
from ..core.checktable import CheckTable
from ..core.journal import Journal
from ..errors import HypervisorError, VmSnapBackupError
from .dirtymap import (
    change_outside,
    is_our_checkpoint,
    new_checkpoint_name,
    unchanged_blocks_disagree,
)
from .generation import CurrentGeneration

__all__ = ["BitmapPolicy", "remove_our_checkpoints"]

log = logging.getLogger(__name__)

Runs = list[tuple[int, int]]


class BitmapPolicy:
    """The dirty-bitmap decisions of one backup of one domain."""

    def __init__(self, hv: Hypervisor, journal: Journal, name: str, point: int,
                 pool_dir: Path, enabled: bool) -> None:
        self.hv, self.journal = hv, journal
        self.name, self.point, self.pool_dir = name, point, pool_dir
        self.enabled = enabled
        self.checkpoint: str | None = None   # made by this backup for its new generation
        self.distrusted: str | None = None   # a bitmap that failed its check
        self.proven = False   # the generation's last point was in this QEMU run

    def clear_when_off(self, dom: Domain) -> None:
        """Bitmaps off: the domain is left without any checkpoint of ours."""
        if not self.enabled:
            remove_our_checkpoints(self.hv, dom, self.name)

    def start_generation(self, dom: Domain, new_generation: str | None,
                         targets: Sequence[str]) -> None:
        """Before the snapshot of a new generation's first point, start its bitmap.

        ``new_generation`` is why a new generation starts (None: it does not).
        Made *before* the snapshot, the bitmap marks a few writes that the
        base volume already holds, which only costs reads; made after, it
        would miss writes the base does not hold.  Whether a generation
        starts is known here for every reason but a resized disk (the sizes
        come from the exports); such a generation just gets no checkpoint.
        """
        if not self.enabled or new_generation is None or not targets:
            return
        name = new_checkpoint_name(self.point)
        self.journal.update(checkpoint=name)   # FORMAT §9: named before it exists
        try:
            self.hv.create_checkpoint(dom, name, targets,
                                      f"vmsnapbackup: writes since point {self.point} into "
                                      f"{self.pool_dir}")
        except HypervisorError as exc:
            log.warning("domain %s: no checkpoint for the new generation (%s); its later "
                        "points read every data block", self.name, exc)
            self.journal.update(checkpoint=None)
            return
        self.checkpoint = name

    def usable_bitmap(self, dom: Domain, current: CurrentGeneration,
                      qemu_run: str | None) -> str | None:
        """The current generation's checkpoint, if libvirt still has it (else None)."""
        name = current.checkpoint
        if not self.enabled or name is None:
            return None
        try:
            present = name in self.hv.checkpoint_names(dom)
        except HypervisorError as exc:
            log.warning("domain %s: cannot list its checkpoints (%s): reading every data block",
                        self.name, exc)
            return None
        if not present:
            log.info("domain %s: checkpoint %s of generation %d is gone (deleted, or the "
                     "domain migrated): reading every data block", self.name, name,
                     current.number)
            return None
        latest = current.latest
        last_run = latest.qemu_run if latest is not None else None
        self.proven = qemu_run is not None and last_run == qemu_run
        if not self.proven:
            log.info("domain %s: first point of generation %d since QEMU started: reading "
                     "every data block to prove bitmap %s", self.name, current.number, name)
        return name

    def trusted_runs(self, target: str, table1: CheckTable | None, src: NbdClient,
                     dirty: Runs, data: Runs) -> Runs | None:
        """The bitmap's dirty runs for this disk, or None when every block must be read."""
        if table1 is None or not self.proven:
            return None
        doubt = unchanged_blocks_disagree(src, table1, dirty, data=data)
        if doubt is not None:
            log.warning("domain %s: dirty bitmap %s of %s cannot be trusted (%s): reading "
                        "every data block, and the checkpoint is deleted", self.name,
                        src.dirty_bitmap, target, doubt)
            self.distrusted = src.dirty_bitmap
            return None
        return dirty

    def prove(self, target: str, table1: CheckTable, table: CheckTable,
              bitmap: str | None, marked: Runs) -> None:
        """After a full read: did the bitmap see every change since table 1?"""
        block = change_outside(table1, table, marked)
        if block is None:
            log.info("domain %s: bitmap %s of %s agrees with a full read", self.name, bitmap,
                     target)
            return
        log.warning("domain %s: block %d of %s changed since the generation's first point "
                    "but bitmap %s missed it (the image was written behind QEMU's back?): "
                    "the checkpoint is deleted, later points read every data block",
                    self.name, block, target, bitmap)
        self.distrusted = bitmap

    def retire(self, dom: Domain, replaced: str | None) -> None:
        """After the seal: drop the checkpoint a new generation ``replaced``, or one that lied.

        Best effort: a checkpoint left behind costs QEMU a bitmap to keep,
        never a wrong backup (only the generation record's checkpoint is
        ever trusted, and only after its checks).
        """
        retire: set[str] = set()
        if replaced and replaced != self.checkpoint:
            retire.add(replaced)
        if self.distrusted:
            retire.add(self.distrusted)
        for name in sorted(retire):
            try:
                self.hv.delete_checkpoint(dom, name)
            except HypervisorError as exc:
                log.warning("domain %s: checkpoint %s not deleted: %s", self.name, name, exc)

    def drop_own(self, dom: Domain) -> None:
        """A failed backup's checkpoint names no generation: delete it (best effort).

        Left behind it would only cost QEMU a bitmap; it is never trusted, and
        repair deletes what the journal names.
        """
        if self.checkpoint is None:
            return
        try:
            self.hv.delete_checkpoint(dom, self.checkpoint)
            self.journal.update(checkpoint=None)
        except VmSnapBackupError as exc:
            log.warning("domain %s: checkpoint %s of the failed backup not deleted: %s",
                        self.name, self.checkpoint, exc)


def remove_our_checkpoints(hv: Hypervisor, dom: Domain, name: str) -> list[str]:
    """Delete every checkpoint of ours (of any pool) from the domain; the names deleted.

    Only names with our reserved prefix are touched.  A generation whose
    checkpoint is gone is still whole: its later points read every data block.
    """
    removed = []
    for cp in hv.checkpoint_names(dom):
        if is_our_checkpoint(cp) and hv.delete_checkpoint(dom, cp):
            removed.append(cp)
    if removed:
        log.info("domain %s: deleted vmsnapbackup checkpoint(s) %s", name, ", ".join(removed))
    return removed
