"""What one backup is asked to do: every choice of the caller in one typed, frozen record.

Why one record: the command line, ``run`` (a job's settings) and a run over
many domains all hand the same choices to :func:`.backup.backup`, and a
dictionary passed on as ``**kwargs`` hid a misspelt or missing one from the
type checker.  The record is checked when it is made, so a bad choice is a
:class:`~vmsnapbackup.errors.UsageError` before any domain or pool is touched,
and it is frozen, so one record can be shared by the threads of a run over
many domains.  No argparse namespace crosses into the library: the command
line builds this record.

``budget`` is the run's bandwidth budget (:mod:`.ratebudget`), carried down
to every disk pass of the backup; the domains of one run share one budget by
sharing one record.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..adapters.sourceexport import DataPath
from ..adapters.volumeformat import VolumeLayout, resolve_compression
from ..core.retention import Policy
from ..core.tablefile import DEFAULT_BLOCK_SIZE, validate_block_size
from ..errors import UsageError
from .backupkey import check_encryption
from .ratebudget import RateBudget

__all__ = ["BASE_FORMATS", "BackupOptions"]

BASE_FORMATS = ("qcow2", "raw")


@dataclass(frozen=True)
class BackupOptions:
    """The choices of one backup.

    ``quiesce`` None asks the guest agent and falls back to a crash-consistent
    snapshot; True insists; False never asks.

    ``dirty_bitmaps`` lets a running domain's new generation start with a
    libvirt checkpoint, whose bitmap later points use to skip reading what
    was not written (see :mod:`.dirtymap` for when it is trusted).  False
    creates no checkpoint, reads every data block and deletes the checkpoints
    vmsnapbackup left on the domain, so that other users of libvirt's backup
    API (virtnbdbackup) find none of ours; None follows the domain's own
    setting (``vmsnapbackup checkpoints off DOMAIN``), on by default.

    ``exclude`` leaves those disk targets out (a target the domain lacks is an
    error); ``disks`` None means every disk that can be backed up.

    ``threshold`` None lets :mod:`..core.genpolicy` decide when a new generation
    pays (from the stored sizes, weighing the base by ``retention``, the policy
    the pool is pruned with; None weighs it as a point); a fraction is the older
    rule "the newest point changed more than this fraction of a disk's blocks".

    ``compression`` ``"zstd"`` writes compressed volumes (FORMAT §15.1), ``"none"``
    plain ones, None the pool's default (recorded when this backup creates the pool).
    ``encrypt`` makes a new pool an encrypted one (FORMAT §15.2) with ``key_file``;
    an encrypted pool encrypts every backup and needs ``key_file``.

    ``budget``: the bandwidth budget every disk pass takes its reads from.
    """

    disks: Sequence[str] | None = None       # None: every disk that can be backed up
    exclude: Sequence[str] = ()
    quiesce: bool | None = None
    new_generation: bool = False
    threshold: float | None = None
    block_size: int = DEFAULT_BLOCK_SIZE
    base_format: str = "qcow2"
    overlay_dir: str | None = None
    dirty_bitmaps: bool | None = None
    retention: Policy | None = None
    data_path: DataPath | None = None
    compression: str | None = None
    encrypt: bool = False
    key_file: str | None = None
    budget: RateBudget | None = None

    def __post_init__(self) -> None:
        # tuples: a caller's list changed later must not change a record in use
        if self.disks is not None:
            object.__setattr__(self, "disks", tuple(self.disks))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        validate_block_size(self.block_size)
        if self.base_format not in BASE_FORMATS:
            raise UsageError(f"base format must be one of {', '.join(BASE_FORMATS)}, "
                             f"not {self.base_format!r}")
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise UsageError("the new-generation threshold must be in (0, 1], "
                             f"not {self.threshold}")
        compression = resolve_compression(self.compression, None)
        VolumeLayout(compression).check(self.base_format)
        check_encryption(self.encrypt, compression, self.key_file, self.base_format)
