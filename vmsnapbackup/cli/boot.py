"""``vmsnapbackup boot DOMAIN --point N --name NEW``: instant recovery, a new domain
running on throwaway overlays over a point; ``boot --discard NEW`` removes it again,
``boot --resume NEW`` serves its point again after a host reboot."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..core.defaults import DEFAULT_BOOT_ROOT
from ..errors import UsageError
from .common import Context, add_json_option

if TYPE_CHECKING:
    from ..workflows.access import BootResult

ORDER = 55


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "boot", help="boot a point as a new domain (instant recovery)",
        description="Define a new domain from a point's saved XML whose disks are "
        "throwaway qcow2 overlays on a read-only export of the point, and start it. The "
        "pool is never written. New UUID and MAC addresses. Remove it with --discard NEW.")
    p.add_argument("domain", metavar="DOMAIN", nargs="?",
                   help="domain name or UUID (as in the pool)")
    p.add_argument("--point", type=int, metavar="N", help="point number")
    p.add_argument("--name", metavar="NEW", help="name of the new domain")
    p.add_argument("--start", dest="start", action="store_true", default=True,
                   help="start the new domain (default)")
    p.add_argument("--no-start", dest="start", action="store_false",
                   help="only define it")
    p.add_argument("--no-network", dest="network", action="store_false", default=True,
                   help="leave out every network interface")
    p.add_argument("--overlay-dir", metavar="DIR",
                   help=f"where the NEW/ directory of overlays goes (default {DEFAULT_BOOT_ROOT})")
    p.add_argument("--key-file", metavar="FILE",
                   help="the key file of an encrypted pool (docs/FORMAT.md §15.2); the boot's "
                   "storage daemon reads it, and --resume reads it again")
    act = p.add_mutually_exclusive_group()
    act.add_argument("--discard", metavar="NEW",
                     help="destroy and undefine boot domain NEW and remove its overlays")
    act.add_argument("--resume", metavar="NEW",
                     help="serve boot domain NEW's point again (after a host reboot) and "
                     "start it unless --no-start")
    add_json_option(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace, ctx: Context) -> int:
    from ..workflows.remoteboot import boot_point, discard_boot, resume_boot

    if (args.discard or args.resume) and (args.domain or args.point is not None or args.name):
        raise UsageError("--discard/--resume take only the boot domain's name")
    if args.discard:
        res = discard_boot(args.discard, ctx.uri, overlay_dir=args.overlay_dir)
        ctx.emit(res.to_dict(),
                 f"boot {res.name}: "
                 + ("domain destroyed and undefined, " if res.domain_removed else
                    "no domain left to remove, ")
                 + f"{len(res.files_removed)} file(s) removed")
        return 0
    if args.resume:
        result = resume_boot(args.resume, uri=ctx.uri, overlay_dir=args.overlay_dir,
                             start=args.start, key_file=args.key_file)
        ctx.emit(result.to_dict(), _text(result))
        return 0
    if not args.domain or args.point is None or not args.name:
        raise UsageError("boot needs DOMAIN, --point N and --name NEW (or --discard NEW)")
    result = boot_point(args.domain, ctx.pool, args.point, args.name, uri=ctx.uri,
                        start=args.start, overlay_dir=args.overlay_dir, network=args.network,
                        key_file=args.key_file)
    ctx.emit(result.to_dict(), _text(result))
    return 0


def _text(r: BootResult) -> str:
    state = "started" if r.started else "defined (start it with: virsh start " + r.name + ")"
    lines = [f"point {r.point} of {r.domain} runs as domain {r.name} ({r.uuid}): {state}"]
    for target, path in sorted(r.overlays.items()):
        lines.append(f"  {target}: overlay {path}")
    lines.append(f"  point served by storage daemon pid {r.daemon_pid} on {r.socket}")
    lines.append(f"discard it with: vmsnapbackup boot --discard {r.name}")
    return "\n".join(lines)
