"""``repair``: bring a domain back to its original images after an interrupted backup.

A backup killed at any instant leaves some of: the domain running (or defined, if
it was shut off meanwhile) on our overlay, a commit job half-way, an overlay file
nobody uses, a storage daemon or its runtime directory, partial files in the pool,
the journal and the host's in-flight record.  Repair finds them from two sides, the
journal (FORMAT §9) and the hypervisor's own view (every disk whose image carries
our overlay marker), so it also works when the journal or the whole pool is gone.

It works in two halves so that what it would do can be tested, shown
(``--dry-run``) and refused as a whole:

* :func:`gather` reads the state (libvirt, the file system, the pool) into a
  :class:`DomainFacts`, changing nothing;
* :func:`plan` (pure) turns the facts into a list of :class:`RepairAction`;
* the actions are then carried out in order: storage daemon first (a commit
  needs the frozen image's write lock), then the VM side, the pool files, and
  the journal last, so a repair that dies half-way is finished by the next one.

Safety rules: nothing is merged or deleted unless its name carries our overlay
marker and the hypervisor shows it where we expect it; a disk whose top image is
someone else's is explained and the whole domain left untouched; a pool file a
sealed manifest refers to is never removed; the domain's pool lock and the host's
in-flight record keep a repair away from a running backup.
"""
from __future__ import annotations

import logging
import os
import re
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Set, Tuple

from ..adapters import offline
from ..adapters.domainxml import Disk, ImageRef, is_our_overlay
from ..adapters.hypervisor import DEFAULT_URI, Hypervisor, connect
from ..adapters.storagedaemon import RUNTIME_DIR_PREFIX, stop_leftover_daemon
from ..adapters.storagepool import resolve_pool
from ..core import inflight
from ..core.atomic import is_temp_name, unlink_durable
from ..core.journal import Journal, JournalEntry
from ..core.pool import (
    GENERATION_RECORD,
    GENERATIONS_DIR,
    POINTS_DIR,
    DomainStore,
    Leftover,
    Pool,
    parse_number_name,
)
from ..errors import (
    BackupInterruptedError,
    CorruptFileError,
    ExitCode,
    HypervisorError,
    IncompatibleFormatError,
    LockedError,
    NotFoundError,
    UsageError,
    VmSnapBackupError,
)
from .dirtymap import is_our_checkpoint
from .interrupt import interruptible

__all__ = [
    "STOP_DAEMON", "CANCEL_JOB", "COMMIT", "OFFLINE_COMMIT", "DELETE_OVERLAY", "DELETE_CHECKPOINT",
    "REMOVE_FILE", "REMOVE_GENERATION", "CLEAR_JOURNAL", "CLEAR_INFLIGHT", "REFUSE", "SKIP",
    "RepairAction",
    "PoolFacts",
    "DomainFacts",
    "DomainRepair",
    "RepairReport",
    "plan",
    "plan_vm",
    "plan_pool",
    "gather",
    "needs_repair",
    "repair_held",
    "repair",
]

log = logging.getLogger(__name__)

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

_NUMBERED = re.compile(r"(table|point|diff)-([0-9]{6,})\.(vsbt|qcow2|vsbd)(\.partial)?")
_BASE = re.compile(r"base\.(qcow2|raw)(\.partial)?")


@dataclass(frozen=True)
class RepairAction:
    """One thing repair does (or would do, or refuses to do), as one line for people.

    ``target`` names what it acts on (a disk target, a pool path relative to the
    domain directory, a runtime directory); the other fields carry what is needed
    to carry it out and are not part of the report.
    """

    action: str
    target: str
    detail: str
    disk: Optional[str] = field(default=None, compare=False)
    path: Optional[str] = field(default=None, compare=False)
    image: Optional[ImageRef] = field(default=None, compare=False)
    pid: Optional[int] = field(default=None, compare=False)

    @property
    def changes(self) -> bool:
        return self.action not in _NOTES

    def line(self) -> str:
        return f"{self.action} {self.target}: {self.detail}"

    def to_dict(self) -> Dict[str, str]:
        return {"action": self.action, "target": self.target, "detail": self.detail}


# -- facts ------------------------------------------------------------------------------

@dataclass(frozen=True)
class PoolFacts:
    """The domain's part of the pool, as far as repair cares.

    Paths are relative to the domain directory.  ``leftovers`` are those of
    :meth:`DomainStore.leftovers` as the next run will see them once the journal is
    gone (so the dead backup's own files are included).  ``sealed_generations`` is
    None when a damaged manifest hides which generations hold sealed points: then
    every generation is treated as holding some.
    """

    leftovers: Tuple[Leftover, ...] = ()
    journal_files: FrozenSet[str] = frozenset()   # the journal's files that exist
    directories: FrozenSet[str] = frozenset()     # those of them that are directories
    referenced: FrozenSet[str] = frozenset()      # every path a valid manifest names
    manifest_points: FrozenSet[int] = frozenset()  # points with a manifest file, valid or not
    sealed_generations: Optional[FrozenSet[int]] = frozenset()
    generation_checkpoints: FrozenSet[str] = frozenset()  # named by generations with points


@dataclass(frozen=True)
class DomainFacts:
    """Everything :func:`plan` decides from, read by :func:`gather`.

    ``disks`` is the live XML (for a shut-off domain: its definition); ``config`` the
    persistent definition of a running domain.  ``existing`` holds the normalised
    paths (overlays, frozen and backing images, the runtime dir) found to exist;
    ``users`` maps every image path any domain on the host uses to those domains;
    ``backing`` maps the overlay of a shut-off domain's disk to the backing image the
    overlay file records; ``jobs`` the block job running on a disk, by target.
    """

    name: str
    uuid: str
    host: str
    defined: bool = True
    active: bool = False
    disks: Tuple[Disk, ...] = ()
    config: Tuple[Disk, ...] = ()
    journal: Optional[JournalEntry] = None
    journal_error: Optional[str] = None
    existing: FrozenSet[str] = frozenset()
    users: Mapping[str, Tuple[str, ...]] = field(default_factory=dict)
    backing: Mapping[str, Optional[ImageRef]] = field(default_factory=dict)
    jobs: Mapping[str, str] = field(default_factory=dict)
    daemon_alive: bool = False
    pool: Optional[PoolFacts] = None
    stale_inflight: Optional[str] = None
    checkpoints: Tuple[str, ...] = ()   # libvirt checkpoints of the domain with our prefix


def _norm(path: Optional[str]) -> str:
    return os.path.normpath(path) if path else ""


def _same(a: Optional[str], b: Optional[str]) -> bool:
    return bool(a) and bool(b) and _norm(a) == _norm(b)


# -- planning (pure) --------------------------------------------------------------------

def plan(facts: DomainFacts) -> List[RepairAction]:
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
    actions: List[RepairAction] = []
    if entry is not None and entry.daemon is not None:
        d = entry.daemon
        if not os.path.basename(_norm(d.runtime_dir)).startswith(RUNTIME_DIR_PREFIX):
            return [RepairAction(REFUSE, d.runtime_dir,
                                 f"the journal names {d.runtime_dir} as the storage daemon's "
                                 "runtime directory, which is not one of ours: the journal is "
                                 "not to be trusted; inspect it, move it away, then run repair "
                                 "again")]
        if facts.daemon_alive or _norm(d.runtime_dir) in facts.existing:
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


def plan_vm(facts: DomainFacts) -> List[RepairAction]:
    """The hypervisor side: commits, offline merges, unused overlays, refusals."""
    entry = facts.journal
    jdisks = dict(entry.disks) if entry is not None else {}
    live = {d.target: d for d in facts.disks}
    config = {d.target: d for d in facts.config}
    targets: List[str] = list(jdisks)
    for d in (*facts.disks, *facts.config):
        if d.target not in targets and _has_our_overlay(d):
            targets.append(d.target)

    out: List[RepairAction] = []
    for target in targets:
        jd = jdisks.get(target)
        recorded = jd.overlay if jd is not None else None
        disk = live.get(target)
        if not facts.defined or disk is None:
            if recorded and _norm(recorded) in facts.existing:
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
                    and not _same(other.source, top):
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
            if recorded and not _same(top, recorded) and not _same(top, jd.source) \
                    and not _same(top, jd.frozen):
                out.append(RepairAction(
                    SKIP, target,
                    f"top image {top} of {target} is not a vmsnapbackup overlay; not touching "
                    "it"))
        if recorded and not _same(recorded, top) and _norm(recorded) in facts.existing:
            out.append(_plan_unused_overlay(facts, target, recorded))
    return out


def plan_checkpoints(facts: DomainFacts, vm: List[RepairAction]) -> List[RepairAction]:
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


def _has_our_overlay(disk: Disk) -> bool:
    return is_our_overlay(disk.source) or any(is_our_overlay(i.path) for i in disk.backing_chain)


def _config_mismatch(facts: DomainFacts, other: Disk, live_top: Optional[str]) -> RepairAction:
    return RepairAction(
        REFUSE, other.target,
        f"the definition of domain {facts.name} names overlay {other.source} for "
        f"{other.target} while the running domain uses {live_top}: shut the domain down "
        "and run repair again, or fix the definition by hand")


def _plan_our_top(facts: DomainFacts, disk: Disk, frozen: Optional[str]) -> List[RepairAction]:
    target, overlay = disk.target, disk.source or ""
    if facts.active:
        if not disk.backing_chain:
            return [RepairAction(REFUSE, target, f"overlay {overlay} of {target} has no "
                                 "backing image in the live XML: cannot commit it")]
        below = disk.backing_chain[0]
        out: List[RepairAction] = []
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
    backing = facts.backing.get(_norm(overlay))
    if _norm(overlay) not in facts.existing:
        return [RepairAction(REFUSE, target, f"the definition of {target} names overlay "
                             f"{overlay}, which does not exist: fix the definition by hand")]
    if backing is None:
        return [RepairAction(REFUSE, target, f"overlay {overlay} of {target} records no "
                             "backing image: cannot merge it")]
    if not backing.format:
        return [RepairAction(REFUSE, target, f"overlay {overlay} does not record the format "
                             f"of its backing image {backing.path}: not merging it")]
    if frozen and not _same(backing.path, frozen):
        return [RepairAction(REFUSE, target, f"overlay {overlay} is backed by {backing.path}, "
                             f"not by the frozen image {frozen} the journal recorded: not "
                             "merging it")]
    if _norm(backing.path) not in facts.existing:
        return [RepairAction(REFUSE, target, f"backing image {backing.path} of overlay "
                             f"{overlay} is missing: cannot merge it")]
    return [RepairAction(
        OFFLINE_COMMIT, target,
        f"merge overlay {overlay} into {backing.path} (qemu-img commit), define {target} on "
        f"{backing.path} again and delete the overlay (domain shut off)",
        disk=target, path=overlay, image=backing)]


def _plan_unused_overlay(facts: DomainFacts, target: str, overlay: str) -> RepairAction:
    users = facts.users.get(_norm(overlay), ())
    if not is_our_overlay(overlay):
        return RepairAction(REFUSE, overlay, f"the journal names {overlay} as the overlay of "
                            f"{target}, but it does not carry the vmsnapbackup marker: not "
                            "deleting it")
    if users:
        return RepairAction(REFUSE, overlay, f"overlay {overlay} is in use by domain "
                            f"{', '.join(users)}: not deleting it")
    return RepairAction(
        DELETE_OVERLAY, overlay,
        f"delete overlay {overlay} of {target}, which no domain uses (the snapshot or the "
        "commit did not finish)", disk=target, path=overlay)


def _generation_of(rel: str) -> Optional[int]:
    parts = rel.split("/")
    if len(parts) >= 2 and parts[0] == GENERATIONS_DIR:
        return parse_number_name(parts[1])
    return None


def plan_pool(entry: Optional[JournalEntry], pool: PoolFacts) -> List[RepairAction]:
    """Pool files the interrupted operation left: never one a sealed manifest refers to."""
    candidates: Dict[str, RepairAction] = {}
    notes: List[RepairAction] = []
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
        numbered = _NUMBERED.fullmatch(name)
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


# -- results ----------------------------------------------------------------------------

@dataclass
class DomainRepair:
    """What repair did (or would do) for one domain."""

    domain: str
    uuid: str
    actions: List[RepairAction] = field(default_factory=list)
    error: Optional[str] = None
    error_code: Optional[ExitCode] = None

    @property
    def refused(self) -> List[RepairAction]:
        return [a for a in self.actions if a.action == REFUSE]

    @property
    def changed(self) -> List[RepairAction]:
        return [a for a in self.actions if a.changes]

    @property
    def nothing_to_do(self) -> bool:
        return not self.changed and not self.refused and self.error is None

    def lines(self, dry_run: bool = False) -> List[str]:
        head = f"domain {self.domain} ({self.uuid})"
        if self.error is not None:
            return [f"{head}: failed: {self.error}"] + [f"  {a.line()}" for a in self.actions]
        if self.refused:
            return ([f"{head}: refused, nothing changed:"]
                    + [f"  {a.line()}" for a in self.refused])
        if not self.changed:
            return [f"{head}: nothing to repair"] + [f"  {a.line()}" for a in self.actions]
        verb = "would do" if dry_run else "repaired"
        return [f"{head}: {verb}:"] + [f"  {a.line()}" for a in self.actions]

    def to_dict(self) -> Dict[str, Any]:
        return {"domain": self.domain, "uuid": self.uuid,
                "actions": [a.to_dict() for a in self.actions],
                "refused": bool(self.refused), "nothing_to_do": self.nothing_to_do,
                "error": self.error}


@dataclass
class RepairReport:
    """The result of :func:`repair`: per domain, the actions as one-line strings."""

    pool: str
    dry_run: bool
    domains: List[DomainRepair] = field(default_factory=list)

    @property
    def actions(self) -> List[RepairAction]:
        return [a for d in self.domains for a in d.actions]

    @property
    def nothing_to_do(self) -> bool:
        return all(d.nothing_to_do for d in self.domains)

    @property
    def exit_code(self) -> ExitCode:
        """OK; the first failed domain's code; else REPAIR_NEEDED if anything was refused."""
        for d in self.domains:
            if d.error is not None:
                return d.error_code or ExitCode.ERROR
        if any(d.refused for d in self.domains):
            return ExitCode.REPAIR_NEEDED
        return ExitCode.OK

    def lines(self) -> List[str]:
        if not self.domains:
            return ["nothing to repair"]
        out: List[str] = []
        for d in self.domains:
            out += d.lines(self.dry_run)
        if self.dry_run:
            out.append("(dry run: nothing was changed)")
        return out

    def to_dict(self) -> Dict[str, Any]:
        return {"pool": self.pool, "dry_run": self.dry_run,
                "nothing_to_do": self.nothing_to_do,
                "domains": [d.to_dict() for d in self.domains],
                "actions": [dict(a.to_dict(), domain=d.domain)
                            for d in self.domains for a in d.actions]}


# -- gathering the facts ----------------------------------------------------------------

class _NoJournal(Journal):
    def read(self) -> Optional[JournalEntry]:
        return None


class _StoreAsIfNoJournal(DomainStore):
    """The store as the next run sees it once the journal is cleared: the dead
    operation's point and generation are then leftovers like any other."""

    @property
    def journal(self) -> Journal:
        return _NoJournal(self.journal_path)


def _pool_facts(store: DomainStore, entry: Optional[JournalEntry]) -> PoolFacts:
    view = _StoreAsIfNoJournal(store.pool, store.uuid)
    leftovers = tuple(Leftover(Path(store.relpath(lo.path)), lo.kind, lo.reason)
                      for lo in view.leftovers())
    referenced: Set[str] = set()
    sealed: Set[int] = set()
    damaged = False
    infos = store.list_points()
    for info in infos:
        if info.manifest is None:
            damaged = True
            continue
        sealed.add(info.manifest.generation)
        for d in info.manifest.disks:
            referenced.update(p for p in (d.volume, d.base, d.table, d.difference) if p)
    existing: Set[str] = set()
    dirs: Set[str] = set()
    for rel in (entry.files if entry is not None else ()):
        p = store.resolve(rel)
        if os.path.lexists(p):
            existing.add(rel)
            if p.is_dir() and not p.is_symlink():
                dirs.add(rel)
    named: Set[str] = set()
    for g in store.generations():
        if not damaged and g not in sealed:
            continue   # repair removes a generation without a sealed point, and so its checkpoint
        try:
            checkpoint = store.read_generation(g).checkpoint
        except VmSnapBackupError:
            continue
        if checkpoint is not None:
            named.add(checkpoint)
    return PoolFacts(
        leftovers=leftovers, journal_files=frozenset(existing), directories=frozenset(dirs),
        referenced=frozenset(referenced), manifest_points=frozenset(i.number for i in infos),
        sealed_generations=None if damaged else frozenset(sealed),
        generation_checkpoints=frozenset(named))


def _pid_exists(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def _inflight_state(uuid: str) -> Optional[str]:
    """A description of a stale (or damaged) in-flight record; LockedError for a live one."""
    try:
        rec = inflight.read(uuid)
    except CorruptFileError as err:
        return f"damaged in-flight record ({err.reason})"
    if rec is None:
        return None
    if inflight.is_live(rec):
        if rec.pid == os.getpid():
            return None
        raise LockedError(f"domain {rec.name} ({uuid}) is busy: {rec.operation} by pid "
                          f"{rec.pid} since {rec.since} (pool {rec.pool}); repair runs only "
                          "once it has ended")
    return (f"stale in-flight record: {rec.operation} by dead pid {rec.pid} since "
            f"{rec.since} (pool {rec.pool})")


def gather(hv: Hypervisor, dom: Any, store: Optional[DomainStore], name: str,
           uuid: str) -> DomainFacts:
    """Read what :func:`plan` needs, changing nothing.

    ``dom`` is None for a domain no longer defined on the hypervisor; ``store`` None
    when the pool has no part for it (or no pool was found).  LockedError if a live
    operation holds the domain's in-flight record.
    """
    stale = _inflight_state(uuid)
    entry: Optional[JournalEntry] = None
    journal_error: Optional[str] = None
    if store is not None:
        try:
            entry = store.journal.read()
        except (CorruptFileError, IncompatibleFormatError) as err:
            journal_error = str(err)
    active = False
    disks: Tuple[Disk, ...] = ()
    config: Tuple[Disk, ...] = ()
    if dom is not None:
        active = hv.is_active(dom)
        disks = tuple(hv.disks(dom))
        if active:
            config = tuple(offline.config_disks(hv, dom))
    paths: Set[str] = set()
    if entry is not None:
        for jd in entry.disks.values():
            paths.update(p for p in (jd.overlay, jd.frozen, jd.source) if p)
        if entry.daemon is not None:
            paths.add(entry.daemon.runtime_dir)
    for d in (*disks, *config):
        if d.source:
            paths.add(d.source)
    backing: Dict[str, Optional[ImageRef]] = {}
    if dom is not None and not active:
        for d in disks:
            if is_our_overlay(d.source) and os.path.lexists(d.source or ""):
                b = offline.overlay_backing(d.source or "")
                backing[_norm(d.source)] = b
                if b is not None:
                    paths.add(b.path)
    jobs: Dict[str, str] = {}
    if active:
        for d in disks:
            if is_our_overlay(d.source):
                job = offline.block_job(dom, d.target)
                if job is not None:
                    jobs[d.target] = job
    users = offline.image_users(hv) if (entry is not None or dom is not None) else {}
    checkpoints: Tuple[str, ...] = ()
    if dom is not None:
        try:
            checkpoints = tuple(n for n in hv.checkpoint_names(dom) if is_our_checkpoint(n))
        except HypervisorError as err:
            log.warning("domain %s: cannot list its checkpoints: %s", name, err)
    return DomainFacts(
        name=name, uuid=uuid, host=socket.gethostname(), defined=dom is not None,
        active=active, disks=disks, config=config, journal=entry, journal_error=journal_error,
        existing=frozenset(_norm(p) for p in paths if os.path.lexists(p)),
        users=users, backing=backing, jobs=jobs,
        daemon_alive=bool(entry and entry.daemon and _pid_exists(entry.daemon.pid)),
        pool=_pool_facts(store, entry) if store is not None and journal_error is None else None,
        stale_inflight=stale, checkpoints=checkpoints)


# -- carrying it out --------------------------------------------------------------------

def _remove_tree_of_ours(path: Path) -> List[str]:
    """Remove a generation (or disk) directory no sealed point refers to: only names the
    pool format defines, then the directories left empty.  Returns what was kept."""
    kept: List[str] = []
    for dirpath, dirnames, filenames in os.walk(path, topdown=False):
        for fname in filenames:
            f = Path(dirpath) / fname
            if (is_temp_name(fname) or fname == GENERATION_RECORD
                    or _NUMBERED.fullmatch(fname) or _BASE.fullmatch(fname)):
                unlink_durable(f)
            else:
                kept.append(str(f))
        for dname in dirnames:
            d = Path(dirpath) / dname
            if d.is_symlink():
                kept.append(str(d))
                continue
            try:
                d.rmdir()
            except OSError:
                pass  # not empty: a stranger's file is in it
    try:
        path.rmdir()
    except OSError:
        if not kept:
            kept.append(str(path))
    return kept


def _execute(hv: Hypervisor, dom: Any, store: Optional[DomainStore],
             action: RepairAction) -> RepairAction:
    """Carry out one action; returns it with what happened added to its detail."""
    kind = action.action
    result = "done"
    if kind == STOP_DAEMON:
        assert action.path is not None
        stopped = stop_leftover_daemon(action.pid, action.path)
        result = "stopped" if stopped else "was no longer running; runtime directory removed"
    elif kind == CANCEL_JOB:
        offline.cancel_block_job(dom, action.disk or "")
        result = "cancelled"
    elif kind == COMMIT:
        res = hv.commit(dom, action.disk or "", action.path or "")
        result = f"back on {res.image.path} in {res.seconds:.2f} s"
    elif kind == OFFLINE_COMMIT:
        assert action.image is not None
        res2 = offline.offline_commit(hv, dom, action.disk or "", action.path or "",
                                      action.image)
        result = f"defined on {res2.image.path} again in {res2.seconds:.2f} s"
    elif kind == DELETE_CHECKPOINT:
        deleted = hv.delete_checkpoint(dom, action.path or "")
        result = "deleted" if deleted else "already gone"
    elif kind == DELETE_OVERLAY:
        removed = offline.delete_unused_overlay(hv, action.path or "")
        result = "deleted" if removed else "already gone"
    elif kind in (REMOVE_FILE, REMOVE_GENERATION):
        assert store is not None
        p = store.resolve(action.target)
        if p.is_dir() and not p.is_symlink():
            kept = _remove_tree_of_ours(p)
            result = "removed" if not kept else f"removed; kept foreign files: {', '.join(kept)}"
        else:
            result = "removed" if unlink_durable(p) else "already gone"
    elif kind == CLEAR_JOURNAL:
        assert store is not None
        store.journal.clear()
        result = "cleared"
    elif kind == CLEAR_INFLIGHT:
        result = "replaced by this repair's record, removed at its end"
    else:
        return action
    log.info("repair: %s %s: %s (%s)", kind, action.target, action.detail, result)
    return replace(action, detail=f"{action.detail} [{result}]")


def _carry_out(hv: Hypervisor, dom: Any, store: Optional[DomainStore], pool_dir: str,
               facts: DomainFacts, actions: List[RepairAction]) -> List[RepairAction]:
    images = [a.image.path for a in actions if a.image is not None]
    images += [d.source for d in facts.disks if d.source and d.source not in images]
    record = inflight.InflightRecord.now(
        facts.uuid, facts.name, "repair", pool_dir, images,
        offline=any(a.action == OFFLINE_COMMIT for a in actions))
    done: List[RepairAction] = []
    # registering replaces a stale record, and fails if a live operation took the
    # domain since we looked (the host-wide guard; the pool lock is per pool)
    with inflight.inflight(record):
        try:
            for action in actions:
                done.append(_execute(hv, dom, store, action))
        except BaseException:
            if done:
                log.warning("repair of domain %s stopped after: %s", facts.name,
                            "; ".join(a.line() for a in done if a.changes))
            raise
    return done


def _repair_facts(hv: Hypervisor, dom: Any, store: Optional[DomainStore], pool_dir: str,
                  name: str, uuid: str, dry_run: bool) -> DomainRepair:
    facts = gather(hv, dom, store, name, uuid)
    actions = plan(facts)
    result = DomainRepair(domain=name, uuid=uuid)
    refused = [a for a in actions if a.action == REFUSE]
    if refused:
        for a in refused:
            log.warning("repair of domain %s: %s", name, a.line())
        result.actions = refused  # nothing else happens: listing it would only mislead
        return result
    if dry_run or not any(a.changes for a in actions):
        result.actions = actions
        return result
    result.actions = _carry_out(hv, dom, store, pool_dir, facts, actions)
    return result


def repair_held(store: DomainStore, hypervisor: Hypervisor, dom: Any, *,
                dry_run: bool = False) -> DomainRepair:
    """Repair one domain whose pool lock the caller already holds (the backup's
    "repair first" path).  Refusals come back in the result; nothing changed then."""
    name = hypervisor.domain_name(dom) if dom is not None else store.name
    return _repair_facts(hypervisor, dom, store, str(store.pool.root), name, store.uuid,
                         dry_run)


def needs_repair(store: DomainStore, hypervisor: Hypervisor, dom: Any) -> Optional[str]:
    """Why the domain needs a repair before it can be backed up, or None.

    A journal (readable or not), or a disk on one of our overlays (live or in the
    definition, or below someone else's image).  Pool leftovers without a journal do
    not block a backup (their names never come back), nor does a stale in-flight
    record alone (registering a new one replaces it; the overlays it might stand for
    are looked at directly).
    """
    reasons: List[str] = []
    try:
        entry = store.journal.read()
    except (CorruptFileError, IncompatibleFormatError) as err:
        reasons.append(f"its journal is unreadable ({err})")
    else:
        if entry is not None:
            reasons.append(f"an interrupted {entry.operation} (pid {entry.pid} on "
                           f"{entry.host or 'unknown host'}, started {entry.started}, step "
                           f"{entry.step}) left a journal")
    disks = list(hypervisor.disks(dom))
    if hypervisor.is_active(dom):
        disks += [replace(d, target=f"{d.target} (definition)")
                  for d in offline.config_disks(hypervisor, dom)]
    for d in disks:
        if is_our_overlay(d.source):
            reasons.append(f"disk {d.target} is on overlay {d.source} of an earlier backup")
        else:
            below = [i.path for i in d.backing_chain if is_our_overlay(i.path)]
            if below:
                reasons.append(f"disk {d.target} has overlay {below[0]} of an earlier backup "
                               f"below its top image {d.source}")
    return "; ".join(reasons) or None


# -- the command ------------------------------------------------------------------------

@dataclass
class _Target:
    name: str
    uuid: str
    dom: Any
    store: Optional[DomainStore]


def _store_of(the_pool: Optional[Pool], uuid: str) -> Optional[DomainStore]:
    if the_pool is None:
        return None
    try:
        return the_pool.domain(uuid)
    except NotFoundError:
        return None


def _find_target(hv: Hypervisor, the_pool: Optional[Pool], ident: str) -> _Target:
    try:
        dom = hv.find_domain(ident)
    except NotFoundError:
        if the_pool is None:
            raise
        try:
            store = the_pool.find_domain(ident)
        except NotFoundError:
            raise NotFoundError(f"domain '{ident}' is neither defined on {hv.uri} nor in pool "
                                f"{the_pool.root}") from None
        try:
            dom = hv.find_domain(store.uuid)
        except NotFoundError:
            return _Target(store.name, store.uuid, None, store)
    uuid = hv.domain_uuid(dom)
    return _Target(hv.domain_name(dom), uuid, dom, _store_of(the_pool, uuid))


def _all_targets(hv: Hypervisor, the_pool: Optional[Pool], pool_dir: str) -> List[_Target]:
    """Domains of the pool with a journal, domains on the hypervisor with one of our
    overlays in a disk, and domains whose stale in-flight record names this pool."""
    found: Dict[str, _Target] = {}

    def add_uuid(uuid: str, fallback_name: str) -> None:
        if uuid in found:
            return
        try:
            dom = hv.find_domain(uuid)
        except NotFoundError:
            store = _store_of(the_pool, uuid)
            found[uuid] = _Target(store.name if store else fallback_name, uuid, None, store)
            return
        found[uuid] = _Target(hv.domain_name(dom), uuid, dom, _store_of(the_pool, uuid))

    if the_pool is not None:
        for store in the_pool.domains():
            if store.journal.exists():
                add_uuid(store.uuid, store.name)
    for dom in offline.list_domains(hv):
        try:
            disks = hv.disks(dom) + offline.config_disks(hv, dom)
        except VmSnapBackupError as err:
            log.debug("skipping a domain that went away: %s", err)
            continue
        if any(_has_our_overlay(d) for d in disks):
            add_uuid(hv.domain_uuid(dom), hv.domain_name(dom))
    for rec in inflight.records():
        if _same(rec.pool, pool_dir) and rec.pid != os.getpid() and not inflight.is_live(rec):
            add_uuid(rec.uuid, rec.name)
    return sorted(found.values(), key=lambda t: (t.name, t.uuid))


def _repair_target(hv: Hypervisor, t: _Target, pool_dir: str, dry_run: bool) -> DomainRepair:
    if t.store is None:
        log.info("domain %s has no part in pool %s: repairing the hypervisor side only",
                 t.name, pool_dir)
        return _repair_facts(hv, t.dom, None, pool_dir, t.name, t.uuid, dry_run)
    # dry runs lock too: what they report must not be a backup's work in progress
    with t.store.lock("repair"):
        return _repair_facts(hv, t.dom, t.store, pool_dir, t.name, t.uuid, dry_run)


def repair(
    pool: "str | os.PathLike[str]",
    *,
    domain: Optional[str] = None,
    all_domains: bool = False,
    dry_run: bool = False,
    uri: str = DEFAULT_URI,
) -> RepairReport:
    """Undo what interrupted backups left for ``domain`` (name or UUID) or, with
    ``all_domains``, for every domain that needs it.

    Takes each domain's pool lock (LockedError if a live process holds it) and
    its in-flight record.  With ``dry_run`` nothing changes; the report says what
    would be done.  A pool that does not exist is not an error: the hypervisor side
    (overlays) is still repaired, since that is what matters when a pool was lost.
    With one domain, errors are raised; with ``all_domains`` they are recorded per
    domain and the others are still repaired (see :attr:`RepairReport.exit_code`).
    """
    if all_domains == (domain is not None):
        raise UsageError("repair needs either a DOMAIN or --all")
    pool_dir, _libvirt_pool = resolve_pool(os.fspath(pool), uri)
    try:
        the_pool: Optional[Pool] = Pool.open(pool_dir)
    except NotFoundError as err:
        log.warning("%s; repairing the hypervisor side only", err)
        the_pool = None
    report = RepairReport(pool=str(pool_dir), dry_run=dry_run)
    with connect(uri) as hv, interruptible("repair"):
        if domain is not None:
            target = _find_target(hv, the_pool, domain)
            report.domains.append(_repair_target(hv, target, str(pool_dir), dry_run))
            return report
        for target in _all_targets(hv, the_pool, str(pool_dir)):
            try:
                report.domains.append(_repair_target(hv, target, str(pool_dir), dry_run))
            except BackupInterruptedError:
                raise
            except VmSnapBackupError as err:
                log.error("repair of domain %s failed: %s", target.name, err)
                report.domains.append(DomainRepair(domain=target.name, uuid=target.uuid,
                                                   error=" ".join(str(err).split()),
                                                   error_code=err.exit_code))
    return report
