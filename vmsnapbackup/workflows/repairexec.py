"""Repair's last part: carry out a planned list of actions, one at a time, in order.

Each action re-checks right before acting what it is about to touch (the
adapters refuse to merge or delete anything without our overlay marker, or an
overlay some domain uses); the host's in-flight record keeps a backup away
while the actions run.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import replace
from pathlib import Path

from ..adapters import offline
from ..adapters.blockjobs import cancel_block_job
from ..adapters.domain import Domain
from ..adapters.hostinflight import inflight_on
from ..adapters.hypervisor import Hypervisor
from ..adapters.storagedaemon import stop_leftover_daemon
from ..core import inflight
from ..core.atomic import is_temp_name, unlink_durable
from ..core.names import BASE_RE, NUMBERED_RE
from ..core.pool import GENERATION_RECORD, DomainStore
from ..errors import RepairNeededError
from .repairfacts import DomainFacts
from .repairplan import (
    CANCEL_JOB,
    CLEAR_INFLIGHT,
    CLEAR_JOURNAL,
    COMMIT,
    DELETE_CHECKPOINT,
    DELETE_OVERLAY,
    OFFLINE_COMMIT,
    REMOVE_FILE,
    REMOVE_GENERATION,
    STOP_DAEMON,
    RepairAction,
)

__all__ = ["carry_out", "execute", "remove_tree_of_ours"]

log = logging.getLogger(__name__)

def remove_tree_of_ours(path: Path) -> list[str]:
    """Remove a generation (or disk) directory no sealed point refers to: only names the
    pool format defines, then the directories left empty.  Returns what was kept."""
    kept: list[str] = []
    for dirpath, dirnames, filenames in os.walk(path, topdown=False):
        for fname in filenames:
            f = Path(dirpath) / fname
            if (is_temp_name(fname) or fname == GENERATION_RECORD
                    or NUMBERED_RE.fullmatch(fname) or BASE_RE.fullmatch(fname)):
                unlink_durable(f)
            else:
                kept.append(str(f))
        for dname in dirnames:
            d = Path(dirpath) / dname
            if d.is_symlink():
                kept.append(str(d))
                continue
            with contextlib.suppress(OSError):  # not empty: a stranger's file is in it
                d.rmdir()
    try:
        path.rmdir()
    except OSError:
        if not kept:
            kept.append(str(path))
    return kept


def execute(hv: Hypervisor, dom: Domain | None, store: DomainStore | None,
             action: RepairAction) -> RepairAction:
    """Carry out one action; returns it with what happened added to its detail."""
    kind = action.action
    result = "done"

    def defined() -> Domain:
        # the plan only has VM actions for a domain it found defined
        if dom is None:
            raise RepairNeededError(f"{kind} {action.target}: the domain is not defined")
        return dom

    if kind == STOP_DAEMON:
        assert action.path is not None
        stopped = stop_leftover_daemon(action.pid, action.path, host=hv.host)
        result = "stopped" if stopped else "was no longer running; runtime directory removed"
    elif kind == CANCEL_JOB:
        cancel_block_job(defined(), action.disk or "")
        result = "cancelled"
    elif kind == COMMIT:
        res = hv.commit(defined(), action.disk or "", action.path or "")
        result = f"back on {res.image.path} in {res.seconds:.2f} s"
    elif kind == OFFLINE_COMMIT:
        assert action.image is not None
        res2 = offline.offline_commit(hv, defined(), action.disk or "", action.path or "",
                                      action.image)
        result = f"defined on {res2.image.path} again in {res2.seconds:.2f} s"
    elif kind == DELETE_CHECKPOINT:
        deleted = hv.delete_checkpoint(defined(), action.path or "")
        result = "deleted" if deleted else "already gone"
    elif kind == DELETE_OVERLAY:
        removed = offline.delete_unused_overlay(hv, action.path or "")
        result = "deleted" if removed else "already gone"
    elif kind in (REMOVE_FILE, REMOVE_GENERATION):
        assert store is not None
        p = store.resolve(action.target)
        if p.is_dir() and not p.is_symlink():
            kept = remove_tree_of_ours(p)
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


def carry_out(hv: Hypervisor, dom: Domain | None, store: DomainStore | None, pool_dir: str,
               facts: DomainFacts, actions: list[RepairAction]) -> list[RepairAction]:
    images = [a.image.path for a in actions if a.image is not None]
    images += [d.source for d in facts.disks if d.source and d.source not in images]
    record = inflight.InflightRecord.now(
        facts.uuid, facts.name, "repair", pool_dir, images,
        offline=any(a.action == OFFLINE_COMMIT for a in actions))
    done: list[RepairAction] = []
    # registering replaces a stale record, and fails if a live operation took the
    # domain since we looked (the host-wide guard; the pool lock is per pool)
    with inflight_on(hv.host, record):   # on the hypervisor, where its hook reads it
        try:
            for action in actions:
                done.append(execute(hv, dom, store, action))
        except BaseException:
            if done:
                log.warning("repair of domain %s stopped after: %s", facts.name,
                            "; ".join(a.line() for a in done if a.changes))
            raise
    return done
