"""Domains we create: define one from XML, start it, destroy and undefine it again,
and what restore and boot must ask libvirt before they do.

Why apart from :mod:`~vmsnapbackup.adapters.hypervisor`: that module works on
the domain being backed up and never changes a definition; here a restore's
``--define`` and a boot make *new* domains, and a boot's discard removes one.
Domains are named by :class:`DomainRef` (name and UUID), never passed around as
libvirt handles: every call looks the domain up by its UUID again, so a domain
that was replaced meanwhile by another of the same name is never touched.

The DAC owner of a domain's QEMU (:func:`qemu_owner`) is resolved with the user
database of the machine we run on; a remote hypervisor needs its own (the
host seam's job, see :mod:`~vmsnapbackup.adapters.host`).
"""
from __future__ import annotations

import contextlib
import grp
import logging
import pwd
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Callable

import libvirt

from ..errors import HypervisorError
from .hypervisor import Hypervisor

__all__ = [
    "DomainRef",
    "define",
    "destroy_and_undefine",
    "domain_xml",
    "find",
    "is_active",
    "parse_dac_label",
    "qemu_owner",
    "running_domains",
    "start",
]

log = logging.getLogger(__name__)

_UNDEFINE_FLAGS = (libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                   | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                   | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                   | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)


@dataclass(frozen=True)
class DomainRef:
    """A domain by name and UUID (the UUID is what every call looks it up by)."""

    name: str
    uuid: str


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    try:
        yield
    except libvirt.libvirtError as err:
        msg = " ".join((err.get_error_message() or str(err)).split())
        raise HypervisorError(f"{what}: {msg}") from err


def _lookup(hv: Hypervisor, how: Callable[[], libvirt.virDomain],
            what: str) -> libvirt.virDomain | None:
    try:
        return how()
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise HypervisorError(f"looking up domain {what} on {hv.uri}: "
                              f"{' '.join((err.get_error_message() or '').split())}") from err


def _handle(hv: Hypervisor, ref: DomainRef) -> libvirt.virDomain:
    dom = _lookup(hv, lambda: hv.conn.lookupByUUIDString(ref.uuid), ref.uuid)
    if dom is None:
        raise HypervisorError(f"domain {ref.name} ({ref.uuid}) vanished from {hv.uri}")
    return dom


def find(hv: Hypervisor, *, name: str | None = None, uuid: str | None = None
         ) -> DomainRef | None:
    """The domain with that UUID (or else name), None when there is none."""
    if uuid:
        dom = _lookup(hv, lambda: hv.conn.lookupByUUIDString(uuid), uuid)
    elif name:
        dom = _lookup(hv, lambda: hv.conn.lookupByName(name), f"'{name}'")
    else:
        return None
    return None if dom is None else DomainRef(str(dom.name()), str(dom.UUIDString()))


def define(hv: Hypervisor, xml: str, name: str) -> DomainRef:
    """Define a new persistent domain from ``xml`` (named ``name``)."""
    with _translated(f"defining domain '{name}' on {hv.uri}"):
        dom = hv.conn.defineXML(xml)
        return DomainRef(str(dom.name()), str(dom.UUIDString()))


def start(hv: Hypervisor, ref: DomainRef) -> None:
    """Start the domain unless it runs already."""
    with _translated(f"starting domain {ref.name}"):
        dom = _handle(hv, ref)
        if not dom.isActive():
            dom.create()


def is_active(hv: Hypervisor, ref: DomainRef) -> bool:
    with _translated(f"state of domain {ref.name}"):
        return bool(_handle(hv, ref).isActive())


def domain_xml(hv: Hypervisor, ref: DomainRef) -> str:
    """The live XML (for a shut-off domain: its definition)."""
    with _translated(f"reading domain {ref.name}"):
        return str(_handle(hv, ref).XMLDesc(0))


def destroy_and_undefine(hv: Hypervisor, ref: DomainRef) -> None:
    """Stop the domain if it runs and remove its definition (and NVRAM, snapshot and
    checkpoint metadata, managed save)."""
    dom = _handle(hv, ref)
    with _translated(f"stopping domain {ref.name}"):
        if dom.isActive():
            dom.destroy()
    with _translated(f"undefining domain {ref.name}"):
        if dom.isPersistent():
            dom.undefineFlags(_UNDEFINE_FLAGS)
    log.info("domain %s destroyed and undefined", ref.name)


def running_domains(hv: Hypervisor) -> list[tuple[str, str]]:
    """``(name, live XML)`` of every running domain; one that stops meanwhile is skipped."""
    pairs = []
    with _translated(f"listing running domains on {hv.uri}"):
        for dom in hv.conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            try:
                pairs.append((str(dom.name()), str(dom.XMLDesc(0))))
            except libvirt.libvirtError as err:
                if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
    return pairs


def qemu_owner(hv: Hypervisor, xml: str) -> tuple[int, int] | None:
    """uid/gid QEMU will run as for this domain: its static DAC label, else the host's
    DAC base label for the domain type; None without DAC (QEMU runs as root)."""
    root = ET.fromstring(xml)
    for sec in root.findall("seclabel"):
        if sec.get("model") == "dac" and sec.get("type") == "static":
            label = sec.findtext("label")
            if label:
                return parse_dac_label(label)
    with _translated("reading the host capabilities"):
        caps = ET.fromstring(hv.conn.getCapabilities())
    virt_type = root.get("type", "kvm")
    for model in caps.findall("./host/secmodel"):
        if model.findtext("model") != "dac":
            continue
        labels = {b.get("type"): b.text for b in model.findall("baselabel")}
        label = labels.get(virt_type) or next(iter(labels.values()), None)
        if label:
            return parse_dac_label(label)
    return None


def parse_dac_label(label: str) -> tuple[int, int]:
    """``+64055:+64055`` or ``libvirt-qemu:kvm`` -> (uid, gid)."""
    user, _, group = label.partition(":")

    def one(text: str, by_name: Callable[[str], object], field_: str) -> int:
        text = text.strip()
        if text.startswith("+"):
            return int(text[1:])
        if text.isdigit():
            return int(text)
        try:
            return int(getattr(by_name(text), field_))
        except KeyError:
            raise HypervisorError(f"unknown user or group {text!r} in DAC label "
                                  f"{label!r}") from None

    uid = one(user, pwd.getpwnam, "pw_uid")
    gid = one(group, grp.getgrnam, "gr_gid") if group else pwd.getpwuid(uid).pw_gid
    return uid, gid
