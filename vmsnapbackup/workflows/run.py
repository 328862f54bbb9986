"""``run``: a job from the configuration file, start to end, for every domain it selects.

Back up every selected domain (``parallelism`` at a time), then prune each
domain that got a new point, then verify by the job's policy.  A failing
domain is recorded and the others go on: a nightly job that stops at the first
broken VM leaves every VM after it unprotected.  Prune runs only after a
successful backup of that domain, so a domain that stopped backing up keeps
its old points instead of ageing them out.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

from ..adapters.inventory import list_domains
from ..core.jobconfig import Config, Job, select_domains
from ..errors import BackupInterruptedError, NotFoundError, UsageError, VmSnapBackupError
from .backup import backup
from .backupoptions import BackupOptions
from .batch import run_isolated
from .jobstate import load_state, record_step, save_state
from .listing import list_points
from .poolgrowth import pool_growth
from .prune import prune
from .verify import verify

__all__ = ["DomainRun", "JobRun", "Step", "run_jobs", "select_jobs"]

log = logging.getLogger(__name__)


@dataclass
class Step:
    """One backup, prune or verify of one domain."""

    ok: bool
    seconds: float = 0.0
    error: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class DomainRun:
    domain: str
    backup: Step | None = None
    prune: Step | None = None
    verify: Step | None = None

    @property
    def ok(self) -> bool:
        return all(s is None or s.ok for s in (self.backup, self.prune, self.verify))

    def to_dict(self) -> dict[str, Any]:
        return {"domain": self.domain, "ok": self.ok,
                **{k: None if s is None else s.to_dict()
                   for k, s in (("backup", self.backup), ("prune", self.prune),
                                ("verify", self.verify))}}


@dataclass
class JobRun:
    job: str
    dry_run: bool
    domains: list[DomainRun] = field(default_factory=list)
    error: str | None = None       # the job could not start (cannot list domains)
    seconds: float = 0.0

    @property
    def failures(self) -> int:
        return (1 if self.error else 0) + sum(
            1 for d in self.domains for s in (d.backup, d.prune, d.verify)
            if s is not None and not s.ok)

    @property
    def ok(self) -> bool:
        return self.failures == 0

    def to_dict(self) -> dict[str, Any]:
        return {"job": self.job, "ok": self.ok, "dry_run": self.dry_run, "error": self.error,
                "failures": self.failures, "seconds": round(self.seconds, 3),
                "domains": [d.to_dict() for d in self.domains]}


def select_jobs(config: Config, names: Sequence[str]) -> list[Job]:
    unknown = [n for n in names if n not in config.jobs]
    if unknown:
        raise UsageError(f"no job named {', '.join(unknown)} in {config.path} "
                         f"(jobs: {', '.join(sorted(config.jobs))})")
    return [config.jobs[n] for n in (names or sorted(config.jobs))]


def _step(what: str, domain: str, fn: Callable[[], dict[str, Any]]) -> Step:
    started = time.monotonic()
    try:
        detail = fn()
    except VmSnapBackupError as exc:
        log.error("%s of %s failed: %s", what, domain, exc)
        return Step(False, time.monotonic() - started, f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # a bug in one domain must not stop the others
        log.exception("%s of %s failed unexpectedly", what, domain)
        return Step(False, time.monotonic() - started, f"internal error: {type(exc).__name__}: "
                    f"{exc}")
    return Step(True, time.monotonic() - started, None, detail)


def _backup(job: Job, domain: str, dry_run: bool) -> Step:
    if dry_run:
        return Step(True, detail={"would": "back up", "disks": list(job.disks or ["all"]),
                                  "new_generation": job.new_generation == "always"})

    def go() -> dict[str, Any]:
        # threshold None: the generation policy decides, weighing the base by the
        # retention this job prunes with (as `backup --keep-...` without --threshold)
        options = BackupOptions(disks=job.disks, quiesce=job.quiesce,
                                new_generation=job.new_generation == "always",
                                threshold=job.threshold, retention=job.retention,
                                encrypt=job.key_file is not None, key_file=job.key_file)
        r = backup(domain, job.pool, uri=job.uri, options=options)
        return {"point": r.point, "generation": r.generation, "consistency": r.consistency,
                "bytes_written": r.bytes_written, "bytes_read": r.bytes_read,
                "new_generation": r.new_generation, "skipped": [t for t, _ in r.skipped]}
    return _step("backup", domain, go)


def _prune(job: Job, domain: str, dry_run: bool) -> Step | None:
    retention = job.retention
    if retention is None:
        return None

    def go() -> dict[str, Any]:
        try:
            r = prune(domain, job.pool, uri=job.uri, dry_run=dry_run,
                      **retention.to_dict())
        except NotFoundError:
            if dry_run:  # not in the pool yet: nothing to prune
                return {"removed": [], "kept": []}
            raise
        return {"removed": [p.number for p in r.removed], "kept": [p.number for p in r.kept],
                "bytes_freed": r.bytes_freed}
    return _step("prune", domain, go)


def _verify(job: Job, domain: str, dry_run: bool, last_full: float | None,
            now: float) -> Step | None:
    if job.verify is None:
        return None
    sample = job.verify.sample_for(last_full, now)
    if dry_run:
        return Step(True, detail={"would": "verify", "sample_percent": sample})

    def go() -> dict[str, Any]:
        r = verify(job.pool, domain=domain, sample=sample, uri=job.uri, key_file=job.key_file)
        counts = r.counts()
        if not r.ok:
            raise _Damage(f"verify found damage: {counts}")
        return {"sample_percent": sample, "counts": counts}
    return _step("verify", domain, go)


class _Damage(VmSnapBackupError):
    """Verify ran and found damaged points (a failed step, not an exception upward)."""


def run_job(job: Job, *, dry_run: bool = False, state_dir: str | None = None) -> JobRun:
    """Run one job; every outcome is in the returned JobRun, nothing raises for one domain."""
    started = time.monotonic()
    result = JobRun(job.name, dry_run)
    state = load_state(state_dir, job.name) if state_dir and not dry_run else None
    try:
        inventory = list_domains(job.uri)
    except VmSnapBackupError as exc:
        result.error = f"cannot list domains on {job.uri}: {exc}"
        log.error("job %s: %s", job.name, result.error)
        inventory = []
    selected, missing = select_domains(job, inventory)
    for name in missing:
        result.domains.append(DomainRun(name, Step(False, error=f"NotFoundError: no domain "
                                                   f"named {name!r} on {job.uri}")))
    batch = run_isolated(selected, lambda d: _backup(job, d, dry_run),
                         parallel=job.parallelism, name=f"job-{job.name}", what=f"job {job.name}")
    if batch.interrupted:
        raise BackupInterruptedError(f"job {job.name} interrupted")
    backups = [o.value or Step(False, o.seconds, o.error_text) for o in batch.outcomes]
    now = time.time()
    for name, b in zip(selected, backups):
        run = DomainRun(name, b)
        if b.ok:
            run.prune = _prune(job, name, dry_run)
            last_full = None
            if state is not None:
                last_full = ((state["domains"].get(name) or {}).get("verify") or {}).get(
                    "last_full")
            run.verify = _verify(job, name, dry_run, last_full, now)
        result.domains.append(run)
    result.seconds = time.monotonic() - started
    if state is not None and state_dir is not None:
        _record(job, result, state)
        save_state(state_dir, job.name, state)
    return result


def _record(job: Job, result: JobRun, state: dict[str, Any]) -> None:
    """Fold this run into the job's state record (the source of status and metrics)."""
    now = time.time()
    run = state.setdefault("run", {})
    run.update(finished=now, seconds=result.seconds, failures=result.failures, ok=result.ok)
    if result.ok:
        run["last_success"] = now
    for d in result.domains:
        rec = state["domains"].setdefault(d.domain, {})
        for phase, step in (("backup", d.backup), ("prune", d.prune), ("verify", d.verify)):
            if step is not None:
                record_step(rec, phase, ok=step.ok, seconds=step.seconds, error=step.error,
                            detail=step.detail, now=now)
        try:
            points = list_points(job.pool, uri=job.uri, domain=d.domain)
            rec["pool"] = pool_growth(job.pool, d.domain, uri=job.uri, points=points,
                                      retention=job.retention).to_record()
        except VmSnapBackupError:
            continue


def run_jobs(config: Config, names: Sequence[str] = (), *, dry_run: bool = False
             ) -> list[JobRun]:
    """Run the named jobs (all when none are named), one after the other."""
    jobs = select_jobs(config, names)
    return [run_job(job, dry_run=dry_run, state_dir=config.state_dir) for job in jobs]
