"""``vmsnapbackup schedule install|remove|show [JOB...]``: a systemd timer per job (or cron)."""
from __future__ import annotations

import argparse
import os
import sys

from ..core.units import cron_line, unit_files, unit_name
from .common import Context, add_json_option
from .run import add_config_option

ORDER = 71

#: adapters.units.DEFAULT_UNIT_DIR, spelled here so the parser need not import the
#: adapter (it loads subprocess); tests/test_cli_lazy_defaults.py keeps the two equal.
DEFAULT_UNIT_DIR = "/etc/systemd/system"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "schedule", help="install, remove or show the systemd timers (or cron lines) of jobs",
        description="install: write vmsnapbackup-JOB.service and .timer (OnCalendar from the "
        "job's schedule, Persistent=true, RandomizedDelaySec, a sandboxed oneshot service) "
        "and check them with systemd-analyze verify; then enable them with systemctl. "
        "remove: delete them. show: print them, or with --cron the /etc/cron.d lines for "
        "hosts without systemd.")
    p.add_argument("action", choices=("install", "remove", "show"))
    p.add_argument("jobs", nargs="*", metavar="JOB", help="job names (default: all)")
    add_config_option(p)
    p.add_argument("--unit-dir", default=DEFAULT_UNIT_DIR, metavar="DIR",
                   help=f"where unit files go (default {DEFAULT_UNIT_DIR})")
    p.add_argument("--root", metavar="DIR",
                   help="treat DIR as the root file system (unit dir below it)")
    p.add_argument("--cron", action="store_true", help="show: cron lines instead of units")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="install: skip systemd-analyze verify")
    add_json_option(p)
    p.set_defaults(run=run)


def _command() -> list[str]:
    """How the service starts us: this interpreter, so a venv install works too."""
    return [sys.executable, "-m", "vmsnapbackup"]


def run(args: argparse.Namespace, ctx: Context) -> int:
    from ..adapters.jobfiles import load_config
    from ..adapters.units import install_units, remove_units, verify_units
    from ..workflows.run import select_jobs

    config = load_config(args.config)
    jobs = select_jobs(config, args.jobs)
    config_path = os.path.abspath(args.config)
    unit_dir = args.unit_dir
    if args.root:
        unit_dir = os.path.join(args.root, unit_dir.lstrip("/"))
    if args.action == "show":
        if args.cron:
            lines = [cron_line(j, _command(), config_path) for j in jobs]
            ctx.emit({"cron": lines}, "\n".join(lines))
            return 0
        files = {n: t for j in jobs for n, t in unit_files(j, _command(), config_path)
                 .files.items()}
        ctx.emit({"units": files},
                 "\n".join(f"# {n}\n{t}" for n, t in files.items()))
        return 0
    if args.action == "remove":
        names = [unit_name(j.name, k) for j in jobs for k in ("timer", "service")]
        removed = remove_units(names, unit_dir)
        ctx.emit({"removed": removed},
                 "\n".join(f"removed {p}" for p in removed) or "nothing to remove")
        return 0
    written: list[str] = []
    for job in jobs:
        written += install_units(unit_files(job, _command(), config_path), unit_dir)
    if args.verify:
        verify_units(written)
    timers = " ".join(unit_name(j.name, "timer") for j in jobs)
    ctx.emit({"installed": written, "verified": bool(args.verify), "enable": timers},
             "\n".join([*(f"installed {p}" for p in written),
                        "enable with: systemctl daemon-reload && "
                        f"systemctl enable --now {timers}"]))
    return 0
