"""Which blocks point N must read: a dirty bitmap's answer, trusted only once checked.

A generation's checkpoint (FORMAT §4) gives the frozen image a persistent
bitmap of every write since the generation's first snapshot.  Blocks it shows
unwritten still hold table 1's data, so the pass can take their values from
table 1 instead of reading them: backup N then costs the changed data, not
the whole disk.

The danger is a bitmap that missed a write (the image changed behind QEMU's
back: an offline ``qemu-img commit``, a file copied over, a tool that wrote
the qcow2 directly).  Table N would then be wrong *and* agree with the point
volume, so no later ``verify`` could notice.  Three guards stand before a
bitmap is used, and any doubt means reading everything -- slower, never
wrong:

* the generation names a checkpoint and libvirt still has it (an offline
  commit by ``repair`` deletes our checkpoints; a migration leaves them
  behind);
* QEMU holds the bitmap intact (persistent, not ``inconsistent``): checked by
  the storage daemon when it exports it;
* the generation's previous point was taken in the same QEMU run (FORMAT
  §7 ``qemu_run``): writes behind QEMU's back need the image closed, so the
  first point after a start reads everything and :func:`change_outside`
  proves the bitmap against that full read (or the checkpoint is deleted);
* :func:`unchanged_blocks_disagree`: every block the bitmap calls unwritten
  that now reads as a hole must have been zeros in table 1, and a random
  sample of the others is read and must hash to table 1's values.

This module only decides; the pass itself is :func:`diskpass.run_disk_pass`
with ``dirty=``.
"""
from __future__ import annotations

import logging
import random
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..core.blockruns import Run, block_runs, complement_runs, intersect_runs
from ..core.checktable import CheckTable, hash_blocks
from ..core.difftable import changed_indexes
from ..core.manifest import CHECKPOINT_PREFIX

if TYPE_CHECKING:
    from ..adapters.nbdclient import NbdClient

__all__ = [
    "SAMPLE_FRACTION",
    "SAMPLE_MAX",
    "SAMPLE_MIN",
    "change_outside",
    "is_our_checkpoint",
    "new_checkpoint_name",
    "unchanged_blocks_disagree",
]

log = logging.getLogger(__name__)

#: Share of the unwritten data blocks read back to test a bitmap, within bounds:
#: enough to catch a bitmap that missed a good part of the writes (a stale one),
#: cheap next to the pass (1024 blocks of 64 KiB = 64 MiB at most).
SAMPLE_FRACTION = 1 / 256
SAMPLE_MIN = 64
SAMPLE_MAX = 1024


def new_checkpoint_name(first_point: int) -> str:
    """A fresh checkpoint name for the generation that starts at ``first_point``.

    Random, so that a pool recreated at the same path (or brought back from
    a copy) can never take a checkpoint made for another pool's base as its
    own: the name is only ever trusted through the generation record.
    """
    return f"{CHECKPOINT_PREFIX}p{first_point}-{secrets.token_hex(4)}"


def is_our_checkpoint(name: str) -> bool:
    """Whether a checkpoint carries our reserved prefix (FORMAT §4)."""
    return name.startswith(CHECKPOINT_PREFIX)


def unchanged_blocks_disagree(source: NbdClient, table1: CheckTable, dirty: Sequence[Run],
                              *, data: Sequence[Run] | None = None,
                              rng: random.Random | None = None) -> str | None:
    """Why the bitmap's "unwritten" blocks cannot be trusted, or None when they pass.

    ``source`` is the export of the frozen image (``size``, ``data_ranges``,
    ``read_chunks``); ``dirty`` the bitmap's runs, aligned to table 1's blocks;
    ``data`` its data ranges, when the caller already has them.
    """
    bs = table1.block_size
    size = source.size
    if size != table1.disk_size:
        return f"the disk is {size} bytes, table 1 describes {table1.disk_size}"
    clean = list(complement_runs(dirty, size))
    data = list(source.data_ranges(bs)) if data is None else list(data)
    # a hole where table 1 had data means a write the bitmap did not see (a discard)
    for offset, length in intersect_runs(clean, complement_runs(data, size)):
        first, stop = offset // bs, -(-(offset + length) // bs)
        full_stop = min(stop, size // bs)
        bad = table1.first_data_block(first, full_stop)
        if bad is not None:
            return (f"block {bad} reads as a hole but held data in table 1, "
                    "and the bitmap calls it unwritten")
        if stop > full_stop and not table1.is_zero(stop - 1):
            return (f"block {stop - 1} reads as a hole but held data in table 1, "
                    "and the bitmap calls it unwritten")
    # the unwritten data blocks, as block spans: a list of them could hold one Python
    # int per block of the disk; ranks drawn from their count are mapped to indexes
    spans = [(offset // bs, -(-(offset + length) // bs))
             for offset, length in intersect_runs(clean, data)]
    total = sum(stop - first for first, stop in spans)
    if not total:
        return None
    want = min(total, max(SAMPLE_MIN, min(SAMPLE_MAX, int(total * SAMPLE_FRACTION))))
    chooser = rng or random.SystemRandom()
    sample: list[int] = []
    walk = iter(spans)
    first, stop = next(walk)
    passed = 0   # blocks in the spans before the current one
    for rank in sorted(chooser.sample(range(total), want)):
        while rank >= passed + stop - first:
            passed += stop - first
            first, stop = next(walk)
        sample.append(first + rank - passed)
    ranges = [(i * bs, min(n * bs, size - i * bs)) for i, n in block_runs(sample, 16)]
    for offset, view in source.read_chunks(ranges, chunk_size=16 * bs):
        hashed = hash_blocks(view, bs, offset // bs)
        for k, value in enumerate(hashed.values):
            index = hashed.first + k
            if value != table1.value(index):
                return (f"block {index} (offset {index * bs}) differs from table 1, but the "
                        "bitmap calls it unwritten")
    log.debug("dirty bitmap agrees with table 1 on %d sampled unwritten blocks", want)
    return None


def change_outside(table1: CheckTable, table: CheckTable, dirty: Sequence[Run]) -> int | None:
    """The first block that differs from table 1 but is clean in the bitmap, or None.

    ``table`` comes from a full read, so this proves (or refutes) that the
    bitmap saw every write since table 1 until now.
    """
    bs = table1.block_size
    marked = np.zeros(table1.count, dtype=np.bool_)
    for offset, length in dirty:
        marked[offset // bs:-(-(offset + length) // bs)] = True
    changed = changed_indexes(table1, table)
    outside = changed[~marked[changed.astype(np.intp)]]
    return int(outside[0]) if outside.size else None
