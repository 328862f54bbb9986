"""Repair's first half: what is on the host and in the pool, read without changing anything.

:func:`gather` reads libvirt (live XML and definition, block jobs,
checkpoints, every image any domain uses), the file system (which overlays,
frozen images and runtime directories exist, what an overlay file records as
its backing image), the journal and the in-flight record into one
:class:`DomainFacts`; :mod:`.repairplan` decides from that alone.
:func:`needs_repair` is the backup's quick look at the same state.
"""
from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..adapters import offline, processes
from ..adapters.blockjobs import block_job
from ..adapters.domain import Domain
from ..adapters.domainxml import Disk, ImageRef, is_our_overlay
from ..adapters.host import Host
from ..adapters.hostinflight import is_live_on, read_on
from ..adapters.hypervisor import Hypervisor
from ..core.journal import Journal, JournalEntry
from ..core.pool import DomainStore, Leftover
from ..errors import (
    CorruptFileError,
    HypervisorError,
    IncompatibleFormatError,
    LockedError,
    VmSnapBackupError,
)
from .dirtymap import is_our_checkpoint

__all__ = ["DomainFacts", "PoolFacts", "gather", "needs_repair", "norm_path"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolFacts:
    """The domain's part of the pool, as far as repair cares.

    Paths are relative to the domain directory.  ``leftovers`` are those of
    :meth:`DomainStore.leftovers` as the next run will see them once the journal is
    gone (so the dead backup's own files are included).  ``sealed_generations`` is
    None when a damaged manifest hides which generations hold sealed points: then
    every generation is treated as holding some.
    """

    leftovers: tuple[Leftover, ...] = ()
    journal_files: frozenset[str] = frozenset()   # the journal's files that exist
    directories: frozenset[str] = frozenset()     # those of them that are directories
    referenced: frozenset[str] = frozenset()      # every path a valid manifest names
    manifest_points: frozenset[int] = frozenset()  # points with a manifest file, valid or not
    sealed_generations: frozenset[int] | None = frozenset()
    generation_checkpoints: frozenset[str] = frozenset()  # named by generations with points


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
    disks: tuple[Disk, ...] = ()
    config: tuple[Disk, ...] = ()
    journal: JournalEntry | None = None
    journal_error: str | None = None
    existing: frozenset[str] = frozenset()
    users: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    backing: Mapping[str, ImageRef | None] = field(default_factory=dict)
    jobs: Mapping[str, str] = field(default_factory=dict)
    daemon_alive: bool = False
    pool: PoolFacts | None = None
    stale_inflight: str | None = None
    checkpoints: tuple[str, ...] = ()   # libvirt checkpoints of the domain with our prefix


def norm_path(path: str | None) -> str:
    """A path as compared with the paths libvirt reports ("" for none)."""
    return os.path.normpath(path) if path else ""


class _NoJournal(Journal):
    def read(self) -> JournalEntry | None:
        return None


class _StoreAsIfNoJournal(DomainStore):
    """The store as the next run sees it once the journal is cleared: the dead
    operation's point and generation are then leftovers like any other."""

    @property
    def journal(self) -> Journal:
        return _NoJournal(self.journal_path)


def _pool_facts(store: DomainStore, entry: JournalEntry | None) -> PoolFacts:
    view = _StoreAsIfNoJournal(store.pool, store.uuid)
    leftovers = tuple(Leftover(Path(store.relpath(lo.path)), lo.kind, lo.reason)
                      for lo in view.leftovers())
    referenced: set[str] = set()
    sealed: set[int] = set()
    damaged = False
    infos = store.list_points()
    for info in infos:
        if info.manifest is None:
            damaged = True
            continue
        sealed.add(info.manifest.generation)
        for d in info.manifest.disks:
            referenced.update(p for p in (d.volume, d.base, d.table, d.difference) if p)
    existing: set[str] = set()
    dirs: set[str] = set()
    for rel in (entry.files if entry is not None else ()):
        p = store.resolve(rel)
        if os.path.lexists(p):
            existing.add(rel)
            if p.is_dir() and not p.is_symlink():
                dirs.add(rel)
    named: set[str] = set()
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


def _inflight_state(uuid: str, host: Host) -> str | None:
    """A description of a stale (or damaged) in-flight record on the hypervisor;
    LockedError for a live one."""
    try:
        rec = read_on(host, uuid)
    except CorruptFileError as err:
        return f"damaged in-flight record ({err.reason})"
    if rec is None:
        return None
    if is_live_on(host, rec):
        if rec.pid == os.getpid():
            return None
        raise LockedError(f"domain {rec.name} ({uuid}) is busy: {rec.operation} by pid "
                          f"{rec.pid} since {rec.since} (pool {rec.pool}); repair runs only "
                          "once it has ended")
    return (f"stale in-flight record: {rec.operation} by dead pid {rec.pid} since "
            f"{rec.since} (pool {rec.pool})")


def _exists(host: Host, path: str) -> bool:
    """Whether ``path`` exists on the hypervisor (a remote one: asked over ssh)."""
    try:
        return host.stat(path, follow=False) is not None
    except OSError:
        return True   # there, but unreadable to us: never taken for gone


def gather(hv: Hypervisor, dom: Domain | None, store: DomainStore | None, name: str,
           uuid: str) -> DomainFacts:
    """Read what :func:`plan` needs, changing nothing.

    ``dom`` is None for a domain no longer defined on the hypervisor; ``store`` None
    when the pool has no part for it (or no pool was found).  LockedError if a live
    operation holds the domain's in-flight record.
    """
    stale = _inflight_state(uuid, hv.host)
    entry: JournalEntry | None = None
    journal_error: str | None = None
    if store is not None:
        try:
            entry = store.journal.read()
        except (CorruptFileError, IncompatibleFormatError) as err:
            journal_error = str(err)
    active = False
    disks: tuple[Disk, ...] = ()
    config: tuple[Disk, ...] = ()
    if dom is not None:
        active = hv.is_active(dom)
        disks = tuple(hv.disks(dom))
        if active:
            config = tuple(offline.config_disks(hv, dom))
    paths: set[str] = set()
    if entry is not None:
        for jd in entry.disks.values():
            paths.update(p for p in (jd.overlay, jd.frozen, jd.source) if p)
        if entry.daemon is not None:
            paths.add(entry.daemon.runtime_dir)
    for d in (*disks, *config):
        if d.source:
            paths.add(d.source)
    backing: dict[str, ImageRef | None] = {}
    if dom is not None and not active:
        for d in disks:
            if is_our_overlay(d.source) and _exists(hv.host, d.source or ""):
                b = offline.overlay_backing(d.source or "")
                backing[norm_path(d.source)] = b
                if b is not None:
                    paths.add(b.path)
    jobs: dict[str, str] = {}
    if dom is not None and active:
        for d in disks:
            if is_our_overlay(d.source):
                job = block_job(dom, d.target)
                if job is not None:
                    jobs[d.target] = job
    users = offline.image_users(hv) if (entry is not None or dom is not None) else {}
    checkpoints: tuple[str, ...] = ()
    if dom is not None:
        try:
            checkpoints = tuple(n for n in hv.checkpoint_names(dom) if is_our_checkpoint(n))
        except HypervisorError as err:
            log.warning("domain %s: cannot list its checkpoints: %s", name, err)
    return DomainFacts(
        name=name, uuid=uuid, host=socket.gethostname(), defined=dom is not None,
        active=active, disks=disks, config=config, journal=entry, journal_error=journal_error,
        existing=frozenset(norm_path(p) for p in paths if _exists(hv.host, p)),
        users=users, backing=backing, jobs=jobs,
        daemon_alive=bool(entry and entry.daemon
                          and processes.is_alive(entry.daemon.pid, hv.host)),
        pool=_pool_facts(store, entry) if store is not None and journal_error is None else None,
        stale_inflight=stale, checkpoints=checkpoints)


def needs_repair(store: DomainStore, hypervisor: Hypervisor, dom: Domain) -> str | None:
    """Why the domain needs a repair before it can be backed up, or None.

    A journal (readable or not), or a disk on one of our overlays (live or in the
    definition, or below someone else's image).  Pool leftovers without a journal do
    not block a backup (their names never come back), nor does a stale in-flight
    record alone (registering a new one replaces it; the overlays it might stand for
    are looked at directly).
    """
    reasons: list[str] = []
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
