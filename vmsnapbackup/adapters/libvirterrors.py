"""libvirt's errors, said once: one translation to HypervisorError, one quiet handler.

Every adapter that calls libvirt goes through :func:`translated` (or
:func:`message` where it inspects the error first), so a user always sees one
line in the same shape: what we were doing, then libvirt's own words.

libvirt prints each error to stderr through its default handler before the
binding raises it; a CLI that reports the error itself would show it twice
(issue: ``--pool nosuchpool`` printed libvirt's "Storage Driver error" line
and ours).  :func:`open_connection` -- the one way adapters open a connection
-- replaces that handler, once per process, by one that logs at debug level.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import libvirt

from vmsnapbackup.errors import HypervisorError

__all__ = ["message", "open_connection", "quiet_default_handler", "translated"]

log = logging.getLogger(__name__)

_quiet_lock = threading.Lock()
_quiet = False


def message(err: libvirt.libvirtError) -> str:
    """libvirt's message for ``err`` on one line (libvirt's may span several)."""
    return " ".join((err.get_error_message() or str(err)).split())


@contextmanager
def translated(what: str) -> Iterator[None]:
    """Turn a libvirtError into a HypervisorError that says what we were doing."""
    try:
        yield
    except libvirt.libvirtError as err:
        raise HypervisorError(f"{what}: {message(err)}") from err


def _log_instead_of_stderr(_ctx: object, err: object) -> None:
    log.debug("libvirt: %s", err)


def quiet_default_handler() -> None:
    """Stop libvirt printing errors to stderr (we raise them); idempotent."""
    global _quiet
    with _quiet_lock:
        if not _quiet:
            libvirt.registerErrorHandler(_log_instead_of_stderr, None)
            _quiet = True


def open_connection(uri: str) -> libvirt.virConnect:
    """A read-write connection to ``uri``, libvirt's stderr handler silenced first."""
    quiet_default_handler()
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as err:
        raise HypervisorError(f"cannot connect to {uri}: {message(err)}") from err
    if conn is None:  # pragma: no cover - old bindings returned None
        raise HypervisorError(f"cannot connect to {uri}")
    return conn
