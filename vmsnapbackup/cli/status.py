"""``vmsnapbackup status [DOMAIN...]``: a monitoring check (exit 0 ok, 1 warning, 2 critical)."""
from __future__ import annotations

import argparse
import datetime as _dt
from typing import TYPE_CHECKING

from .common import Context, add_json_option, size_text
from .run import add_config_option

ORDER = 72

if TYPE_CHECKING:
    from ..workflows.status import DomainStatus, StatusReport


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "status", help="is every domain recoverable, recently enough? (a monitoring check)",
        description="Per domain of every job: the newest good point, its age and size, the "
        "last verify and its result, whether the job's RPO is broken, and how the pool "
        "grows (stored bytes, growth per backup, the predicted next point; a warning "
        "when it grows past the generation policy). Exit 0 ok, 1 warning, 2 critical, "
        "as a Nagios/Icinga check.")
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
        if d.stored_bytes is not None:
            lines.append(f"           pool: {_growth(d)}")
    return "\n".join(lines)


def _growth(d: DomainStatus) -> str:
    """The domain's part of the pool and how it grows, in one line."""
    text = f"{size_text(d.stored_bytes or 0)} stored"
    if d.data_bytes:
        text += f" ({(d.stored_bytes or 0) / d.data_bytes:.2f}x the data)"
    text += f", generation {d.generation} {size_text(d.generation_bytes or 0)}"
    if d.growth_bytes is not None:
        text += f", +{size_text(d.growth_bytes)} per backup"
    if d.predicted_next_bytes is not None:
        text += f", next point about {size_text(d.predicted_next_bytes)}"
    if d.policy_limit_bytes is not None:
        over = "OVER" if d.growth_over_policy else "within"
        text += f" ({over} the policy: {size_text(d.policy_limit_bytes)})"
    return text
