"""Before a backup takes a point number: is the domain free, which disks, where overlays go.

Everything here can refuse, and it refuses before the pool is created or a
point number is burnt: a backup that could never have started leaves no trace
(issue 18: a block disk without ``--overlay-dir`` used to cost a point number).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ..adapters.domainxml import Disk, SkippedDisk
from ..adapters.host import LOCAL
from ..core import inflight
from ..core.defaults import BLOCK_OVERLAY_ROOT
from ..errors import LockedError, NotFoundError, UsageError

__all__ = ["announce_new_pool", "apply_exclude", "overlay_dirs", "refuse_live_backup"]

log = logging.getLogger(__name__)

#: QEMU (another user) must reach the overlays: traverse only, no listing.
_OVERLAY_DIR_MODE = 0o711


def refuse_live_backup(uuid: str, name: str) -> None:
    """LockedError when another live process of this host is backing the domain up now.

    A backup into another pool holds another pool lock, so only the host-wide
    in-flight record sees it; without this check its overlays looked like the
    leftovers of a dead backup and we set out to "repair" a live one.
    """
    record = inflight.read(uuid)
    if record is None or record.pid == os.getpid() or not inflight.is_live(record):
        return
    into = f" into pool {record.pool}" if record.pool else ""
    raise LockedError(
        f"domain {name} is busy: a live {record.operation} by another process "
        f"(pid {record.pid}){into} since {record.since}; try again when it is done")


def apply_exclude(name: str, all_targets: Sequence[str], selected: list[Disk],
                  skipped: list[SkippedDisk],
                  exclude: Sequence[str]) -> tuple[list[Disk], list[SkippedDisk]]:
    """``--exclude TARGET``: leave those disks out; a name the domain lacks is NotFoundError."""
    if not exclude:
        return selected, skipped
    unknown = sorted(set(exclude) - set(all_targets))
    if unknown:
        raise NotFoundError(f"cannot exclude disk {', '.join(unknown)}: domain {name} has no "
                            f"such disk (its disks: {', '.join(all_targets) or 'none'})")
    kept = [d for d in selected if d.target not in exclude]
    dropped = [SkippedDisk(d, "excluded") for d in selected if d.target in exclude]
    return kept, skipped + dropped


def overlay_dirs(name: str, uuid: str, disks: Sequence[Disk], overlay_dir: str | None,
                 running: bool) -> dict[str, str | None]:
    """Where each disk's snapshot overlay goes (None: beside its image).

    A block device has no directory beside it: without ``--overlay-dir`` its
    overlay goes to ``BLOCK_OVERLAY_ROOT/<domain uuid>``, made here (and said).
    A shut-off domain is read directly and needs no overlay at all.
    """
    if overlay_dir is not None:
        info = LOCAL.stat(overlay_dir) if running else None
        if running and (info is None or not info.is_dir):
            raise UsageError(f"--overlay-dir {overlay_dir}: no such directory")
        return {d.target: overlay_dir for d in disks}
    out: dict[str, str | None] = {d.target: None for d in disks}
    devices = [d.target for d in disks if d.type != "file"]
    if not running or not devices:
        return out
    place = str(Path(BLOCK_OVERLAY_ROOT) / uuid)
    try:
        LOCAL.mkdir(BLOCK_OVERLAY_ROOT, _OVERLAY_DIR_MODE, parents=True, exist_ok=True)
        LOCAL.mkdir(place, _OVERLAY_DIR_MODE, exist_ok=True)
    except OSError as err:
        raise UsageError(
            f"domain {name}: disk {', '.join(devices)} is a block device, whose snapshot "
            f"overlay goes to {place} by default, which cannot be made ({err.strerror}): "
            "give --overlay-dir DIR") from err
    log.info("domain %s: disk %s is a block device: its snapshot overlay goes to %s "
             "(--overlay-dir DIR for another place)", name, ", ".join(devices), place)
    for target in devices:
        out[target] = place
    return out


def release_overlay_dirs(places: dict[str, str | None]) -> None:
    """Remove the default per-domain overlay directories of :func:`overlay_dirs`
    once they are empty again, so that no directory outlives its domain.

    Called with the domain's backup lock held, after the backup (done or
    undone): an overlay still in it (a backup that could not undo itself)
    keeps it, as ``repair`` needs to find the overlay there.
    """
    root = Path(BLOCK_OVERLAY_ROOT)
    for place in {p for p in places.values() if p is not None}:
        if Path(place).parent != root:
            continue            # the user's --overlay-dir is theirs
        try:
            LOCAL.rmdir(place)
        except OSError as err:
            log.debug("keeping %s: %s", place, err.strerror)


def announce_new_pool(pool_dir: Path) -> None:
    """A backup creates a missing pool (``list`` only reports it): say so."""
    if not pool_dir.exists():
        log.warning("pool %s does not exist yet: creating it", pool_dir)
