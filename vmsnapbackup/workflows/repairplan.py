"""Repair's second half: what to do, decided from the facts alone (pure, no I/O).

:func:`plan` turns a :class:`~.repairfacts.DomainFacts` into an ordered list
of :class:`RepairAction`: storage daemon first (a commit needs the frozen
image's write lock), then the VM side, the pool files, and the journal last,
so a repair that dies half-way is finished by the next one.  A REFUSE action
blocks the whole domain's repair; being pure, the plan is what ``--dry-run``
shows and what the unit tests check.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..adapters.domainxml import Disk, ImageRef, is_our_overlay, same_image
from ..adapters.storagedaemon import RUNTIME_DIR_PREFIX
from ..core.atomic import is_temp_name
from ..core.journal import JournalEntry
from ..core.names import NUMBERED_RE
from ..core.pool import GENERATIONS_DIR, POINTS_DIR, parse_number_name
from .repairfacts import DomainFacts, PoolFacts, norm_path

__all__ = [
    "CANCEL_JOB",
    "CLEAR_INFLIGHT",
    "CLEAR_JOURNAL",
    "COMMIT",
    "DELETE_CHECKPOINT",
    "DELETE_OVERLAY",
    "OFFLINE_COMMIT",
    "REFUSE",
    "REMOVE_FILE",
    "REMOVE_GENERATION",
    "SKIP",
    "STOP_DAEMON",
    "RepairAction",
    "plan",
    "plan_checkpoints",
    "plan_pool",
    "plan_vm",
]

# -- actions ----------------------------------------------------------------------------

STOP_DAEMON = "stop-daemon"
CANCEL_JOB = "cancel-block-job"
COMMIT = "commit"
OFFLINE_COMMIT = "offline-commit"
DELETE_OVERLAY = "delete-overlay"
DELETE_CHECKPOINT = "delete-checkpoint"
REMOVE_FILE = "remove-file"
REMOVE_GENERATION = "remove-generation"
CLEAR_JOURNAL = "clear-journal"
CLEAR_INFLIGHT = "clear-inflight"
#: Something that must not be touched blocks the domain's whole repair (nothing changes).
REFUSE = "refuse"
#: Something seen and deliberately left alone; does not block.
SKIP = "skip"

#: Kinds that change nothing: a plan of only these has nothing to do.
_NOTES = frozenset({SKIP, REFUSE})


@dataclass(frozen=True)
class RepairAction:
    """One thing repair does (or would do, or refuses to do), as one line for people.

    ``target`` names what it acts on (a disk target, a pool path relative to the
    domain directory, a runtime directory); the other fields carry what is needed
    to carry it out and are not part of the report.  ``transient`` marks a refusal
    that can be a moment's state: libvirt may still be finishing a call of a
    backup killed inside it (a snapshot or pivot has updated the definition but
    not yet the running domain), so repair looks again before believing it.
    """

    action: str
    target: str
    detail: str
    disk: str | None = field(default=None, compare=False)
    path: str | None = field(default=None, compare=False)
    image: ImageRef | None = field(default=None, compare=False)
    pid: int | None = field(default=None, compare=False)
    transient: bool = field(default=False, compare=False)

    @property
    def changes(self) -> bool:
        return self.action not in _NOTES

    def line(self) -> str:
        return f"{self.action} {self.target}: {self.detail}"

    def to_dict(self) -> dict[str, str]:
        return {"action": self.action, "target": self.target, "detail": self.detail}


# -- planning (pure) --------------------------------------------------------------------

def plan(facts: DomainFacts) -> list[RepairAction]:
    """What to do for one domain, in the order to do it.

    Refusals are included as REFUSE actions; if there is any, the caller changes
    nothing for this domain (half a repair around an image we do not understand
    is worse than none).
    """
    entry = facts.journal
    if facts.journal_error is not None:
        return [RepairAction(REFUSE, "journal.json",
                             f"the journal is unreadable ({facts.journal_error}); repair will "
                             "not guess what the interrupted operation left: inspect it, move "
                             "it away, then run repair again")]
    if entry is not None and entry.host and entry.host != facts.host:
        return [RepairAction(REFUSE, "journal.json",
                             f"the journal was written by pid {entry.pid} on host {entry.host}, "
                             f"not on this host ({facts.host}): run repair there")]
    actions: list[RepairAction] = []
    if entry is not None and entry.daemon is not None:
        d = entry.daemon
        if not os.path.basename(norm_path(d.runtime_dir)).startswith(RUNTIME_DIR_PREFIX):
            return [RepairAction(REFUSE, d.runtime_dir,
                                 f"the journal names {d.runtime_dir} as the storage daemon's "
                                 "runtime directory, which is not one of ours: the journal is "
                                 "not to be trusted; inspect it, move it away, then run repair "
                                 "again")]
        if facts.daemon_alive or norm_path(d.runtime_dir) in facts.existing:
            actions.append(RepairAction(
                STOP_DAEMON, d.runtime_dir,
                f"stop the storage daemon pid {d.pid} left by the dead {entry.operation} "
                "(if it still runs) and remove its runtime directory",
                path=d.runtime_dir, pid=d.pid))
    vm = plan_vm(facts)
    checkpoints = plan_checkpoints(facts, vm)
    # an offline commit loses the bitmaps' view of the overlay's writes: their
    # checkpoints go first, so a repair that dies half-way cannot leave them trusted
    if any(a.action == OFFLINE_COMMIT for a in vm):
        actions += checkpoints + vm
    else:
        actions += vm + checkpoints
    if facts.pool is not None:
        actions += plan_pool(entry, facts.pool)
    if entry is not None:
        where = f"point {entry.point}, " if entry.point is not None else ""
        actions.append(RepairAction(
            CLEAR_JOURNAL, "journal.json",
            f"forget the interrupted {entry.operation} ({where}pid {entry.pid}, started "
            f"{entry.started}, last step {entry.step})"))
    if facts.stale_inflight is not None:
        actions.append(RepairAction(CLEAR_INFLIGHT, facts.uuid, facts.stale_inflight))
    return actions


def plan_vm(facts: DomainFacts) -> list[RepairAction]:
    """The hypervisor side: commits, offline merges, unused overlays, refusals."""
    entry = facts.journal
    jdisks = dict(entry.disks) if entry is not None else {}
    live = {d.target: d for d in facts.disks}
    config = {d.target: d for d in facts.config}
    targets: list[str] = list(jdisks)
    for d in (*facts.disks, *facts.config):
        if d.target not in targets and has_our_overlay(d):
            targets.append(d.target)

    out: list[RepairAction] = []
    for target in targets:
        jd = jdisks.get(target)
        recorded = jd.overlay if jd is not None else None
        disk = live.get(target)
        if not facts.defined or disk is None:
            if recorded and norm_path(recorded) in facts.existing:
                why = (f"domain {facts.name} is not defined on this host any more"
                       if not facts.defined else f"domain {facts.name} has no disk {target} now")
                out.append(RepairAction(
                    REFUSE, recorded,
                    f"{why}; overlay {recorded} may hold the guest's writes since the "
                    "snapshot, so it is not deleted: merge it (qemu-img commit) or delete it "
                    "by hand, then run repair again"))
            continue
        top = disk.source
        if is_our_overlay(top):
            out += _plan_our_top(facts, disk, jd.frozen if jd is not None else None)
            other = config.get(target)
            if facts.active and other is not None and is_our_overlay(other.source) \
                    and not same_image(other.source, top):
                out.append(_config_mismatch(facts, other, top))
        else:
            ours_below = [img.path for img in disk.backing_chain if is_our_overlay(img.path)]
            if ours_below:
                out.append(RepairAction(
                    REFUSE, target,
                    f"top image {top} of {target} is not a vmsnapbackup overlay; not touching "
                    f"it (our overlay {ours_below[0]} lies below it: merge or remove the image "
                    "on top first, then run repair again)"))
                continue
            other = config.get(target)
            if facts.active and other is not None and is_our_overlay(other.source):
                out.append(_config_mismatch(facts, other, top))
                continue
            if recorded and jd is not None and not same_image(top, recorded) \
                    and not same_image(top, jd.source) \
                    and not same_image(top, jd.frozen):
                out.append(RepairAction(
                    SKIP, target,
                    f"top image {top} of {target} is not a vmsnapbackup overlay; not touching "
                    "it"))
        if recorded and not same_image(recorded, top) and norm_path(recorded) in facts.existing:
            out.append(_plan_unused_overlay(facts, target, recorded))
    return out


def plan_checkpoints(facts: DomainFacts, vm: list[RepairAction]) -> list[RepairAction]:
    """Checkpoints of ours that must go (FORMAT §4, §9).

    ``qemu-img commit`` of an overlay (the offline merge) copies its data but not
    its dirty bitmaps, so every bitmap of ours on the domain would then miss the
    guest's writes since the snapshot: all our checkpoints are deleted, and
    later backups read every block until a new generation makes a new one.
    Otherwise only the checkpoint a dead backup made for a generation it never
    sealed is deleted.
    """
    if any(a.action == OFFLINE_COMMIT for a in vm):
        return [RepairAction(
            DELETE_CHECKPOINT, name,
            "an offline merge does not carry the overlay's writes into the dirty bitmap: "
            "later backups must not skip reads with it", path=name)
            for name in facts.checkpoints]
    entry = facts.journal
    if entry is None or entry.checkpoint is None or entry.checkpoint not in facts.checkpoints:
        return []
    if facts.pool is None or entry.checkpoint in facts.pool.generation_checkpoints:
        return []
    return [RepairAction(DELETE_CHECKPOINT, entry.checkpoint,
                         f"made by the interrupted {entry.operation} for a generation it "
                         "never sealed", path=entry.checkpoint)]


def has_our_overlay(disk: Disk) -> bool:
    return is_our_overlay(disk.source) or any(is_our_overlay(i.path) for i in disk.backing_chain)


def _config_mismatch(facts: DomainFacts, other: Disk, live_top: str | None) -> RepairAction:
    return RepairAction(
        REFUSE, other.target,
        f"the definition of domain {facts.name} names overlay {other.source} for "
        f"{other.target} while the running domain uses {live_top}: shut the domain down "
        "and run repair again, or fix the definition by hand", transient=True)


def _plan_our_top(facts: DomainFacts, disk: Disk, frozen: str | None) -> list[RepairAction]:
    target, overlay = disk.target, disk.source or ""
    if facts.active:
        if not disk.backing_chain:
            return [RepairAction(REFUSE, target, f"overlay {overlay} of {target} has no "
                                 "backing image in the live XML: cannot commit it")]
        below = disk.backing_chain[0]
        out: list[RepairAction] = []
        job = facts.jobs.get(target)
        if job == "active-commit":
            out.append(RepairAction(
                CANCEL_JOB, target,
                f"cancel the commit of {overlay} that the dead backup left running (the guest "
                "stays on the overlay, nothing is lost)", disk=target))
        elif job is not None:
            return [RepairAction(REFUSE, target, f"disk {target} has a {job} block job that "
                                 "vmsnapbackup did not start: wait for it or cancel it, then run "
                                 "repair again")]
        out.append(RepairAction(
            COMMIT, target,
            f"commit overlay {overlay} into {below.path} and pivot (domain running)",
            disk=target, path=overlay, image=below))
        return out
    backing = facts.backing.get(norm_path(overlay))
    if norm_path(overlay) not in facts.existing:
        return [RepairAction(REFUSE, target, f"the definition of {target} names overlay "
                             f"{overlay}, which does not exist: fix the definition by hand")]
    if backing is None:
        return [RepairAction(REFUSE, target, f"overlay {overlay} of {target} records no "
                             "backing image: cannot merge it")]
    if not backing.format:
        return [RepairAction(REFUSE, target, f"overlay {overlay} does not record the format "
                             f"of its backing image {backing.path}: not merging it")]
    if frozen and not same_image(backing.path, frozen):
        return [RepairAction(REFUSE, target, f"overlay {overlay} is backed by {backing.path}, "
                             f"not by the frozen image {frozen} the journal recorded: not "
                             "merging it")]
    if norm_path(backing.path) not in facts.existing:
        return [RepairAction(REFUSE, target, f"backing image {backing.path} of overlay "
                             f"{overlay} is missing: cannot merge it")]
    return [RepairAction(
        OFFLINE_COMMIT, target,
        f"merge overlay {overlay} into {backing.path} (qemu-img commit), define {target} on "
        f"{backing.path} again and delete the overlay (domain shut off)",
        disk=target, path=overlay, image=backing)]


def _plan_unused_overlay(facts: DomainFacts, target: str, overlay: str) -> RepairAction:
    users = facts.users.get(norm_path(overlay), ())
    if not is_our_overlay(overlay):
        return RepairAction(REFUSE, overlay, f"the journal names {overlay} as the overlay of "
                            f"{target}, but it does not carry the vmsnapbackup marker: not "
                            "deleting it")
    if users:
        # in use by this very domain: a dead backup's snapshot may be just landing
        return RepairAction(REFUSE, overlay, f"overlay {overlay} is in use by domain "
                            f"{', '.join(users)}: not deleting it",
                            transient=facts.name in users)
    return RepairAction(
        DELETE_OVERLAY, overlay,
        f"delete overlay {overlay} of {target}, which no domain uses (the snapshot or the "
        "commit did not finish)", disk=target, path=overlay)


def _generation_of(rel: str) -> int | None:
    parts = rel.split("/")
    if len(parts) >= 2 and parts[0] == GENERATIONS_DIR:
        return parse_number_name(parts[1])
    return None


def plan_pool(entry: JournalEntry | None, pool: PoolFacts) -> list[RepairAction]:
    """Pool files the interrupted operation left: never one a sealed manifest refers to."""
    candidates: dict[str, RepairAction] = {}
    notes: list[RepairAction] = []
    sealed = pool.sealed_generations

    def protected(rel: str) -> bool:
        return rel in pool.referenced or any(r.startswith(rel + "/") for r in pool.referenced)

    for rel in (entry.files if entry is not None else ()):
        if rel not in pool.journal_files:
            continue  # never created, or already gone
        parts = rel.split("/")
        name = parts[-1]
        if parts[0] == POINTS_DIR:
            notes.append(RepairAction(SKIP, rel, "a point manifest is never removed by repair "
                                      "(the point was sealed before the operation died)"))
            continue
        if protected(rel):
            notes.append(RepairAction(SKIP, rel, "a sealed point refers to it; kept"))
            continue
        g = _generation_of(rel)
        if g is None:
            notes.append(RepairAction(SKIP, rel, "not a point-store path; kept"))
            continue
        if sealed is not None and g not in sealed:
            kind = REMOVE_GENERATION if len(parts) == 2 else REMOVE_FILE
            candidates[rel] = RepairAction(
                kind, rel, f"generation {g} has no sealed point: the interrupted "
                f"{entry.operation if entry else 'operation'} created it")
            continue
        numbered = NUMBERED_RE.fullmatch(name)
        own_point = (numbered is not None and entry is not None
                     and int(numbered.group(2)) == entry.point
                     and entry.point not in pool.manifest_points)
        if rel not in pool.directories and (is_temp_name(name) or own_point):
            candidates[rel] = RepairAction(
                REMOVE_FILE, rel, "left by the interrupted operation; no sealed point refers "
                "to it")
        else:
            notes.append(RepairAction(SKIP, rel, f"generation {g} holds sealed points; kept"))
    for lo in pool.leftovers:
        rel = Path(lo.path).as_posix()
        if rel in candidates or protected(rel):
            continue
        kind = REMOVE_GENERATION if lo.kind == "generation" else REMOVE_FILE
        candidates[rel] = RepairAction(kind, rel, f"{lo.kind}: {lo.reason}")
    # a path inside one that is removed whole goes with it
    kept = [a for rel, a in sorted(candidates.items())
            if not any(rel.startswith(other + "/") for other in candidates)]
    notes = [n for n in notes if not any(n.target == rel or n.target.startswith(rel + "/")
                                         for rel in candidates)]
    return kept + notes
