"""Jobs another tool runs on a domain, which our snapshot has to wait for.

libvirt runs one domain job at a time: while another tool's backup job (say
virtnbdbackup's pull backup), a migration or a save runs, our snapshot and
checkpoint calls wait for it (libvirt gives up after about 30 s); a block job of
someone else's on a disk makes the snapshot fail.  The backup asks first, so
that it can say at once what it waits for instead of hanging silently.
"""
from __future__ import annotations

import libvirt

from .domain import Domain
from .domainxml import parse_disks
from .libvirterrors import translated

__all__ = ["busy_with"]

_OPERATIONS = {
    libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP: "a backup job (libvirt backup API: "
                                             "virtnbdbackup or another tool)",
    libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_IN: "an incoming migration",
    libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT: "a migration",
    libvirt.VIR_DOMAIN_JOB_OPERATION_SAVE: "a save",
    libvirt.VIR_DOMAIN_JOB_OPERATION_DUMP: "a memory dump",
    libvirt.VIR_DOMAIN_JOB_OPERATION_SNAPSHOT: "a snapshot",
    libvirt.VIR_DOMAIN_JOB_OPERATION_SNAPSHOT_DELETE: "a snapshot deletion",
}
_BLOCK_JOBS = {
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_PULL: "block pull",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY: "block copy",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT: "block commit",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT: "active block commit",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_BACKUP: "backup block job",
}


def busy_with(dom: Domain, targets: list[str] | None = None) -> list[str]:
    """What runs on the running domain now, one phrase each (empty: nothing).

    ``targets`` limits the block jobs looked at to those disks (None: every disk).
    """
    found: list[str] = []
    with translated(f"jobs of domain '{dom.name}'"):
        stats = dom.virdomain.jobStats(0)
    if int(stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE)) != libvirt.VIR_DOMAIN_JOB_NONE:
        op = int(stats.get("operation", libvirt.VIR_DOMAIN_JOB_OPERATION_UNKNOWN))
        found.append(_OPERATIONS.get(op, f"a domain job (operation {op})"))
    disks = [d.target for d in parse_disks(dom.xml()) if d.device == "disk"]
    for target in disks if targets is None else [t for t in disks if t in targets]:
        with translated(f"block job of disk '{target}' of domain '{dom.name}'"):
            info = dom.virdomain.blockJobInfo(target, 0)
        if info:
            kind = int(info.get("type", 0))
            found.append(f"a {_BLOCK_JOBS.get(kind, f'block job (type {kind})')} on disk "
                         f"{target}")
    return found
