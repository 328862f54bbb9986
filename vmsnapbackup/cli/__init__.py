"""The ``vmsnapbackup`` command line: ``main(argv) -> int``.

This is the only place where exceptions become exit codes (see
:class:`vmsnapbackup.errors.ExitCode`).  Each command lives in its own module
that owns its parser and its handler (``register(subparsers)`` and
``run(args, ctx) -> int``); the handler turns the parsed arguments into typed
options for the library, so no argparse Namespace ever reaches the library.

Start-up is part of the interface: a host with hundreds of domains runs us
hundreds of times.  So a command module imports only :mod:`.common` and the
standard library at module level, and its handler imports its workflow (numpy,
libvirt, QEMU's client) when it runs; ``--help`` and a parse error never load them
(tests/test_cli_startup.py checks this).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from types import ModuleType
from typing import List, NoReturn, Optional, Sequence

from .. import __version__
from ..errors import ExitCode, UsageError, VmSnapBackupError
from . import common

__all__ = ["build_parser", "main"]

log = logging.getLogger("vmsnapbackup")

#: Modules of this package that are not commands.
_NOT_COMMANDS = {"common"}

#: Whatever we create (pool files, overlays, sockets, restored images) starts
#: private; a module that needs wider access grants it explicitly with chmod.
UMASK = 0o077


#: Commands whose module is not named after them (``list`` would shadow the builtin
#: as an attribute of this package).
_MODULE_OF = {"list": "list_points"}


def _command_names() -> List[str]:
    """The module name of every command, found without importing any of them.

    A directory listing, not ``pkgutil.iter_modules``: that imports ``inspect``
    (about 10 ms, a tenth of the start-up this package aims at, on every command).
    """
    names: set[str] = set()
    for directory in __path__:
        try:
            entries = os.listdir(directory)
        except OSError:
            continue
        names.update(entry[:-3] for entry in entries if entry.endswith(".py"))
    return sorted(n for n in names
                  if n.isidentifier() and n not in _NOT_COMMANDS and not n.startswith("_"))


def _commands(only: Optional[str] = None) -> List[ModuleType]:
    """Command modules, in the order of their ``ORDER``: every one, or the one named.

    A command is a module ``cli/<name>.py`` with ``ORDER``, ``register(subparsers)``
    (which sets ``run`` as the parser's default) and ``run(args, ctx) -> int``;
    adding a command never means editing this file.  ``only`` (a command as typed)
    imports just that command's module when there is one, so running a command does
    not pay for importing the other commands.
    """
    names = _command_names()
    wanted = _MODULE_OF.get(only, only) if only else None
    if wanted in names:
        names = [wanted]
    modules = [importlib.import_module(f"{__name__}.{name}") for name in names]
    return sorted(modules, key=lambda m: (getattr(m, "ORDER", 100), m.__name__))


def _command_in(argv: Sequence[str]) -> Optional[str]:
    """The command word of ``argv`` (the first word that is not a global option)."""
    pre = _Parser(add_help=False)
    common.add_global_options(pre)
    pre.add_argument("--version", action="store_true")
    pre.add_argument("command", nargs="?")
    try:
        known, _rest = pre.parse_known_args(argv)
    except UsageError:  # a malformed global option: the full parser will say what
        return None
    command = known.command
    return command if isinstance(command, str) else None


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so usage errors get our exit code."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    """The whole command line, or (``only``) the global options and that one command."""
    parser = _Parser(
        prog="vmsnapbackup",
        description="Back up running libvirt/QEMU virtual machines.",
    )
    parser.add_argument("--version", action="version", version=f"vmsnapbackup {__version__}")
    common.add_global_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in _commands(only):
        module.register(sub)
    if only is not None and only not in sub.choices:  # not what we guessed: all of them
        return build_parser()
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; return its exit code.  Never lets an exception escape.

    The umask is set first, before anything can create a file, and put back on
    return: a caller running us in its own process keeps its own umask.
    """
    previous_umask = os.umask(UMASK)
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    finally:
        os.umask(previous_umask)


def _main(args_list: List[str]) -> int:
    try:
        parser = build_parser(_command_in(args_list))
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
    common.setup_logging(args.verbose, args.debug, args.quiet)
    ctx = common.Context.from_args(args)
    try:
        common.check_pool_path(ctx.pool)
        return int(args.run(args, ctx))
    except VmSnapBackupError as exc:
        log.debug("error detail", exc_info=True)
        ctx.close()
        ctx.fail(exc)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        ctx.close()
        ctx.fail_message("interrupted", ExitCode.INTERRUPTED)
        return int(ExitCode.INTERRUPTED)
    except Exception as exc:  # a bug: one line, the traceback only with --debug
        log.debug("internal error", exc_info=True)
        ctx.close()
        ctx.fail_message(
            f"internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)",
            ExitCode.ERROR,
        )
        return int(ExitCode.ERROR)
    finally:
        ctx.close()
