"""``vmsnapbackup mount DOMAIN --point N --disk D``: serve one disk of a point read-only
over NBD until SIGINT/SIGTERM, for file-level restore with stock tools."""
from __future__ import annotations

import argparse
import threading
from typing import TYPE_CHECKING

from .common import Context, add_json_option, size_text

if TYPE_CHECKING:
    from ..workflows.access import MountedPoint

ORDER = 50


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "mount", help="serve a point's disk read-only over NBD (file-level restore)",
        description="Export one disk of a point read-only over NBD and wait until "
        "interrupted (Ctrl-C, SIGTERM); then the export is removed. Read files out of it "
        "with guestmount, nbdfuse or qemu-img (the commands are printed).")
    p.add_argument("domain", metavar="DOMAIN", help="domain name or UUID (as in the pool)")
    p.add_argument("--point", type=int, required=True, metavar="N", help="point number")
    p.add_argument("--disk", metavar="TARGET",
                   help="disk target, e.g. vda (may be left out for a one-disk point)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH",
                       help="also make the export reachable at this unix socket path")
    where.add_argument("--port", type=int, metavar="P",
                       help="serve on TCP port P (on --bind, default 127.0.0.1)")
    p.add_argument("--bind", default="127.0.0.1", metavar="ADDR",
                   help="address for --port (default 127.0.0.1)")
    p.add_argument("--tls-dir", metavar="DIR",
                   help="serve --port with TLS only, x509 files from DIR (ca-cert.pem, "
                   "server-cert.pem, server-key.pem); clients need a certificate the CA signed")
    p.add_argument("--insecure", action="store_true",
                   help="serve --port as plain NBD, without authentication (loopback only: "
                   "any local user can read the disk)")
    p.add_argument("--key-file", metavar="FILE",
                   help="the key file of an encrypted pool (docs/FORMAT.md §15.2)")
    add_json_option(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace, ctx: Context) -> int:
    from ..adapters.processes import stop_signals
    from ..workflows.access import mount_point

    stop = threading.Event()
    # Our handlers are in place before the storage daemon starts, so it leaves
    # signals to us: a signal ends the wait below, and the with-block cleans up.
    with stop_signals(lambda _signum: stop.set()), \
            mount_point(args.domain, ctx.pool, args.point, args.disk, args.socket,
                        port=args.port, bind=args.bind, uri=ctx.uri,
                        tls_dir=args.tls_dir, insecure=args.insecure,
                        key_file=args.key_file) as m:
        ctx.emit(m.to_dict(), _text(m))
        stop.wait()
    return 0


def _text(m: MountedPoint) -> str:
    u = m.uri
    if m.tls_dir is not None:
        return _tls_text(m)
    return "\n".join([
        (f"domain {m.domain}, point {m.point}, disk {m.disk} ({size_text(m.size)}) "
        f"is served read-only at:"),
        f"  {u}",
        "use it with, for example:",
        f"  nbdinfo '{u}'",
        f"  guestmount --format=raw -a '{u}' -i --ro /mnt/restore",
        f"  nbdfuse /mnt/disk '{u}'      # the disk as a file: /mnt/disk/nbd",
        f"  qemu-img convert -f raw -O raw '{u}' {m.disk}.img",
        "press Ctrl-C (or send SIGTERM) to stop serving it",
    ])


def _tls_text(m: MountedPoint) -> str:
    """How to connect to a TLS export: the client needs its own certificate from the CA
    (client-cert.pem, client-key.pem and ca-cert.pem in one directory)."""
    u = m.uri
    return "\n".join([
        (f"domain {m.domain}, point {m.point}, disk {m.disk} ({size_text(m.size)}) "
         f"is served read-only with TLS (client certificate required) at:"),
        f"  {u}",
        "with a client directory CDIR holding ca-cert.pem, client-cert.pem, client-key.pem:",
        f"  nbdinfo '{u}?tls-certificates=CDIR'",
        "  qemu-img convert -O raw --object tls-creds-x509,id=tls0,dir=CDIR,endpoint=client "
        f"--image-opts driver=nbd,host={m.host},port={m.port},export={m.export_name},"
        f"tls-creds=tls0 {m.disk}.img",
        "press Ctrl-C (or send SIGTERM) to stop serving it",
    ])
