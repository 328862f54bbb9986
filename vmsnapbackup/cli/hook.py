"""``vmsnapbackup hook install|uninstall|status``: the libvirt qemu hook
(see :mod:`vmsnapbackup.hooks`)."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from .common import Context, add_json_option

if TYPE_CHECKING:
    from ..hooks.install import HookStatus

ORDER = 90

#: hooks.install.DEFAULT_HOOKS_DIR, spelled here so ``--help`` need not import the
#: installer (it loads subprocess); tests/test_cli_lazy_defaults.py keeps the two equal.
DEFAULT_HOOKS_DIR = Path("/etc/libvirt/hooks")

_RELOAD_NOTE = ("libvirtd looks for hooks at start-up and on SIGHUP: use --reload, "
                "'systemctl reload libvirtd' or restart it")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "hook", help="install or remove the libvirt qemu hook",
        description="The hook refuses to start a domain while an offline backup reads its "
        "disks, refuses an incoming migration while an operation holds the domain, starts "
        "'repair' when a domain comes up on an overlay a dead backup left behind, and can "
        "start an offline backup after shutdown (/etc/vmsnapbackup/hooks.conf). It never "
        "calls back into libvirt.")
    hsub = p.add_subparsers(dest="hook_command", metavar="ACTION", parser_class=type(p))
    hsub.required = True

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--hooks-dir", type=Path, default=DEFAULT_HOOKS_DIR,
                       metavar="DIR",
                       help=f"libvirt's hook directory (default {DEFAULT_HOOKS_DIR})")
        add_json_option(q)

    q = hsub.add_parser("install", help="install (or update) the hook as qemu.d/vmsnapbackup")
    common(q)
    q.add_argument("--reload", action="store_true",
                   help="send SIGHUP to libvirtd so it notices the hook now")
    q.add_argument("--python", metavar="PATH",
                   help="interpreter for the hook's '#!' line (default: the one running this)")
    q.set_defaults(run=run, hook_action="install")

    q = hsub.add_parser("uninstall", help="remove the hook")
    common(q)
    q.add_argument("--reload", action="store_true", help="send SIGHUP to libvirtd afterwards")
    q.set_defaults(run=run, hook_action="uninstall")

    q = hsub.add_parser("status", help="show whether the hook is installed and current")
    common(q)
    q.set_defaults(run=run, hook_action="status")


def run(args: argparse.Namespace, ctx: Context) -> int:
    from ..hooks import install as hookinstall

    hooks_dir: Path = args.hooks_dir
    if args.hook_action == "status":
        st = hookinstall.status(hooks_dir)
        ctx.emit(dataclasses.asdict(st), _status_text(st))
        return 0
    lines: list[str] = []
    doc = {"action": args.hook_action, "path": str(hookinstall.hook_path(hooks_dir))}
    if args.hook_action == "install":
        path = hookinstall.install(hooks_dir, interpreter=args.python)
        lines.append(f"installed {path}")
        doc["changed"] = True
    else:
        removed = hookinstall.uninstall(hooks_dir)
        lines.append(f"removed {doc['path']}" if removed else f"{doc['path']} was not installed")
        doc["changed"] = removed
    if args.reload:
        pid = hookinstall.reload_libvirtd()
        lines.append(f"sent SIGHUP to libvirtd (pid {pid})")
        doc["reloaded_pid"] = pid
    else:
        lines.append(_RELOAD_NOTE)
    ctx.emit(doc, "\n".join(lines))
    return 0


def _status_text(st: HookStatus) -> str:
    if not st.installed:
        state = "not installed"
    elif st.current:
        state = f"installed (interpreter {st.interpreter})"
    else:
        state = "installed but out of date or damaged: run 'vmsnapbackup hook install'"
    daemon = f"libvirtd pid {st.daemon_pid}" if st.daemon_pid else "no libvirtd running"
    conf = st.config_path + ("" if st.config_exists else " (absent: defaults)")
    if st.config_problem:
        conf += f" (NOT TRUSTED, ignored: {st.config_problem})"
    return f"{st.path}: {state}\n{daemon}\nconfig: {conf}"
