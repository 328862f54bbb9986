"""Turning SIGTERM, SIGINT and SIGHUP into an orderly unwind.

A backup killed politely (a service manager stopping, a Ctrl-C) must still
commit the VM back to its original image and remove partial files.  The first
signal raises :class:`BackupInterruptedError` where the work is; later signals
only log, so they cannot cut the clean-up itself short.  SIGKILL cannot be
caught: that case is what the journal and ``repair`` are for.
"""
from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterator

from ..adapters.processes import stop_signals
from ..errors import BackupInterruptedError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def interruptible(what: str) -> Iterator[None]:
    """Within the block, the first of SIGTERM/SIGINT/SIGHUP raises BackupInterruptedError.

    Outside the main thread signals cannot be handled; the block then runs
    unchanged (the embedding program owns its signals).
    """
    raised = False

    def handler(signum: int) -> None:
        nonlocal raised
        name = signal.Signals(signum).name
        if raised:
            log.warning("%s received again: still cleaning up after the interrupted %s, "
                        "please wait", name, what)
            return
        raised = True
        raise BackupInterruptedError(f"{what} interrupted by {name}")

    with stop_signals(handler):
        yield
