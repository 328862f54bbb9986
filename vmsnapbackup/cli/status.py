"""``vmsnapbackup status [DOMAIN...]``: a monitoring check (exit 0 ok, 1 warning, 2 critical)."""
from __future__ import annotations

import argparse
import datetime as _dt
from typing import TYPE_CHECKING

from .common import Context, add_json_option, size_text
from .run import add_config_option

ORDER = 72

if TYPE_CHECKING:
    from ..workflows.status import StatusReport


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "status", help="is every domain recoverable, recently enough? (a monitoring check)",
        description="Per domain of every job: the newest good point, its age and size, the "
        "last verify and its result, and whether the job's RPO is broken. Exit 0 ok, "
        "1 warning, 2 critical, as a Nagios/Icinga check.")
    p.add_argument("domains", nargs="*", metavar="DOMAIN", help="only these domains")
    add_config_option(p)
    add_json_option(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace, ctx: Context) -> int:
    from ..adapters.jobfiles import load_config
    from ..workflows.status import status

    report = status(load_config(args.config), args.domains)
    ctx.emit(report.to_dict(), _text(report))
    return report.level


def _age(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _text(r: StatusReport) -> str:
    from ..workflows.status import LEVELS

    lines = [f"{LEVELS[r.level].upper()}: {len(r.domains)} domain(s)"]
    for d in r.domains:
        point = "no good point"
        if d.last_point is not None:
            age = "age unknown" if d.age_seconds is None else f"{_age(d.age_seconds)} old"
            point = (f"point {d.last_point}, {age}, {size_text(d.size_bytes or 0)} stored "
                     f"of {size_text(d.virtual_bytes or 0)}")
        verified = "never verified"
        if d.last_verify is not None:
            when = _dt.datetime.fromtimestamp(d.last_verify, _dt.timezone.utc)
            verified = (f"verified {when.strftime('%Y-%m-%d %H:%M')} UTC: "
                        f"{'ok' if d.last_verify_ok else 'FAILED'}")
        why = f" ({'; '.join(d.reasons)})" if d.reasons else ""
        lines.append(f"  {LEVELS[d.level]:<8} {d.domain} [job {d.job}]: {point}; {verified}"
                     f"{why}")
    return "\n".join(lines)
