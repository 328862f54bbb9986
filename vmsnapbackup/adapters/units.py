"""Put the job's unit files on the host, take them away, and ask systemd about them.

``systemd-analyze`` works without systemd as PID 1, so the calendar check at
config load and the unit check in the tests use systemd's own parser instead
of a copy of its grammar.  Where the tool is missing (a host without systemd)
the calendar is not checked here; the timer would be refused at install time.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from ..core.atomic import atomic_write_bytes, unlink_durable
from ..core.units import UnitFiles
from ..errors import StorageError, UsageError

__all__ = ["DEFAULT_UNIT_DIR", "check_calendar", "install_units", "remove_units", "verify_units"]

log = logging.getLogger(__name__)

DEFAULT_UNIT_DIR = "/etc/systemd/system"
_TIMEOUT = 60


def _analyze() -> str | None:
    return shutil.which("systemd-analyze")


def check_calendar(expression: str) -> str | None:
    """None if systemd accepts ``expression`` (or cannot be asked), else its complaint."""
    tool = _analyze()
    if tool is None:
        return None
    proc = subprocess.run([tool, "calendar", expression], check=False, capture_output=True,
                          text=True, timeout=_TIMEOUT)
    if proc.returncode == 0:
        return None
    return " ".join((proc.stderr or proc.stdout).split()) or f"exit {proc.returncode}"


def install_units(units: UnitFiles, unit_dir: str) -> list[str]:
    """Write each unit file atomically (0644: systemd reads them as any user)."""
    target = Path(unit_dir)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create unit directory {target}: {exc.strerror}") from exc
    written = []
    for name, text in units.files.items():
        atomic_write_bytes(target / name, text.encode(), 0o644)
        written.append(str(target / name))
    return written


def remove_units(names: Sequence[str], unit_dir: str) -> list[str]:
    removed = []
    for name in names:
        if unlink_durable(Path(unit_dir) / name):
            removed.append(os.path.join(unit_dir, name))
    return removed


def verify_units(paths: Sequence[str], root: str | None = None) -> None:
    """Run ``systemd-analyze verify`` on the unit files; UsageError with its words if not clean.

    ``--man=no``: Documentation=man: pages are not installed in every test host.
    """
    tool = _analyze()
    if tool is None:
        raise UsageError("systemd-analyze is not installed: cannot verify unit files")
    argv = [tool, "verify", "--man=no"]
    if root is not None:
        argv.append(f"--root={root}")
    proc = subprocess.run([*argv, *paths], check=False, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT,
                          text=True, timeout=_TIMEOUT)
    if proc.returncode != 0 or proc.stdout.strip():
        raise UsageError(f"systemd-analyze verify: {' '.join(proc.stdout.split())}")
