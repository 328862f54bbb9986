"""What a dead command's storage daemon leaves behind, and how it is removed.

A backup killed without its ``close()`` (SIGKILL, a crash, a power cut) leaves
its runtime directory, and -- only if it died between fork and the death signal,
or the daemon is still tearing down -- the daemon itself.  The journal recorded
both; these functions trust neither blindly: a directory is only removed when
its name and its contents are ours, a pid only signalled when its command line
names that directory (pid reuse).

Restore, verify and mount keep no journal: what their killed runs leave is
found by :func:`sweep_orphan_runtime_dirs`, which the first daemon a process
starts under a runtime base runs over its siblings (:func:`sweep_once`): once per
command, not once per daemon, as over ssh each sweep is a round trip or more.
"""
from __future__ import annotations

import contextlib
import logging
import os

from .. import errors
from . import processes
from .daemonprocess import PID_FILE, RUNTIME_DIR_PREFIX, RUNTIME_FILES
from .host import LOCAL, Host

__all__ = ["remove_runtime_dir", "stop_leftover_daemon", "sweep_once", "sweep_orphan_runtime_dirs"]

log = logging.getLogger(__name__)

#: ``(host name, runtime base)`` pairs this process has swept already.
_SWEPT: set[tuple[str, str]] = set()


def remove_runtime_dir(path: str, host: Host = LOCAL) -> None:
    """Remove one of *our* runtime directories, refusing anything else.

    The path may come from a journal on disk; a damaged journal must not make
    us delete an arbitrary directory, hence the name and content checks.
    """
    if not os.path.basename(os.path.normpath(path)).startswith(RUNTIME_DIR_PREFIX):
        raise errors.UsageError(f"{path} is not a vmsnapbackup runtime directory")
    try:
        names = host.listdir(path)
    except FileNotFoundError:
        return
    foreign = [n for n in names if n not in RUNTIME_FILES]
    if foreign:
        raise errors.UsageError(
            f"{path} holds files vmsnapbackup did not create ({', '.join(sorted(foreign))}); "
            "not removing it")
    for n in names:
        host.unlink(os.path.join(path, n))
    with contextlib.suppress(FileNotFoundError):
        host.rmdir(path)


def stop_leftover_daemon(pid: int | None, runtime_dir: str, *, timeout: float = 15.0,
                         host: Host = LOCAL) -> bool:
    """Stop the daemon a dead backup left behind and remove its runtime dir.

    For ``repair``: ``pid`` and ``runtime_dir`` are what the journal recorded
    (``StorageDaemon.pid``, ``StorageDaemon.runtime_dir``); the pid file in the
    directory is consulted too. A process is only signalled if it is a
    qemu-storage-daemon whose command line names that directory (PID reuse).
    Refuses (UsageError) a directory that is not one of ours.  Returns True if
    a live daemon was stopped.
    """
    if not os.path.basename(os.path.normpath(runtime_dir)).startswith(RUNTIME_DIR_PREFIX):
        raise errors.UsageError(f"{runtime_dir} is not a vmsnapbackup runtime directory")
    candidates = [pid] if pid is not None else []
    with contextlib.suppress(OSError, ValueError):
        candidates.append(int((host.read_file(os.path.join(runtime_dir, PID_FILE),
                                              limit=64) or b"").strip()))
    needle = os.path.join(os.path.normpath(runtime_dir), "")
    stopped = False
    for candidate in dict.fromkeys(candidates):
        if not processes.is_alive(candidate, host):
            continue
        if processes.started_with(candidate, needle, host):
            log.info("stopping leftover storage daemon pid %d (%s)", candidate, runtime_dir)
            try:
                stopped = processes.stop(candidate, timeout=timeout, host=host,
                                         what="leftover storage daemon") or stopped
            except errors.HypervisorError as err:
                raise errors.ExportError(str(err)) from err
        # killed with its parent and still tearing down (its command line is gone
        # already, its image locks not yet): wait, or a commit fails on the lock.
        # It was dying already: nothing was stopped here.
        elif (processes.is_exiting(candidate, "qemu-storage", host)
              and not processes.wait_gone(candidate, timeout, host)):
            raise errors.ExportError(f"leftover storage daemon pid {candidate} does not "
                                     "finish exiting")
    try:
        remove_runtime_dir(runtime_dir, host)
    except FileNotFoundError:
        pass
    except OSError as err:
        raise errors.ExportError(f"cannot remove {runtime_dir}: {err.strerror}") from err
    return stopped


def _owner_alive(runtime_dir: str, host: Host) -> bool | None:
    """Whether the daemon named by the directory's pid file still serves it;
    None when there is no readable pid file (a daemon starting just now)."""
    try:
        pid = int((host.read_file(os.path.join(runtime_dir, PID_FILE), limit=64) or b"").strip())
    except (OSError, ValueError):
        return None
    needle = os.path.join(os.path.normpath(runtime_dir), "")
    return processes.is_alive(pid, host) and processes.started_with(pid, needle, host)


def sweep_orphan_runtime_dirs(base: str, host: Host = LOCAL) -> list[str]:
    """Remove the runtime directories under ``base`` whose daemon is gone.

    Only a directory whose pid file names a process that is no longer its
    daemon is an orphan: one without a pid file may belong to a daemon being
    started right now, and one holding files we did not make is not ours.
    """
    removed: list[str] = []
    try:
        names = host.listdir(base)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(RUNTIME_DIR_PREFIX):
            continue
        path = os.path.join(base, name)
        if _owner_alive(path, host) is not False:
            continue
        try:
            remove_runtime_dir(path, host)
        except (OSError, errors.VmSnapBackupError) as err:
            log.debug("keeping %s: %s", path, err)
            continue
        log.info("removed %s, left by a storage daemon that is gone", path)
        removed.append(path)
    return removed


def sweep_once(base: str, host: Host = LOCAL) -> list[str]:
    """:func:`sweep_orphan_runtime_dirs` the first time this process asks for
    ``base`` on ``host``; nothing after that.  What a command killed while we run
    leaves is the next command's to sweep (or ``repair``'s)."""
    key = (host.name, os.path.normpath(base))
    if key in _SWEPT:
        return []
    _SWEPT.add(key)
    return sweep_orphan_runtime_dirs(base, host)
