"""The disks of a libvirt domain, read from its XML, and the overlays we put on them.

Kept free of the libvirt module so that every rule about which disk can be
backed up, how an overlay is named and what snapshot XML we send can be unit
tested on hand-written XML.  The live hypervisor half is ``hypervisor.py``.

Overlay names carry :data:`OVERLAY_MARKER`: the tool only ever commits or
deletes an image whose name carries it, so a snapshot taken by someone else
is never merged or removed by us.
"""
from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from vmsnapbackup.errors import (
    HypervisorError,
    NotFoundError,
    UnsupportedDiskError,
    UsageError,
)

__all__ = [
    "BACKUP_FORMATS",
    "OVERLAY_MARKER",
    "Disk",
    "ImageRef",
    "SkippedDisk",
    "backup_disks",
    "checkpoint_xml",
    "find_disk",
    "is_our_overlay",
    "overlay_id",
    "overlay_path",
    "parse_disks",
    "same_image",
    "snapshot_xml",
    "unsupported_reason",
]

#: Every overlay we create has this in its file name, followed by the snapshot id and ``.qcow2``.
OVERLAY_MARKER = ".vmsnapbackup-"

#: Image formats whose frozen image the storage daemon can export as is.
BACKUP_FORMATS = ("qcow2", "raw")

_ID_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_OVERLAY_RE = re.compile(r"^.+" + re.escape(OVERLAY_MARKER) + r"([A-Za-z0-9_-]+)\.qcow2$")


class ImageRef(NamedTuple):
    """One image of a disk's chain: where it is and how to read it."""

    path: str
    format: str | None


@dataclass(frozen=True)
class Disk:
    """One ``<disk>`` of a domain, as the XML describes it.

    ``source`` is a path for file/block/dir disks, ``protocol:name`` for
    network disks, ``pool/volume`` for volume disks, None for an empty drive.
    ``backing_chain`` lists the images below ``source``, nearest first; it is
    only known from the live XML of a running domain (the inactive XML of a
    shut-off domain usually has no ``<backingStore>``).
    """

    target: str
    device: str
    type: str
    source: str | None
    format: str | None
    readonly: bool = False
    shareable: bool = False
    transient: bool = False
    alias: str | None = None
    bus: str | None = None
    protocol: str | None = None
    backing_chain: tuple[ImageRef, ...] = ()

    @property
    def top(self) -> ImageRef:
        """The image the guest writes to."""
        return ImageRef(self.source or "", self.format)


@dataclass(frozen=True)
class SkippedDisk:
    """A disk left out of the backup, and why (shown to the user)."""

    disk: Disk
    reason: str


def _parse(xml: str) -> ET.Element:
    try:
        return ET.fromstring(xml)
    except ET.ParseError as err:
        raise HypervisorError(f"domain XML is not well-formed: {err}") from None


def _source_of(kind: str, source: ET.Element | None) -> tuple[str | None, str | None]:
    """(source string, network protocol) of a ``<source>`` element of a disk of ``kind``."""
    if source is None:
        return None, None
    if kind == "file":
        return source.get("file"), None
    if kind == "block":
        return source.get("dev"), None
    if kind == "dir":
        return source.get("dir"), None
    if kind == "volume":
        pool, volume = source.get("pool"), source.get("volume")
        return (f"{pool}/{volume}" if pool or volume else None), None
    if kind == "network":
        protocol = source.get("protocol")
        name = source.get("name")
        if name is None:
            host = source.find("host")
            if host is not None:
                name = host.get("name") or host.get("socket")
        return (f"{protocol}:{name}" if protocol else name), protocol
    return None, None


def _backing_chain(disk_el: ET.Element) -> tuple[ImageRef, ...]:
    chain: list[ImageRef] = []
    node = disk_el.find("backingStore")
    # An empty <backingStore/> ends the chain in the live XML.
    while node is not None and node.get("type"):
        fmt_el = node.find("format")
        path, _ = _source_of(node.get("type", ""), node.find("source"))
        chain.append(ImageRef(path or "", fmt_el.get("type") if fmt_el is not None else None))
        node = node.find("backingStore")
    return tuple(chain)


def _parse_disk(disk_el: ET.Element) -> Disk | None:
    target_el = disk_el.find("target")
    if target_el is None or not target_el.get("dev"):
        return None
    kind = disk_el.get("type", "file")
    driver = disk_el.find("driver")
    alias = disk_el.find("alias")
    source, protocol = _source_of(kind, disk_el.find("source"))
    return Disk(
        target=target_el.get("dev", ""),
        device=disk_el.get("device", "disk"),
        type=kind,
        source=source,
        format=driver.get("type") if driver is not None else None,
        readonly=disk_el.find("readonly") is not None,
        shareable=disk_el.find("shareable") is not None,
        transient=disk_el.find("transient") is not None,
        alias=alias.get("name") if alias is not None else None,
        bus=target_el.get("bus"),
        protocol=protocol,
        backing_chain=_backing_chain(disk_el),
    )


def parse_disks(xml: str) -> list[Disk]:
    """Every disk of the domain XML, in XML order."""
    root = _parse(xml)
    disks = []
    for disk_el in root.findall("./devices/disk"):
        disk = _parse_disk(disk_el)
        if disk is not None:
            disks.append(disk)
    return disks


def find_disk(xml: str, target: str) -> Disk:
    """The disk with target ``target``; NotFoundError names the targets there are."""
    disks = parse_disks(xml)
    for disk in disks:
        if disk.target == target:
            return disk
    known = ", ".join(d.target for d in disks) or "none"
    raise NotFoundError(f"disk '{target}' not found (domain disks: {known})")


def unsupported_reason(disk: Disk) -> str | None:
    """Why ``disk`` cannot be backed up by an external snapshot, or None if it can."""
    if disk.device != "disk":
        return f"{disk.device} device"
    if disk.type not in ("file", "block"):
        what = f"{disk.type} disk"
        if disk.protocol:
            what += f" ({disk.protocol})"
        return what
    if not disk.source:
        return "no source image"
    if disk.shareable:
        return "shareable disk (another domain may write it)"
    if disk.readonly:
        return "read-only disk"
    if disk.transient:
        return "transient disk"
    if disk.format not in BACKUP_FORMATS:
        return f"image format {disk.format or 'unknown'} (only {'/'.join(BACKUP_FORMATS)})"
    return None


def backup_disks(
    xml: str, select: Iterable[str] | None = None
) -> tuple[list[Disk], list[SkippedDisk]]:
    """Split the domain's disks into (to back up, skipped with a reason).

    Without ``select`` every disk that can be backed up is, and the rest are
    reported.  With ``select`` the caller asked for those targets by name, so a
    missing one is NotFoundError and one we cannot back up is
    UnsupportedDiskError rather than a silent skip; unselected disks are
    reported as "not selected".
    """
    disks = parse_disks(xml)
    chosen: list[Disk] = []
    skipped: list[SkippedDisk] = []
    if select is None:
        for disk in disks:
            reason = unsupported_reason(disk)
            if reason is None:
                chosen.append(disk)
            else:
                skipped.append(SkippedDisk(disk, reason))
        return chosen, skipped

    wanted = list(dict.fromkeys(select))
    by_target = {d.target: d for d in disks}
    missing = [t for t in wanted if t not in by_target]
    if missing:
        known = ", ".join(d.target for d in disks) or "none"
        names = ", ".join(map(repr, missing))
        raise NotFoundError(f"disk {names} not found (domain disks: {known})")
    for target in wanted:
        reason = unsupported_reason(by_target[target])
        if reason is not None:
            raise UnsupportedDiskError(f"disk '{target}' cannot be backed up: {reason}")
    for disk in disks:
        if disk.target in wanted:
            chosen.append(disk)
        else:
            skipped.append(SkippedDisk(disk, "not selected"))
    return chosen, skipped


def overlay_path(disk: Disk, snapshot_id: str, overlay_dir: str | None = None) -> str:
    """Where the overlay of ``disk`` for snapshot ``snapshot_id`` goes.

    Beside the image it is ``<image stem>.vmsnapbackup-<id>.qcow2``; in a shared
    ``overlay_dir`` the target is added (``<stem>.<target>.vmsnapbackup-<id>.qcow2``)
    because two disks may have images of the same name in different
    directories.  A block device has no directory of its own to write into, so
    it needs ``overlay_dir``.  ``snapshot_id`` must be unique per backup (and,
    in a directory shared by several domains, per domain).
    """
    if not _ID_RE.match(snapshot_id):
        raise UsageError(f"snapshot id {snapshot_id!r} must be letters, digits, '-' or '_'")
    if not disk.source:
        raise UsageError(f"disk '{disk.target}' has no source image")
    stem = os.path.splitext(os.path.basename(disk.source))[0] or disk.target
    if overlay_dir is None:
        if disk.type != "file":
            raise UsageError(
                f"disk '{disk.target}' is a {disk.type} device: give an overlay directory"
            )
        name = f"{stem}{OVERLAY_MARKER}{snapshot_id}.qcow2"
        return os.path.join(os.path.dirname(disk.source), name)
    return os.path.join(
        os.path.abspath(overlay_dir), f"{stem}.{disk.target}{OVERLAY_MARKER}{snapshot_id}.qcow2"
    )


def is_our_overlay(path: str | None) -> bool:
    """True if the file name carries our marker (so we may commit or delete it)."""
    return bool(path) and _OVERLAY_RE.match(os.path.basename(path or "")) is not None


def same_image(a: str | None, b: str | None) -> bool:
    """Both paths given and naming the same file as libvirt spells it (normalised, not resolved).

    Symlinks are not followed on purpose: libvirt compares the names it was given.
    """
    return bool(a) and bool(b) and os.path.normpath(a or "") == os.path.normpath(b or "")


def overlay_id(path: str) -> str | None:
    """The snapshot id in one of our overlay names, None for any other name."""
    match = _OVERLAY_RE.match(os.path.basename(path))
    return match.group(1) if match else None


def snapshot_xml(overlays: Mapping[str, str], all_targets: Sequence[str]) -> str:
    """The ``<domainsnapshot>`` for an external disk-only snapshot of ``overlays``' disks.

    Every other disk is listed with ``snapshot='no'``: left out, libvirt would
    apply its default (external) to it too, and fail on a cdrom or a disk we
    chose not to back up.
    """
    unknown = [t for t in overlays if t not in all_targets]
    if unknown:
        raise NotFoundError(f"disk {', '.join(map(repr, unknown))} not found in the domain")
    root = ET.Element("domainsnapshot")
    disks_el = ET.SubElement(root, "disks")
    for target in all_targets:
        if target in overlays:
            el = ET.SubElement(disks_el, "disk", name=target, snapshot="external", type="file")
            ET.SubElement(el, "driver", type="qcow2")
            ET.SubElement(el, "source", file=overlays[target])
        else:
            ET.SubElement(disks_el, "disk", name=target, snapshot="no")
    return ET.tostring(root, encoding="unicode")


def checkpoint_xml(name: str, bitmap_targets: Sequence[str], all_targets: Sequence[str],
                   description: str = "") -> str:
    """The ``<domaincheckpoint>`` that gives ``bitmap_targets`` a persistent dirty bitmap.

    Every other disk is listed with ``checkpoint='no'``, for the reason
    :func:`snapshot_xml` lists them: libvirt's default would try a bitmap on
    a raw disk or a cdrom and fail the whole checkpoint.
    """
    unknown = [t for t in bitmap_targets if t not in all_targets]
    if unknown:
        raise NotFoundError(f"disk {', '.join(map(repr, unknown))} not found in the domain")
    root = ET.Element("domaincheckpoint")
    ET.SubElement(root, "name").text = name
    if description:
        ET.SubElement(root, "description").text = description
    disks_el = ET.SubElement(root, "disks")
    for target in all_targets:
        if target in bitmap_targets:
            ET.SubElement(disks_el, "disk", name=target, checkpoint="bitmap", bitmap=name)
        else:
            ET.SubElement(disks_el, "disk", name=target, checkpoint="no")
    return ET.tostring(root, encoding="unicode")
