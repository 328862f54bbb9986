"""Processes we start or find: is it alive, is it ours, stop it -- and our own signals.

Why one module: a pid comes back to us from a journal, a pid file or an
in-flight record, possibly long after the process it named is gone and the
number was reused.  So "alive" means "some thread of it still runs" (a zombie
leader whose threads finish native AIO still holds image locks), "ours" means
"its command line names what we started it with", and a process is only ever
signalled by pid after that check -- never by name.

:func:`stop_signals` is the one place that installs handlers for SIGTERM,
SIGINT and SIGHUP: the storage daemon, ``mount``'s wait and the workflows'
orderly unwind all go through it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any, Callable

import tenacity

from ..errors import HypervisorError
from .host import LOCAL, Host

__all__ = [
    "STOP_SIGNALS",
    "STORAGE_DAEMON",
    "daemon_arguments",
    "is_alive",
    "is_exiting",
    "process_name",
    "program_arguments",
    "started_with",
    "stop",
    "stop_signals",
    "wait_gone",
]

log = logging.getLogger(__name__)

STORAGE_DAEMON = "qemu-storage-daemon"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def is_alive(pid: int, host: Host = LOCAL) -> bool:
    """True while any thread of ``pid`` runs (see the module docstring)."""
    return pid > 0 and host.process_alive(pid)


def process_name(pid: int, host: Host = LOCAL) -> str | None:
    """The kernel's short name of ``pid`` (``comm``), None when it is gone."""
    return host.process_name(pid)


def program_arguments(pid: int, program: str, host: Host = LOCAL) -> list[str] | None:
    """The arguments of ``pid`` if its program's name contains ``program``, else None
    (gone, a zombie -- no command line -- or something else)."""
    argv = host.process_arguments(pid) if pid > 0 else None
    if not argv or program not in os.path.basename(argv[0]):
        return None
    return argv[1:]


def daemon_arguments(pid: int, host: Host = LOCAL) -> list[str] | None:
    """The arguments of ``pid`` if it is a running qemu-storage-daemon, else None."""
    return program_arguments(pid, STORAGE_DAEMON, host)


def started_with(pid: int, needle: str, host: Host = LOCAL,
                 program: str = STORAGE_DAEMON) -> bool:
    """True if ``pid`` runs ``program`` with an argument containing ``needle`` (the
    socket or directory we started it with): the guard against pid reuse."""
    return any(needle in a for a in program_arguments(pid, program, host) or ())


def is_exiting(pid: int, name_prefix: str, host: Host = LOCAL) -> bool:
    """A process on its way out: no command line any more, its name still there
    (killed with its parent, still closing its files and image locks)."""
    if host.process_arguments(pid):
        return False
    name = host.process_name(pid)
    return name is not None and name.startswith(name_prefix)


def wait_gone(pid: int, timeout: float, host: Host = LOCAL) -> bool:
    """Wait until no thread of ``pid`` runs; False when ``timeout`` passed first."""
    try:
        tenacity.Retrying(
            retry=tenacity.retry_if_result(bool),
            stop=tenacity.stop_after_delay(timeout),
            wait=tenacity.wait_exponential(multiplier=0.005, max=0.2),
        )(is_alive, pid, host)
    except tenacity.RetryError:
        return False
    return True


def stop(pid: int, *, timeout: float, host: Host = LOCAL, what: str = "process") -> bool:
    """SIGTERM ``pid``, SIGKILL it after half of ``timeout``, and wait until it is gone.

    The caller has checked that ``pid`` is ours (:func:`started_with`).  Returns
    False when there was no such process; HypervisorError when it outlives the
    deadline even after SIGKILL (a process stuck in the kernel).
    """
    signalled = False
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not host.send_signal(pid, sig):
            return signalled
        signalled = True
        if wait_gone(pid, timeout / 2, host):
            return True
        log.warning("%s pid %d did not stop on %s", what, pid, signal.Signals(sig).name)
    raise HypervisorError(f"{what} pid {pid} does not stop within {timeout:g} s")


@contextlib.contextmanager
def stop_signals(handler: Callable[[int], None], *,
                 only_if_default: bool = False) -> Iterator[bool]:
    """Within the block, SIGTERM, SIGINT and SIGHUP call ``handler(signum)``.

    The handler may raise (an orderly unwind) or note the signal (a wait that
    ends).  With ``only_if_default`` a signal whose handler the application
    chose itself is left alone.  Outside the main thread nothing is installed
    (Python delivers signals there only).  Yields whether any handler was
    installed; the previous handlers are back when the block ends.
    """
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            current = signal.getsignal(sig)
            default = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
            if only_if_default and current is not default:
                continue
            previous[int(sig)] = current
            signal.signal(sig, lambda signum, _frame: handler(signum))
    try:
        yield bool(previous)
    finally:
        for signum, old in previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signum, old)
