"""``vmsnapbackup backup DOMAIN...|--all``: take one point of each running or shut-off domain.

One domain named on one connection is the plain backup: its result, or its
error's own exit code.  Several names, ``--all`` or several ``-c`` make a run
over many domains (:mod:`vmsnapbackup.workflows.backupmany`): ``--parallel`` at
once, each isolated from the others, a line per domain while it runs, a table
(or one ``--json`` document) at the end, and exit 12 when any domain failed.
"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..core.defaults import DEFAULT_BLOCK_SIZE
from ..errors import UsageError
from .common import Context, add_data_path_options, add_json_option, size_text
from .run import add_standalone_metrics_options

if TYPE_CHECKING:
    from ..workflows.backup import BackupResult
    from ..workflows.backupoptions import BackupOptions

ORDER = 10


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("backup", help="back up a domain (one new point)",
                       description="Back up a domain: external snapshot, read each disk once, "
                       "store what differs from the generation's first check table, commit "
                       "back. The domain keeps running.")
    p.add_argument("domains", metavar="DOMAIN", nargs="*",
                   help="domain name, UUID or id (several: a run over many domains)")
    many = p.add_argument_group("many domains in one run")
    many.add_argument("--all", action="store_true", dest="every",
                      help="every domain of every -c connection")
    state = many.add_mutually_exclusive_group()
    state.add_argument("--running", action="store_true", help="with --all: running ones only")
    state.add_argument("--inactive", action="store_true", help="with --all: shut-off ones only")
    many.add_argument("--exclude-domain", action="append", default=[], metavar="GLOB",
                      dest="exclude_domains", help="leave out domains whose name matches "
                      "(repeatable; shell glob)")
    many.add_argument("--parallel", type=_positive, default=1, metavar="N",
                      help="back up N domains at once (default 1)")
    p.add_argument("--max-rate", metavar="RATE",
                   help="bandwidth budget of the whole run, shared by every disk read "
                   "(e.g. 100M = 100 MiB/s; K, M, G are binary units)")
    p.add_argument("--disk", action="append", metavar="TARGET", dest="disks",
                   help="back up only this disk (repeatable; default: every disk we can)")
    p.add_argument("--exclude", action="append", metavar="TARGET", default=[],
                   help="leave this disk out (repeatable; a target like vdb)")
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
    b = p.add_mutually_exclusive_group()
    b.add_argument("--dirty-bitmaps", dest="dirty_bitmaps", action="store_true", default=None,
                   help="use libvirt checkpoints even if 'checkpoints off' was set for the "
                   "domain")
    b.add_argument("--no-dirty-bitmaps", dest="dirty_bitmaps", action="store_false",
                   help="neither create a libvirt checkpoint nor use one, and delete ours from "
                   "the domain (for virtnbdbackup beside us): read every data block "
                   "(default: the domain's 'vmsnapbackup checkpoints on|off' setting, on)")
    add_data_path_options(p, "read its disks")
    p.add_argument("--compress", choices=("zstd", "none"), default=None,
                   help="write compressed qcow2 volumes (zstd), or plain ones (none); default: "
                   "the pool's default, which a backup that creates the pool records")
    p.add_argument("--encrypt", action="store_true",
                   help="create an encrypted pool (docs/FORMAT.md §15.2): LUKS volumes, sealed "
                   "tables; needs --key-file; not with --compress")
    p.add_argument("--key-file", metavar="FILE",
                   help="the key file of an encrypted pool (every backup into one needs it)")
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


def _positive(text: str) -> int:
    n = _count(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"not a whole number >= 1: {text!r}")
    return n


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"not a whole number >= 0: {text!r}")
    return n


def run(args: argparse.Namespace, ctx: Context) -> int:
    if not args.every and not args.domains:   # before any import: a usage error stays cheap
        raise UsageError("name at least one DOMAIN, or give --all (see 'vmsnapbackup "
                         "backup --help')")
    options = _options(args)
    if args.every or len(args.domains) != 1 or len(ctx.uris) > 1:
        return _run_many(args, ctx, options)
    return _run_one(args.domains[0], ctx, options, args)


def _options(args: argparse.Namespace) -> "BackupOptions":
    """The command line's choices as the library's typed record (no Namespace crosses)."""
    from ..core.retention import Policy
    from ..workflows.backupdaemons import data_path_from
    from ..workflows.backupoptions import BackupOptions
    from ..workflows.ratebudget import RateBudget, parse_rate

    counts = (args.keep_last, args.keep_daily, args.keep_weekly, args.keep_monthly)
    return BackupOptions(
        disks=args.disks,
        exclude=args.exclude,
        quiesce=args.quiesce,
        new_generation=args.new_generation,
        threshold=args.threshold,
        block_size=args.block_size,
        base_format=args.base_format,
        overlay_dir=args.overlay_dir,
        dirty_bitmaps=args.dirty_bitmaps,
        retention=None if all(c is None for c in counts) else Policy(*counts),
        data_path=data_path_from(args.tls_dir, args.nbd_ports),
        compression=args.compress,
        encrypt=args.encrypt,
        key_file=args.key_file,
        # one budget for the whole run: every domain's disk passes share it
        budget=None if args.max_rate is None else RateBudget(parse_rate(args.max_rate)),
    )


def _run_one(domain: str, ctx: Context, options: "BackupOptions",
             args: argparse.Namespace) -> int:
    from ..workflows.backup import backup
    from ..workflows.metricsfile import recorded

    with recorded("backup", domain, ctx.pool, ctx.uri, metrics=args.metrics,
                  config=args.config) as record:
        result = backup(domain, ctx.pool, uri=ctx.uri, options=options,
                        progress=ctx.progress())
        record.backup(result)
    ctx.emit(result.to_dict(), _text(result))
    return 0


def _run_many(args: argparse.Namespace, ctx: Context, options: "BackupOptions") -> int:
    from ..workflows.backupmany import backup_many, list_inventories, select_domains
    from ._manyview import ManyDisplay, summary_text

    if args.every or len(ctx.uris) > 1:
        inventories, failed = list_inventories(ctx.uris)
    else:
        inventories, failed = {ctx.uris[0]: []}, []
    targets, missing = select_domains(
        inventories, args.domains, every=args.every, running=args.running,
        inactive=args.inactive, exclude=args.exclude_domains)
    display = None
    if not (ctx.json or ctx.quiet):
        display = ManyDisplay(ctx.err, ctx.err.isatty(), [t.label for t in targets])
    try:
        result = backup_many(targets, ctx.pool, options, parallel=args.parallel,
                             observer=display, failed=[*failed, *missing])
    finally:
        if display is not None:
            display.close()
    ctx.emit(result.to_dict(), summary_text(result))
    return result.exit_code


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
        if d.full_read:
            lines.append(f"    ({d.full_read})")
    for target, reason in r.skipped:
        lines.append(f"  {target}: skipped ({reason})")
    return "\n".join(lines)
