"""Back up many domains in one run: which ones, several at once, and what became of each.

``backup DOMAIN...`` or ``backup --all`` over one or more libvirt connections.
Which domains: :func:`select_domains` (pure, from each connection's list).
Several at once, each isolated from the others: :func:`.batch.run_isolated`
(the executor ``run`` uses too).  Each domain's backup is the ordinary
:func:`.backup.backup` with its own connection to its own URI, so a domain
that fails undoes its own work (or says that ``repair`` must run) and the
others go on.  Every domain gets the same :class:`.BackupOptions`, so the run's
bandwidth budget, when there is one (:mod:`.ratebudget`), is shared by every
domain's disk passes.
"""
from __future__ import annotations

import fnmatch
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from ..adapters.inventory import list_domains
from ..core.jobconfig import DomainEntry
from ..errors import (
    BackupInterruptedError,
    ExitCode,
    NotFoundError,
    UsageError,
    VmSnapBackupError,
)
from ..progress import ProgressCallback, ProgressEvent
from .backup import backup
from .backupoptions import BackupOptions
from .backupwork import BackupResult
from .batch import Outcome, run_isolated

__all__ = ["DomainBackup", "DomainTarget", "ManyBackups", "ManyObserver", "backup_many",
           "list_inventories", "select_domains"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DomainTarget:
    """One domain of the run: its name (or UUID/id) on one libvirt connection."""

    uri: str
    name: str
    label: str   # how the display and the summary call it (``name``, or ``name@uri``)


@dataclass
class DomainBackup:
    """What became of one domain: its point, or why it failed (a domain never started too)."""

    target: DomainTarget
    ok: bool
    seconds: float = 0.0
    error: str | None = None
    exit_code: int = 0
    result: BackupResult | None = None
    started: bool = True

    def to_dict(self) -> dict[str, Any]:
        r = self.result
        return {"domain": self.target.name, "uri": self.target.uri, "ok": self.ok,
                "started": self.started, "seconds": round(self.seconds, 3),
                "error": self.error, "exit_code": self.exit_code,
                "point": r.point if r else None, "generation": r.generation if r else None,
                "bytes_written": r.bytes_written if r else 0,
                "bytes_read": r.bytes_read if r else 0,
                "result": r.to_dict() if r else None}


@dataclass
class ManyBackups:
    """The whole run: one entry per selected domain, in the order they were selected."""

    domains: list[DomainBackup] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0
    max_rate: int | None = None

    @property
    def failed(self) -> list[DomainBackup]:
        return [d for d in self.domains if not d.ok]

    @property
    def ok(self) -> bool:
        return not self.interrupted and not self.failed

    @property
    def exit_code(self) -> int:
        """0 when every domain has its point; else what the run as a whole says."""
        if self.interrupted:
            return int(ExitCode.INTERRUPTED)
        return int(ExitCode.OK if self.ok else ExitCode.DOMAINS_FAILED)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "interrupted": self.interrupted, "exit_code": self.exit_code,
                "seconds": round(self.seconds, 3), "max_rate": self.max_rate,
                "failed": [d.target.name for d in self.failed],
                "domains": [d.to_dict() for d in self.domains]}


class ManyObserver(Protocol):
    """Who watches the run (the command line's display): domains starting, going, ending."""

    def started(self, target: DomainTarget) -> None: ...

    def progress(self, target: DomainTarget, event: ProgressEvent) -> None: ...

    def finished(self, target: DomainTarget, outcome: DomainBackup) -> None: ...


def select_domains(inventories: dict[str, list[DomainEntry]], names: Sequence[str], *,
                   every: bool, running: bool = False, inactive: bool = False,
                   exclude: Sequence[str] = ()) -> tuple[list[DomainTarget], list[DomainBackup]]:
    """``(domains to back up, failures found while selecting)`` over every connection.

    ``every`` (``--all``) takes each connection's domains, only the running or
    only the shut-off ones if asked; otherwise each name must be on exactly one
    connection (a name on none or on several is that domain's failure, the
    others still go).  ``exclude`` globs drop domains by name either way.
    With one connection and names, the names are taken as given (a UUID or an
    id works too, as for one domain) and ``inventories`` is not consulted.
    """
    if running and inactive:
        raise UsageError("--running and --inactive exclude each other")
    if (running or inactive) and not every:
        raise UsageError("--running and --inactive select among --all")
    if every and names:
        raise UsageError("name domains or give --all, not both")
    if not every and not names:
        raise UsageError("name at least one domain, or give --all")
    uris = list(inventories)
    several = len(uris) > 1

    def target(uri: str, name: str) -> DomainTarget:
        return DomainTarget(uri, name, f"{name}@{uri}" if several else name)

    def excluded(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, glob) for glob in exclude)

    chosen: list[DomainTarget] = []
    failures: list[DomainBackup] = []
    if every:
        for uri in uris:
            for d in inventories[uri]:
                if excluded(d.name) or (running and not d.running) or (inactive and d.running):
                    continue
                chosen.append(target(uri, d.name))
        return chosen, failures
    for name in dict.fromkeys(names):   # each once, in the order given
        if excluded(name):
            continue
        if not several:
            chosen.append(target(uris[0], name))
            continue
        hosts = [u for u in uris if any(d.name == name for d in inventories[u])]
        if len(hosts) == 1:
            chosen.append(target(hosts[0], name))
            continue
        error = (NotFoundError(f"no domain named {name!r} on {', '.join(uris)}") if not hosts
                 else UsageError(f"domain {name!r} is on several connections "
                                 f"({', '.join(hosts)}): back it up with one -c"))
        failures.append(DomainBackup(DomainTarget(", ".join(hosts or uris), name, name), False,
                                     error=f"{type(error).__name__}: {error}",
                                     exit_code=int(error.exit_code), started=False))
    return chosen, failures


def list_inventories(uris: Sequence[str],
                     lister: Callable[[str], list[DomainEntry]] = list_domains,
                     ) -> tuple[dict[str, list[DomainEntry]], list[DomainBackup]]:
    """Each connection's domains; a connection that cannot list them is a failure of
    the run (reported, not raised), and the other connections still go."""
    inventories: dict[str, list[DomainEntry]] = {}
    failures: list[DomainBackup] = []
    for uri in dict.fromkeys(uris):
        try:
            inventories[uri] = lister(uri)
        except VmSnapBackupError as exc:
            failures.append(DomainBackup(DomainTarget(uri, "*", f"*@{uri}"), False,
                                         error=f"{type(exc).__name__}: {exc}",
                                         exit_code=int(exc.exit_code), started=False))
    return inventories, failures


def backup_many(targets: Sequence[DomainTarget], pool: str,
                options: BackupOptions | None = None, *, parallel: int = 1,
                observer: ManyObserver | None = None,
                failed: Sequence[DomainBackup] = ()) -> ManyBackups:
    """Back up every target, ``parallel`` at once, each by :func:`.backup` with ``options``.

    Never raises for one domain: every outcome is in the result.  The budget
    in ``options`` is the whole run's: one shared by every domain's disk passes.
    ``failed``: domains that failed while selecting, reported first.
    """
    options = BackupOptions() if options is None else options
    started = time.monotonic()
    stop = threading.Event()

    def progress_of(t: DomainTarget) -> ProgressCallback:
        def call(event: ProgressEvent) -> None:
            if stop.is_set():   # the run is being interrupted: unwind this backup now
                raise BackupInterruptedError(f"backup of {t.label} interrupted")
            if observer is not None:
                observer.progress(t, event)
        return call

    def one(t: DomainTarget) -> BackupResult:
        if observer is not None:
            observer.started(t)
        t0 = time.monotonic()
        try:
            result = backup(t.name, pool, uri=t.uri, options=options, progress=progress_of(t))
        except Exception as exc:
            if observer is not None:
                observer.finished(t, _outcome(t, Outcome(None, exc, True,
                                                         time.monotonic() - t0)))
            raise
        if observer is not None:
            observer.finished(t, _outcome(t, Outcome(result, None, True,
                                                     time.monotonic() - t0)))
        return result

    batch = run_isolated(targets, one, parallel=parallel, name="vsb-domain", stop=stop,
                         what="backup of many domains")
    run = ManyBackups([*failed, *(_outcome(t, o) for t, o in zip(targets, batch.outcomes))],
                      batch.interrupted, time.monotonic() - started,
                      None if options.budget is None else int(options.budget.rate))
    for d in run.failed:
        log.warning("domain %s: %s", d.target.label, d.error)
    return run


def _outcome(target: DomainTarget, o: Outcome[BackupResult]) -> DomainBackup:
    return DomainBackup(target, o.ok, o.seconds, o.error_text, o.exit_code, o.value, o.started)
