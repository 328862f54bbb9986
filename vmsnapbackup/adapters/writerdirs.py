"""Where a remote backup's pool-writing daemon keeps its runtime directory here, and how
what a dead one left is found again.

Why apart: on the hypervisor itself one daemon serves both sides of a backup and
the journal names its runtime directory, so ``repair`` removes it.  With a remote
hypervisor the journal names the *remote* source daemon (the one a cut connection
strands there); the second daemon, writing the pool on this backup server, is
not in it.  A backup server killed mid-backup (SIGKILL, OOM, power) loses that
daemon by its death signal, but its runtime directory stays.  So these daemons
live under their own directory, ``<runtime root>/writers``, where every entry is
one of them, and a directory whose daemon is dead is garbage by definition:
:func:`sweep_dead_writers` removes those (:func:`.hostopen.open_host` calls it
whenever a remote connection opens: before the next remote backup, as ``repair -c
URI`` begins).  A directory whose pid file names a live storage daemon started with
that directory is left alone, as is one without a pid file yet (a daemon being
started by a backup running now).
"""
from __future__ import annotations

import logging
import os

from .. import errors
from ..core.inflight import runtime_root
from . import processes
from .daemonleftover import remove_runtime_dir
from .daemonprocess import PID_FILE, RUNTIME_DIR_PREFIX
from .host import LOCAL

__all__ = ["WRITERS", "sweep_dead_writers", "writers_base"]

log = logging.getLogger(__name__)

WRITERS = "writers"


def writers_base() -> str:
    """The directory under which remote backups' pool-writing daemons put their runtime
    directory (on this machine)."""
    return os.path.join(str(runtime_root()), WRITERS)


def _pid_of(path: str) -> int | None:
    data = LOCAL.read_file(os.path.join(path, PID_FILE), limit=64)
    try:
        return int((data or b"").strip()) if data else None
    except ValueError:
        return None


def sweep_dead_writers(base: str | None = None) -> list[str]:
    """Remove the runtime directories under ``base`` (default :func:`writers_base`) whose
    daemon is dead; returns them.  Never raises for one directory: a sweep is cleanup."""
    base = base or writers_base()
    try:
        names = sorted(LOCAL.listdir(base))
    except FileNotFoundError:
        return []
    removed = []
    for name in names:
        if not name.startswith(RUNTIME_DIR_PREFIX):
            continue
        path = os.path.join(base, name)
        pid = _pid_of(path)
        if pid is None:
            continue   # not started yet, or died before: left for an operator's eye
        if processes.is_alive(pid) and processes.started_with(pid, os.path.join(path, "")):
            continue
        try:
            remove_runtime_dir(path)
        except (OSError, errors.VmSnapBackupError) as err:
            log.warning("could not remove a dead writer's runtime directory %s: %s", path, err)
            continue
        log.info("removed %s, left by a pool-writing daemon that is gone", path)
        removed.append(path)
    return removed
