"""Putting the hook where libvirt looks for it: ``/etc/libvirt/hooks/qemu.d/vmsnapbackup``.

The shim's text lives here as :data:`SHIM_SOURCE` (the repository's ``hooks/qemu`` is the
reference copy; a test keeps the two identical), so installing works from a wheel too.
It is POSIX sh, not Python: libvirt refuses every domain start when it cannot run a
hook, so the installed file must run even after the venv it names was deleted.
Its ``PYTHON=`` line gets the interpreter running the install: the one that can
import this package (a venv's ``python`` finds its site-packages through
``pyvenv.cfg``, so the path is kept unresolved).

libvirtd runs the hook as root, so whoever can change the interpreter, the package
or a ``.pth`` file in its site-packages runs code as root: install refuses any of
them that is not root's alone (:mod:`.trust`), and the shim runs Python with ``-I``
(no environment variables, no user site, no current directory on ``sys.path``).

libvirtd decides at start-up and on SIGHUP whether hooks exist; after that it
lists ``qemu.d`` on every call.  So a new hook needs ``--reload`` (SIGHUP to the
daemon found by its pid file) or a daemon restart, unless another qemu hook was
already installed when the daemon started.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..core.atomic import atomic_write_bytes, unlink_durable
from ..errors import NotFoundError, UsageError
from .config import config_path
from .trust import UntrustedPathError, path_problem, tree_problem

__all__ = [
    "DAEMON_PID_FILES",
    "DEFAULT_HOOKS_DIR",
    "HOOK_NAME",
    "SHIM_SOURCE",
    "HookStatus",
    "hook_path",
    "install",
    "reload_libvirtd",
    "shim_text",
    "status",
    "uninstall",
]

HOOK_NAME = "vmsnapbackup"
DEFAULT_HOOKS_DIR = Path("/etc/libvirt/hooks")
#: The monolithic daemon, then the modular QEMU daemon.
DAEMON_PID_FILES = (Path("/run/libvirtd.pid"), Path("/run/virtqemud.pid"))
HOOK_MODE = 0o755

#: The shim's line that names the interpreter (the reference copy's value is a placeholder).
_PYTHON_LINE = "PYTHON="

#: Run by the candidate interpreter, isolated as the shim runs it: where the package and
#: the site directories (whose ``.pth`` files run at start-up) are.
_PROBE = (
    "import json, os, site, sys, vmsnapbackup.hooks.logic as m\n"
    "print(json.dumps({'package': os.path.dirname(os.path.dirname(m.__file__)),"
    " 'site': [p for p in site.getsitepackages() if os.path.isdir(p)]}))"
)

SHIM_SOURCE = r'''#!/bin/sh
# libvirt qemu hook of vmsnapbackup (installed as /etc/libvirt/hooks/qemu.d/vmsnapbackup).
#
# POSIX sh on purpose: libvirt refuses every domain start on the host when it
# cannot run a hook, so this file must run even when the Python it names has
# gone away or is broken.  `vmsnapbackup hook install` writes that interpreter
# into PYTHON below; all decisions are in vmsnapbackup.hooks.logic.  Only its
# deliberate refusal (status 100) becomes libvirt's 1; a missing interpreter,
# a package that cannot be imported, a crash or a hang lets the domain go ahead
# (and says so in syslog).
umask 077
PYTHON='/usr/bin/python3'
# a backstop only: the Python side gives up after its own, shorter budget
BUDGET=30

say() {
    logger -t vmsnapbackup-hook -p daemon.warning -- "$*" 2>/dev/null ||
        printf 'vmsnapbackup hook: %s\n' "$*" >&2
}

drain() {
    # libvirt writes the domain XML to stdin: read what is left of it
    [ -t 0 ] || cat >/dev/null 2>&1 || :
}

if [ ! -f "$PYTHON" ] || [ ! -x "$PYTHON" ]; then
    say "interpreter $PYTHON is missing: doing nothing for $2 of $1" \
        "(run 'vmsnapbackup hook install' again)"
    drain
    exit 0
fi

CODE='
import sys
try:
    from vmsnapbackup.hooks.logic import shim_main
except BaseException as err:
    try:
        import syslog
        syslog.openlog("vmsnapbackup-hook", 0, syslog.LOG_DAEMON)
        syslog.syslog(syslog.LOG_WARNING, "cannot import vmsnapbackup (%s); doing nothing" % err)
    except BaseException:
        pass
    if not sys.stdin.isatty():
        sys.stdin.buffer.read()
    sys.exit(0)
shim_main(sys.argv[1:])
'
if command -v timeout >/dev/null 2>&1; then
    timeout -s KILL "$BUDGET" "$PYTHON" -I -c "$CODE" "$@"
else
    "$PYTHON" -I -c "$CODE" "$@"
fi
status=$?
case $status in
    0) exit 0 ;;
    100) exit 1 ;;
esac
say "interpreter $PYTHON failed (status $status): letting $2 of $1 go ahead"
drain
exit 0
'''


@dataclass(frozen=True)
class HookStatus:
    """What is installed where, for ``hook status``."""

    path: str
    installed: bool
    interpreter: str | None
    current: bool
    daemon_pid: int | None
    config_path: str
    config_exists: bool
    #: why the hook ignores the policy file (not root's alone), or None
    config_problem: str | None = None


def hook_path(hooks_dir: os.PathLike[str] | str = DEFAULT_HOOKS_DIR) -> Path:
    return Path(hooks_dir) / "qemu.d" / HOOK_NAME


def shim_text(interpreter: str) -> str:
    """The shim with ``interpreter`` on its ``PYTHON=`` line (single-quoted for sh)."""
    if not os.path.isabs(interpreter):
        raise UsageError(f"the hook interpreter must be an absolute path, not {interpreter!r}")
    if "'" in interpreter or any(not c.isprintable() for c in interpreter):
        raise UsageError(f"the hook interpreter path {interpreter!r} holds a quote or a "
                         "control character")
    lines = SHIM_SOURCE.split("\n")
    index = next(i for i, line in enumerate(lines) if line.startswith(_PYTHON_LINE))
    lines[index] = f"{_PYTHON_LINE}'{interpreter}'"
    return "\n".join(lines)


def _probe(interpreter: str) -> dict[str, object]:
    """Refuse to install a hook whose interpreter cannot import us: it would silently do nothing."""
    try:
        proc = subprocess.run(
            [interpreter, "-I", "-c", _PROBE], check=False, cwd="/",
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise UsageError(f"cannot run the hook interpreter {interpreter}: {err}") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise UsageError(f"{interpreter} cannot import vmsnapbackup: {last}")
    try:
        found = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise UsageError(f"{interpreter} gave no answer about vmsnapbackup") from None
    if not isinstance(found, dict):
        raise UsageError(f"{interpreter} gave no answer about vmsnapbackup")
    return found


def _check_trusted(interpreter: str, found: dict[str, object]) -> None:
    """Everything libvirtd would run as root through the hook must be root's alone."""
    package = str(found.get("package", ""))
    sites = found.get("site", [])
    problem = path_problem(interpreter) or tree_problem(package)
    for site_dir in sites if isinstance(sites, list) else []:
        if problem:
            break
        problem = path_problem(str(site_dir)) or _top_level_problem(str(site_dir))
    if problem:
        raise UntrustedPathError(
            f"refusing to install the hook: {problem}; libvirtd would run it as root "
            "(install vmsnapbackup where only root can write, e.g. a root-owned venv)")


def _top_level_problem(site_dir: str) -> str | None:
    """The entries of a site directory (its ``.pth`` files run at every start)."""
    try:
        names = sorted(os.listdir(site_dir))
    except OSError as err:
        return f"cannot list {site_dir}: {err.strerror}"
    for name in names:
        problem = path_problem(os.path.join(site_dir, name))
        if problem:
            return problem
    return None


def install(
    hooks_dir: os.PathLike[str] | str = DEFAULT_HOOKS_DIR,
    interpreter: str | None = None,
    *,
    check: bool = True,
) -> Path:
    """Write the hook (mode 0755, atomically), creating ``qemu.d``; returns its path.

    Re-installing replaces it (say, after moving the venv).
    """
    python = interpreter or sys.executable
    text = shim_text(python)
    if check:
        problem = path_problem(python)  # before running it at all
        if problem:
            raise UntrustedPathError(f"refusing to install the hook: {problem}; "
                                     "libvirtd would run it as root")
        _check_trusted(python, _probe(python))
    target = hook_path(hooks_dir)
    try:
        target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create {target.parent}: {err.strerror}") from None
    atomic_write_bytes(target, text.encode("utf-8"), mode=HOOK_MODE)
    return target


def uninstall(hooks_dir: os.PathLike[str] | str = DEFAULT_HOOKS_DIR) -> bool:
    """Remove the hook; True if it was there.  ``qemu.d`` stays (other hooks may live there)."""
    return unlink_durable(hook_path(hooks_dir))


def _installed_interpreter(text: str) -> str | None:
    for line in text.split("\n"):
        if line.startswith(_PYTHON_LINE):
            return line[len(_PYTHON_LINE):].strip().strip("'") or None
    return None


def _same_shim(text: str, interpreter: str) -> bool:
    try:
        return text == shim_text(interpreter)
    except UsageError:
        return False


def status(hooks_dir: os.PathLike[str] | str = DEFAULT_HOOKS_DIR) -> HookStatus:
    """Is the hook installed, and is it this version's shim?"""
    target = hook_path(hooks_dir)
    try:
        text: str | None = target.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = None
    except (OSError, UnicodeDecodeError):
        text = ""
    interpreter = _installed_interpreter(text) if text else None
    current = bool(
        text and interpreter
        and os.access(target, os.X_OK)
        and _same_shim(text, interpreter)
    )
    conf = config_path()
    return HookStatus(
        path=str(target),
        installed=text is not None,
        interpreter=interpreter,
        current=current,
        daemon_pid=_daemon_pid(DAEMON_PID_FILES),
        config_path=str(conf),
        config_exists=conf.exists(),
        config_problem=path_problem(conf) if os.path.lexists(conf) else None,
    )


def _daemon_pid(pid_files: Sequence[Path]) -> int | None:
    for pid_file in pid_files:
        try:
            pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            pass
        return pid
    return None


def reload_libvirtd(pid_files: Sequence[Path] = DAEMON_PID_FILES) -> int:
    """SIGHUP the running libvirt daemon so it looks for hooks again; returns its pid."""
    pid = _daemon_pid(pid_files)
    if pid is None:
        raise NotFoundError(
            f"no running libvirt daemon found by {', '.join(map(str, pid_files))}; "
            "restart it (or send it SIGHUP) so it reads the hook")
    try:
        os.kill(pid, signal.SIGHUP)
    except PermissionError:
        raise UsageError(f"not allowed to signal the libvirt daemon (pid {pid}); "
                         "run as root") from None
    except OSError as err:
        if err.errno == errno.ESRCH:
            raise NotFoundError(f"the libvirt daemon (pid {pid}) has just exited") from None
        raise
    return pid
