"""``vmsnapbackup rebase DOMAIN [--point N]``: a new generation whose base is a point already
in the pool, made without reading the VM (see :mod:`vmsnapbackup.workflows.rebase`)."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from .common import Context, add_json_option, size_text

if TYPE_CHECKING:
    from ..workflows.rebase import RebaseResult

ORDER = 45


def _point(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a point number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"point numbers start at 1, not {n}")
    return n


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser(
        "rebase", help="start a new generation from a point in the pool (no VM read)",
        description="Copy point N (default: the newest valid point) into a new base volume, "
        "checking every block against its check table, and seal it as the first point of a "
        "new generation: the next backup stores only what changed since N. The old "
        "generation stays restorable until prune removes it. The VM is not touched.")
    p.add_argument("domain", metavar="DOMAIN", help="domain name or UUID (as in the pool)")
    p.add_argument("--point", type=_point, metavar="N",
                   help="the point to rebase (default: the newest valid point)")
    add_json_option(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace, ctx: Context) -> int:
    from ..workflows.rebase import rebase

    result = rebase(args.domain, ctx.pool, point=args.point, uri=ctx.uri,
                    progress=ctx.progress())
    ctx.emit(result.to_dict(), _text(result))
    return 0


def _text(r: "RebaseResult") -> str:
    carried = (f"checkpoint {r.checkpoint} carried over" if r.checkpoint
               else "no checkpoint: the next backup reads every data block")
    return (f"domain {r.domain}: point {r.point} starts generation {r.generation} from point "
            f"{r.source} (generation {r.source_generation}): {size_text(r.bytes_written)} "
            f"written in {r.seconds:.1f} s; {carried}")
