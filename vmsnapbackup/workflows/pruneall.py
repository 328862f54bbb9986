"""``prune --all``: the retention policy over every domain of a pool, one summary.

Each domain is pruned on its own (its own lock, its own journal check), so one
domain that cannot be pruned now (a backup runs, a repair is pending) does not
keep the others from being pruned; the summary says which failed and why, and
the exit code that it happened.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..adapters.storagepool import refresh_pool, resolve_pool
from ..core.defaults import DEFAULT_URI
from ..core.pool import Pool
from ..errors import ExitCode, UsageError, VmSnapBackupError
from .prune import PruneReport

__all__ = ["PruneAllReport", "prune_all"]

log = logging.getLogger(__name__)

#: prune of one domain (name or UUID) in an open pool, with the policy already bound
PruneOne = Callable[[str, Pool], PruneReport]


@dataclass
class PruneAllReport:
    pool: str
    reports: list[PruneReport] = field(default_factory=list)
    #: (domain, error message, exit code) of each domain that could not be pruned
    failed: list[tuple[str, str, int]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 when every domain was pruned; else the failures' code (1 when they differ)."""
        codes = {code for _, _, code in self.failed}
        if not codes:
            return int(ExitCode.OK)
        return codes.pop() if len(codes) == 1 else int(ExitCode.ERROR)

    def to_dict(self) -> dict[str, Any]:
        return {"pool": self.pool, "reports": [r.to_dict() for r in self.reports],
                "failed": [{"domain": d, "error": m, "exit_code": c}
                           for d, m, c in self.failed],
                "exit_code": self.exit_code}


def prune_all(pool: str | os.PathLike[str], prune_one: PruneOne, *,
              uri: str = DEFAULT_URI) -> PruneAllReport:
    """Prune every domain of ``pool`` with ``prune_one``; failures are collected, not raised.

    A UsageError (a bad policy) is the same for every domain: raised at once.
    """
    pool_dir, libvirt_pool = resolve_pool(os.fspath(pool), uri)
    the_pool = Pool.open(pool_dir)
    report = PruneAllReport(pool=str(the_pool.root))
    for store in the_pool.domains():
        label = store.uuid
        try:
            label = store.name or store.uuid
            report.reports.append(prune_one(store.uuid, the_pool))
        except UsageError:
            raise
        except VmSnapBackupError as exc:
            log.error("domain %s: not pruned: %s", label, exc)
            report.failed.append((label, " ".join(str(exc).split()), int(exc.exit_code)))
    if any(r.files_removed for r in report.reports if not r.dry_run):
        refresh_pool(libvirt_pool, uri)
    return report
