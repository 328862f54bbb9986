"""``vmsnapbackup backup DOMAIN``: take one point of a running or shut-off domain."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..core.defaults import DEFAULT_BLOCK_SIZE
from .common import Context, add_json_option, size_text
from .run import add_standalone_metrics_options

if TYPE_CHECKING:
    from ..workflows.backup import BackupResult

ORDER = 10


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("backup", help="back up a domain (one new point)",
                       description="Back up a domain: external snapshot, read each disk once, "
                       "store what differs from the generation's first check table, commit "
                       "back. The domain keeps running.")
    p.add_argument("domain", metavar="DOMAIN", help="domain name, UUID or id")
    p.add_argument("--disk", action="append", metavar="TARGET", dest="disks",
                   help="back up only this disk (repeatable; default: every disk we can)")
    q = p.add_mutually_exclusive_group()
    q.add_argument("--quiesce", dest="quiesce", action="store_true", default=None,
                   help="require the guest agent to freeze filesystems (fail without it)")
    q.add_argument("--no-quiesce", dest="quiesce", action="store_false",
                   help="never ask the guest agent (crash-consistent)")
    p.add_argument("--new-generation", action="store_true",
                   help="start a new generation: a full base volume")
    p.add_argument("--threshold", type=float, default=None, metavar="FRACTION",
                   help="start a new generation after a point changed more than this fraction "
                   "of a disk (default: when a new base costs less than continuing, see "
                   "docs/generations.md)")
    for rule, what in (("last", "the N newest points"), ("daily", "N days"),
                       ("weekly", "N ISO weeks"), ("monthly", "N months")):
        p.add_argument(f"--keep-{rule}", type=_count, metavar="N",
                       help=f"the retention the pool is pruned with ({what}): weighs a new "
                       "base against the points in deciding when to start a generation")
    p.add_argument("--block-size", type=_size, default=DEFAULT_BLOCK_SIZE, metavar="BYTES",
                   help="check table block size for a new generation (4K..4M, default 64K)")
    p.add_argument("--base-format", choices=("qcow2", "raw"), default="qcow2",
                   help="format of a new base volume (default qcow2)")
    p.add_argument("--overlay-dir", metavar="DIR",
                   help="put the snapshot overlays here instead of beside each image")
    p.add_argument("--no-dirty-bitmaps", dest="dirty_bitmaps", action="store_false",
                   help="neither create a libvirt checkpoint for a new generation nor use one: "
                   "read every data block")
    add_standalone_metrics_options(p)
    add_json_option(p)
    p.set_defaults(run=run)


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20}
    t = text.strip().lower().rstrip("ib")
    try:
        if t and t[-1] in units:
            return int(t[:-1]) * units[t[-1]]
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"not a whole number >= 0: {text!r}")
    return n


def run(args: argparse.Namespace, ctx: Context) -> int:
    from ..core.retention import Policy
    from ..workflows.backup import backup
    from ..workflows.metricsfile import recorded

    counts = (args.keep_last, args.keep_daily, args.keep_weekly, args.keep_monthly)
    retention = None if all(c is None for c in counts) else Policy(*counts)

    with recorded("backup", args.domain, ctx.pool, ctx.uri, metrics=args.metrics,
                  config=args.config) as record:
        result = backup(
            args.domain, ctx.pool, uri=ctx.uri, disks=args.disks, quiesce=args.quiesce,
            new_generation=args.new_generation, threshold=args.threshold,
            block_size=args.block_size, base_format=args.base_format,
            overlay_dir=args.overlay_dir, progress=ctx.progress(),
            dirty_bitmaps=args.dirty_bitmaps, retention=retention)
        record.backup(result)
    ctx.emit(result.to_dict(), _text(result))
    return 0


def _text(r: "BackupResult") -> str:
    lines = [f"domain {r.domain}: point {r.point} (generation {r.generation}"
             f"{', new' if r.new_generation else ''}, {r.consistency}) in "
             f"{r.seconds.get('total', 0):.1f} s"]
    for d in r.disks:
        b = d.blocks
        skipped = (f" ({b['unchanged']} unchanged by the dirty bitmap)"
                   if b.get("unchanged") else "")
        lines.append(f"  {d.target}: {b.get('read', 0)} of {b.get('total', 0)} blocks read"
                     f"{skipped}, {b.get('changed', 0)} stored ({b.get('zero', 0)} zero), "
                     f"{size_text(d.bytes_written)} written")
    for target, reason in r.skipped:
        lines.append(f"  {target}: skipped ({reason})")
    return "\n".join(lines)
