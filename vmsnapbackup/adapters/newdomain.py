"""A *new* domain from a point's saved definition (``restore --define``, ``boot``).

The saved domain XML comes from the pool, and the pool's storage is not trusted
(docs/DESIGN.md §8): whoever can write it could add a ``<hostdev>`` handing the
host's disk controller to the guest, a ``<filesystem>`` exporting ``/`` into it,
or a ``<qemu:commandline>`` running anything as the QEMU user.  So unless the
caller trusts the pool's XML (``--trust-pool-xml``), every element that reaches
into the host is left out, each one logged.  A domain so defined boots on its
restored disks with emulated devices; passthrough is the admin's to add again.
"""
from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Callable

from ..errors import CorruptFileError, UsageError

__all__ = ["DOMAIN_NAME_RE", "QEMU_NS", "new_domain_xml", "set_disk_source",
           "strip_host_access"]

log = logging.getLogger(__name__)


#: libvirt's QEMU namespace: ``<qemu:commandline>``, ``<qemu:capabilities>``, ``<qemu:override>``
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
ET.register_namespace("qemu", QEMU_NS)   # trusted extras keep libvirt's usual prefix

#: device elements that hand host hardware or host files to the guest, whatever their type
_HOST_DEVICES = ("hostdev", "redirdev", "filesystem", "smartcard", "shmem")
#: character device types that open a host path (a file, a device, a pipe, a socket)
_HOST_CHARDEV_TYPES = ("file", "dev", "pipe", "unix")
_CHARDEVS = ("serial", "parallel", "console", "channel")


def _describe(el: ET.Element) -> str:
    attrs = " ".join(f"{k}='{v}'" for k, v in el.attrib.items())
    src = el.find("source")
    where = ""
    if src is not None:
        where = " " + " ".join(f"{k}='{v}'" for k, v in src.attrib.items())
        addr = src.find("address")
        if addr is not None:
            where += " " + " ".join(f"{k}='{v}'" for k, v in addr.attrib.items())
    tag = el.tag.replace("{" + QEMU_NS + "}", "qemu:")
    return f"<{tag}{' ' + attrs if attrs else ''}>{where}"


def strip_host_access(root: ET.Element, keep: set[str]) -> list[str]:
    """Remove from ``root`` (a ``<domain>``) what reaches into the host; returns what.

    Left out: passthrough devices (``hostdev``, USB ``redirdev``, ``filesystem``,
    ``smartcard``, ``shmem``), interfaces of type ``hostdev`` and any interface
    ``<script>``, character devices on a host file, device, pipe or socket (a guest
    agent channel whose socket libvirt places itself is kept), the host source of
    a removable disk not restored (the drive stays, empty), and every element in
    libvirt's QEMU namespace (``qemu:commandline`` and friends).  ``keep``: targets
    of the restored disks, whose sources are ours.
    """
    out: list[str] = []

    def drop(parent: ET.Element, el: ET.Element) -> None:
        out.append(_describe(el))
        parent.remove(el)

    for el in list(root):
        if el.tag.startswith("{" + QEMU_NS + "}"):
            drop(root, el)
    devices = root.find("devices")
    if devices is None:
        return out
    for el in list(devices):
        if el.tag in _HOST_DEVICES:
            drop(devices, el)
        elif el.tag == "interface":
            if el.get("type") == "hostdev":
                drop(devices, el)
                continue
            for script in el.findall("script"):
                drop(el, script)
        elif el.tag in _CHARDEVS and el.get("type") in _HOST_CHARDEV_TYPES:
            src = el.find("source")
            placed_by_libvirt = el.get("type") == "unix" and (
                src is None or (src.get("mode") == "bind" and "path" not in src.attrib))
            if not placed_by_libvirt:
                drop(devices, el)
        elif el.tag == "disk":
            target_el = el.find("target")
            if target_el is not None and target_el.get("dev") in keep:
                continue
            dev = target_el.get("dev") if target_el is not None else "?"
            for src in el.findall("source"):
                where = " ".join(f"{k}='{v}'" for k, v in src.attrib.items())
                out.append(f"the host source of disk {dev} ({where}; the drive stays, empty)")
                el.remove(src)
            for tag in ("backingStore", "auth", "encryption"):
                for sub in el.findall(tag):
                    el.remove(sub)
    return out


#: Names we accept for a domain we define (libvirt allows more; these are safe in paths).
DOMAIN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")

DiskRewrite = Callable[[ET.Element], None]


def new_domain_xml(xml: str, name: str, disks: Mapping[str, DiskRewrite], *,
                   network: bool = True, what: str = "<saved domain XML>",
                   trust: bool = False) -> tuple[str, list[str]]:
    """A point's saved domain XML made into a *new* domain that can run beside the original.

    Returns ``(xml, dropped targets)``.  The new domain gets ``name`` and no UUID,
    MAC addresses, NVRAM path, agent socket paths or fixed display ports (libvirt
    makes its own, so nothing clashes with the original).  Runtime-only details of
    a live XML (domain id, automatic aliases, dynamic labels) are removed.
    ``disks[target]`` rewrites that disk's element in place (its new source); a
    disk not listed is dropped, except removable and read-only ones (cdrom,
    floppy): sharing a writable disk with the original would corrupt it.
    ``network`` False removes the interfaces.  Unless ``trust``, everything that
    reaches into the host is left out as well (:func:`strip_host_access`).
    """
    if not name or not DOMAIN_NAME_RE.fullmatch(name):
        raise UsageError(f"not a usable domain name: {name!r}")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as err:
        raise CorruptFileError(what, f"not well-formed: {err}") from None
    if root.tag != "domain":
        raise CorruptFileError(what, f"root element is <{root.tag}>, not <domain>")
    root.attrib.pop("id", None)
    name_el = root.find("name")
    if name_el is None:
        name_el = ET.SubElement(root, "name")
    name_el.text = name
    for el in root.findall("uuid"):
        root.remove(el)
    for sec in root.findall("seclabel"):
        if sec.get("type") == "dynamic":   # its labels belong to the original's process
            root.remove(sec)
    os_el = root.find("os")
    if os_el is not None:
        for el in os_el.findall("nvram"):
            os_el.remove(el)
    for parent in root.iter():
        for alias in parent.findall("alias"):
            if not (alias.get("name") or "").startswith("ua-"):
                parent.remove(alias)
    devices = root.find("devices")
    if devices is None:
        raise CorruptFileError(what, "has no <devices>")
    dropped: list[str] = []
    seen = set()
    for disk_el in devices.findall("disk"):
        target_el = disk_el.find("target")
        target = target_el.get("dev") if target_el is not None else None
        if target is not None and target in disks:
            disks[target](disk_el)
            seen.add(target)
        elif disk_el.get("device") in ("cdrom", "floppy") or disk_el.find("readonly") is not None:
            continue
        else:
            devices.remove(disk_el)
            dropped.append(target or "?")
    missing = sorted(set(disks) - seen)
    if missing:
        raise CorruptFileError(what, f"has no disk {', '.join(missing)} of the point")
    for iface in devices.findall("interface"):
        if not network:
            devices.remove(iface)
            continue
        for tag in ("mac", "target"):
            for el in iface.findall(tag):
                iface.remove(el)
    for chan in devices.findall("channel"):
        src = chan.find("source")
        if chan.get("type") == "unix" and src is not None and src.get("mode") == "bind":
            src.attrib.pop("path", None)
    for gfx in devices.findall("graphics"):
        if gfx.get("port") not in (None, "-1") and gfx.get("autoport") != "yes":
            gfx.set("autoport", "yes")
            for attr in ("port", "tlsPort", "websocket"):
                gfx.attrib.pop(attr, None)
    if not trust:
        for item in strip_host_access(root, keep=set(disks)):
            log.warning("domain %s: left out %s from the pool's saved XML (it reaches into "
                        "the host; --trust-pool-xml keeps it)", name, item)
    return ET.tostring(root, encoding="unicode"), dropped


def set_disk_source(disk_el: ET.Element, path: str, fmt: str,
                    backing: ET.Element | None = None) -> None:
    """Point a ``<disk>`` element at a file image, with an optional explicit backing store."""
    disk_el.set("type", "file")
    if disk_el.get("device") == "lun":
        disk_el.set("device", "disk")
    for tag in ("source", "backingStore", "mirror", "encryption", "auth", "shareable",
                "transient"):
        for el in disk_el.findall(tag):
            disk_el.remove(el)
    driver = disk_el.find("driver")
    if driver is None:
        driver = ET.Element("driver")
        disk_el.insert(0, driver)
    driver.set("name", "qemu")
    driver.set("type", fmt)
    index = list(disk_el).index(driver) + 1
    disk_el.insert(index, ET.Element("source", {"file": path}))
    if backing is not None:
        disk_el.insert(index + 1, backing)
