"""``boot`` on a remote hypervisor (``-c qemu+ssh://``): the point served here, run there.

The pool and its point volumes stay on the backup server; a boot domain runs
on the hypervisor on throwaway overlays whose backing is the point's NBD
export.  Three pieces, each where it must be (docs/DESIGN.md §10):

* **here**, in a state directory under this server's runtime root
  (``boots/NAME``): the boot's storage daemon, serving the pinned point volumes
  read-only on a private unix socket (:mod:`..adapters.bootdaemon`, as for a
  local boot), and one long-lived ssh reverse forward carrying that socket to
  the hypervisor (:mod:`..adapters.bootforward`);
* **there**, in the boot directory (default ``/var/lib/libvirt/images/
  vmsnapbackup-boot/NAME``, made through the :class:`Host`): the forwarded
  socket (handed to the QEMU user, mode 0600), the overlays (0600 from their
  creation, handed to the QEMU user) and the boot note, which names the point,
  the overlays and the domain's UUID -- the boot's record lives with the boot;
* **libvirt there**: the domain, defined from the point's XML with the same
  rewrite as a local boot (:func:`.boot.boot_domain_xml`) and started.

The daemon and the forward outlive the command, like a local boot's daemon;
``--discard`` removes the domain (by the note's UUID), stops both (each only
if its command line names this boot), removes the overlays, the socket and
the note there and the state directory here.  ``--resume`` starts the daemon
and the forward again (after either machine rebooted) and the domain.
"""
from __future__ import annotations

import json
import logging
import os
import posixpath
from pathlib import Path
from typing import Any

from ..adapters import bootdaemon, bootforward, domaindefine
from ..adapters.host import LOCAL, Host
from ..adapters.hostfor import SshTarget, ssh_target_for
from ..adapters.hypervisor import Hypervisor, connect
from ..adapters.newdomain import DOMAIN_NAME_RE
from ..adapters.qemuimg import QemuImg
from ..core import defaults
from ..core.atomic import make_private_dir
from ..core.inflight import runtime_root
from ..errors import ExportError, NotFoundError, UsageError, VmSnapBackupError
from . import boot
from .boot import (
    BOOT_NOTE,
    BootDisk,
    BootResult,
    DiscardResult,
    _unix_uri,
    boot_domain_xml,
)
from .bootnote import new_note, parse_note, served_images
from .pointread import PoolLike, open_pool, pinned_volume, reading

__all__ = ["boot_point", "boot_remote", "discard_boot", "discard_remote", "resume_boot",
           "resume_remote"]

log = logging.getLogger(__name__)

_SUN_PATH_MAX = 107
_LOCAL_FILES = (bootdaemon.SOCKET, bootdaemon.PIDFILE, bootdaemon.LOGFILE,
                bootforward.FORWARD_PID, bootforward.FORWARD_LOG)


class _Places:
    """Where one remote boot's pieces live: ``here`` (state) and ``there`` (boot dir)."""

    def __init__(self, name: str, overlay_dir: str | os.PathLike[str] | None, uri: str) -> None:
        if not DOMAIN_NAME_RE.fullmatch(name):
            raise UsageError(f"not a usable domain name for a boot: {name!r} (letters, "
                             "digits, '.', '_', '+', '-'; at most 64)")
        target = ssh_target_for(uri)
        assert target is not None
        self.target: SshTarget = target
        self.name = name
        self.uri = uri
        root = os.path.abspath(os.fspath(overlay_dir)) if overlay_dir \
            else defaults.DEFAULT_BOOT_ROOT
        self.there = posixpath.join(root, name)
        self.here = os.path.join(str(runtime_root()), "boots", name)
        self.remote_socket = posixpath.join(self.there, bootdaemon.SOCKET)
        self.local_socket = os.path.join(self.here, bootdaemon.SOCKET)
        for sock in (self.remote_socket, self.local_socket):
            if len(os.fsencode(sock)) > _SUN_PATH_MAX:
                raise UsageError(f"{sock} is too long for a unix socket path")

    @property
    def note_path(self) -> str:
        return posixpath.join(self.there, BOOT_NOTE)


def _serve(p: _Places, host: Host, note: dict[str, Any],
           owner: tuple[int, int] | None) -> int:
    """Start the daemon here and the forward to there; the daemon's pid."""
    make_private_dir(Path(p.here))
    pid = bootdaemon.serve(p.here, served_images(note), None)   # only ssh connects here
    try:
        bootforward.start_forward(p.target, host, p.here, p.remote_socket, p.local_socket)
        if owner is not None:
            host.chown(p.remote_socket, owner[0], owner[1])
        host.chmod(p.remote_socket, 0o600)
    except BaseException:
        _stop_here(p)
        raise
    return pid


def _stop_here(p: _Places) -> bool:
    """Stop the forward and the daemon, remove the state directory; True if the daemon ran."""
    bootforward.stop_forward(p.here, p.remote_socket, p.local_socket)
    stopped = bootdaemon.stop(p.here)
    for f in _LOCAL_FILES:
        LOCAL.unlink(os.path.join(p.here, f))
    try:
        LOCAL.rmdir(p.here)
    except OSError as err:
        if not isinstance(err, FileNotFoundError):
            log.warning("boot state directory %s left in place: %s", p.here, err.strerror)
    return stopped


def _read_note(p: _Places, host: Host) -> dict[str, Any]:
    data = host.read_file(p.note_path)
    if data is None:
        raise NotFoundError(f"no boot made by vmsnapbackup in {host.name}:{p.there} "
                            f"(no {BOOT_NOTE})")
    return parse_note(p.note_path, data)


def _remove_there(p: _Places, host: Host, note: dict[str, Any]) -> list[str]:
    removed = []
    names = [str(d["overlay"]) for d in dict(note["disks"]).values()]
    for f in [*names, bootdaemon.SOCKET, BOOT_NOTE]:
        path = posixpath.join(p.there, f)
        info = host.stat(path, follow=False)
        if info is not None and (info.is_file or info.is_socket):
            host.unlink(path)
            removed.append(f"{host.name}:{path}")
    try:
        host.rmdir(p.there)
    except OSError as err:
        log.warning("boot directory %s:%s left in place: %s", host.name, p.there, err)
    return removed


def _result(p: _Places, note: dict[str, Any], started: bool, pid: int) -> BootResult:
    src = dict(note.get("source") or {})
    return BootResult(name=p.name, uuid=str(note.get("uuid")), started=started,
                      domain=str(src.get("domain")), point=int(src.get("point") or 0),
                      directory=p.there,
                      overlays={t: posixpath.join(p.there, str(d["overlay"]))
                                for t, d in dict(note["disks"]).items()},
                      socket=p.remote_socket, daemon_pid=pid)


def boot_remote(domain: str, pool: PoolLike, point: int, name: str, *, uri: str,
                start: bool = True, overlay_dir: str | os.PathLike[str] | None = None,
                network: bool = True, key_file: str | None = None) -> BootResult:
    """:func:`.boot.boot_point` onto the remote hypervisor of ``uri`` (module docstring)."""
    p = _Places(name, overlay_dir, uri)
    store = open_pool(pool, uri, key_file).find_domain(domain)
    if store.pool.encryption is not None:
        raise UsageError("boot of an encrypted pool's point: not available yet (restore it)")
    with reading(store), connect(uri) as hv:
        host = hv.host
        manifest = store.read_manifest(point)
        volumes = {d.target: (d, pinned_volume(store, d)) for d in manifest.disks}
        if domaindefine.find(hv, name=name) is not None:
            raise UsageError(f"a domain named {name!r} already exists on {uri}")
        if os.path.exists(p.here):
            raise UsageError(f"{p.here} exists (an earlier boot of that name? discard "
                             f"it first: vmsnapbackup -c URI boot --discard {name})")
        owner = domaindefine.qemu_owner(hv, manifest.domain.xml)
        host.mkdir(posixpath.dirname(p.there), 0o755, parents=True, exist_ok=True)
        try:
            host.mkdir(p.there, 0o755)
        except FileExistsError:
            raise UsageError(f"{host.name}:{p.there} already exists (discard that boot "
                             f"first: vmsnapbackup -c URI boot --discard {name})") from None
        note = new_note(name, uri, store, point, volumes, served_from=p.here)
        return _boot(p, hv, host, note, manifest.domain.xml, owner, start, network)


def _boot(p: _Places, hv: Hypervisor, host: Host, note: dict[str, Any], xml: str,
          owner: tuple[int, int] | None, start: bool, network: bool) -> BootResult:
    ref = None
    pid = 0
    try:
        host.write_file(p.note_path, json.dumps(note, indent=1).encode(), mode=0o600)
        pid = _serve(p, host, note, owner)
        disks: dict[str, BootDisk] = {}
        for t, d in sorted(dict(note["disks"]).items()):
            overlay = posixpath.join(p.there, str(d["overlay"]))
            QemuImg(host, error=ExportError).create(
                overlay, "qcow2", backing=_unix_uri(t, p.remote_socket), backing_fmt="raw",
                size=int(d["virtual_size"]), mode=0o600)
            if owner is not None:
                host.chown(overlay, owner[0], owner[1])
            disks[t] = BootDisk(overlay=overlay, socket=p.remote_socket, export=t)
        ref = domaindefine.define(hv, boot_domain_xml(xml, p.name, disks, network=network),
                                  p.name)
        note["uuid"] = ref.uuid
        host.write_file(p.note_path, json.dumps(note, indent=1).encode(), mode=0o600)
        if start:
            domaindefine.start(hv, ref)
    except BaseException:
        log.warning("boot %s on %s failed; removing what it made", p.name, host.name)
        if ref is not None:
            try:
                domaindefine.destroy_and_undefine(hv, ref)
            except (VmSnapBackupError, OSError) as err:
                log.warning("boot domain %s left defined: %s", ref.name, err)
        for undo in (lambda: _stop_here(p), lambda: _remove_there(p, host, note)):
            try:
                undo()
            except (VmSnapBackupError, OSError) as err:
                log.warning("boot %s: cleanup left something behind: %s", p.name, err)
        raise
    log.info("point %s booted as %s on %s", note["source"]["point"], p.name, host.name)
    return _result(p, note, start, pid)


def resume_remote(name: str, *, uri: str, overlay_dir: str | os.PathLike[str] | None = None,
                  start: bool = True) -> BootResult:
    """Serve a remote boot's point again (daemon and forward) and start its domain."""
    p = _Places(name, overlay_dir, uri)
    with connect(uri) as hv:
        note = _read_note(p, hv.host)
        ref = domaindefine.find(hv, uuid=note.get("uuid"))
        if ref is None:
            raise NotFoundError(f"boot domain {name} ({note.get('uuid')}) is not defined on "
                                f"{uri}; discard it with: vmsnapbackup -c URI boot --discard "
                                f"{name}")
        pid = bootdaemon.running_pid(p.here)
        if pid is None or bootforward.running_forward(p.here, p.remote_socket,
                                                      p.local_socket) is None:
            for d in dict(note["disks"]).values():
                if not os.path.isfile(d["volume"]):
                    raise NotFoundError(f"point volume {d['volume']} of boot {name} is gone")
            _stop_here(p)
            owner = domaindefine.qemu_owner(hv, domaindefine.domain_xml(hv, ref))
            pid = _serve(p, hv.host, note, owner)
        if start:
            domaindefine.start(hv, ref)
    return _result(p, note, start, pid)


def discard_remote(name: str, *, uri: str,
                   overlay_dir: str | os.PathLike[str] | None = None) -> DiscardResult:
    """Remove a remote boot: its domain (by the note's UUID), forward, daemon and files."""
    p = _Places(name, overlay_dir, uri)
    removed_domain = False
    with connect(uri) as hv:
        note = _read_note(p, hv.host)
        ref = domaindefine.find(hv, uuid=note.get("uuid"))
        if ref is None:
            other = domaindefine.find(hv, name=name)
            if other is not None:
                raise UsageError(f"domain {name} on {uri} is not the one boot made (UUID "
                                 f"{other.uuid}, expected {note.get('uuid')}); not touching it")
        else:
            domaindefine.destroy_and_undefine(hv, ref)
            removed_domain = True
        stopped = _stop_here(p)
        files = _remove_there(p, hv.host, note)
    return DiscardResult(name=name, domain_removed=removed_domain, daemon_stopped=stopped,
                         files_removed=files)


# --- where a boot command goes: here (.boot) or to a remote hypervisor --------------------------

def boot_point(domain: str, pool: PoolLike, point: int, name: str, *,
               uri: str = defaults.DEFAULT_URI, start: bool = True,
               overlay_dir: str | os.PathLike[str] | None = None, network: bool = True,
               key_file: str | None = None) -> BootResult:
    """:func:`.boot.boot_point`, or :func:`boot_remote` for a ``qemu+ssh`` URI."""
    run = boot_remote if ssh_target_for(uri) is not None else boot.boot_point
    return run(domain, pool, point, name, uri=uri, start=start, overlay_dir=overlay_dir,
               network=network, key_file=key_file)


def resume_boot(name: str, *, uri: str = defaults.DEFAULT_URI,
                overlay_dir: str | os.PathLike[str] | None = None,
                start: bool = True, key_file: str | None = None) -> BootResult:
    """:func:`.boot.resume_boot`, or :func:`resume_remote` for a ``qemu+ssh`` URI."""
    if ssh_target_for(uri) is not None:   # a remote boot is never of an encrypted pool
        return resume_remote(name, uri=uri, overlay_dir=overlay_dir, start=start)
    return boot.resume_boot(name, uri=uri, overlay_dir=overlay_dir, start=start,
                            key_file=key_file)


def discard_boot(name: str, uri: str = defaults.DEFAULT_URI, *,
                 overlay_dir: str | os.PathLike[str] | None = None) -> DiscardResult:
    """:func:`.boot.discard_boot`, or :func:`discard_remote` for a ``qemu+ssh`` URI."""
    if ssh_target_for(uri) is not None:
        return discard_remote(name, uri=uri, overlay_dir=overlay_dir)
    return boot.discard_boot(name, uri, overlay_dir=overlay_dir)
