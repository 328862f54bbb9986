"""Open the :class:`~.host.Host` a libvirt connection URI names.

Why apart from :mod:`.hostfor`: reading the URI is pure, opening an ssh
master connection is not; :func:`~.hypervisor.connect` calls this once so
that every host touch of a workflow (overlays, qemu-img, storage daemons,
in-flight records) follows libvirt to the same machine.
"""
from __future__ import annotations

from typing import Callable

from .host import LOCAL, Host
from .hostfor import ssh_target_for
from .sshhost import SshHost
from .writerdirs import sweep_dead_writers

__all__ = ["open_host"]


def open_host(uri: str | None) -> tuple[Host, Callable[[], None] | None]:
    """The host of ``uri`` and how to close it (None for this machine)."""
    target = ssh_target_for(uri)
    if target is None:
        return LOCAL, None
    # every remote backup's pool writer runs here and is not in its journal: what a
    # killed one left goes before we start another, or as repair -c URI begins
    sweep_dead_writers()
    host = SshHost(target).connect()
    return host, host.close
