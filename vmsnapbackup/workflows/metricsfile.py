"""The metrics file after a standalone ``backup``, ``prune`` or ``verify`` (``run`` too).

Monitoring must see every backup, not only those a timer started: an admin's
backup by hand before an upgrade, a prune after a full pool, a failed backup
that a script retries.  So each of these commands records its outcome in the
state directory (:mod:`.jobstate`: ``STATE_DIR/commands/DOMAIN.json``) and
re-renders the whole metrics file from every record there, jobs included,
replacing it atomically; a file written by one command never drops another's
series.

Where: ``--metrics FILE``, else the configuration file's ``metrics`` key, else
node_exporter's textfile directory when it exists; nowhere (nothing recorded)
when none of these is given.  The state directory is the configuration file's
``state-dir`` (default ``/var/lib/vmsnapbackup/state``).

Writing the metrics never changes what the command did or its exit code: a
failure to write them is logged as an error, and the stale file's
``*_last_success_timestamp_seconds`` is what an alert catches.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..adapters.jobfiles import load_settings
from ..core.jobmodel import DEFAULT_CONFIG, DEFAULT_STATE_DIR
from ..errors import VmSnapBackupError
from .jobstate import (
    all_states,
    command_state_path,
    default_metrics_path,
    load_state_file,
    record_step,
    save_state_file,
    write_metrics,
)
from .poolgrowth import pool_growth

if TYPE_CHECKING:
    from .backupwork import BackupResult
    from .prune import PruneReport
    from .verify import VerifyReport

__all__ = ["CommandRecord", "MetricsTarget", "metrics_target", "publish_metrics", "recorded"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MetricsTarget:
    """Where the metrics file goes and where the records it is made from live."""

    path: str
    state_dir: str


def metrics_target(metrics: str | None, config: str = DEFAULT_CONFIG) -> MetricsTarget | None:
    """The metrics file and state directory for a command; None: no metrics wanted.

    A configuration file that cannot be trusted or read is not used (a warning):
    the command itself does not depend on it.
    """
    settings = None
    try:
        settings = load_settings(config)
    except VmSnapBackupError as exc:
        log.warning("not using %s for metrics: %s", config, exc)
    path = metrics or (settings.metrics if settings else None) or default_metrics_path()
    if path is None:
        return None
    return MetricsTarget(path, settings.state_dir if settings else DEFAULT_STATE_DIR)


def publish_metrics(target: MetricsTarget) -> str | None:
    """Re-render the metrics file from every record; the error text if that failed."""
    try:
        write_metrics(target.path, all_states(target.state_dir))
    except (VmSnapBackupError, OSError) as exc:
        message = f"cannot write metrics {target.path}: {exc}"
        log.error("%s", message)
        return message
    return None


@dataclass
class CommandRecord:
    """What one standalone command did, per domain, for the state record."""

    command: str                 # the phase it records: backup, prune or verify
    pool: str
    uri: str
    started: float = field(default_factory=time.monotonic)
    outcomes: dict[str, tuple[bool, str | None, dict[str, Any]]] = field(default_factory=dict)

    def done(self, domain: str, *, ok: bool = True, error: str | None = None,
             **detail: Any) -> None:
        self.outcomes[domain] = (ok, error, detail)

    def backup(self, result: BackupResult) -> None:
        self.done(result.domain, point=result.point,
                  bytes_written=result.bytes_written, bytes_read=result.bytes_read)

    def prune(self, report: PruneReport) -> None:
        self.done(report.domain, removed=[p.number for p in report.removed])

    def verify(self, report: VerifyReport) -> None:
        for d in report.domains:
            self.done(d.name, ok=not d.damaged,
                      error="verify found damage" if d.damaged else None,
                      sample_percent=report.sample)


@contextmanager
def recorded(command: str, domain: str | None, pool: str, uri: str, *,
             metrics: str | None = None, config: str = DEFAULT_CONFIG
             ) -> Iterator[CommandRecord]:
    """Record the command run inside the block, then publish the metrics file.

    An exception out of the block is a failure of ``domain`` (as the user named
    it), recorded and re-raised.  ``domain`` None (verify of every domain) has
    nothing to blame a failure on: only the domains the block reports are recorded.
    """
    target = metrics_target(metrics, config)
    record = CommandRecord(command, pool, uri)
    try:
        yield record
    except BaseException as exc:
        if target is not None and domain is not None:
            record.outcomes.setdefault(domain, (False, f"{type(exc).__name__}: {exc}", {}))
            _save(record, target)
        raise
    if target is not None:
        if not record.outcomes and domain is not None:
            record.done(domain)
        _save(record, target)


def _save(record: CommandRecord, target: MetricsTarget) -> None:
    now = time.time()
    seconds = time.monotonic() - record.started
    try:
        for domain, (ok, error, detail) in record.outcomes.items():
            path = command_state_path(target.state_dir, domain)
            doc = load_state_file(path, None)
            rec = doc["domains"].setdefault(domain, {})
            record_step(rec, record.command, ok=ok, seconds=seconds, error=error,
                        detail=detail, now=now)
            pool = _pool_summary(record, domain)
            if pool is not None:
                rec["pool"] = pool
            save_state_file(path, doc)
    except (VmSnapBackupError, OSError) as exc:
        log.error("cannot record %s of %s for the metrics: %s", record.command,
                  ", ".join(record.outcomes), exc)
    publish_metrics(target)


def _pool_summary(record: CommandRecord, domain: str) -> dict[str, int] | None:
    """The domain's good points, their stored bytes and how they grow, as the pool holds
    them now (no retention is known to a standalone command: the base weighs 1)."""
    try:
        return pool_growth(record.pool, domain, uri=record.uri).to_record()
    except VmSnapBackupError:
        return None
