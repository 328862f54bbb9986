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

import os

from ..core.inflight import runtime_root
from .daemonleftover import sweep_orphan_runtime_dirs

__all__ = ["WRITERS", "sweep_dead_writers", "writers_base"]

WRITERS = "writers"


def writers_base() -> str:
    """The directory under which remote backups' pool-writing daemons put their runtime
    directory (on this machine)."""
    return os.path.join(str(runtime_root()), WRITERS)


def sweep_dead_writers(base: str | None = None) -> list[str]:
    """Remove the runtime directories under ``base`` (default :func:`writers_base`) whose
    daemon is dead; returns them.  The judgement -- a pid file naming no live storage
    daemon of that directory -- is the one every new daemon applies to its siblings
    (:func:`.daemonleftover.sweep_orphan_runtime_dirs`); never raises for one directory."""
    return sorted(sweep_orphan_runtime_dirs(base or writers_base()))
