"""Where the pool lives: a directory, or a libvirt ``dir``/``netfs`` storage pool.

Letting ``--pool`` name a libvirt storage pool means an admin who already
manages backup storage in libvirt does not have to repeat its path, and after
a backup the libvirt pool is refreshed so ``virsh vol-list`` sees what we wrote.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import HypervisorError, NotFoundError, UnsupportedDiskError, UsageError

log = logging.getLogger(__name__)

SUPPORTED_POOL_TYPES = ("dir", "netfs", "fs")


def looks_like_path(spec: str) -> bool:
    """A spec with a slash (or starting with ``.``/``~``) is a path, anything else a pool name."""
    return "/" in spec or spec.startswith((".", "~"))


def resolve_pool(spec: str, uri: str) -> tuple[Path, str | None]:
    """Return ``(directory, libvirt pool name or None)`` for a ``--pool`` value."""
    if not spec:
        raise UsageError("the pool is empty: give --pool PATH or set VMSNAPBACKUP_POOL")
    if looks_like_path(spec):
        return Path(os.path.expanduser(spec)).absolute(), None
    import xml.etree.ElementTree as ET

    import libvirt  # only for a pool name: ``list`` of a directory never loads it

    from .libvirterrors import open_connection, translated

    conn = open_connection(uri)
    try:
        try:
            sp = conn.storagePoolLookupByName(spec)
        except libvirt.libvirtError as exc:
            raise NotFoundError(
                f"no libvirt storage pool named '{spec}' on {uri} "
                "(give a directory path with a '/' to use a plain directory)"
            ) from exc
        with translated(f"libvirt storage pool '{spec}'"):
            root = ET.fromstring(sp.XMLDesc(0))
            active = bool(sp.isActive())
        kind = root.get("type", "")
        if kind not in SUPPORTED_POOL_TYPES:
            raise UnsupportedDiskError(
                f"libvirt storage pool '{spec}' is of type '{kind}'; only "
                f"{', '.join(SUPPORTED_POOL_TYPES)} pools hold a directory we can use"
            )
        path = root.findtext("target/path")
        if not path:
            raise HypervisorError(f"libvirt storage pool '{spec}' has no target path")
        if not active:
            raise HypervisorError(
                f"libvirt storage pool '{spec}' is not active (virsh pool-start {spec})"
            )
        return Path(path), spec
    finally:
        conn.close()


def refresh_pool(name: str | None, uri: str) -> None:
    """Ask libvirt to rescan the storage pool; a failure is only worth a warning."""
    if not name:
        return
    from .libvirterrors import open_connection, translated

    try:
        conn = open_connection(uri)
        try:
            with translated(f"could not refresh libvirt storage pool {name}"):
                conn.storagePoolLookupByName(name).refresh(0)
        finally:
            conn.close()
    except HypervisorError as exc:
        log.warning("%s", exc)


def contained_volume(directory: Path, name: str) -> Path:
    """The path of volume ``name`` in a storage pool's target ``directory``, refused
    (UsageError) unless it stays inside it (docs/DESIGN.md §8).

    ``name`` is built from names that come from a backup pool (the domain, the
    disk target), which is not trusted: a name with a ``/`` or ``..``, or a volume
    path that resolves elsewhere -- a symlink planted in the directory -- must not
    make a restore write outside the storage pool.
    """
    if not name or "/" in name or "\0" in name or name in (".", "..") or name.startswith("."):
        raise UsageError(f"volume name {name!r} would leave storage pool directory "
                         f"{directory}: refusing it")
    root = os.path.realpath(directory)
    path = directory / name
    if os.path.islink(path) or os.path.dirname(os.path.realpath(path)) != root:
        raise UsageError(f"volume {path} resolves outside storage pool directory "
                         f"{root} (a symlink?): refusing to write it")
    return path
