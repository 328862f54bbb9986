"""Checkpoints: the libvirt side of a generation's dirty bitmap, and which QEMU run holds it.

A checkpoint makes QEMU keep a persistent bitmap of every write to the disks
it names; libvirt carries that bitmap through our snapshot/commit cycle.
Whether to make, trust or delete one is the workflow's policy
(``workflows/bitmappolicy.py``); these are the calls it needs.
"""
from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections.abc import Sequence

import libvirt

from vmsnapbackup.adapters.domain import Domain
from vmsnapbackup.adapters.domainxml import checkpoint_xml, parse_disks
from vmsnapbackup.adapters.host import LOCAL, Host
from vmsnapbackup.adapters.libvirterrors import message, translated
from vmsnapbackup.errors import HypervisorError

__all__ = [
    "checkpoint_names",
    "checkpoints_wanted",
    "create_checkpoint",
    "delete_checkpoint",
    "qemu_run",
    "set_checkpoints_wanted",
]

log = logging.getLogger(__name__)

#: Our element in the domain's ``<metadata>``: the per-domain settings that belong to
#: the domain rather than to one pool (several pools may back up the same domain).
METADATA_URI = "urn:vmsnapbackup:domain:1"
METADATA_KEY = "vmsnapbackup"


def qemu_run(dom: Domain, host: Host = LOCAL) -> str | None:
    """Which QEMU process runs the domain: ``<host boot id>:<domain id>`` (None: shut off).

    libvirt gives a domain a new id each time it starts, and ids restart
    after a host reboot, hence the boot id.  A dirty bitmap can only miss
    writes made while no QEMU had the image open, that is between two runs.
    """
    try:
        raw = host.read_file("/proc/sys/kernel/random/boot_id", limit=64)
    except OSError:
        return None
    if raw is None:
        return None
    boot = raw.decode("ascii", "replace").strip()
    ident = dom.run_id()
    return f"{boot}:{ident}" if ident > 0 else None


def checkpoint_names(dom: Domain) -> list[str]:
    """Names of the domain's libvirt checkpoints (ours and anybody else's)."""
    with translated(f"list of checkpoints of domain '{dom.name}'"):
        return sorted(str(cp.getName()) for cp in dom.virdomain.listAllCheckpoints(0))


def create_checkpoint(dom: Domain, name: str, bitmap_targets: Sequence[str],
                      description: str = "") -> None:
    """A checkpoint with a bitmap named ``name`` on ``bitmap_targets`` (running domain).

    From here on QEMU marks every write to those disks in the bitmap, and
    libvirt carries the bitmap through our snapshot/commit cycle (it
    re-creates it in the overlay and merges it back on commit).
    """
    what = f"checkpoint {name} of domain '{dom.name}'"
    xml = checkpoint_xml(name, bitmap_targets, [d.target for d in parse_disks(dom.xml())],
                         description)
    with translated(what):
        dom.virdomain.checkpointCreateXML(xml, 0)
    log.info("domain '%s': checkpoint %s on %s", dom.name, name,
             ", ".join(bitmap_targets))


def delete_checkpoint(dom: Domain, name: str) -> bool:
    """Delete checkpoint ``name`` with its bitmaps; False when there is none.

    libvirt 9 deletes bitmaps only from a running domain; of a shut-off
    one only the checkpoint's metadata goes, so nobody trusts the bitmap
    any more, and the bitmap itself stays in the image (harmless, and
    removable with ``qemu-img bitmap --remove``).
    """
    what = f"deleting checkpoint {name} of domain '{dom.name}'"
    try:
        cp = dom.virdomain.checkpointLookupByName(name, 0)
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
            return False
        raise HypervisorError(f"{what}: {message(err)}") from err
    flags = 0 if dom.is_active() else libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY
    with translated(what):
        cp.delete(flags)
    log.info("domain '%s': deleted checkpoint %s%s", dom.name, name,
             "" if not flags else " (metadata only: the domain is shut off)")
    return True


def _metadata_flags(dom: Domain, write: bool) -> int:
    """The persistent definition where there is one (and, on write, the running one too)."""
    persistent = dom.is_persistent()
    flags: int = (libvirt.VIR_DOMAIN_AFFECT_CONFIG if persistent
                  else libvirt.VIR_DOMAIN_AFFECT_LIVE)
    if write and persistent and dom.is_active():
        flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
    return flags


def checkpoints_wanted(dom: Domain) -> bool:
    """The domain's setting: may vmsnapbackup leave libvirt checkpoints on it? (default yes)

    Off for a domain another libvirt-backup-API user (virtnbdbackup) also backs up:
    such tools refuse to run beside a checkpoint they did not make.
    """
    try:
        text = dom.virdomain.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_URI,
                                      _metadata_flags(dom, write=False))
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
            return True
        raise HypervisorError(f"settings of domain '{dom.name}': {message(err)}") from err
    try:
        value = ET.fromstring(text).get("checkpoints", "yes")
    except ET.ParseError:
        log.warning("domain '%s': unreadable vmsnapbackup metadata %r: checkpoints stay on",
                    dom.name, text)
        return True
    return value != "no"


def set_checkpoints_wanted(dom: Domain, wanted: bool) -> None:
    """Record the setting in the domain's own definition (``virsh dumpxml`` shows it)."""
    xml = f"<settings checkpoints='{'yes' if wanted else 'no'}'/>"
    with translated(f"settings of domain '{dom.name}'"):
        dom.virdomain.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, xml, METADATA_KEY,
                                  METADATA_URI, _metadata_flags(dom, write=True))
    log.info("domain '%s': vmsnapbackup checkpoints %s", dom.name,
             "allowed" if wanted else "off (every backup reads every data block)")
