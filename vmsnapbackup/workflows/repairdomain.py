"""Repair of one domain: look, plan, act, until what libvirt shows has settled.

:func:`repair_domain` is the unit both callers share: the ``repair`` command
(:mod:`.repair`, which finds the domains and takes their pool locks) and the
backup, which repairs what a dead backup left before it stacks a new snapshot
on it (:func:`repair_before_backup`, under the lock the backup already holds).

A backup killed inside a libvirt call leaves that call running in libvirtd, so
the state repair looks at can still move for a moment after the process died.
Repair is idempotent and a refusal changes nothing, so it looks again, for a
bounded time, before it believes a refusal that such a call can explain (see
:attr:`~.repairplan.RepairAction.transient`); any other refusal is final at once.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tenacity

from ..adapters.domain import Domain
from ..adapters.hypervisor import Hypervisor
from ..core.pool import DomainStore
from ..errors import ExitCode, RepairNeededError
from .repairexec import carry_out
from .repairfacts import gather, needs_repair
from .repairplan import REFUSE, RepairAction, plan

__all__ = ["DomainRepair", "repair_before_backup", "repair_domain", "repair_held"]

log = logging.getLogger(__name__)


@dataclass
class DomainRepair:
    """What repair did (or would do) for one domain."""

    domain: str
    uuid: str
    actions: list[RepairAction] = field(default_factory=list)
    error: str | None = None
    error_code: ExitCode | None = None

    @property
    def refused(self) -> list[RepairAction]:
        return [a for a in self.actions if a.action == REFUSE]

    @property
    def changed(self) -> list[RepairAction]:
        return [a for a in self.actions if a.changes]

    @property
    def nothing_to_do(self) -> bool:
        return not self.changed and not self.refused and self.error is None

    def lines(self, dry_run: bool = False) -> list[str]:
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

    def to_dict(self) -> dict[str, Any]:
        return {"domain": self.domain, "uuid": self.uuid,
                "actions": [a.to_dict() for a in self.actions],
                "refused": bool(self.refused), "nothing_to_do": self.nothing_to_do,
                "error": self.error}


#: How long a repair keeps re-planning while the domain's state moves under it, and
#: how long a refusal must hold before it is believed.
_SETTLE_SECONDS = 20.0
_REFUSAL_SETTLE_SECONDS = 5.0


class _Unsettled(Exception):
    """A transient refusal met while libvirt may still be finishing a dead backup's call."""

    def __init__(self, result: DomainRepair) -> None:
        super().__init__("refused")
        self.result = result


def repair_domain(hv: Hypervisor, dom: Domain | None, store: DomainStore | None,
                  pool_dir: str, name: str, uuid: str, dry_run: bool) -> DomainRepair:
    """Look, plan, act; look again if the domain changed between the look and the act.

    A backup killed during a libvirt call leaves the call running in libvirtd: a
    snapshot puts the domain on its overlay just *after* we looked (the planned
    "delete the unused overlay" is then refused at its last check), or has updated
    the definition but not yet the running domain (a refusal, for a moment).  Repair
    is idempotent and a refusal changes nothing: gather and plan afresh, for a
    bounded time, before believing either.  Refusals that cannot be transient
    (:attr:`RepairAction.transient` unset) are believed at once."""
    refuse_until = time.monotonic() + _REFUSAL_SETTLE_SECONDS
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type((RepairNeededError, _Unsettled)),
        stop=tenacity.stop_after_delay(_SETTLE_SECONDS),
        wait=tenacity.wait_exponential(multiplier=0.2, max=3.0),
        before_sleep=lambda state: log.info(
            "repair of domain %s: the domain may still be changing (%s); looking again",
            name, state.outcome.exception() if state.outcome else "?"),
        reraise=True)
    try:
        return retrying(_repair_once, hv, dom, store, pool_dir, name, uuid, dry_run,
                        refuse_until)
    except _Unsettled as unsettled:
        return unsettled.result


def _repair_once(hv: Hypervisor, dom: Domain | None, store: DomainStore | None,
                 pool_dir: str, name: str, uuid: str, dry_run: bool,
                 refuse_until: float = 0.0) -> DomainRepair:
    facts = gather(hv, dom, store, name, uuid)
    actions = plan(facts)
    result = DomainRepair(domain=name, uuid=uuid)
    refused = [a for a in actions if a.action == REFUSE]
    if refused:
        result.actions = refused  # nothing else happens: listing it would only mislead
        # only a refusal that libvirt's unfinished work can explain is worth a wait: a
        # foreign image, an unreadable journal... hold, and are reported at once
        if not dry_run and all(a.transient for a in refused) \
                and time.monotonic() < refuse_until:
            raise _Unsettled(result)
        for a in refused:
            log.warning("repair of domain %s: %s", name, a.line())
        return result
    if dry_run or not any(a.changes for a in actions):
        result.actions = actions
        return result
    result.actions = carry_out(hv, dom, store, pool_dir, facts, actions)
    return result


def repair_held(store: DomainStore, hypervisor: Hypervisor, dom: Domain | None, *,
                dry_run: bool = False) -> DomainRepair:
    """Repair one domain whose pool lock the caller already holds (the backup's
    "repair first" path).  Refusals come back in the result; nothing changed then."""
    name = hypervisor.domain_name(dom) if dom is not None else store.name
    return repair_domain(hypervisor, dom, store, str(store.pool.root), name, store.uuid,
                         dry_run)


def repair_before_backup(store: DomainStore, hv: Hypervisor, dom: Domain, name: str,
                         pool_dir: Path) -> None:
    """Never stack a backup on what a dead one left: repair it first, or say how.

    Repair only touches what carries our marker and refuses anything else, so
    running it here is as safe as the user running it; when it refuses (a
    foreign image on top of ours, an unreadable journal, ...) the backup stops
    and names the command, whose output explains the refusal.
    """
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
