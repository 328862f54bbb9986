"""``vmsnapbackup list [DOMAIN]``: the points in the pool (damaged ones flagged), with
time, generation, consistency, what each point stores and what its generation costs
(base plus the points kept: the figure the generation policy weighs).  (Not named
``list.py``: as an attribute of the ``cli`` package it would shadow the builtin there.)"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any, Dict, List

from .common import Context, add_json_option, size_text

if TYPE_CHECKING:
    from ..workflows.listing import PointSummary

ORDER = 20


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("list", help="list the points of one or every domain in the pool")
    p.add_argument("domain", metavar="DOMAIN", nargs="?", help="domain name or UUID")
    add_json_option(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace, ctx: Context) -> int:
    from ..workflows.listing import list_points, pending_repairs

    points = list_points(ctx.pool, uri=ctx.uri, domain=args.domain)
    pending = pending_repairs(ctx.pool, uri=ctx.uri, domain=args.domain)
    doc: Dict[str, Any] = {"points": [p.to_dict() for p in points], "repair_pending": pending}
    text = "\n".join([_text(points), *_full_read_notes(points),
                      *("REPAIR PENDING: " + line for line in pending)])
    ctx.emit(doc, text, data=True)  # the listing is what was asked for
    return 0


def _text(points: List["PointSummary"]) -> str:
    if not points:
        return "no points"
    header = f"{'DOMAIN':<20} {'POINT':>5} {'GEN':>4} {'TAKEN (UTC)':<20} {'CONSISTENCY':<16} " \
             f"{'DISKS':<10} {'STORED':>10} {'GEN COST':>10} {'ON DISK':>10} {'RATIO':>6}"
    rows = [header]
    for p in points:
        if p.damaged:
            rows.append(f"{p.domain:<20} {p.point:>5} {'-':>4} {'-':<20} "
                        f"{'DAMAGED':<16} {p.damaged}")
            continue
        rows.append(f"{p.domain:<20} {p.point:>5} {p.generation:>4} "
                    f"{(p.taken or '')[:19].replace('T', ' '):<20} {p.consistency:<16} "
                    f"{','.join(p.disks):<10} {size_text(p.stored_bytes):>10} "
                    f"{size_text(p.generation_bytes):>10} {_on_disk(p)}")
    return "\n".join(rows)


def _full_read_notes(points: List["PointSummary"]) -> List[str]:
    """One line per domain whose newest point has disks every backup reads in full."""
    newest: Dict[str, "PointSummary"] = {}
    for p in points:
        if not p.damaged:
            newest[p.uuid] = p   # oldest first: the last one wins
    return [f"note: {p.domain}: {', '.join(p.full_read)} raw (image or block device): every "
            "backup reads all of it (no dirty bitmap)" for p in newest.values() if p.full_read]


def _on_disk(p: "PointSummary") -> str:
    """The volume files' size and their ratio to the data stored (FORMAT §15.1):
    below 1 for compressed volumes, about 1 for plain ones; blank when not recorded."""
    if p.volume_bytes is None:
        return f"{'-':>10} {'-':>6}"
    ratio = f"{p.ratio:.2f}" if p.ratio is not None else "-"
    return f"{size_text(p.volume_bytes):>10} {ratio:>6}"
