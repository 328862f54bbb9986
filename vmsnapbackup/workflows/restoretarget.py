"""Where a restore writes, what it must never replace, and the domain it may define.

Two refusals protect live data, both made before any byte is written: an
existing file is only replaced with ``force``, and a file that is a disk (or a
backing image of a disk) of a *running* libvirt domain is never replaced,
``force`` or not -- by real path or by the same inode (a hard link is the same
disk).  libvirt is asked only when there is something to protect: a restore
into a new directory needs no libvirtd (:class:`LazyHypervisor`).

``define`` turns the restored images into a new, shut-off domain from the XML
saved with the point; the XML rewrite is a pure function,
:func:`rewrite_domain_xml`.
"""
from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..adapters import domaindefine
from ..adapters.domainxml import parse_disks
from ..adapters.hypervisor import Hypervisor, connect
from ..adapters.newdomain import new_domain_xml, set_disk_source
from ..core import defaults
from ..errors import HypervisorError, UsageError, VmSnapBackupError

__all__ = [
    "RESTORE_FORMATS",
    "UNVERIFIED_SUFFIX",
    "LazyHypervisor",
    "check_targets",
    "image_name",
    "paths_in_use",
    "rewrite_domain_xml",
    "unverified_name",
    "users_of",
]

RESTORE_FORMATS = defaults.RESTORE_FORMATS
UNVERIFIED_SUFFIX = ".unverified"


def image_name(target: str, fmt: str, prefix: str | None = None) -> str:
    """``vda.raw``; in a libvirt storage pool ``<prefix>-vda.raw`` (volumes of many
    domains share one directory there)."""
    if fmt not in RESTORE_FORMATS:
        raise UsageError(f"restore writes raw or qcow2 images, not {fmt!r}")
    return f"{prefix}-{target}.{fmt}" if prefix else f"{target}.{fmt}"


def unverified_name(final: Path) -> Path:
    """Where an image that failed its check is kept: beside the name it did not get."""
    return final.with_name(final.name + UNVERIFIED_SUFFIX)


def paths_in_use(domains: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """Image paths used by domains, from ``(domain name, live XML)`` pairs.

    Sources and every backing image count: replacing a running disk's backing
    file under it is as destructive as replacing the disk.  Keys are real paths.
    """
    used: dict[str, list[str]] = {}
    for name, xml in domains:
        for disk in parse_disks(xml):
            if disk.type not in ("file", "block"):
                continue
            paths = [disk.source] + [ref.path for ref in disk.backing_chain]
            for p in paths:
                if p:
                    used.setdefault(os.path.realpath(p), []).append(name)
    return used


def users_of(path: Path, used: Mapping[str, list[str]]) -> list[str]:
    """Domains in ``used`` (see :func:`paths_in_use`) whose disks include ``path``,
    by real path or by the same inode (a hard link is the same disk)."""
    real = os.path.realpath(path)
    names = list(used.get(real, []))
    try:
        st = os.stat(path)
    except OSError:
        return sorted(set(names))
    for other, doms in used.items():
        if other == real:
            continue
        with contextlib.suppress(OSError):
            o = os.stat(other)
            if (o.st_dev, o.st_ino) == (st.st_dev, st.st_ino):
                names.extend(doms)
    return sorted(set(names))


def rewrite_domain_xml(xml: str, name: str, disks: Mapping[str, tuple[str, str]], *,
                       trust: bool = False) -> tuple[str, list[str]]:
    """The saved domain XML made into a new domain on the restored images.

    ``disks`` maps a target to ``(image path, format)``; returns ``(xml, dropped
    targets)``.  What else changes, and why -- passthrough and QEMU extras left
    out unless ``trust`` -- is :func:`new_domain_xml`'s to say.
    """
    return new_domain_xml(xml, name, {
        t: functools.partial(set_disk_source, path=path, fmt=fmt)
        for t, (path, fmt) in disks.items()}, trust=trust)


class LazyHypervisor:
    """A libvirt connection opened on first use: a restore into a plain directory of
    new files needs none, and then must not fail for the lack of a libvirtd."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._hv: Hypervisor | None = None

    @property
    def hv(self) -> Hypervisor:
        if self._hv is None:
            self._hv = connect(self.uri)
        return self._hv

    def close(self) -> None:
        if self._hv is not None:
            self._hv.close()
            self._hv.close_host()   # a remote hypervisor's ssh master
            self._hv = None

    def used_paths(self) -> dict[str, list[str]]:
        return paths_in_use(domaindefine.running_domains(self.hv))

    def domain_exists(self, name: str) -> bool:
        return domaindefine.find(self.hv, name=name) is not None

    def define(self, xml: str, name: str) -> str:
        return domaindefine.define(self.hv, xml, name).uuid


def check_targets(finals: Mapping[str, Path], force: bool, lv: LazyHypervisor) -> None:
    """Refuse before any work: running domains' disks always, existing files without force."""
    existing = {t: p for t, p in finals.items() if os.path.lexists(p)}
    if not existing:
        return
    try:
        used = lv.used_paths()
    except VmSnapBackupError as err:
        if not force:
            raise UsageError(f"{next(iter(existing.values()))} exists; restore does not "
                             "replace files unless forced (--force)") from None
        raise HypervisorError(f"cannot make sure that no running domain uses "
                              f"{', '.join(map(str, existing.values()))}: {err}") from err
    for path in existing.values():
        users = users_of(path, used)
        if users:
            raise UsageError(f"{path} is a disk of running domain {', '.join(users)}; a "
                             "restore never replaces a running domain's disk (shut it off, "
                             "or restore elsewhere)")
    if not force:
        paths = ", ".join(str(p) for p in existing.values())
        raise UsageError(f"{paths} exist(s); restore does not replace files unless forced "
                         "(--force)")
    for path in existing.values():
        if not path.is_file():
            raise UsageError(f"{path} is not a regular file; restore only replaces files")
