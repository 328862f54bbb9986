"""``vmsnapbackup checkpoints show|remove|on|off DOMAIN``: our libvirt checkpoints on a
domain (see :mod:`vmsnapbackup.workflows.domaincheckpoints` for why one turns them off)."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from .common import Context, add_json_option

if TYPE_CHECKING:
    from ..workflows.domaincheckpoints import CheckpointReport

ORDER = 60


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser(
        "checkpoints", help="show or remove our libvirt checkpoints on a domain, or turn "
        "them off for it",
        description="A libvirt checkpoint per generation lets later backups read only what "
        "changed, but other users of libvirt's backup API (virtnbdbackup) refuse to run "
        "beside a checkpoint they did not make. 'off' keeps this domain checkpoint-free "
        "(every backup reads every data block; stored in the domain's own <metadata>) and "
        "removes ours; 'on' allows them again; 'remove' deletes ours now (say after "
        "deleting a pool). Checkpoints of other tools are never touched.")
    p.add_argument("action", choices=("show", "remove", "on", "off"),
                   help="what to do")
    p.add_argument("domain", metavar="DOMAIN", help="domain name, UUID or id")
    add_json_option(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace, ctx: Context) -> int:
    from ..workflows.domaincheckpoints import domain_checkpoints

    report = domain_checkpoints(args.domain, args.action, uri=ctx.uri)
    ctx.emit(report.to_dict(), _text(report), data=args.action == "show")
    return 0


def _text(r: "CheckpointReport") -> str:
    lines = [f"domain {r.domain}: vmsnapbackup checkpoints "
             f"{'on' if r.checkpoints_wanted else 'off (backups read every data block)'}"]
    if r.removed:
        lines.append(f"  removed: {', '.join(r.removed)}")
    lines.append(f"  ours: {', '.join(r.ours) or 'none'}")
    lines.append(f"  other tools': {', '.join(r.others) or 'none'}")
    return "\n".join(lines)
