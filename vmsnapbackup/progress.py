"""Progress events: how long work tells its caller how far it got.

The library only emits events; what to do with them (a bar on a terminal, log
lines, nothing) is the caller's choice, so a virt-management tool embedding
vmsnapbackup can feed its own UI.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

__all__ = ["ProgressEvent", "ProgressCallback", "emit"]


@dataclass(frozen=True)
class ProgressEvent:
    """``done`` of ``total`` bytes of ``phase`` ("read", "restore", "verify") on ``disk``."""

    disk: str
    phase: str
    done: int
    total: int
    finished: bool = False


ProgressCallback = Callable[[ProgressEvent], None]


def emit(callback: Optional[ProgressCallback], event: ProgressEvent) -> None:
    """Call ``callback`` if there is one (keeps the ``if`` out of every hot loop's caller)."""
    if callback is not None:
        callback(event)
