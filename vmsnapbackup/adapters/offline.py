"""What ``repair`` needs from libvirt and qemu-img beyond the backup's adapter.

A backup that died leaves a domain in states the backup itself never has to
handle: shut off while its definition names our overlay (the guest's writes
since the snapshot live only there), a commit job left half-way, an overlay
file nobody uses.  This module reads the host-wide picture (every domain's
images, an overlay's backing file) and performs the offline merge; the
decisions stay in ``workflows/repair.py``.

The rule of :mod:`hypervisor` holds here too: we only merge or delete a file
whose name carries our overlay marker, and only after checking, right before
acting, that it is what we think it is (top of the disk, or used by nobody).
"""
from __future__ import annotations

import logging
import os
import stat
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from io import StringIO

from vmsnapbackup.adapters.domain import Domain
from vmsnapbackup.adapters.domainxml import Disk, ImageRef, find_disk, is_our_overlay
from vmsnapbackup.adapters.hypervisor import Hypervisor
from vmsnapbackup.adapters.libvirterrors import translated
from vmsnapbackup.adapters.qemuimg import QemuImg
from vmsnapbackup.core.atomic import fsync_path
from vmsnapbackup.errors import HypervisorError, RepairNeededError, UsageError

__all__ = [
    "OfflineCommitResult",
    "config_disks",
    "delete_unused_overlay",
    "disk_back_on_image",
    "image_users",
    "offline_commit",
    "overlay_backing",
]

log = logging.getLogger(__name__)


def _norm(path: str) -> str:
    return os.path.normpath(path)


@dataclass(frozen=True)
class OfflineCommitResult:
    """A shut-off domain's disk is back on ``image``; the overlay is merged and gone."""

    target: str
    overlay: str
    image: ImageRef
    seconds: float


# -- the host-wide picture --------------------------------------------------------------

def config_disks(hv: Hypervisor, dom: Domain) -> list[Disk]:
    """The disks of the persistent definition ([] for a transient domain).

    A running domain's definition can still name an overlay after its live XML
    stopped doing so (or the other way round); repair looks at both.
    """
    return hv.disks(dom, inactive=True) if dom.is_persistent() else []


def image_users(hv: Hypervisor) -> dict[str, tuple[str, ...]]:
    """Every image path any domain uses -> the names of those domains.

    Live XML (top and backing chain) and persistent definitions both count: a
    shut-off domain whose definition names an overlay needs it as much as a
    running one.  A domain that vanishes while we look is skipped.
    """
    users: dict[str, list[str]] = {}
    for dom in hv.list_domains():
        try:
            name = dom.name
            disks = hv.disks(dom) + config_disks(hv, dom)
        except HypervisorError as err:
            log.debug("skipping a domain that went away while listing images: %s", err)
            continue
        for disk in disks:
            for image in (disk.top, *disk.backing_chain):
                if image.path:
                    names = users.setdefault(_norm(image.path), [])
                    if name not in names:
                        names.append(name)
    return {path: tuple(names) for path, names in users.items()}


def overlay_backing(path: str) -> ImageRef | None:
    """The backing image an overlay file records (absolute path and format), or None.

    Without ``-U``: if a running QEMU holds the file for writing, this fails
    with QEMU's lock message, which is exactly what must stop an offline merge.
    """
    info = QemuImg().info(path)
    if info.format != "qcow2":
        raise HypervisorError(f"{path} is a {info.format} image, not a qcow2 overlay")
    if not info.backing_path:
        return None
    return ImageRef(_norm(info.backing_path), info.backing_format)


# -- the offline merge ------------------------------------------------------------------

def _register_namespaces(xml: str) -> None:
    """Keep the prefixes of metadata and ``qemu:`` elements when ElementTree writes the
    XML back (it would otherwise invent ``ns0``), so a redefined domain reads the same."""
    for _event, (prefix, uri) in ET.iterparse(StringIO(xml), events=("start-ns",)):
        if not prefix:
            continue  # a default namespace would capture every unqualified element
        try:
            ET.register_namespace(prefix, uri)
        except ValueError:
            log.debug("namespace prefix %r cannot be kept; ElementTree picks one", prefix)


def disk_back_on_image(xml: str, target: str, overlay: str, image: ImageRef,
                       block_device: bool = False) -> str:
    """The domain XML with disk ``target`` on ``image`` again instead of ``overlay``.

    Only that disk's ``type``, ``<source>`` attribute, driver format and
    ``<backingStore>`` change; everything else (cache mode, address, seclabels
    under ``<source>``, metadata) is kept.  Refuses (RepairNeededError) unless the
    disk's source is exactly ``overlay`` and carries our marker.
    """
    if not is_our_overlay(overlay):
        raise UsageError(f"{overlay} is not a vmsnapbackup overlay: refusing to touch it")
    if not image.format:
        raise UsageError(f"the format of {image.path} is unknown")
    _register_namespaces(xml)
    root = ET.fromstring(xml)
    for disk_el in root.findall("./devices/disk"):
        target_el = disk_el.find("target")
        if target_el is None or target_el.get("dev") != target:
            continue
        source_el = disk_el.find("source")
        current = None
        if source_el is not None:
            current = source_el.get("file") or source_el.get("dev")
        if disk_el.get("type", "file") != "file" or current is None \
                or _norm(current) != _norm(overlay):
            raise RepairNeededError(
                f"disk '{target}' is defined on {current}, not on our overlay {overlay}: "
                "not changing its definition")
        assert source_el is not None
        for attr in ("file", "dev", "index"):
            source_el.attrib.pop(attr, None)
        if block_device:
            disk_el.set("type", "block")
            source_el.set("dev", image.path)
        else:
            disk_el.set("type", "file")
            source_el.set("file", image.path)
        driver = disk_el.find("driver")
        if driver is None:
            driver = ET.Element("driver", name="qemu")
            disk_el.insert(0, driver)
        driver.set("type", image.format)
        for backing in disk_el.findall("backingStore"):
            disk_el.remove(backing)
        return ET.tostring(root, encoding="unicode")
    raise RepairNeededError(f"disk '{target}' is not in the domain's definition")


def offline_commit(hv: Hypervisor, dom: Domain, target: str, overlay: str,
                   image: ImageRef) -> OfflineCommitResult:
    """Merge our overlay of a shut-off domain into ``image`` and define the disk on it.

    ``image`` is the overlay's backing image as the caller checked it (see
    :func:`overlay_backing`); it is checked again here.  Order, so that a crash at
    any point leaves something a second run finishes: merge (the overlay keeps its
    data), fsync, redefine, then delete the overlay.  A domain started meanwhile
    makes us stop before the redefine.
    """
    name = dom.name
    started = time.monotonic()
    if not is_our_overlay(overlay):
        raise UsageError(f"{overlay} is not a vmsnapbackup overlay: refusing to merge it")
    if hv.is_active(dom):
        raise RepairNeededError(f"domain '{name}' is running: merge its overlay with a live "
                                "commit, not offline")
    disk = find_disk(hv.domain_xml(dom, inactive=True), target)
    if disk.source is None or _norm(disk.source) != _norm(overlay):
        raise RepairNeededError(f"disk '{target}' of domain '{name}' is defined on "
                                f"{disk.source}, not on our overlay {overlay}")
    recorded = overlay_backing(overlay)
    if recorded is None or _norm(recorded.path) != _norm(image.path) \
            or recorded.format != image.format:
        raise RepairNeededError(f"overlay {overlay} is backed by {recorded}, not by {image}: "
                                "not merging it")
    try:
        st = os.stat(image.path)
    except FileNotFoundError:
        raise RepairNeededError(f"backing image {image.path} of overlay {overlay} is missing"
                                ) from None
    # -b names the image we checked, so qemu-img cannot pick another one; it also
    # implies -d (the overlay is not emptied: we delete it after the redefine).
    QemuImg().commit(overlay, image.path)
    fsync_path(image.path)
    log.info("domain '%s': merged overlay %s into %s", name, overlay, image.path)

    xml = dom.xml(inactive=True, secure=True)
    new_xml = disk_back_on_image(xml, target, overlay, image,
                                 block_device=stat.S_ISBLK(st.st_mode))
    if hv.is_active(dom):
        raise RepairNeededError(
            f"domain '{name}' was started during the repair; its overlay {overlay} is merged "
            "but still in use: run repair again")
    with translated(f"redefining domain '{name}' with disk '{target}' on {image.path}"):
        hv.conn.defineXML(new_xml)
    now = find_disk(hv.domain_xml(dom, inactive=True), target)
    if now.source is None or _norm(now.source) != _norm(image.path):
        raise HypervisorError(f"after the redefine disk '{target}' of domain '{name}' is "
                              f"defined on {now.source}, not on {image.path}")
    delete_unused_overlay(hv, overlay)
    seconds = time.monotonic() - started
    log.info("domain '%s': disk '%s' is defined on %s again (%.3f s)", name, target,
             image.path, seconds)
    return OfflineCommitResult(target=target, overlay=overlay, image=image, seconds=seconds)


def delete_unused_overlay(hv: Hypervisor, path: str) -> bool:
    """Delete one of our overlays that no domain uses; True if a file was removed.

    The host-wide check is made right here, not trusted from an earlier plan:
    deleting an overlay a domain runs on would lose the guest's newest writes.
    """
    if not is_our_overlay(path):
        raise UsageError(f"{path} is not a vmsnapbackup overlay: refusing to delete it")
    users = image_users(hv).get(_norm(path))
    if users:
        raise RepairNeededError(f"overlay {path} is in use by domain {', '.join(users)}: "
                                "not deleting it")
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    except OSError as err:
        raise HypervisorError(f"cannot delete overlay {path}: {err.strerror}") from err
    log.info("deleted unused overlay %s", path)
    return True
