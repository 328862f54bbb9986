"""``vmsnapbackup prune DOMAIN --keep-last N [...]``: remove the points a retention
policy does not keep (see :mod:`vmsnapbackup.workflows.prune`)."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from .common import Context, add_json_option, size_text
from .run import add_standalone_metrics_options

if TYPE_CHECKING:
    from ..workflows.prune import PruneReport
    from ..workflows.pruneall import PruneAllReport

ORDER = 40


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {n}")
    return n


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser(
        "prune", help="remove points a retention policy does not keep",
        description="Remove the points of DOMAIN that no --keep rule keeps. The newest point "
        "is always kept; damaged points and points in use (mount, boot) are kept and "
        "reported. Rules as restic's 'forget': --keep-daily N keeps the newest point of "
        "each of the last N days that have points; hourly by clock hour, weekly by ISO week, "
        "monthly by month, yearly by year, all in the host's local time.")
    p.add_argument("domain", metavar="DOMAIN", nargs="?",
                   help="domain name or UUID (as in the pool)")
    p.add_argument("--all", action="store_true", dest="all_domains",
                   help="prune every domain in the pool (one summary; the exit code says "
                   "if any failed)")
    p.add_argument("--keep-last", type=_count, metavar="N", help="keep the N newest points")
    p.add_argument("--keep-hourly", type=_count, metavar="N",
                   help="keep the newest point of each of the last N clock hours with points")
    p.add_argument("--keep-daily", type=_count, metavar="N",
                   help="keep the newest point of each of the last N days with points")
    p.add_argument("--keep-weekly", type=_count, metavar="N",
                   help="keep the newest point of each of the last N ISO weeks with points")
    p.add_argument("--keep-monthly", type=_count, metavar="N",
                   help="keep the newest point of each of the last N months with points")
    p.add_argument("--keep-yearly", type=_count, metavar="N",
                   help="keep the newest point of each of the last N years with points")
    p.add_argument("--dry-run", action="store_true",
                   help="only show what would be removed")
    add_standalone_metrics_options(p)
    add_json_option(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace, ctx: Context) -> int:
    import functools

    from ..errors import UsageError
    from ..workflows.metricsfile import recorded
    from ..workflows.prune import prune

    if args.all_domains == (args.domain is not None):
        raise UsageError("prune: give a DOMAIN or --all, not both")
    one = functools.partial(prune, uri=ctx.uri, keep_last=args.keep_last,
                            keep_daily=args.keep_daily, keep_weekly=args.keep_weekly,
                            keep_monthly=args.keep_monthly, dry_run=args.dry_run,
                            keep_hourly=args.keep_hourly, keep_yearly=args.keep_yearly)
    if args.all_domains:
        from ..workflows.pruneall import prune_all

        every = prune_all(ctx.pool, one, uri=ctx.uri)
        ctx.emit(every.to_dict(), _all_text(every))
        return every.exit_code
    if args.dry_run:  # changes nothing, so nothing to publish
        report = one(args.domain, ctx.pool)
    else:
        with recorded("prune", args.domain, ctx.pool, ctx.uri, metrics=args.metrics,
                      config=args.config) as record:
            report = one(args.domain, ctx.pool)
            record.prune(report)
    ctx.emit(report.to_dict(), _text(report))
    return 0


def _all_text(r: "PruneAllReport") -> str:
    removed = sum(len(x.removed) for x in r.reports)
    freed = sum(x.bytes_freed for x in r.reports)
    dry = any(x.dry_run for x in r.reports)
    lines = [f"pool {r.pool}: {len(r.reports)} domain(s) pruned, {len(r.failed)} failed; "
             f"{'would remove' if dry else 'removed'} {removed} point(s), "
             f"{size_text(freed)} {'to free' if dry else 'freed'}"]
    lines += [_text(x) for x in r.reports]
    lines += [f"domain {d}: FAILED: {msg}" for d, msg, _ in r.failed]
    return "\n".join(lines)


def _text(r: "PruneReport") -> str:
    verb = "would remove" if r.dry_run else "removed"
    lines = [f"domain {r.domain}: kept {len(r.kept)}, {verb} {len(r.removed)} point(s), "
             f"{size_text(r.bytes_freed)} {'to free' if r.dry_run else 'freed'}"
             + (" (dry run)" if r.dry_run else "")]
    rows = sorted([(p, True) for p in r.kept] + [(p, False) for p in r.removed],
                  key=lambda x: x[0].number, reverse=True)
    for p, keep in rows:
        gen = "-" if p.generation is None else str(p.generation)
        when = (p.taken or "-")[:19].replace("T", " ")
        action = "keep  " if keep else ("remove" if r.dry_run else "gone  ")
        lines.append(f"  point {p.number:>5}  gen {gen:>3}  {when:<19}  {action}  "
                     f"{', '.join(p.reasons)}")
    for rel in r.bases_removed:
        lines.append(f"  base volume {verb}: {rel}")
    return "\n".join(lines)
