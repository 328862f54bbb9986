"""``vmsnapbackup verify [DOMAIN]``: read the points back and check every block.

Prints the whole report, then exits 5 (INTEGRITY) if anything is damaged: a
script sees the verdict in the exit code, a person sees which points and blocks."""
from __future__ import annotations

import argparse

from ..errors import ExitCode, UsageError
from .common import Context, add_json_option
from .run import add_standalone_metrics_options

ORDER = 35


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser(
        "verify", help="check that points are intact, block by block",
        description="Check manifests, check tables, difference tables and volumes of every "
        "point (or one domain, or one point). A damaged base volume marks every point of "
        "its generation; a damaged point volume only its point. Exit 5 if damage is found.")
    p.add_argument("domain", metavar="DOMAIN", nargs="?",
                   help="domain name or UUID (default: every domain in the pool)")
    p.add_argument("--point", type=int, metavar="N", help="only this point (needs DOMAIN)")
    p.add_argument("--sample", type=float, metavar="PERCENT",
                   help="read only this percentage of the blocks each volume stores, drawn "
                   "afresh each run; the report says how likely it was to find damage")
    p.add_argument("--key-file", metavar="FILE",
                   help="the key file of an encrypted pool (docs/FORMAT.md §15.2)")
    p.add_argument("--seed", type=int, metavar="N",
                   help="draw the --sample from this seed (the report names the seed of "
                   "each run, to repeat a sample)")
    add_standalone_metrics_options(p)
    add_json_option(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace, ctx: Context) -> int:
    if args.point is not None and args.domain is None:
        raise UsageError("--point needs a DOMAIN (point numbers are per domain)")
    from ..workflows.metricsfile import recorded
    from ..workflows.verify import format_report, verify

    with recorded("verify", args.domain, ctx.pool, ctx.uri, metrics=args.metrics,
                  config=args.config) as record:
        report = verify(ctx.pool, domain=args.domain, point=args.point, sample=args.sample,
                        seed=args.seed, uri=ctx.uri, progress=ctx.progress(),
                        key_file=args.key_file)
        record.verify(report)
    # damage is shown even with --quiet: it is the warning the user runs verify for
    ctx.emit(report.to_dict(), format_report(report),
             data=not report.ok or bool(report.incompatible))
    if not report.ok:
        return int(ExitCode.INTEGRITY)
    if report.incompatible:
        return int(ExitCode.INCOMPATIBLE)
    return int(ExitCode.OK)
