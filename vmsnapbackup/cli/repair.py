"""``vmsnapbackup repair [DOMAIN | --all] [--dry-run]``: undo what an interrupted backup
left (the domain on our overlay, a storage daemon, partial pool files, the journal)."""
from __future__ import annotations

import argparse

from ..errors import UsageError
from .common import Context, add_json_option

ORDER = 50


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser(
        "repair", help="bring a domain back to its original images after an interrupted backup",
        description="Finds what an interrupted backup left, from the pool's journal and the "
        "domain's live XML, and undoes it: commits the domain back from our overlay (offline "
        "for a shut-off domain), stops a leftover storage daemon, removes partial pool files "
        "and clears the journal. Never touches an image without the vmsnapbackup overlay "
        "marker, nor a file a sealed point refers to.")
    p.add_argument("domain", metavar="DOMAIN", nargs="?", help="domain name or UUID")
    p.add_argument("--all", dest="all_domains", action="store_true",
                   help="every domain of the pool with a journal, and every domain on the "
                   "hypervisor that runs on our overlays")
    p.add_argument("--dry-run", action="store_true", help="say what would be done; change nothing")
    add_json_option(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace, ctx: Context) -> int:
    if args.all_domains == (args.domain is not None):
        raise UsageError("repair needs either a DOMAIN or --all (see 'vmsnapbackup repair --help')")
    from ..workflows.repair import repair

    report = repair(ctx.pool, domain=args.domain, all_domains=bool(args.all_domains),
                    dry_run=bool(args.dry_run), uri=ctx.uri)
    # what is left to do (a non-zero exit) is shown even with --quiet
    ctx.emit(report.to_dict(), "\n".join(report.lines()), data=report.exit_code != 0)
    return int(report.exit_code)
