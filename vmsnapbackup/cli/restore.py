"""``vmsnapbackup restore DOMAIN --to DIR``: write the disks of a point as checked images,
optionally as volumes of a libvirt storage pool and as a new (shut-off) domain."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..core.defaults import RESTORE_FORMATS
from ..errors import UsageError
from .common import Context, add_data_path_options, add_json_option, size_text

if TYPE_CHECKING:
    from ..workflows.restore import RestoreResult

ORDER = 30


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "restore", help="restore the disks of a point as image files",
        description="Write each disk of a point as an image file named after its target "
        "(vda.raw, vdb.qcow2), check it against the point's check table block by block, "
        "and only then give it its final name. An image that does not match is kept as "
        "NAME.unverified and the command fails (exit 5).")
    p.add_argument("domain", metavar="DOMAIN", help="domain name or UUID (as in the pool)")
    p.add_argument("--point", metavar="N|latest", default="latest",
                   help="point number to restore (default: the newest valid point)")
    p.add_argument("--disk", action="append", metavar="TARGET", dest="disks",
                   help="restore only this disk (repeatable; default: every disk of the point)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--to", metavar="DIR", help="directory for the images (created if missing)")
    where.add_argument("--pool-volume", metavar="POOLNAME",
                       help="write into this libvirt dir storage pool as volumes "
                       "NAME-TARGET.FORMAT (NAME: --define or the domain)")
    p.add_argument("--format", dest="fmt", choices=RESTORE_FORMATS, default="raw",
                   help="image format (default raw; both are sparse)")
    p.add_argument("--force", action="store_true",
                   help="replace existing files (never a disk of a running domain)")
    p.add_argument("--define", metavar="NAME",
                   help="define a new shut-off domain NAME from the point's saved XML, with "
                   "the restored disks, a new UUID and new MAC addresses; passthrough "
                   "devices and QEMU command-line extras of the saved XML are left out")
    p.add_argument("--trust-pool-xml", action="store_true",
                   help="with --define: keep passthrough devices and qemu:commandline of the "
                   "pool's saved XML (only for a pool nobody else can write)")
    p.add_argument("--key-file", metavar="FILE",
                   help="the key file of an encrypted pool (docs/FORMAT.md §15.2)")
    add_data_path_options(p, "with --pool-volume, send the images")
    add_json_option(p)
    p.set_defaults(run=run)


def parse_point(text: str) -> int | None:
    """``latest`` (None) or a point number."""
    if text.strip().lower() == "latest":
        return None
    try:
        n = int(text)
    except ValueError:
        raise UsageError(f"--point takes a number or 'latest', not {text!r}") from None
    if n < 1:
        raise UsageError(f"point numbers start at 1, not {n}")
    return n


def run(args: argparse.Namespace, ctx: Context) -> int:
    from ..workflows.backupdaemons import data_path_from
    from ..workflows.restore import restore

    result = restore(
        args.domain, ctx.pool, point=parse_point(args.point), disks=args.disks,
        to=args.to, fmt=args.fmt, force=args.force, define=args.define,
        pool_volume=args.pool_volume, trust_pool_xml=args.trust_pool_xml, uri=ctx.uri,
        progress=None if ctx.json else ctx.progress(), key_file=args.key_file,
        data_path=data_path_from(args.tls_dir, args.nbd_ports))
    ctx.emit(result.to_dict(), format_result(result))
    return 0


def format_result(r: RestoreResult) -> str:
    lines = [(f"domain {r.domain}: point {r.point} (generation {r.generation}, "
             f"{r.snapshot_at or '?'}) restored to {r.directory} in {r.seconds:.1f} s")]
    for d in r.disks:
        state = "verified" if d.verified else "NOT VERIFIED"
        lines.append(f"  {d.target}: {d.path} ({d.format}, {size_text(d.size)}, "
                     f"{size_text(d.allocated)} allocated, {d.seconds:.1f} s, {state})")
    if r.storage_pool:
        lines.append(f"  volumes of libvirt storage pool {r.storage_pool}")
    if r.defined is not None:
        lines.append(f"defined domain {r.defined.name} ({r.defined.uuid}), shut off")
        for t in r.defined.dropped:
            lines.append(f"  disk {t} was not restored and is left out of it")
    return "\n".join(lines)
