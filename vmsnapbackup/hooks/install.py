"""Putting the hook where libvirt looks for it: ``/etc/libvirt/hooks/qemu.d/vmsnapbackup``.

The shim's text lives here as :data:`SHIM_SOURCE` (the repository's ``hooks/qemu`` is the
reference copy; a test keeps the two identical), so installing works from a wheel too.
Its first line is replaced by ``#!<the interpreter running the install>``: that is
the interpreter that can import this package (a venv's ``python`` finds its
site-packages through ``pyvenv.cfg``, so the path is kept unresolved).

libvirtd decides at start-up and on SIGHUP whether hooks exist; after that it
lists ``qemu.d`` on every call.  So a new hook needs ``--reload`` (SIGHUP to the
daemon found by its pid file) or a daemon restart, unless another qemu hook was
already installed when the daemon started.
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..core.atomic import atomic_write_bytes, unlink_durable
from ..errors import NotFoundError, UsageError
from .config import config_path

__all__ = [
    "SHIM_SOURCE",
    "HOOK_NAME",
    "DEFAULT_HOOKS_DIR",
    "DAEMON_PID_FILES",
    "HookStatus",
    "hook_path",
    "shim_text",
    "install",
    "uninstall",
    "status",
    "reload_libvirtd",
]

HOOK_NAME = "vmsnapbackup"
DEFAULT_HOOKS_DIR = Path("/etc/libvirt/hooks")
#: The monolithic daemon, then the modular QEMU daemon.
DAEMON_PID_FILES = (Path("/run/libvirtd.pid"), Path("/run/virtqemud.pid"))
HOOK_MODE = 0o755

#: Linux reads at most this much of a "#!" line on older kernels (BINPRM_BUF_SIZE 128).
_MAX_SHEBANG = 127

SHIM_SOURCE = r'''#!/usr/bin/env python3
"""libvirt qemu hook of vmsnapbackup (installed as /etc/libvirt/hooks/qemu.d/vmsnapbackup).

A thin shim: `vmsnapbackup hook install` writes the interpreter that has the
package into the first line; all logic is in vmsnapbackup.hooks.logic.
If the package cannot be imported the hook does nothing and exits 0, so a
broken installation never stops a domain.
"""
import sys

try:
    from vmsnapbackup.hooks.logic import hook_main
except Exception as err:  # noqa: BLE001
    sys.stderr.write("vmsnapbackup hook: cannot import vmsnapbackup (%s); doing nothing\n" % err)
    sys.exit(0)

sys.exit(hook_main(sys.argv[1:], sys.stdin.buffer, setup_logging=True))
'''


@dataclass(frozen=True)
class HookStatus:
    """What is installed where, for ``hook status``."""

    path: str
    installed: bool
    interpreter: Optional[str]
    current: bool
    daemon_pid: Optional[int]
    config_path: str
    config_exists: bool


def hook_path(hooks_dir: "os.PathLike[str] | str" = DEFAULT_HOOKS_DIR) -> Path:
    return Path(hooks_dir) / "qemu.d" / HOOK_NAME


def shim_text(interpreter: str) -> str:
    """The shim with ``interpreter`` in its ``#!`` line."""
    if not os.path.isabs(interpreter):
        raise UsageError(f"the hook interpreter must be an absolute path, not {interpreter!r}")
    if any(c.isspace() for c in interpreter):
        raise UsageError(f"the hook interpreter path {interpreter!r} contains white space, "
                         "which a '#!' line cannot hold")
    if len(interpreter) + 2 > _MAX_SHEBANG:
        raise UsageError(f"the hook interpreter path {interpreter!r} is too long for a '#!' line")
    _, rest = SHIM_SOURCE.split("\n", 1)
    return f"#!{interpreter}\n{rest}"


def _check_interpreter(interpreter: str) -> None:
    """Refuse to install a hook whose interpreter cannot import us: it would silently do nothing."""
    try:
        proc = subprocess.run(
            [interpreter, "-c", "import vmsnapbackup.hooks.logic"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise UsageError(f"cannot run the hook interpreter {interpreter}: {err}") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise UsageError(f"{interpreter} cannot import vmsnapbackup: {last}")


def install(
    hooks_dir: "os.PathLike[str] | str" = DEFAULT_HOOKS_DIR,
    interpreter: Optional[str] = None,
    *,
    check: bool = True,
) -> Path:
    """Write the hook (mode 0755, atomically), creating ``qemu.d``; returns its path.

    Re-installing replaces it (say, after moving the venv).
    """
    python = interpreter or sys.executable
    text = shim_text(python)
    if check:
        _check_interpreter(python)
    target = hook_path(hooks_dir)
    try:
        target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create {target.parent}: {err.strerror}") from None
    atomic_write_bytes(target, text.encode("utf-8"), mode=HOOK_MODE)
    return target


def uninstall(hooks_dir: "os.PathLike[str] | str" = DEFAULT_HOOKS_DIR) -> bool:
    """Remove the hook; True if it was there.  ``qemu.d`` stays (other hooks may live there)."""
    return unlink_durable(hook_path(hooks_dir))


def _installed_interpreter(text: str) -> Optional[str]:
    first = text.split("\n", 1)[0]
    return first[2:].strip() or None if first.startswith("#!") else None


def status(hooks_dir: "os.PathLike[str] | str" = DEFAULT_HOOKS_DIR) -> HookStatus:
    """Is the hook installed, and is it this version's shim?"""
    target = hook_path(hooks_dir)
    try:
        text: Optional[str] = target.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = None
    except (OSError, UnicodeDecodeError):
        text = ""
    interpreter = _installed_interpreter(text) if text else None
    current = bool(
        text and interpreter
        and os.access(target, os.X_OK)
        and text.split("\n", 1)[-1] == SHIM_SOURCE.split("\n", 1)[-1]
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
    )


def _daemon_pid(pid_files: Sequence[Path]) -> Optional[int]:
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
        raise UsageError(f"not allowed to signal the libvirt daemon (pid {pid}); run as root") from None
    except OSError as err:
        if err.errno == errno.ESRCH:
            raise NotFoundError(f"the libvirt daemon (pid {pid}) has just exited") from None
        raise
    return pid
