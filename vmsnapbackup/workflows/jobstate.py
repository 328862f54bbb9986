"""What the last runs of each job did, kept between runs, and the metrics made from it.

``status`` must say when a domain was last verified and how that went, and
the metrics must describe every job even though each timer runs one: so each
run records its outcome in ``STATE_DIR/jobs/JOB.json`` (one file per job, so
two jobs running at once never write the same file), written atomically
(temp, fsync, rename, fsync dir).  A standalone ``backup``, ``prune`` or
``verify`` records its outcome the same way in ``STATE_DIR/commands/DOMAIN.json``
(one file per domain: a command works on one domain, under its lock), with no
job; its series carry no ``job`` label.  The format is in docs/JOBS.md.
"""
from __future__ import annotations

import json
import os
import urllib.parse
from pathlib import Path
from typing import Any

from ..core.atomic import atomic_write_bytes, atomic_write_json
from ..core.metrics import MetricFamily, render
from ..errors import CorruptFileError

__all__ = [
    "DEFAULT_TEXTFILE_DIRS",
    "STATE_FORMAT",
    "all_states",
    "command_state_path",
    "default_metrics_path",
    "load_state",
    "load_state_file",
    "metrics_text",
    "record_step",
    "save_state",
    "save_state_file",
    "write_metrics",
]

STATE_FORMAT = 1
DEFAULT_TEXTFILE_DIRS = ("/var/lib/prometheus/node-exporter",
                         "/var/lib/node_exporter/textfile_collector")


def _path(state_dir: str, job: str) -> Path:
    return Path(state_dir) / "jobs" / f"{job}.json"


def command_state_path(state_dir: str, domain: str) -> Path:
    """The record of standalone commands on ``domain`` (its name quoted: any name is safe)."""
    return Path(state_dir) / "commands" / f"{urllib.parse.quote(domain, safe='')}.json"


def load_state(state_dir: str, job: str) -> dict[str, Any]:
    """The job's record, or an empty one before its first run."""
    return load_state_file(_path(state_dir, job), job)


def load_state_file(path: Path, job: str | None) -> dict[str, Any]:
    """A record (a job's, or standalone commands' when ``job`` is None), or an empty one."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {"format": STATE_FORMAT, "job": job, "run": {}, "domains": {}}
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise CorruptFileError(path, f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
        raise CorruptFileError(path, f"not a job state record of format {STATE_FORMAT}")
    return doc


def save_state(state_dir: str, job: str, doc: dict[str, Any]) -> None:
    save_state_file(_path(state_dir, job), doc)


def save_state_file(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write_json(path, doc, 0o600)


def all_states(state_dir: str) -> list[dict[str, Any]]:
    """Every job's record, then every standalone command record."""
    out = []
    jobs = Path(state_dir) / "jobs"
    if jobs.is_dir():
        out += [load_state(state_dir, p.stem) for p in sorted(jobs.glob("*.json"))]
    commands = Path(state_dir) / "commands"
    if commands.is_dir():
        out += [load_state_file(p, None) for p in sorted(commands.glob("*.json"))]
    return out


def record_step(rec: dict[str, Any], phase: str, *, ok: bool, seconds: float,
                error: str | None, detail: dict[str, Any], now: float) -> None:
    """Fold one backup, prune or verify of a domain into its record ``rec``."""
    p = rec.setdefault(phase, {})
    p.update(at=now, ok=ok, seconds=seconds, error=error)
    p.setdefault("failures_total", 0)
    if not ok:
        p["failures_total"] += 1
        return
    p["last_success"] = now
    if phase == "backup":
        p["bytes_written"] = detail.get("bytes_written", 0)
        p["bytes_read"] = detail.get("bytes_read", 0)
        p["point"] = detail.get("point")
    elif phase == "prune":
        p["removed"] = len(detail.get("removed", []))
    elif phase == "verify" and detail.get("sample_percent") is None:
        p["last_full"] = now


def default_metrics_path() -> str | None:
    """node_exporter's textfile directory when it exists, else no metrics file."""
    for d in DEFAULT_TEXTFILE_DIRS:
        if os.path.isdir(d):
            return os.path.join(d, "vmsnapbackup.prom")
    return None


_DOMAIN_SERIES = (
    # (family, help, phase, key in the phase record, type)
    ("backup_last_success_timestamp_seconds", "End of the last successful backup.",
     "backup", "last_success", "gauge"),
    ("backup_last_duration_seconds", "Duration of the last backup attempt.",
     "backup", "seconds", "gauge"),
    ("backup_last_bytes_written", "Bytes the last successful backup wrote to the pool.",
     "backup", "bytes_written", "gauge"),
    ("backup_last_bytes_read", "Bytes the last successful backup read from the domain's "
     "disks (its I/O on the hypervisor).", "backup", "bytes_read", "gauge"),
    ("backup_last_success", "1 if the last backup attempt succeeded, else 0.",
     "backup", "ok", "gauge"),
    ("backup_failures_total", "Failed backup attempts since the state was created.",
     "backup", "failures_total", "counter"),
    ("prune_last_success_timestamp_seconds", "End of the last successful prune.",
     "prune", "last_success", "gauge"),
    ("prune_last_removed_points", "Points the last prune removed.",
     "prune", "removed", "gauge"),
    ("prune_failures_total", "Failed prunes since the state was created.",
     "prune", "failures_total", "counter"),
    ("verify_last_success_timestamp_seconds", "End of the last verify that found no damage.",
     "verify", "last_success", "gauge"),
    ("verify_last_ok", "1 if the last verify found no damage and ran, else 0.",
     "verify", "ok", "gauge"),
    ("verify_last_duration_seconds", "Duration of the last verify.",
     "verify", "seconds", "gauge"),
    ("verify_failures_total", "Verifies that failed or found damage.",
     "verify", "failures_total", "counter"),
    ("points", "Points of the domain in the pool.", "pool", "points", "gauge"),
    ("stored_bytes", "Bytes the domain's points and bases hold in the pool.", "pool",
     "stored_bytes", "gauge"),
    # how the pool grows (workflows.poolgrowth, issue 19)
    ("data_bytes", "Bytes a new base of the domain would store (its disks' data).",
     "pool", "data_bytes", "gauge"),
    ("generation_stored_bytes", "Bytes the current generation stores: base and points kept.",
     "pool", "generation_bytes", "gauge"),
    ("last_point_growth_bytes", "Bytes per backup the newest point added to its generation.",
     "pool", "growth_bytes", "gauge"),
    ("predicted_next_point_bytes", "What the next point would store if the generation "
     "goes on.", "pool", "predicted_next_bytes", "gauge"),
    ("generation_policy_limit_bytes", "The generation policy's limit for the newest point.",
     "pool", "policy_limit_bytes", "gauge"),
    ("growth_over_policy", "1 if the newest point stores over 1.5x the policy's limit "
     "(the pool grows past the generation policy), else 0.", "pool", "over_policy", "gauge"),
)
_RUN_SERIES = (
    ("run_last_success_timestamp_seconds", "End of the last run where everything succeeded.",
     "last_success"),
    ("run_last_timestamp_seconds", "End of the last run.", "finished"),
    ("run_last_duration_seconds", "Duration of the last run.", "seconds"),
    ("run_last_failures", "Failed steps (backup, prune, verify) in the last run.", "failures"),
)


def metrics_text(states: list[dict[str, Any]]) -> str:
    families = {name: MetricFamily(name, help_, kind)
                for name, help_, _, _, kind in _DOMAIN_SERIES}
    for name, help_, _ in _RUN_SERIES:
        families[name] = MetricFamily(name, help_)
    for doc in states:
        job = doc.get("job")
        job_label = {} if job is None else {"job": str(job)}   # standalone: no job
        run = doc.get("run") or {}
        for name, _, key in _RUN_SERIES:
            if job is not None and isinstance(run.get(key), (int, float)):
                families[name].add(job_label, float(run[key]))
        for domain, rec in sorted((doc.get("domains") or {}).items()):
            for name, _, phase, key, _ in _DOMAIN_SERIES:
                value = (rec.get(phase) or {}).get(key)
                if isinstance(value, (bool, int, float)):
                    families[name].add({**job_label, "domain": domain}, float(value))
    return render(list(families.values()))


def write_metrics(path: str, states: list[dict[str, Any]]) -> None:
    """Replace the metrics file atomically: the collector never reads half a file.

    0644: node_exporter runs as its own user.
    """
    atomic_write_bytes(path, metrics_text(states).encode(), 0o644)
