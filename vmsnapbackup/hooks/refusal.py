"""Whether a domain may start or migrate in now: the hook's pure decision.

libvirt gives the hook the domain XML and nothing else; the host gives it the
in-flight records of our live operations (FORMAT §11).  Deciding from those two
alone, with no libvirt call and no I/O beyond ``realpath``, is what lets the
hook answer within its time budget while libvirtd holds the domain's job.
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass

from ..adapters.domainxml import Disk, is_our_overlay, parse_disks
from ..core.inflight import InflightRecord

__all__ = [
    "DomainInfo",
    "HookCall",
    "describe",
    "is_domain",
    "migrate_refusal",
    "parse_domain",
    "start_refusal",
]


@dataclass(frozen=True)
class HookCall:
    """libvirt's four arguments."""

    domain: str
    op: str
    subop: str = "-"
    extra: str = "-"

    @classmethod
    def from_argv(cls, argv: Sequence[str]) -> HookCall:
        args = list(argv) + ["-"] * (4 - len(argv))
        return cls(*args[:4])


@dataclass(frozen=True)
class DomainInfo:
    """What the hook knows about the domain: only what its XML says."""

    name: str
    uuid: str | None
    disks: tuple[Disk, ...]

    @property
    def images(self) -> frozenset[str]:
        """Every local image of every disk (top and known backing chain), in both their
        written and resolved form, so a symlinked path still matches a record."""
        paths: set[str] = set()
        for disk in self.disks:
            if disk.type not in ("file", "block") or not disk.source:
                continue
            for image in (disk.top, *disk.backing_chain):
                if image.path:
                    paths.update(_path_forms(image.path))
        return frozenset(paths)

    @property
    def overlay_disks(self) -> list[Disk]:
        """Disks whose guest-writable image is one of our overlays."""
        return [d for d in self.disks if d.type == "file" and is_our_overlay(d.source)]


def _path_forms(path: str) -> tuple[str, ...]:
    norm = os.path.normpath(path)
    try:
        real = os.path.realpath(norm)
    except OSError:
        return (norm,)
    return (norm, real) if real != norm else (norm,)


def parse_domain(xml: str, fallback_name: str) -> DomainInfo:
    """The domain's name, uuid and disks from the XML on stdin (pure)."""
    root = ET.fromstring(xml)
    name = (root.findtext("name") or "").strip() or fallback_name
    uuid = (root.findtext("uuid") or "").strip().lower() or None
    return DomainInfo(name=name, uuid=uuid, disks=tuple(parse_disks(xml)))


def is_domain(record: InflightRecord, info: DomainInfo) -> bool:
    if info.uuid is not None:
        return record.uuid.lower() == info.uuid
    return record.name == info.name


def _shared_images(record: InflightRecord, info: DomainInfo) -> list[str]:
    mine = info.images
    return sorted(p for p in record.images if mine.intersection(_path_forms(p)))


def describe(record: InflightRecord) -> str:
    kind = "offline " if record.offline else ""
    return f"{kind}{record.operation} of {record.name} (pid {record.pid}, since {record.since})"


def start_refusal(info: DomainInfo, live: Sequence[InflightRecord]) -> str | None:
    """Why the domain must not start now, or None.

    An offline operation reads the images directly, with no snapshot between it
    and the guest: a guest writing them at the same time would make the copy
    inconsistent (or the operation would write under a running guest).
    """
    for record in live:
        if record.offline and is_domain(record, info):
            return (f"domain {info.name} cannot start: "
                    f"an {describe(record)} is reading its disks; "
                    "wait for it to finish (or stop that process)")
    for record in live:
        shared = _shared_images(record, info)
        if shared:
            return (f"domain {info.name} cannot start: its image(s) {', '.join(shared)} are in use "
                    f"by the {describe(record)}; wait for it to finish (or stop that process)")
    return None


def migrate_refusal(info: DomainInfo, live: Sequence[InflightRecord]) -> str | None:
    """Why the domain must not migrate in, or None: our operation holds it on this host."""
    for record in live:
        if is_domain(record, info):
            return (f"domain {info.name} cannot migrate: a {describe(record)} is working on it; "
                    "wait for it to finish")
    return None
