"""Step 1 of a backup: the external disk-only snapshot that freezes the images.

Why libvirt's atomic, metadata-free, disk-only snapshot: every selected disk
switches to a new overlay at one instant (so the frozen images are consistent
with each other), libvirt keeps no snapshot object we would have to delete, and
the guest never pauses longer than the switch.  The overlay paths are checked
on the hypervisor's :class:`~.host.Host` -- this machine or one over ssh --
because that is where QEMU creates them.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Union

import libvirt

from ..errors import (
    HypervisorError,
    NotFoundError,
    RepairNeededError,
    UnsupportedDiskError,
    UsageError,
)
from .domain import Domain
from .domainxml import (
    OVERLAY_MARKER,
    Disk,
    ImageRef,
    is_our_overlay,
    parse_disks,
    same_image,
    snapshot_xml,
    unsupported_reason,
)
from .host import LOCAL, Host
from .libvirterrors import message, translated

__all__ = ["OverlayFor", "SnapshotResult", "take_snapshot"]

log = logging.getLogger(__name__)

#: libvirt error codes meaning "no usable guest agent": 74 when no agent channel
#: is configured, 86 when the channel exists but no agent answers, 97 when it
#: answers out of sync.  Only these turn quiesce=None into a crash-consistent snapshot.
_NO_AGENT_CODES = frozenset(
    {
        libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED,
        libvirt.VIR_ERR_AGENT_UNRESPONSIVE,
        libvirt.VIR_ERR_AGENT_UNSYNCED,
    }
)

_SNAPSHOT_FLAGS = (
    libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
    | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
    | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
)


@dataclass(frozen=True)
class SnapshotResult:
    """What an external snapshot left behind, per disk target.

    ``frozen`` is read back from the live XML after the snapshot (never
    assumed): it is the image to export, now opened read-only by QEMU.
    """

    quiesced: bool
    overlays: dict[str, str]
    frozen: dict[str, ImageRef]
    seconds: float


OverlayFor = Union[Callable[[Disk], str], Mapping[str, str]]


def _overlays(dom: Domain, disks: Sequence[Disk], overlay_for: OverlayFor, host: Host,
              live: dict[str, Disk]) -> dict[str, str]:
    """The overlay path of each disk, refused unless ours, absolute and not there yet."""
    name = dom.name
    overlays: dict[str, str] = {}
    for disk in disks:
        current = live.get(disk.target)
        if current is None:
            raise NotFoundError(f"disk '{disk.target}' not found in domain '{name}'")
        reason = unsupported_reason(current)
        if reason is not None:
            raise UnsupportedDiskError(f"disk '{disk.target}' cannot be backed up: {reason}")
        path = overlay_for(current) if callable(overlay_for) else overlay_for[disk.target]
        if not os.path.isabs(path) or not is_our_overlay(path):
            raise UsageError(
                f"overlay {path!r} must be an absolute path whose name carries "
                f"'{OVERLAY_MARKER}<id>.qcow2'"
            )
        if host.stat(path, follow=False) is not None:
            raise RepairNeededError(
                f"overlay {path} already exists (left by an interrupted backup?): run repair"
            )
        overlays[disk.target] = path
    if len(set(overlays.values())) != len(overlays):
        raise UsageError(f"two disks of domain '{name}' would share one overlay file")
    return overlays


def take_snapshot(dom: Domain, disks: Sequence[Disk], overlay_for: OverlayFor,
                  quiesce: bool | None = None, *, host: Host = LOCAL) -> SnapshotResult:
    """External disk-only snapshot of ``disks``; the other disks are left alone.

    ``quiesce``: True demands a guest-agent freeze (failing without one),
    None tries it and falls back to crash-consistent when there is no
    usable agent, False does not ask.  ``host`` is where the domain's images are.
    """
    name = dom.name
    if not disks:
        raise UsageError(f"no disk of domain '{name}' to snapshot")
    if not dom.is_active():
        raise HypervisorError(f"domain '{name}' is not running: read its images directly")
    live = {d.target: d for d in parse_disks(dom.xml())}
    overlays = _overlays(dom, disks, overlay_for, host, live)

    xml = snapshot_xml(overlays, list(live))
    started = time.monotonic()
    quiesced = quiesce is not False
    flags = _SNAPSHOT_FLAGS | (libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE if quiesced else 0)
    what = f"snapshot of domain '{name}'"
    try:
        dom.virdomain.snapshotCreateXML(xml, flags)
    except libvirt.libvirtError as err:
        if quiesce is None and err.get_error_code() in _NO_AGENT_CODES:
            log.warning(
                "domain '%s': no usable guest agent (%s); the snapshot is crash-consistent",
                name,
                message(err),
            )
            quiesced = False
            with translated(what):
                dom.virdomain.snapshotCreateXML(xml, _SNAPSHOT_FLAGS)
        else:
            kind = "quiesced " if quiesced else ""
            raise HypervisorError(f"{kind}{what}: {message(err)}") from err
    seconds = time.monotonic() - started

    frozen: dict[str, ImageRef] = {}
    after = {d.target: d for d in parse_disks(dom.xml())}
    for target, path in overlays.items():
        now = after.get(target)
        if now is None or not same_image(now.source, path) or not now.backing_chain:
            raise HypervisorError(
                f"after the snapshot disk '{target}' of domain '{name}' does not run on "
                f"overlay {path} over a frozen image: run repair"
            )
        frozen[target] = now.backing_chain[0]
    log.info(
        "domain '%s': snapshot of %s in %.3f s (%s)",
        name,
        ", ".join(overlays),
        seconds,
        "quiesced" if quiesced else "crash-consistent",
    )
    return SnapshotResult(quiesced=quiesced, overlays=overlays, frozen=frozen, seconds=seconds)
