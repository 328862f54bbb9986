"""Handing slow work out of the hook, and where the hook's words go.

libvirt runs the hook synchronously and waits for EOF on its stdout and
stderr, so anything slow (a repair, a backup) runs as a detached job whose
output goes to a job log, never to the hook's pipes.  The hook runs as root:
the job log is opened without following symlinks and only if it is a regular
file, jobs get umask 077, and a configured command is run only when root
alone can change it (:mod:`.trust`).
"""
from __future__ import annotations

import logging
import logging.handlers
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from .trust import path_problem

__all__ = [
    "JOB_UMASK",
    "SYSLOG_SOCKET",
    "command_problem",
    "open_job_log",
    "setup_hook_logging",
    "spawn_detached",
]

log = logging.getLogger(__name__)

SYSLOG_SOCKET = "/dev/log"
#: Whatever the hook or its jobs create (logs, overlays, volumes) is root's alone.
JOB_UMASK = 0o077


def open_job_log(log_path: Path) -> IO[bytes]:
    """The job log, appended, 0600; a symlink, FIFO or device there is refused (OSError).

    ``O_NONBLOCK`` keeps a FIFO planted at the path from blocking the open
    until a reader comes; the check for a regular file then refuses it.
    """
    log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
                 | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{log_path} is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "ab")
    except BaseException:
        os.close(fd)
        raise


def command_problem(argv0: str) -> str | None:
    """Why the configured command must not run as root, or None."""
    found = argv0 if os.sep in argv0 else shutil.which(argv0)
    if found is None:
        return f"{argv0} is not on PATH"
    return path_problem(found)


def spawn_detached(argv: Sequence[str], log_path: Path | None = None) -> None:
    """Start ``argv`` in its own session and return at once.

    Its output goes to ``log_path`` (appended), never to the hook's pipes:
    libvirt waits for EOF on those, so an inherited pipe would block it for as
    long as the job runs.  The hook exits right away, so the job is adopted by
    init and nobody waits for it.
    """
    out: int | IO[bytes] = subprocess.DEVNULL
    handle = None
    if log_path is not None:
        try:
            handle = open_job_log(log_path)
            handle.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(argv)}\n".encode())
            handle.flush()
            out = handle
        except OSError as err:
            log.warning("cannot open job log %s (%s); job output is discarded", log_path, err)
    try:
        subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            start_new_session=True, close_fds=True, cwd="/", umask=JOB_UMASK,
        )
    finally:
        if handle is not None:
            handle.close()


def setup_hook_logging(syslog_socket: str = SYSLOG_SOCKET) -> logging.Handler:
    """Send the package's log to syslog (daemon facility), or to stderr without one.

    On stderr only warnings and worse: libvirt puts a failing hook's whole
    stderr into its error message, and shows nothing of a successful one.
    """
    handler: logging.Handler
    try:
        if not os.path.exists(syslog_socket):
            raise OSError(f"{syslog_socket} does not exist")
        handler = logging.handlers.SysLogHandler(
            address=syslog_socket, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        handler.setFormatter(logging.Formatter("vmsnapbackup-hook[%(process)d]: %(message)s"))
        handler.setLevel(logging.INFO)
    except OSError:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("vmsnapbackup hook: %(levelname)s: %(message)s"))
        handler.setLevel(logging.WARNING)
    logger = logging.getLogger("vmsnapbackup")
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    return handler
