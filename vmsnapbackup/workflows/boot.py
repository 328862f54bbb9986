"""Instant recovery (``boot``): a new domain running on a point, nothing restored, the
pool never written.

The new domain's disks are throwaway qcow2 overlays outside the pool.  The hard
part is that the pool is root-only (0700 directories, 0600 files) and must stay
exactly as it is, while the domain's QEMU runs unprivileged (``libvirt-qemu``).
The options, and why this module takes the last one:

* *overlay backed by the point volume's path*: libvirt's DAC driver chowns every
  image of a disk's chain to the QEMU user (and writes ``trusted.libvirt.security``
  xattrs), i.e. it changes pool files; and QEMU still could not reach them through
  the 0700 pool directories.  ``<seclabel relabel='no'/>`` stops the chown, not
  the EACCES;
* *run the boot domain's QEMU as root* (static DAC label ``+0:+0``): works, but a
  guest escape from a recovered (possibly compromised) VM would be root;
* *serve the point over NBD and make it the overlay's backing* (chosen): a
  qemu-storage-daemon running as root opens the point volume **read-only** (it
  follows the relative backing to the base itself) and exports it read-only on a
  unix socket in the boot directory (:mod:`~vmsnapbackup.adapters.bootdaemon`);
  the overlay's backing is ``nbd+unix:///<target>?socket=<boot dir>/nbd.sock``
  (format raw), and the domain XML carries the same chain as an explicit
  ``<backingStore type='network'>`` so libvirt does not probe.  QEMU never opens
  a pool file, libvirt labels nothing in the pool, and even a ``blockcommit`` in
  the boot domain cannot reach the pool: the export is read-only.  The socket is
  owned by the QEMU user with mode 0600.

The daemon outlives the ``vmsnapbackup boot`` command.  Its pid file, log and
socket live in the boot directory next to the overlays and a small note
(``vmsnapbackup-boot.json``) that lists exactly what we created.
:func:`discard_boot` destroys and undefines the domain (only the one whose UUID the
note recorded), stops that daemon (only if its command line names this boot
directory) and removes only the files the note lists.  After a host reboot the
daemon is gone; :func:`resume_boot` starts it again from the note.

Overlays live outside the pool (default ``/var/lib/libvirt/images/vmsnapbackup-boot/
NAME/``, 0755 so QEMU can traverse it; the overlay files are 0600 from their
creation and handed to the QEMU user, as libvirt would).  What the boot domain
gets from the point's XML: a new name, no UUID, no MAC addresses, no NVRAM path,
no fixed guest-agent socket paths; disks that were not in the point are dropped
unless they are cdroms or floppies (a clone must never write the original's other
disks).  A prune never removes a point a boot holds open.
"""
from __future__ import annotations

import logging
import os
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..adapters import bootdaemon, domaindefine
from ..adapters.host import LOCAL
from ..adapters.hostfor import ssh_target_for
from ..adapters.hypervisor import Hypervisor, connect
from ..adapters.newdomain import DOMAIN_NAME_RE, new_domain_xml, set_disk_source
from ..adapters.qemuimg import QemuImg
from ..core import defaults
from ..core.defaults import DEFAULT_URI
from ..core.poolkey import with_domain_xml
from ..errors import ExportError, NotFoundError, UsageError, VmSnapBackupError
from .bootnote import (
    BOOT_NOTE,
    new_note,
    note_files,
    note_key_file,
    read_note,
    served_images,
    write_note,
)
from .pointread import PoolLike, open_pool, pinned_volume, pool_key_file, reading

__all__ = ["BOOT_NOTE", "DEFAULT_BOOT_ROOT", "BootDisk", "BootResult", "DiscardResult",
           "boot_domain_xml", "boot_point", "discard_boot", "resume_boot"]

log = logging.getLogger(__name__)

#: Where boot overlays go unless told otherwise: beside libvirt's own images, where
#: QEMU can traverse (``/var/lib/libvirt/images`` is 0711 on Debian).
DEFAULT_BOOT_ROOT = Path(defaults.DEFAULT_BOOT_ROOT)
_SUN_PATH_MAX = 107


# --- the domain XML (pure) -----------------------------------------------------------------

@dataclass(frozen=True)
class BootDisk:
    """Where a boot domain's disk lives: its overlay, and the NBD export it is backed by."""

    overlay: str
    socket: str
    export: str


def boot_domain_xml(xml: str, name: str, disks: Mapping[str, BootDisk], *,
                    network: bool = True) -> str:
    """The definition of a boot domain, from a point's saved domain XML.

    Pure: no libvirt.  Each disk of the point runs on its overlay, whose backing
    store is the point's NBD export (written out explicitly, so libvirt neither
    probes nor relabels anything in the pool); see the module docstring.
    """
    def rewrite(boot: BootDisk) -> Callable[[ET.Element], None]:
        def apply(disk_el: ET.Element) -> None:
            backing = ET.Element("backingStore", {"type": "network"})
            ET.SubElement(backing, "format", {"type": "raw"})
            nbd = ET.SubElement(backing, "source", {"protocol": "nbd", "name": boot.export})
            ET.SubElement(nbd, "host", {"transport": "unix", "socket": boot.socket})
            ET.SubElement(backing, "backingStore")
            set_disk_source(disk_el, boot.overlay, "qcow2", backing)
        return apply

    out, dropped = new_domain_xml(xml, name, {t: rewrite(b) for t, b in disks.items()},
                                  network=network, what="<point domain XML>")
    for target in dropped:
        log.info("boot domain %s: leaving out disk %s (not in the point)", name, target)
    return out


def _unix_uri(name: str, socket_path: str) -> str:
    return (f"nbd+unix:///{urllib.parse.quote(name, safe='')}"
            f"?socket={urllib.parse.quote(socket_path, safe='/')}")


# --- the note --------------------------------------------------------------------------------

def _boot_dir(name: str, overlay_dir: str | os.PathLike[str] | None,
              uri: str = DEFAULT_URI) -> Path:
    if ssh_target_for(uri) is not None:   # docs/DESIGN.md §10: the point is served here
        raise UsageError(f"boot runs a point only on the backup server's own hypervisor, not "
                         f"on {uri}: restore --to DIR, copy the images there, define them")
    if not DOMAIN_NAME_RE.fullmatch(name):
        raise UsageError(f"not a usable domain name for a boot: {name!r} (letters, digits, "
                         "'.', '_', '+', '-'; at most 64)")
    root = Path(os.path.abspath(os.fspath(overlay_dir))) if overlay_dir else DEFAULT_BOOT_ROOT
    return root / name


# --- the workflows -----------------------------------------------------------------------------

@dataclass
class BootResult:
    """A booted (or only defined) point: the new domain and what serves its disks."""

    name: str
    uuid: str
    started: bool
    domain: str
    point: int
    directory: str
    overlays: dict[str, str] = field(default_factory=dict)
    socket: str = ""
    daemon_pid: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class DiscardResult:
    name: str
    domain_removed: bool
    daemon_stopped: bool
    files_removed: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def boot_point(domain: str, pool: PoolLike, point: int, name: str, *,
               uri: str = DEFAULT_URI, start: bool = True,
               overlay_dir: str | os.PathLike[str] | None = None,
               network: bool = True, key_file: str | None = None) -> BootResult:
    """Instant recovery: define (and start) domain ``name`` running on point ``point``.

    Its writes stay in the overlays until :func:`discard_boot`.  ``network=False``
    leaves out every interface (a boot beside the still-running original without
    address conflicts).  On any failure everything made so far is removed again.
    """
    bdir = _boot_dir(name, overlay_dir, uri)
    store = open_pool(pool, uri, key_file).find_domain(domain)
    key = pool_key_file(store)    # an encrypted pool's: the daemon reads it (FORMAT §15.2)
    sock = bdir / bootdaemon.SOCKET
    if len(os.fsencode(str(sock))) > _SUN_PATH_MAX:
        raise UsageError(f"boot directory {bdir} is too long for a unix socket path")
    # readers lock until the daemon holds the volumes open (then prune sees them in use)
    with reading(store), connect(uri) as hv:
        manifest = with_domain_xml(store, store.read_manifest(point))
        volumes = {d.target: (d, pinned_volume(store, d)) for d in manifest.disks}
        if domaindefine.find(hv, name=name) is not None:
            raise UsageError(f"a domain named {name!r} already exists on {uri}")
        owner = domaindefine.qemu_owner(hv, manifest.domain.xml)
        _make_boot_dir(bdir)
        note = new_note(name, uri, store, point, volumes, key_file=key)
        ref = None
        boot_disks: dict[str, BootDisk] = {}
        try:
            write_note(bdir, note)
            pid = bootdaemon.serve(str(bdir), served_images(note), owner)
            for t in sorted(volumes):
                overlay = bdir / note["disks"][t]["overlay"]
                _create_overlay(overlay, _unix_uri(t, str(sock)), owner)
                boot_disks[t] = BootDisk(overlay=str(overlay), socket=str(sock), export=t)
            xml = boot_domain_xml(manifest.domain.xml, name, boot_disks, network=network)
            ref = domaindefine.define(hv, xml, name)
            note["uuid"] = ref.uuid
            write_note(bdir, note)
            if start:
                domaindefine.start(hv, ref)
        except BaseException:
            log.warning("boot %s failed; removing what it made", name)
            _undo_boot(hv, ref, bdir, note)
            raise
    log.info("domain %s: point %d booted as %s%s", store.name, point, name,
             "" if start else " (defined, not started)")
    return BootResult(name=name, uuid=str(note["uuid"]), started=start, domain=store.name,
                      point=point, directory=str(bdir),
                      overlays={t: b.overlay for t, b in boot_disks.items()},
                      socket=str(sock), daemon_pid=pid)


def _undo_boot(hv: Hypervisor, ref: domaindefine.DomainRef | None, bdir: Path,
               note: dict[str, Any]) -> None:
    if ref is not None:
        try:
            domaindefine.destroy_and_undefine(hv, ref)
        except (VmSnapBackupError, OSError) as err:
            log.warning("boot domain %s left defined: %s", ref.name, err)
    try:
        _remove_boot(bdir, note)
    except (VmSnapBackupError, OSError) as err:
        log.warning("boot directory %s left behind: %s", bdir, err)


def _make_boot_dir(bdir: Path) -> None:
    """The boot directory and its parent, 0755 (QEMU must traverse them); the boot
    directory must be new, so we never adopt someone else's files."""
    if not bdir.parent.is_dir():
        LOCAL.mkdir(str(bdir.parent), 0o755, parents=True, exist_ok=True)
    try:
        LOCAL.mkdir(str(bdir), 0o755)
    except FileExistsError:
        raise UsageError(f"{bdir} already exists (an earlier boot of that name? "
                         f"discard it first: vmsnapbackup boot --discard {bdir.name})") from None


def _create_overlay(overlay: Path, backing_uri: str, owner: tuple[int, int] | None) -> None:
    """The boot disk's overlay: 0600 from its creation, then handed to the QEMU user."""
    QemuImg(LOCAL, error=ExportError).create(str(overlay), "qcow2", backing=backing_uri,
                                             backing_fmt="raw", mode=0o600)
    if owner is not None:
        LOCAL.chown(str(overlay), owner[0], owner[1])


def _remove_boot(bdir: Path, note: dict[str, Any]) -> list[str]:
    """Stop the daemon, remove the files the note lists, the note, the directory."""
    bootdaemon.stop(str(bdir))
    removed = []
    for f in [*note_files(note), BOOT_NOTE]:
        p = bdir / f
        info = LOCAL.stat(str(p), follow=False)
        if info is not None and (info.is_file or info.is_socket):
            LOCAL.unlink(str(p))
            removed.append(str(p))
    try:
        LOCAL.rmdir(str(bdir))
    except OSError as err:
        log.warning("boot directory %s left in place: %s", bdir, err.strerror)
    return removed


def resume_boot(name: str, *, uri: str = DEFAULT_URI,
                overlay_dir: str | os.PathLike[str] | None = None,
                start: bool = True, key_file: str | None = None) -> BootResult:
    """Serve a boot's point again (its daemon is gone after a host reboot) and start it.

    A point of an encrypted pool is served with the key file the note records, or
    ``key_file`` when it has moved; either is checked against the pool first."""
    bdir = _boot_dir(name, overlay_dir, uri)
    note = _with_key(read_note(bdir), key_file, uri)
    with connect(uri) as hv:
        ref = domaindefine.find(hv, uuid=note.get("uuid"))
        if ref is None:
            raise NotFoundError(f"boot domain {name} ({note.get('uuid')}) is not defined on "
                                f"{uri}; discard it with: vmsnapbackup boot --discard {name}")
        pid = bootdaemon.running_pid(str(bdir))
        if pid is None:
            for d in dict(note["disks"]).values():
                if not os.path.isfile(d["volume"]):
                    raise NotFoundError(f"point volume {d['volume']} of boot {name} is gone")
            owner = domaindefine.qemu_owner(hv, domaindefine.domain_xml(hv, ref))
            pid = bootdaemon.serve(str(bdir), served_images(note), owner)
        if start:
            domaindefine.start(hv, ref)
    src = dict(note.get("source") or {})
    return BootResult(name=name, uuid=str(note.get("uuid")), started=start,
                      domain=str(src.get("domain")), point=int(src.get("point") or 0),
                      directory=str(bdir),
                      overlays={t: str(bdir / d["overlay"])
                                for t, d in dict(note["disks"]).items()},
                      socket=str(bdir / bootdaemon.SOCKET), daemon_pid=pid)


def _with_key(note: dict[str, Any], key_file: str | None, uri: str) -> dict[str, Any]:
    """``note`` with the key its pool opens with, checked (a wrong or lost key is one
    line, before a daemon is started)."""
    key = key_file or note_key_file(note)
    if key is None:
        return note
    if note_key_file(note) is None:
        raise UsageError(f"boot {note.get('name')} serves a plain pool's point: drop --key-file")
    pool = open_pool(Path(str(dict(note.get("source") or {}).get("pool"))), uri, key)
    assert pool.key is not None       # unlocked: an encrypted pool, and this its key
    return {**note, "key_file": pool.key.key_file}


def discard_boot(name: str, uri: str = DEFAULT_URI, *,
                 overlay_dir: str | os.PathLike[str] | None = None) -> DiscardResult:
    """Destroy and undefine boot domain ``name``, stop its daemon, remove its overlays.

    Only what the boot's note records is touched: the domain with the recorded UUID
    (a different domain that now has the name is refused), the daemon whose command
    line names this boot directory, the files the note lists.
    """
    bdir = _boot_dir(name, overlay_dir, uri)
    note = read_note(bdir)
    removed_domain = False
    with connect(uri) as hv:
        ref = domaindefine.find(hv, uuid=note.get("uuid"))
        if ref is None:
            other = domaindefine.find(hv, name=name)
            if other is not None:
                raise UsageError(
                    f"domain {name} on {uri} is not the one boot made "
                    f"(UUID {other.uuid}, expected {note.get('uuid')}); not touching it")
        else:
            domaindefine.destroy_and_undefine(hv, ref)
            removed_domain = True
    stopped = bootdaemon.stop(str(bdir))
    files = _remove_boot(bdir, note)
    return DiscardResult(name=name, domain_removed=removed_domain, daemon_stopped=stopped,
                         files_removed=files)
