"""``vmsnapbackup checkpoints``: our libvirt checkpoints on a domain, and whether we make any.

A libvirt checkpoint gives later points a dirty bitmap (fewer reads), but other
users of libvirt's backup API (virtnbdbackup) refuse to run beside a checkpoint
they did not make.  For a domain both tools back up, turn ours off: every backup
then reads every data block and leaves no checkpoint.  ``remove`` deletes ours
now, say when the pool that used them is deleted.  Neither touches anyone
else's checkpoint, nor any pool: a generation whose checkpoint is gone is whole,
its later points just read every data block.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..adapters.checkpoints import checkpoints_wanted, set_checkpoints_wanted
from ..adapters.hypervisor import connect
from ..core.defaults import DEFAULT_URI
from ..errors import UsageError
from .bitmappolicy import remove_our_checkpoints
from .dirtymap import is_our_checkpoint

__all__ = ["CheckpointReport", "domain_checkpoints"]

ACTIONS = ("show", "remove", "on", "off")


@dataclass
class CheckpointReport:
    """The domain's checkpoints after the action, and what the action did."""

    domain: str
    action: str
    checkpoints_wanted: bool
    ours: list[str] = field(default_factory=list)
    others: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def domain_checkpoints(domain: str, action: str = "show", *,
                       uri: str = DEFAULT_URI) -> CheckpointReport:
    """``show`` the domain's checkpoints and setting; ``remove`` ours; turn ours ``on``/``off``.

    ``off`` also removes ours, so the domain is checkpoint-free from now on.
    """
    if action not in ACTIONS:
        raise UsageError(f"unknown checkpoints action {action!r} (one of {', '.join(ACTIONS)})")
    with connect(uri) as hv:
        dom = hv.find_domain(domain)
        name = hv.domain_name(dom)
        removed: list[str] = []
        if action in ("on", "off"):
            set_checkpoints_wanted(dom, action == "on")
        if action in ("remove", "off"):
            removed = remove_our_checkpoints(hv, dom, name)
        names = hv.checkpoint_names(dom)
        return CheckpointReport(
            domain=name, action=action, checkpoints_wanted=checkpoints_wanted(dom),
            ours=[n for n in names if is_our_checkpoint(n)],
            others=[n for n in names if not is_our_checkpoint(n)], removed=removed)
