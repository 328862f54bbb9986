"""How a qemu-storage-daemon of ours is started: the one launcher, its
environment and the escaping of its option values.

Shared by :class:`~.daemonprocess.DaemonProcess` (backup, restore, verify,
mount: the daemon dies with us) and :mod:`~.bootdaemon` (boot: it outlives us).
"""
from __future__ import annotations

import logging
import os
import re
import select

from .. import errors
from .host import Host, HostProcess, LocalHost

__all__ = ["MALLOC_TUNABLES", "daemon_environment", "launch_daemon", "qemu_opt", "sanitize_tag",
           "wait_exit"]

log = logging.getLogger(__name__)

#: QEMU allocates a bounce buffer for every NBD request and frees it after the
#: reply; glibc serves each one of 128 KiB or more with a fresh mmap, i.e. page
#: faults and zeroing for every byte moved, twice.  Keeping such blocks in the
#: heap made a disk pass 30 % faster (docs/benchmarks.md).
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=4194304:glibc.malloc.trim_threshold=67108864"


def daemon_environment() -> dict[str, str]:
    """What the daemon's environment adds to ours: the malloc tunables above."""
    current = os.environ.get("GLIBC_TUNABLES")
    return {"GLIBC_TUNABLES": f"{current}:{MALLOC_TUNABLES}" if current else MALLOC_TUNABLES}


def qemu_opt(value: str) -> str:
    """Escape a value for QEMU's ``key=value,...`` option syntax."""
    return value.replace(",", ",,")


def sanitize_tag(tag: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9_.-]", "_", tag)[:32]
    return clean or "vmsnapbackup"


def launch_daemon(host: Host, args: list[str], *, log_path: str, tie_to_us: bool,
                  binary: str = "qemu-storage-daemon") -> HostProcess:
    """Start ``binary ARGS`` on ``host``: the one place a qemu-storage-daemon is started.

    Its environment carries :data:`MALLOC_TUNABLES`; like every child of a host it
    runs with umask 077 in a new session (the terminal's Ctrl-C is ours to
    handle), stdout and stderr into ``log_path`` (0600).  ``tie_to_us``: it dies
    with us (a backup's, restore's, verify's or mount's daemon); without, it
    outlives us (a boot's, which serves as long as the boot domain runs).
    """
    argv = [binary, *args]
    log.debug("starting %s", " ".join(argv))
    try:
        return host.start(argv, log_path=log_path, env=daemon_environment(),
                          tie_to_us=tie_to_us)
    except errors.HypervisorError as err:
        raise errors.ExportError(str(err)) from err


def wait_exit(host: Host, proc: HostProcess, timeout: float) -> int | None:
    """``proc``'s exit status once it has exited, None when ``timeout`` passed first.

    A local child is awaited on a pidfd: the kernel wakes us the instant it
    exits.  ``Popen.wait(timeout)`` polls with sleeps that grow to 50 ms, and the
    daemon, told to ``quit``, is gone long before the next one ends (about 0.06 s
    per backup, docs/benchmarks.md).  The pidfd is opened while the child is
    unreaped (only we reap it), so its PID cannot have been reused.  Elsewhere
    (an ssh host) the host's own wait.
    """
    rc = proc.poll()
    if rc is not None or not isinstance(host, LocalHost):
        return rc if rc is not None else proc.wait(timeout)
    try:
        fd = os.pidfd_open(proc.pid)
    except OSError:                       # an old kernel: the polling wait
        return proc.wait(timeout)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if not poller.poll(max(int(timeout * 1000), 0)):
            return None
    finally:
        os.close(fd)
    rc = proc.wait(0.0)
    return rc if rc is not None else proc.wait(timeout)
