"""A libvirt domain as the layers above adapters see it: typed, and never raw.

Workflows hold a :class:`Domain` and hand it back to the adapters
(:class:`~vmsnapbackup.adapters.hypervisor.Hypervisor`, the block jobs, the
offline merge); only adapters reach the ``virDomain`` inside.  Keeping the
libvirt handle behind this one type is what lets a remote hypervisor (a
connection over ssh) replace it without a workflow noticing, and what lets
mypy check every call a workflow makes on a domain.

The name and UUID are read once, when the handle is wrapped: libvirt keeps
both in the handle itself, and a backup must keep naming the same domain even
after the connection that found it died (see ``Hypervisor.revive``).
"""
from __future__ import annotations

import logging

import libvirt

from vmsnapbackup.adapters.libvirterrors import translated
from vmsnapbackup.errors import HypervisorError

__all__ = ["Domain"]

log = logging.getLogger(__name__)


class Domain:
    """One domain of one connection."""

    __slots__ = ("name", "uuid", "virdomain")

    def __init__(self, virdomain: libvirt.virDomain) -> None:
        #: the libvirt handle: for adapters only
        self.virdomain = virdomain
        self.name: str = str(virdomain.name())
        self.uuid: str = str(virdomain.UUIDString())

    def __repr__(self) -> str:
        return f"Domain({self.name!r}, {self.uuid})"

    def is_active(self) -> bool:
        """Running (or paused): QEMU has its images open."""
        with translated(f"state of domain '{self.name}'"):
            return bool(self.virdomain.isActive())

    def is_persistent(self) -> bool:
        """Defined (not transient): it has a persistent configuration."""
        with translated(f"domain '{self.name}'"):
            return bool(self.virdomain.isPersistent())

    def xml(self, inactive: bool = False, secure: bool = False) -> str:
        """The live XML (what QEMU runs now), or with ``inactive`` the persistent config."""
        flags = (libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0) | (
            libvirt.VIR_DOMAIN_XML_SECURE if secure else 0)
        with translated(f"XML of domain '{self.name}'"):
            return str(self.virdomain.XMLDesc(flags))

    def saved_xml(self) -> str:
        """What a restore would define again: the persistent definition, else the live XML."""
        try:
            if self.is_persistent():
                return self.xml(inactive=True)
        except HypervisorError:   # a libvirt hiccup: the live XML will do
            log.debug("domain %s: no persistent XML", self.name, exc_info=True)
        return self.xml()

    def run_id(self) -> int:
        """libvirt's id of the running domain; -1 when it is shut off."""
        with translated(f"id of domain '{self.name}'"):
            return int(self.virdomain.ID())
