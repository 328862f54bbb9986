"""``status``: is every domain a job protects recoverable, recently enough? A monitoring check.

Per domain: the newest good point in the job's pool, its age and size, the
last verify and its result (from the job's state record), whether the age
breaks the job's recovery-point objective, and how the domain's part of the pool
grows (:mod:`.poolgrowth`: stored bytes, growth per backup, the predicted next
point).  The verdict follows the Nagios plug-in convention so any monitoring
system can run it as is: 0 ok, 1 warning (the last backup attempt failed or was
never verified, or the pool grows past the generation policy, but a recent point
exists), 2 critical (no good point, the RPO is broken, or the last verify found
damage).
"""
from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..adapters.inventory import list_domains
from ..core.jobconfig import Config, select_domains
from ..core.retention import Policy
from ..errors import NotFoundError, UsageError, VmSnapBackupError
from .jobstate import load_state
from .listing import PointSummary, list_points
from .poolgrowth import PoolGrowth, pool_growth

__all__ = ["CRITICAL", "OK", "WARNING", "DomainStatus", "StatusReport", "status"]

OK, WARNING, CRITICAL = 0, 1, 2
LEVELS = {OK: "ok", WARNING: "warning", CRITICAL: "critical"}


@dataclass
class DomainStatus:
    domain: str
    job: str
    level: int = OK
    reasons: list[str] = field(default_factory=list)
    last_point: int | None = None
    last_point_taken: str | None = None
    age_seconds: float | None = None
    size_bytes: int | None = None       # what the newest point stored in the pool
    virtual_bytes: int | None = None    # the size of the disks it restores
    rpo_seconds: int | None = None
    rpo_breached: bool = False
    last_verify: float | None = None
    last_verify_ok: bool | None = None
    last_backup_ok: bool | None = None
    #: the domain's part of the pool and how it grows (.poolgrowth.PoolGrowth)
    stored_bytes: int | None = None         # every good point and base of the domain
    data_bytes: int | None = None           # what a new base would store
    generation: int | None = None
    generation_bytes: int | None = None
    growth_bytes: int | None = None         # added per backup by the newest point
    predicted_next_bytes: int | None = None
    policy_limit_bytes: int | None = None   # the policy's limit for the newest point
    growth_over_policy: bool = False

    def raise_to(self, level: int, reason: str) -> None:
        self.level = max(self.level, level)
        self.reasons.append(reason)

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "state": LEVELS[self.level]}


@dataclass
class StatusReport:
    domains: list[DomainStatus] = field(default_factory=list)

    @property
    def level(self) -> int:
        return max((d.level for d in self.domains), default=OK)

    def to_dict(self) -> dict[str, Any]:
        return {"state": LEVELS[self.level], "exit_code": self.level,
                "domains": [d.to_dict() for d in self.domains]}


def _taken(p: PointSummary) -> float | None:
    if not p.taken:
        return None
    try:
        when = _dt.datetime.fromisoformat(p.taken.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    return when.timestamp()


def _check(st: DomainStatus, pool: str, uri: str, record: dict[str, Any], now: float,
           verify_expected: bool, retention: Policy | None) -> None:
    try:
        listed = list_points(pool, uri=uri, domain=st.domain)
    except NotFoundError:
        listed = []
    points = [p for p in listed if p.damaged is None]
    if points:
        _growth(st, pool_growth(pool, st.domain, uri=uri, retention=retention,
                                points=listed))
    if not points:
        st.raise_to(CRITICAL, "no good point in the pool")
    else:
        newest = max(points, key=lambda p: p.point)
        st.last_point, st.last_point_taken = newest.point, newest.taken
        st.size_bytes, st.virtual_bytes = newest.stored_bytes, newest.virtual_bytes
        taken = _taken(newest)
        if taken is not None:
            st.age_seconds = round(now - taken, 1)
        if st.rpo_seconds is not None and (st.age_seconds is None
                                           or st.age_seconds > st.rpo_seconds):
            st.rpo_breached = True
            st.raise_to(CRITICAL, f"newest point is older than the RPO ({st.rpo_seconds} s)")
    b = record.get("backup") or {}
    if b:
        st.last_backup_ok = bool(b.get("ok"))
        if not st.last_backup_ok:
            st.raise_to(WARNING, f"last backup failed: {b.get('error')}")
    v = record.get("verify") or {}
    if v:
        st.last_verify, st.last_verify_ok = v.get("at"), bool(v.get("ok"))
        if not st.last_verify_ok:
            st.raise_to(CRITICAL, f"last verify failed: {v.get('error')}")
    elif verify_expected and points:
        st.raise_to(WARNING, "never verified")


def _growth(st: DomainStatus, g: PoolGrowth) -> None:
    st.stored_bytes, st.data_bytes = g.stored_bytes, g.data_bytes
    st.generation, st.generation_bytes = g.generation, g.generation_bytes
    st.growth_bytes, st.predicted_next_bytes = g.growth_bytes, g.predicted_next_bytes
    st.policy_limit_bytes, st.growth_over_policy = g.policy_limit_bytes, g.over_policy
    if g.over_policy and g.reason:
        st.raise_to(WARNING, g.reason)


def status(config: Config, domains: Sequence[str] = (), *, now: float | None = None
           ) -> StatusReport:
    """The status of ``domains`` (every domain any job selects when none are named)."""
    now = time.time() if now is None else now
    report = StatusReport()
    seen: set[str] = set()
    for job in (config.jobs[n] for n in sorted(config.jobs)):
        state = load_state(config.state_dir, job.name)
        recorded = set(state.get("domains") or {})
        try:
            selected, missing = select_domains(job, list_domains(job.uri))
        except VmSnapBackupError:
            selected, missing = sorted(recorded), []
        names = [*selected, *missing]
        if domains:
            names = [n for n in domains if n in names or n in recorded]
        for name in names:
            st = DomainStatus(name, job.name, rpo_seconds=job.rpo)
            _check(st, job.pool, job.uri, state["domains"].get(name) or {}, now,
                   job.verify is not None, job.retention)
            report.domains.append(st)
            seen.add(name)
    unknown = [d for d in domains if d not in seen]
    if unknown:
        raise UsageError(f"no job in {config.path} covers {', '.join(unknown)}")
    return report
