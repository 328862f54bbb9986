"""Which files other processes on this host hold open (read from ``/proc``).

``prune`` must not delete a volume a running ``mount`` or ``boot`` (or any
other process: a qemu-img, a copy) is reading; the kernel knows who holds
what, so we ask it instead of trusting our own records.
"""
from __future__ import annotations

import os

from . import processes

__all__ = ["files_held_open"]


def files_held_open() -> dict[str, str]:
    """Every file some other process holds open: path -> ``pid N (command)``."""
    out: dict[str, str] = {}
    me = os.getpid()
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return out
    for pid in pids:
        if pid == me:
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue  # gone, or not ours to see
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            target = target.removesuffix(" (deleted)")
            if target.startswith("/") and target not in out:
                out[target] = f"pid {pid} ({processes.process_name(pid) or '?'})"
    return out
