"""``repair``: bring a domain back to its original images after an interrupted backup.

A backup killed at any instant leaves some of: the domain running (or defined, if
it was shut off meanwhile) on our overlay, a commit job half-way, an overlay file
nobody uses, a storage daemon or its runtime directory, partial files in the pool,
the journal and the host's in-flight record.  Repair finds them from two sides, the
journal (FORMAT §9) and the hypervisor's own view (every disk whose image carries
our overlay marker), so it also works when the journal or the whole pool is gone.

This module is the command: which domains, under which locks, and the report.
One domain's repair (look, plan, act, until the state has settled) is
:mod:`.repairdomain`; it works in two halves so that what it would do can be
tested, shown (``--dry-run``) and refused as a whole:

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
from dataclasses import dataclass, field
from typing import Any

from ..adapters import offline
from ..adapters.domain import Domain
from ..adapters.domainxml import same_image
from ..adapters.hostinflight import is_live_on, records_on
from ..adapters.hypervisor import DEFAULT_URI, Hypervisor, connect
from ..adapters.storagepool import resolve_pool
from ..core.pool import DomainStore, Pool
from ..errors import (
    BackupInterruptedError,
    ExitCode,
    NotFoundError,
    UsageError,
    VmSnapBackupError,
)
from .drylock import looking
from .interrupt import interruptible
from .repairdomain import DomainRepair, repair_before_backup, repair_domain, repair_held
from .repairfacts import DomainFacts, PoolFacts, gather, needs_repair
from .repairplan import (
    CANCEL_JOB,
    CLEAR_INFLIGHT,
    CLEAR_JOURNAL,
    COMMIT,
    DELETE_CHECKPOINT,
    DELETE_OVERLAY,
    OFFLINE_COMMIT,
    REFUSE,
    REMOVE_FILE,
    REMOVE_GENERATION,
    SKIP,
    STOP_DAEMON,
    RepairAction,
    has_our_overlay,
    plan,
    plan_pool,
    plan_vm,
)

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
    "DomainFacts",
    "DomainRepair",
    "PoolFacts",
    "RepairAction",
    "RepairReport",
    "gather",
    "needs_repair",
    "plan",
    "plan_pool",
    "plan_vm",
    "repair",
    "repair_before_backup",
    "repair_held",
]

log = logging.getLogger(__name__)


# -- results ----------------------------------------------------------------------------

@dataclass
class RepairReport:
    """The result of :func:`repair`: per domain, the actions as one-line strings."""

    pool: str
    dry_run: bool
    domains: list[DomainRepair] = field(default_factory=list)

    @property
    def actions(self) -> list[RepairAction]:
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

    def lines(self) -> list[str]:
        if not self.domains:
            return ["nothing to repair"]
        out: list[str] = []
        for d in self.domains:
            out += d.lines(self.dry_run)
        if self.dry_run:
            out.append("(dry run: nothing was changed)")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"pool": self.pool, "dry_run": self.dry_run,
                "nothing_to_do": self.nothing_to_do,
                "domains": [d.to_dict() for d in self.domains],
                "actions": [dict(a.to_dict(), domain=d.domain)
                            for d in self.domains for a in d.actions]}


# -- the command ------------------------------------------------------------------------

@dataclass
class _Target:
    name: str
    uuid: str
    dom: Domain | None
    store: DomainStore | None


def _store_of(the_pool: Pool | None, uuid: str) -> DomainStore | None:
    if the_pool is None:
        return None
    try:
        return the_pool.domain(uuid)
    except NotFoundError:
        return None


def _find_target(hv: Hypervisor, the_pool: Pool | None, ident: str) -> _Target:
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


def _all_targets(hv: Hypervisor, the_pool: Pool | None, pool_dir: str) -> list[_Target]:
    """Domains of the pool with a journal, domains on the hypervisor with one of our
    overlays in a disk, and domains whose stale in-flight record names this pool;
    never one that a live operation (another process's backup, in any pool) holds
    now: that is work in progress, not a leftover, and ``--all`` must not fail on it."""
    found: dict[str, _Target] = {}
    records = records_on(hv.host)   # a remote backup's records live on the hypervisor
    live = {r.uuid: r for r in records if r.pid != os.getpid() and is_live_on(hv.host, r)}

    def add_uuid(uuid: str, fallback_name: str) -> None:
        if uuid in found:
            return
        if uuid in live:
            rec = live[uuid]
            log.info("domain %s: skipped, a live %s by pid %d holds it (since %s)",
                     rec.name, rec.operation, rec.pid, rec.since)
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
    for dom in hv.list_domains():
        try:
            disks = hv.disks(dom) + offline.config_disks(hv, dom)
        except VmSnapBackupError as err:
            log.debug("skipping a domain that went away: %s", err)
            continue
        if any(has_our_overlay(d) for d in disks):
            add_uuid(hv.domain_uuid(dom), hv.domain_name(dom))
    for rec in records:
        if same_image(rec.pool, pool_dir) and rec.uuid not in live and rec.pid != os.getpid():
            add_uuid(rec.uuid, rec.name)
    return sorted(found.values(), key=lambda t: (t.name, t.uuid))


def _repair_target(hv: Hypervisor, t: _Target, pool_dir: str, dry_run: bool) -> DomainRepair:
    if t.store is None:
        log.info("domain %s has no part in pool %s: repairing the hypervisor side only",
                 t.name, pool_dir)
        return repair_domain(hv, t.dom, None, pool_dir, t.name, t.uuid, dry_run)
    # dry runs look too (what they report must not be a backup's work in progress),
    # but take nothing over: a dead holder's note is what says repair is pending
    with looking(t.store) if dry_run else t.store.lock("repair"):
        return repair_domain(hv, t.dom, t.store, pool_dir, t.name, t.uuid, dry_run)


def repair(
    pool: str | os.PathLike[str],
    *,
    domain: str | None = None,
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
        the_pool: Pool | None = Pool.open(pool_dir)
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
