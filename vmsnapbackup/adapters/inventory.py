"""The host's domains with their state, for jobs that select by glob, ``all`` or running only."""
from __future__ import annotations

import libvirt

from ..core.jobconfig import DomainEntry
from ..errors import HypervisorError
from .hypervisor import connect

__all__ = ["list_domains"]


def list_domains(uri: str) -> list[DomainEntry]:
    """Every defined or running domain on ``uri``, sorted by name."""
    hv = connect(uri)
    try:
        try:
            doms = hv.conn.listAllDomains(0)
            out = [DomainEntry(d.name(), bool(d.isActive())) for d in doms]
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot list domains on {uri}: "
                                  f"{exc.get_error_message()}") from exc
    finally:
        hv.conn.close()
    return sorted(out, key=lambda d: d.name)
