"""Temp images that a killed restore left behind, found and removed by the next one.

A restore writes each disk under a hidden temp name (``.NAME.restore-PID-HEX``,
see :mod:`.restoreimage`) and renames it only once it is proven.  When the
restoring process is SIGKILLed or the host loses power, the temp image stays:
as large as the disk, in the user's directory or a libvirt storage pool,
never named as an image and never used again.  Restore keeps no journal, so
the name itself says whose it was: a temp image is stale when its writer is no
longer alive, or when it was last written before the host booted (its PID may
belong to someone else by now).  One whose PID lives and that was written since
boot may be a restore running now, and is left alone.
"""
from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path

from ..adapters import processes

__all__ = ["TEMP_NAME", "sweep_stale_temps"]

log = logging.getLogger(__name__)

#: The temp name :func:`.restoreimage.temp_name` gives, with its writer's PID.
TEMP_NAME = re.compile(r"^\..+\.restore-(?P<pid>[0-9]+)-[0-9a-f]{8}$")


def _boot_time() -> float | None:
    """When this host booted (``btime`` of ``/proc/stat``), None where unknown."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def sweep_stale_temps(directory: Path) -> list[Path]:
    """Remove the stale temp images in ``directory``; return what was removed."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    booted = _boot_time()
    removed = []
    for name in names:
        match = TEMP_NAME.match(name)
        if match is None:
            continue
        path = directory / name
        try:
            info = path.lstat()
        except OSError:
            continue
        if not stat.S_ISREG(info.st_mode):
            continue        # not a file a restore wrote: not ours to judge
        before_boot = booted is not None and info.st_mtime < booted
        if processes.is_alive(int(match["pid"])) and not before_boot:
            continue
        try:
            path.unlink()
        except OSError as err:
            log.warning("could not remove %s, left by a restore that did not finish: %s",
                        path, err.strerror)
            continue
        log.warning("removed %s, left by a restore that did not finish", path)
        removed.append(path)
    return removed
