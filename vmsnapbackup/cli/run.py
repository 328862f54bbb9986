"""``vmsnapbackup run [JOB...]``: run jobs of the configuration file (what the timers call)."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..core.jobmodel import DEFAULT_CONFIG
from .common import Context, add_json_option, size_text

if TYPE_CHECKING:
    from ..workflows.run import JobRun

ORDER = 70


def add_config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=DEFAULT_CONFIG, metavar="FILE",
                   help=f"job configuration file (default {DEFAULT_CONFIG})")


def add_metrics_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics", metavar="FILE",
                   help="write Prometheus text-format metrics here (default: the config's "
                   "metrics key, else node_exporter's textfile directory when it exists)")


def add_standalone_metrics_options(p: argparse.ArgumentParser) -> None:
    """``--metrics`` and ``--config`` for backup, prune and verify (outside a job)."""
    add_metrics_option(p)
    p.add_argument("--config", default=DEFAULT_CONFIG, metavar="FILE",
                   help="configuration file whose state-dir and metrics keys apply to the "
                   f"metrics (default {DEFAULT_CONFIG}; its jobs are not read)")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run", help="run backup jobs from the configuration file",
        description="For each JOB (every job when none is named): back up every domain it "
        "selects, prune each domain that got a new point by the job's retention, verify by "
        "its policy. One failing domain never stops the others; the exit code is 0 only when "
        "every step succeeded.")
    p.add_argument("jobs", nargs="*", metavar="JOB", help="job names (default: all)")
    add_config_option(p)
    p.add_argument("--dry-run", action="store_true",
                   help="say what would be backed up, pruned and verified; change nothing")
    add_metrics_option(p)
    add_json_option(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace, ctx: Context) -> int:
    # imported here: the parser of every command must not pay for the job runner
    from ..adapters.jobfiles import load_config
    from ..workflows.jobstate import default_metrics_path
    from ..workflows.metricsfile import MetricsTarget, publish_metrics
    from ..workflows.run import run_jobs

    config = load_config(args.config)
    results = run_jobs(config, args.jobs, dry_run=args.dry_run)
    metrics: str | None = args.metrics or config.metrics or default_metrics_path()
    ok = all(r.ok for r in results)
    metrics_error: str | None = None
    if metrics and not args.dry_run:
        # the backups are done; a monitoring file we cannot write must not hide them
        metrics_error = publish_metrics(MetricsTarget(metrics, config.state_dir))
        ok = ok and metrics_error is None
    ctx.emit({"ok": ok, "jobs": [r.to_dict() for r in results], "metrics": metrics,
              "metrics_error": metrics_error},
             _text(results) + (f"\n{metrics_error}" if metrics_error else ""))
    return 0 if ok else 1


def _text(results: list[JobRun]) -> str:
    lines = []
    for r in results:
        verdict = "ok" if r.ok else f"{r.failures} failure(s)"
        lines.append(f"job {r.job}{' (dry run)' if r.dry_run else ''}: {len(r.domains)} "
                     f"domain(s), {verdict}, {r.seconds:.1f} s")
        if r.error:
            lines.append(f"  {r.error}")
        for d in r.domains:
            parts = []
            if d.backup is not None:
                b = d.backup
                if not b.ok:
                    parts.append(f"backup FAILED: {b.error}")
                elif r.dry_run:
                    parts.append("would back up")
                else:
                    parts.append(f"point {b.detail.get('point')} "
                                 f"({size_text(b.detail.get('bytes_written', 0))} written)")
            if d.prune is not None:
                verb = "would remove" if r.dry_run else "removed"
                parts.append(f"prune FAILED: {d.prune.error}" if not d.prune.ok
                             else f"{verb} {len(d.prune.detail.get('removed', []))} point(s)")
            if d.verify is not None:
                v = d.verify
                how = v.detail.get("sample_percent")
                how_text = "every block" if how is None else f"{how:g}% sample"
                parts.append(f"verify FAILED: {v.error}" if not v.ok else
                             f"{'would verify' if r.dry_run else 'verified'} ({how_text})")
            lines.append(f"  {d.domain}: " + "; ".join(parts))
    return "\n".join(lines)
