"""A boot's note: the record of what one ``boot`` made, written beside its overlays.

Kept in one place because two kinds of boot write it -- on this machine
(:mod:`.boot`) and on a remote hypervisor (:mod:`.remoteboot`) -- and
``--resume`` and ``--discard`` of either read back exactly these fields: the
point's volumes with their pinned chains (docs/DESIGN.md §8), the overlays'
plain names, and the domain's UUID once it is defined.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..adapters.pinnedchain import PinnedImage
from ..core.domainstore import DomainStore
from ..core.manifest import PointDisk, utc_now

__all__ = ["BOOT_FORMAT", "BOOT_VERSION", "new_note"]

BOOT_FORMAT = "vmsnapbackup-boot"
BOOT_VERSION = 1


def new_note(name: str, uri: str, store: DomainStore, point: int,
             volumes: Mapping[str, tuple[PointDisk, PinnedImage]],
             **extra: Any) -> dict[str, Any]:
    """The note of boot ``name`` of ``point`` before its domain is defined (``uuid``
    None); ``volumes`` maps each target to its manifest entry and pinned volume."""
    return {
        "format": BOOT_FORMAT, "version": BOOT_VERSION, "name": name, "uuid": None,
        "created": utc_now(), "uri": uri, **extra,
        "source": {"domain": store.name, "uuid": store.uuid, "point": point,
                   "pool": str(store.pool.root)},
        "disks": {t: {"overlay": f"{t}.qcow2", "export": t, "volume": v.path,
                      "format": d.volume_format, "virtual_size": d.virtual_size,
                      "base": v.backing.path if v.backing else None,
                      "base_format": v.backing.fmt if v.backing else None}
                  for t, (d, v) in sorted(volumes.items())},
    }
