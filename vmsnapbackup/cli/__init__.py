"""The ``vmsnapbackup`` command line: ``main(argv) -> int``.

This is the only place where exceptions become exit codes (see
:class:`vmsnapbackup.errors.ExitCode`).  Each command lives in its own module
that owns its parser and its handler (``register(subparsers)`` and
``run(args, ctx) -> int``); the handler turns the parsed arguments into typed
options for the library, so no argparse Namespace ever reaches the library.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn, Optional, Sequence

from .. import __version__
from ..errors import ExitCode, UsageError, VmSnapBackupError
from . import common

__all__ = ["main"]

log = logging.getLogger("vmsnapbackup")

#: Modules of this package that are not commands.
_NOT_COMMANDS = {"common"}


def _commands() -> list:
    """Every command module of this package, in the order of their ``ORDER``.

    A command is a module ``cli/<name>.py`` with ``ORDER``, ``register(subparsers)``
    (which sets ``run`` as the parser's default) and ``run(args, ctx) -> int``;
    adding a command never means editing this file.
    """
    import importlib
    import pkgutil

    modules = [
        importlib.import_module(f"{__name__}.{info.name}")
        for info in pkgutil.iter_modules(__path__)
        if info.name not in _NOT_COMMANDS and not info.name.startswith("_")
    ]
    return sorted(modules, key=lambda m: (getattr(m, "ORDER", 100), m.__name__))


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so usage errors get our exit code."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vmsnapbackup",
        description="Back up running libvirt/QEMU virtual machines.",
    )
    parser.add_argument("--version", action="version", version=f"vmsnapbackup {__version__}")
    common.add_global_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in _commands():
        module.register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; return its exit code.  Never lets an exception escape."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0)
    except UsageError as exc:
        print(f"vmsnapbackup: error: {exc}", file=sys.stderr)
        return int(ExitCode.USAGE)
    if not getattr(args, "command", None):
        parser.print_usage(sys.stderr)
        print("vmsnapbackup: error: a command is required", file=sys.stderr)
        return int(ExitCode.USAGE)
    common.setup_logging(args.verbose, args.debug)
    ctx = common.Context.from_args(args)
    try:
        return int(args.run(args, ctx))
    except VmSnapBackupError as exc:
        log.debug("error detail", exc_info=True)
        ctx.fail(exc)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        ctx.fail_message("interrupted", ExitCode.INTERRUPTED)
        return int(ExitCode.INTERRUPTED)
    except Exception as exc:  # a bug: one line, the traceback only with --debug
        log.debug("internal error", exc_info=True)
        ctx.fail_message(
            f"internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)",
            ExitCode.ERROR,
        )
        return int(ExitCode.ERROR)
