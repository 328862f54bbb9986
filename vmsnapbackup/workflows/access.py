"""File-level access (``mount``) and instant recovery (``boot``) from a point, without
restoring it first and without ever writing into the pool.

Both rest on one fact (DESIGN.md §3): a point volume is a qcow2 overlay whose backing
file is its generation's base volume (relative path), so opening it read-only gives
the whole disk as it was at the point; the first point of a generation *is* the base.

**mount** exports that volume read-only over NBD from a private qemu-storage-daemon
(:class:`~vmsnapbackup.adapters.storagedaemon.StorageDaemon`) for as long as the
caller holds :func:`mount_point` open; any NBD client (``nbdinfo``, ``guestmount``,
``nbdfuse``, ``qemu-img convert``) can then read files out of it.

**boot** defines a new domain from the point's saved XML whose disks are throwaway
qcow2 overlays on top of the point.  The hard part is that the pool is root-only
(0700 directories, 0600 files) and must stay exactly as it is, while the domain's
QEMU runs unprivileged (``libvirt-qemu``).  The options, and why this module takes
the last one:

* *overlay backed by the point volume's path*: libvirt's DAC driver chowns every
  image of a disk's chain to the QEMU user (and writes ``trusted.libvirt.security``
  xattrs to remember the owner), i.e. it changes pool files; and QEMU still could not
  reach them through the 0700 pool directories.  ``<seclabel relabel='no'/>`` on the
  backing entries stops the chown but not the EACCES;
* *run the boot domain's QEMU as root* (static DAC label ``+0:+0``): works, but a
  guest escape from a recovered (possibly compromised) VM would be root, and QEMU
  would hold the pool's files with write-capable credentials;
* *serve the point over NBD and make it the overlay's backing* (chosen): a
  qemu-storage-daemon running as root opens the point volume **read-only** (it
  follows the relative backing to the base itself) and exports it read-only on a
  unix socket in the boot directory; the overlay's backing is
  ``nbd+unix:///<target>?socket=<boot dir>/nbd.sock`` (format raw), and the domain
  XML carries the same chain as an explicit ``<backingStore type='network'>`` so
  libvirt does not probe.  QEMU never opens a pool file, libvirt labels nothing in
  the pool (it does not label network sources), and even a ``blockcommit`` in the
  boot domain cannot reach the pool: the export is read-only.  The socket is owned
  by the QEMU user (from the domain's static DAC label, else the host's DAC base
  label in the capabilities) with mode 0600, so other local users cannot read the
  backup through it.

The daemon of a boot must live as long as the boot domain may run, which is longer
than the ``vmsnapbackup boot`` command: it is started detached
(``--daemonize``: it has finished opening everything when the command returns) with
its whole configuration on its command line, so it needs no monitor.  Its pid file,
log and socket live in the boot directory next to the overlays and a small note
(``vmsnapbackup-boot.json``) that lists exactly what we created.
:func:`discard_boot` destroys and undefines the domain (only the one whose UUID the
note recorded), stops that daemon (only if its command line names this boot
directory: pid reuse) and removes only the files the note lists.  After a host
reboot the daemon is gone; :func:`resume_boot` starts it again from the note.

Overlays live outside the pool (default ``/var/lib/libvirt/images/vmsnapbackup-boot/
NAME/``, 0755 so QEMU can traverse it; the overlay files are 0600 and handed to the
QEMU user, as libvirt would).  What the boot domain gets from the point's XML: a new
name, no UUID (libvirt makes one), no MAC addresses (libvirt makes new ones), no
NVRAM path (a fresh copy of the firmware template, not the original's variables),
no fixed guest-agent socket paths; disks that were not in the point are dropped
unless they are cdroms or floppies (a clone must never write the original's other
disks).  A prune never removes a point a boot or mount holds open
(:mod:`vmsnapbackup.workflows.prune`).
"""
from __future__ import annotations

import contextlib
import grp
import json
import logging
import os
import pwd
import signal
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import tenacity

from ..adapters.domainxml import DOMAIN_NAME_RE, new_domain_xml, set_disk_source
from ..adapters.hypervisor import Hypervisor, connect
from ..adapters.storagedaemon import StorageDaemon, daemon_arguments, qemu_opt
from ..adapters.storagepool import resolve_pool
from ..core.atomic import atomic_write_json, read_optional
from ..core.manifest import PointDisk, PointManifest, utc_now
from ..core.pool import DomainStore, Pool
from ..errors import (
    CorruptFileError,
    ExportError,
    HypervisorError,
    NotFoundError,
    UsageError,
)

__all__ = [
    "DEFAULT_BOOT_ROOT",
    "BOOT_NOTE",
    "MountedPoint",
    "mount_point",
    "BootDisk",
    "BootResult",
    "DiscardResult",
    "boot_point",
    "resume_boot",
    "discard_boot",
    "boot_domain_xml",
]

log = logging.getLogger(__name__)

#: Where boot overlays go unless told otherwise: beside libvirt's own images, where
#: QEMU can traverse (``/var/lib/libvirt/images`` is 0711 on Debian).
DEFAULT_BOOT_ROOT = Path("/var/lib/libvirt/images/vmsnapbackup-boot")
BOOT_NOTE = "vmsnapbackup-boot.json"
BOOT_FORMAT = "vmsnapbackup-boot"
BOOT_VERSION = 1
_SOCKET = "nbd.sock"
_PIDFILE = "qsd.pid"
_LOGFILE = "qsd.log"
_SUN_PATH_MAX = 107
_DAEMON_START_TIMEOUT = 60.0
_DAEMON_STOP_TIMEOUT = 15.0


# --- shared: find a point ------------------------------------------------------------------

def _open_store(domain: str, pool: Union[str, "os.PathLike[str]", Pool],
                uri: str) -> Tuple[Pool, DomainStore]:
    if isinstance(pool, Pool):
        the_pool = pool
    else:
        pool_dir, _ = resolve_pool(os.fspath(pool), uri)
        the_pool = Pool.open(pool_dir)
    return the_pool, the_pool.find_domain(domain)


def _point_disk(store: DomainStore, manifest: PointManifest, disk: Optional[str]) -> PointDisk:
    targets = [d.target for d in manifest.disks]
    if disk is None:
        if len(targets) != 1:
            raise UsageError(f"point {manifest.point} has disks {', '.join(targets)}; "
                             "choose one with --disk")
        return manifest.disks[0]
    try:
        return manifest.disk(disk)
    except KeyError:
        raise NotFoundError(f"point {manifest.point} of domain {store.name} has no disk "
                            f"{disk!r} (it has {', '.join(targets)})") from None


def _volume(store: DomainStore, d: PointDisk) -> Path:
    path = store.resolve(d.volume)
    if not path.is_file():
        raise CorruptFileError(path, f"point volume of disk {d.target} is missing")
    return path


# --- mount -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class MountedPoint:
    """A read-only NBD export of one disk of one point (raw, full disk size)."""

    uri: str
    socket_path: Optional[str]
    export_name: str
    size: int
    volume: str
    domain: str
    point: int
    disk: str
    host: Optional[str] = None
    port: Optional[int] = None

    def to_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)


@contextlib.contextmanager
def mount_point(domain: str, pool: Union[str, "os.PathLike[str]", Pool], point: int,
                disk: Optional[str] = None, socket: Optional[str] = None, *,
                port: Optional[int] = None, bind: str = "127.0.0.1",
                uri: str = "qemu:///system") -> Iterator[MountedPoint]:
    """Serve disk ``disk`` of point ``point`` read-only over NBD while the block runs.

    Without ``socket``/``port`` the export is on the daemon's private socket (root
    only, in a 0700 directory); ``socket=PATH`` serves on that unix socket, ``port``
    serves TCP on ``bind`` (default loopback).  Everything is removed when the block
    ends, also on an exception or a signal (StorageDaemon's own handling).
    """
    if socket is not None and port is not None:
        raise UsageError("give either a socket path or a port, not both")
    if port is not None and not 0 < port < 65536:
        raise UsageError(f"not a TCP port: {port}")
    if socket is not None:
        socket = os.path.abspath(socket)
        if os.path.lexists(socket):
            raise UsageError(f"{socket} already exists; choose a new path for the socket")
        if len(os.fsencode(socket)) > _SUN_PATH_MAX:
            raise UsageError(f"socket path {socket} is too long for a unix socket")
    _, store = _open_store(domain, pool, uri)
    manifest = store.read_manifest(point)
    d = _point_disk(store, manifest, disk)
    volume = _volume(store, d)
    address: Optional[Dict[str, Any]] = None
    if port is not None:
        address = {"type": "inet", "data": {"host": bind, "port": str(port)}}
    elif socket is not None:
        address = {"type": "unix", "data": {"path": socket}}
    with StorageDaemon(tag=f"mount-{store.name}-{point}-{d.target}",
                       nbd_address=address) as daemon:
        export = daemon.export_image(str(volume), d.volume_format, name=d.target)
        mounted = MountedPoint(uri=export.uri, socket_path=export.socket_path,
                               export_name=export.name, size=export.size, volume=str(volume),
                               domain=store.name, point=point, disk=d.target,
                               host=export.host, port=export.port)
        log.info("domain %s: point %d disk %s served read-only at %s", store.name, point,
                 d.target, export.uri)
        yield mounted


def _unix_uri(name: str, socket_path: str) -> str:
    import urllib.parse

    return (f"nbd+unix:///{urllib.parse.quote(name, safe='')}"
            f"?socket={urllib.parse.quote(socket_path, safe='/')}")


# --- boot: the domain XML (pure) ---------------------------------------------------------------

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


# --- boot: the note ------------------------------------------------------------------------------

def _boot_dir(name: str, overlay_dir: Optional[Union[str, "os.PathLike[str]"]]) -> Path:
    if not DOMAIN_NAME_RE.fullmatch(name):
        raise UsageError(f"not a usable domain name for a boot: {name!r} (letters, digits, "
                         "'.', '_', '+', '-'; at most 64)")
    root = Path(os.path.abspath(os.fspath(overlay_dir))) if overlay_dir else DEFAULT_BOOT_ROOT
    return root / name


def _write_note(bdir: Path, note: Dict[str, Any]) -> None:
    atomic_write_json(bdir / BOOT_NOTE, note, 0o600)


def _read_note(bdir: Path) -> Dict[str, Any]:
    path = bdir / BOOT_NOTE
    data = read_optional(path)
    if data is None:
        raise NotFoundError(f"no boot made by vmsnapbackup in {bdir} (no {BOOT_NOTE})")
    try:
        note = json.loads(data)
    except ValueError as err:
        raise CorruptFileError(path, f"not JSON: {err}") from None
    if not isinstance(note, dict) or note.get("format") != BOOT_FORMAT:
        raise CorruptFileError(path, "not a vmsnapbackup boot note")
    if not isinstance(note.get("version"), int) or note["version"] > BOOT_VERSION:
        raise CorruptFileError(path, f"unknown boot note version {note.get('version')!r}")
    for f in _note_files(note):
        if "/" in f or f in ("", ".", ".."):
            raise CorruptFileError(path, f"names a file outside its directory: {f!r}")
    return note


def _note_files(note: Dict[str, Any]) -> List[str]:
    """Every file the note says we created in the boot directory (plain names)."""
    files = [str(d.get("overlay", "")) for d in dict(note.get("disks") or {}).values()]
    files += [_SOCKET, _PIDFILE, _LOGFILE]
    return files


# --- boot: the daemon ---------------------------------------------------------------------------

def _daemon_argv(bdir: Path, note: Dict[str, Any]) -> List[str]:
    argv = ["qemu-storage-daemon"]
    for i, (target, d) in enumerate(sorted(dict(note["disks"]).items())):
        argv += ["--blockdev", f"driver=file,node-name=vsbf{i},"
                 f"filename={qemu_opt(d['volume'])},read-only=on",
                 "--blockdev", f"driver={d['format']},node-name=vsbd{i},file=vsbf{i},"
                 "read-only=on"]
    argv += ["--nbd-server", f"addr.type=unix,addr.path={qemu_opt(str(bdir / _SOCKET))}"]
    for i, (target, d) in enumerate(sorted(dict(note["disks"]).items())):
        argv += ["--export", f"type=nbd,id=vsbe{i},node-name=vsbd{i},"
                 f"name={qemu_opt(d['export'])},writable=off"]
    argv += ["--pidfile", str(bdir / _PIDFILE), "--daemonize"]
    return argv


def _daemon_pid(bdir: Path) -> Optional[int]:
    data = read_optional(bdir / _PIDFILE)
    try:
        return int(data.strip()) if data else None
    except ValueError:
        return None


def _is_our_daemon(pid: int, bdir: Path) -> bool:
    """A live qemu-storage-daemon whose command line names this boot's socket."""
    needle = f"addr.path={qemu_opt(str(bdir / _SOCKET))}"
    return any(needle in a for a in daemon_arguments(pid) or ())


def _start_daemon(bdir: Path, note: Dict[str, Any], owner: Optional[Tuple[int, int]]) -> int:
    for name in (_SOCKET, _PIDFILE):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(bdir / name)
    argv = _daemon_argv(bdir, note)
    log.debug("starting %s", " ".join(argv))
    with open(bdir / _LOGFILE, "ab") as logf:
        os.chmod(bdir / _LOGFILE, 0o600)
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                  cwd="/", close_fds=True, start_new_session=True,
                                  timeout=_DAEMON_START_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise ExportError(f"cannot start qemu-storage-daemon for {bdir}: {err}") from err
    pid = _daemon_pid(bdir)
    if proc.returncode != 0 or pid is None or not _is_our_daemon(pid, bdir):
        tail = (read_optional(bdir / _LOGFILE) or b"")[-2000:].decode("utf-8", "replace")
        if pid is not None and _is_our_daemon(pid, bdir):
            _stop_daemon(bdir)
        raise ExportError(f"qemu-storage-daemon for {bdir} failed to start (exit status "
                          f"{proc.returncode}): {' '.join(tail.split())}")
    sock = bdir / _SOCKET
    if owner is not None:
        os.chown(sock, owner[0], owner[1])
    os.chmod(sock, 0o600)
    log.info("boot %s: storage daemon pid %d serves the point on %s", bdir.name, pid, sock)
    return pid


def _stop_daemon(bdir: Path) -> bool:
    """Stop this boot's daemon if it runs; True if one was stopped."""
    pid = _daemon_pid(bdir)
    if pid is None or not _is_our_daemon(pid, bdir):
        return False
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        try:
            tenacity.Retrying(
                retry=tenacity.retry_if_result(bool),
                stop=tenacity.stop_after_delay(_DAEMON_STOP_TIMEOUT / 2),
                wait=tenacity.wait_exponential(multiplier=0.005, max=0.2),
            )(_is_our_daemon, pid, bdir)
            log.info("boot %s: stopped storage daemon pid %d", bdir.name, pid)
            return True
        except tenacity.RetryError:
            continue
    raise ExportError(f"storage daemon pid {pid} of {bdir} does not stop")


# --- boot: libvirt -------------------------------------------------------------------------------

@contextlib.contextmanager
def _libvirt(what: str) -> Iterator[None]:
    import libvirt

    try:
        yield
    except libvirt.libvirtError as err:
        msg = " ".join((err.get_error_message() or str(err)).split())
        raise HypervisorError(f"{what}: {msg}") from err


def _qemu_owner(hv: Hypervisor, xml: str) -> Optional[Tuple[int, int]]:
    """uid/gid QEMU will run as for this domain: its static DAC label, else the host's
    DAC base label for the domain type; None without DAC (QEMU runs as root)."""
    root = ET.fromstring(xml)
    for sec in root.findall("seclabel"):
        if sec.get("model") == "dac" and sec.get("type") == "static":
            label = sec.findtext("label")
            if label:
                return _parse_label(label)
    with _libvirt("reading the host capabilities"):
        caps = ET.fromstring(hv.conn.getCapabilities())
    virt_type = root.get("type", "kvm")
    for model in caps.findall("./host/secmodel"):
        if model.findtext("model") != "dac":
            continue
        labels = {b.get("type"): b.text for b in model.findall("baselabel")}
        label = labels.get(virt_type) or next(iter(labels.values()), None)
        if label:
            return _parse_label(label)
    return None


def _parse_label(label: str) -> Tuple[int, int]:
    """``+64055:+64055`` or ``libvirt-qemu:kvm`` -> (uid, gid)."""
    user, _, group = label.partition(":")

    def one(text: str, by_name: Any, field_: str) -> int:
        text = text.strip()
        if text.startswith("+"):
            return int(text[1:])
        if text.isdigit():
            return int(text)
        try:
            return int(getattr(by_name(text), field_))
        except KeyError:
            raise HypervisorError(f"unknown user or group {text!r} in DAC label {label!r}") from None

    uid = one(user, pwd.getpwnam, "pw_uid")
    gid = one(group, grp.getgrnam, "gr_gid") if group else pwd.getpwuid(uid).pw_gid
    return uid, gid


def _domain_by_uuid(hv: Hypervisor, uuid: Optional[str]) -> Optional[Any]:
    if not uuid:
        return None
    try:
        return hv.find_domain(uuid)
    except NotFoundError:
        return None


def _destroy_and_undefine(hv: Hypervisor, dom: Any) -> None:
    import libvirt

    name = dom.name()
    with _libvirt(f"stopping boot domain {name}"):
        if dom.isActive():
            dom.destroy()
    flags = (libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
             | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
             | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
             | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
    with _libvirt(f"undefining boot domain {name}"):
        if dom.isPersistent():
            dom.undefineFlags(flags)
    log.info("boot domain %s destroyed and undefined", name)


# --- boot: the workflows -------------------------------------------------------------------------

@dataclass
class BootResult:
    """A booted (or only defined) point: the new domain and what serves its disks."""

    name: str
    uuid: str
    started: bool
    domain: str
    point: int
    directory: str
    overlays: Dict[str, str] = field(default_factory=dict)
    socket: str = ""
    daemon_pid: int = 0

    def to_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class DiscardResult:
    name: str
    domain_removed: bool
    daemon_stopped: bool
    files_removed: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)


def boot_point(domain: str, pool: Union[str, "os.PathLike[str]", Pool], point: int,
               name: str, *, uri: str = "qemu:///system", start: bool = True,
               overlay_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
               network: bool = True) -> BootResult:
    """Instant recovery: define (and start) domain ``name`` running on point ``point``.

    Nothing is restored: the new domain's disks are qcow2 overlays, outside the pool,
    backed by a read-only NBD export of the point.  Its writes stay in the overlays
    until :func:`discard_boot`.  ``network=False`` leaves out every interface (a boot
    beside the still-running original without address conflicts).  On any failure
    everything made so far is removed again.
    """
    bdir = _boot_dir(name, overlay_dir)
    _, store = _open_store(domain, pool, uri)
    manifest = store.read_manifest(point)
    volumes = {d.target: (d, _volume(store, d)) for d in manifest.disks}
    sock = bdir / _SOCKET
    if len(os.fsencode(str(sock))) > _SUN_PATH_MAX:
        raise UsageError(f"boot directory {bdir} is too long for a unix socket path")
    with connect(uri) as hv:
        try:
            hv.find_domain(name)
        except NotFoundError:
            pass
        else:
            raise UsageError(f"a domain named {name!r} already exists on {uri}")
        owner = _qemu_owner(hv, manifest.domain.xml)
        _make_boot_dir(bdir)
        note: Dict[str, Any] = {
            "format": BOOT_FORMAT, "version": BOOT_VERSION, "name": name, "uuid": None,
            "created": utc_now(), "uri": uri,
            "source": {"domain": store.name, "uuid": store.uuid, "point": point,
                       "pool": str(store.pool.root)},
            "disks": {t: {"overlay": f"{t}.qcow2", "export": t, "volume": str(path),
                          "format": d.volume_format, "virtual_size": d.virtual_size}
                      for t, (d, path) in sorted(volumes.items())},
        }
        dom = None
        try:
            _write_note(bdir, note)
            pid = _start_daemon(bdir, note, owner)
            boot_disks: Dict[str, BootDisk] = {}
            for t, (d, _path) in sorted(volumes.items()):
                overlay = bdir / note["disks"][t]["overlay"]
                _create_overlay(overlay, _unix_uri(t, str(sock)), owner)
                boot_disks[t] = BootDisk(overlay=str(overlay), socket=str(sock), export=t)
            xml = boot_domain_xml(manifest.domain.xml, name, boot_disks, network=network)
            with _libvirt(f"defining boot domain {name}"):
                dom = hv.conn.defineXML(xml)
                note["uuid"] = dom.UUIDString()
            _write_note(bdir, note)
            if start:
                with _libvirt(f"starting boot domain {name}"):
                    dom.create()
        except BaseException:
            log.warning("boot %s failed; removing what it made", name)
            with contextlib.suppress(Exception):
                if dom is not None:
                    _destroy_and_undefine(hv, dom)
            with contextlib.suppress(Exception):
                _remove_boot(bdir, note)
            raise
    log.info("domain %s: point %d booted as %s%s", store.name, point, name,
             "" if start else " (defined, not started)")
    return BootResult(name=name, uuid=str(note["uuid"]), started=start, domain=store.name,
                      point=point, directory=str(bdir),
                      overlays={t: str(Path(b.overlay)) for t, b in boot_disks.items()},
                      socket=str(sock), daemon_pid=pid)


def _make_boot_dir(bdir: Path) -> None:
    """The boot directory and its parent, 0755 (QEMU must traverse them); the boot
    directory must be new, so we never adopt someone else's files."""
    parent = bdir.parent
    if not parent.is_dir():
        parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chmod(parent, 0o755)
    try:
        bdir.mkdir(mode=0o755)
    except FileExistsError:
        raise UsageError(f"{bdir} already exists (an earlier boot of that name? "
                         f"discard it first: vmsnapbackup boot --discard {bdir.name})") from None
    os.chmod(bdir, 0o755)


def _create_overlay(overlay: Path, backing_uri: str, owner: Optional[Tuple[int, int]]) -> None:
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-b", backing_uri, "-F", "raw",
            str(overlay)]
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=120)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ExportError(f"cannot run qemu-img create for {overlay}: {err}") from err
    if proc.returncode != 0:
        raise ExportError(f"qemu-img create {overlay} failed: "
                          f"{' '.join(proc.stderr.split()) or proc.returncode}")
    os.chmod(overlay, 0o600)
    if owner is not None:
        os.chown(overlay, owner[0], owner[1])


def _remove_boot(bdir: Path, note: Dict[str, Any]) -> List[str]:
    """Stop the daemon, remove the files the note lists, the note, the directory."""
    _stop_daemon(bdir)
    removed = []
    for f in _note_files(note) + [BOOT_NOTE]:
        p = bdir / f
        if p.is_file() or p.is_socket():
            p.unlink()
            removed.append(str(p))
    try:
        os.rmdir(bdir)
    except OSError as err:
        log.warning("boot directory %s left in place: %s", bdir, err.strerror)
    return removed


def resume_boot(name: str, *, uri: str = "qemu:///system",
                overlay_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
                start: bool = True) -> BootResult:
    """Serve a boot's point again (its daemon is gone after a host reboot) and start it."""
    bdir = _boot_dir(name, overlay_dir)
    note = _read_note(bdir)
    with connect(uri) as hv:
        dom = _domain_by_uuid(hv, note.get("uuid"))
        if dom is None:
            raise NotFoundError(f"boot domain {name} ({note.get('uuid')}) is not defined on "
                                f"{uri}; discard it with: vmsnapbackup boot --discard {name}")
        pid = _daemon_pid(bdir)
        if pid is None or not _is_our_daemon(pid, bdir):
            for d in dict(note["disks"]).values():
                if not os.path.isfile(d["volume"]):
                    raise NotFoundError(f"point volume {d['volume']} of boot {name} is gone")
            with _libvirt(f"reading boot domain {name}"):
                xml = dom.XMLDesc(0)
            pid = _start_daemon(bdir, note, _qemu_owner(hv, xml))
        started = False
        if start:
            with _libvirt(f"starting boot domain {name}"):
                if not dom.isActive():
                    dom.create()
            started = True
    src = dict(note.get("source") or {})
    return BootResult(name=name, uuid=str(note.get("uuid")), started=started,
                      domain=str(src.get("domain")), point=int(src.get("point") or 0),
                      directory=str(bdir),
                      overlays={t: str(bdir / d["overlay"])
                                for t, d in dict(note["disks"]).items()},
                      socket=str(bdir / _SOCKET), daemon_pid=pid)


def discard_boot(name: str, uri: str = "qemu:///system", *,
                 overlay_dir: Optional[Union[str, "os.PathLike[str]"]] = None) -> DiscardResult:
    """Destroy and undefine boot domain ``name``, stop its daemon, remove its overlays.

    Only what the boot's note records is touched: the domain with the recorded UUID
    (a different domain that now has the name is refused), the daemon whose command
    line names this boot directory, the files the note lists.
    """
    bdir = _boot_dir(name, overlay_dir)
    note = _read_note(bdir)
    removed_domain = False
    with connect(uri) as hv:
        dom = _domain_by_uuid(hv, note.get("uuid"))
        if dom is None:
            try:
                other = hv.find_domain(name)
            except NotFoundError:
                other = None
            if other is not None:
                raise UsageError(
                    f"domain {name} on {uri} is not the one boot made "
                    f"(UUID {other.UUIDString()}, expected {note.get('uuid')}); not touching it")
        else:
            _destroy_and_undefine(hv, dom)
            removed_domain = True
    stopped = _stop_daemon(bdir)
    files = _remove_boot(bdir, note)
    return DiscardResult(name=name, domain_removed=removed_domain, daemon_stopped=stopped,
                         files_removed=files)
