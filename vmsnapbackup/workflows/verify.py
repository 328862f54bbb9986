"""Verify: is every point still restorable, bit for bit?

A backup nobody has read back is a hope.  ``verify`` checks, for each point,
everything a restore relies on, in the order a restore reads it (FORMAT §10):
the manifest, table 1 and the difference table (each file's own checksum and
the manifest's digests, table N rebuilt to the manifest's ``table_digest``),
then the volumes themselves, read through a read-only export and hashed block
by block against the table.

Damage is attributed where it lives, because that decides what is lost:

* a damaged **base volume** or **table 1** breaks every point of its
  generation (each point reads through the base);
* a damaged **point volume** or **difference table** breaks that point only.

So the base volume is read once per generation (against table 1), and each
later point's volume (exported with its base beneath it, i.e. the full disk
at that point) against its table N.  With ``sample`` only a random share of
the *stored* blocks is read, freshly drawn each run, and the report says how
likely that was to find a damaged block (see :mod:`.verifysample`).

The library returns the report and never raises for damage: the caller
decides (the CLI prints the whole report, then exits INTEGRITY).
"""
from __future__ import annotations

import logging
import os
import random
import time
from typing import Any

from ..adapters.pinnedchain import PinnedImage
from ..core.checktable import CheckTable
from ..core.defaults import DEFAULT_URI
from ..core.manifest import PointDisk
from ..core.pool import DomainStore, PointInfo
from ..core.poolkey import read_check
from ..errors import (
    ExportError,
    IncompatibleFormatError,
    IntegrityError,
    NotFoundError,
    UsageError,
)
from ..progress import ProgressCallback
from .pointread import (
    PoolLike,
    hash_image,
    hash_sampled,
    open_pool,
    pool_key_file,
    read_daemon,
    read_point_tables,
    read_table1,
    reading,
)
from .verifyreport import (
    BASE,
    DAMAGED,
    DIFFERENCE,
    GOOD,
    INCOMPATIBLE,
    TABLE1,
    VOLUME,
    DiskCheck,
    DomainCheck,
    PointCheck,
    Problem,
    VerifyReport,
    format_point,
    format_report,
)
from .verifysample import SampleTally, draw, fresh_seed, stored_in_base, stored_in_point

__all__ = [
    "DAMAGED",
    "GOOD",
    "INCOMPATIBLE",
    "DiskCheck",
    "DomainCheck",
    "PointCheck",
    "Problem",
    "VerifyReport",
    "format_point",
    "format_report",
    "verify",
]

log = logging.getLogger(__name__)

#: Errors that mean "this file or volume is damaged or unreadable", as opposed to bugs.
_DAMAGE = (IntegrityError, IncompatibleFormatError, ExportError, NotFoundError)


# --- the workflow ----------------------------------------------------------------------

def verify(
    pool: PoolLike,
    *,
    domain: str | None = None,
    point: int | None = None,
    sample: float | None = None,
    uri: str = DEFAULT_URI,
    progress: ProgressCallback | None = None,
    seed: int | None = None,
    runtime_base: str | None = None,
    key_file: str | os.PathLike[str] | None = None,
) -> VerifyReport:
    """Check the points of ``domain`` (every domain when None), or only ``point``.

    ``pool`` is a path or a libvirt storage pool name (``uri`` is only used to look
    that up: verify needs no domain).
    ``sample`` is a percentage of blocks to read per volume (None: all of them);
    ``seed`` makes the sample reproducible.  Returns the report; damage is in it,
    not raised.
    """
    started = time.monotonic()
    if point is not None and domain is None:
        raise UsageError("a point number is per domain: name the domain to verify one point")
    if sample is not None and not 0 < sample <= 100:
        raise UsageError(f"--sample is a percentage above 0 and at most 100, not {sample}")
    if sample is not None and sample >= 100:
        sample = None
    the_pool = open_pool(pool, uri, key_file)   # an encrypted pool's key (FORMAT §15.2)
    stores = [the_pool.find_domain(domain)] if domain is not None else the_pool.domains()
    if sample is not None and seed is None:
        seed = fresh_seed()
    report = VerifyReport(pool=str(the_pool.root), sample=sample,
                          seed=seed if sample is not None else None)
    rng = random.Random(seed)
    with read_daemon("verify", runtime_base) as daemon:
        for store in stores:
            checker = _DomainChecker(store, daemon, sample, rng, progress, report.tally)
            with reading(store):   # no prune removes a point under the check (FORMAT §8)
                report.domains.append(checker.run(point))
    report.seconds = time.monotonic() - started
    log.info("verify of %s: %s", the_pool.root, report.counts())
    return report


class _DomainChecker:
    """One domain's points; caches what a generation's points share (table 1, base check)."""

    def __init__(self, store: DomainStore, daemon: Any, sample: float | None,
                 rng: random.Random, progress: ProgressCallback | None,
                 tally: SampleTally) -> None:
        self.store = store
        self.tally = tally
        self.daemon = daemon
        self.sample = sample
        self.rng = rng
        self.progress = progress
        self._table1: dict[tuple[int, str, str], Any] = {}  # CheckTable or Problem
        self._base: dict[tuple[int, str, str], tuple[Problem | None, int]] = {}
        self._generations_checked: dict[int, bool] = {}

    def run(self, point: int | None) -> DomainCheck:
        result = DomainCheck(uuid=self.store.uuid, name=self.store.name)
        infos = self.store.list_points()
        if point is not None:
            infos = [i for i in infos if i.number == point]
            if not infos:
                raise NotFoundError(f"domain {self.store.name} has no point {point}")
        for info in infos:
            result.points.append(self._check_point(info, result))
        return result

    # -- a point --------------------------------------------------------------------

    def _check_point(self, info: PointInfo, domain: DomainCheck) -> PointCheck:
        if info.manifest is None:
            status = INCOMPATIBLE if info.incompatible else DAMAGED
            log.warning("domain %s: point %d: manifest %s", self.store.name, info.number,
                        info.damaged)
            return PointCheck(info.number, None, None, status=status, reason=info.damaged)
        m = info.manifest
        if self._table1 and all(k[0] != m.generation for k in self._table1):
            self._table1.clear()  # points come in order: an old generation's tables are done
        check = PointCheck(m.point, m.generation, m.snapshot_at or m.started)
        self._check_generation_record(m.generation, domain)
        for disk in m.disks:
            check.disks.append(self._check_disk(m.point, m.generation, disk))
        check.settle()
        log.info("domain %s: point %d: %s", self.store.name, m.point, check.status)
        return check

    def _check_disk(self, number: int, generation: int, disk: PointDisk) -> DiskCheck:
        dc = DiskCheck(disk.target, total=-(-disk.virtual_size // disk.block_size))
        table1 = self._read_table1(generation, disk)
        if isinstance(table1, Problem):
            dc.problems.append(table1)
            return dc
        base_problem = self._check_base(generation, disk, table1, dc)
        if base_problem is not None:
            dc.problems.append(base_problem)
        try:
            tables = read_point_tables(self.store, disk, table1)
        except _DAMAGE as err:
            kind = TABLE1 if disk.is_base else DIFFERENCE
            dc.problems.append(Problem(kind, str(err)))
            return dc
        if disk.is_base or base_problem is not None:
            # the base check was this point's check; or the base is damaged, which
            # already breaks this point (reading through it would only repeat that)
            return dc
        path = self.store.resolve(disk.volume)
        indexes = None
        if tables.difference is not None:
            indexes = self._sample_of(path, stored_in_point(tables.difference))
        problem = self._check_volume(VOLUME, path, disk.volume_format, tables.table,
                                     f"{disk.target} point {number}", dc, indexes,
                                     PinnedImage(str(self.store.resolve(disk.base)),
                                                 disk.base_format,
                                                 key_file=pool_key_file(self.store)))
        if problem is not None:
            dc.problems.append(problem)
        return dc

    # -- shared per generation ------------------------------------------------------

    def _read_table1(self, generation: int, disk: PointDisk) -> Any:
        key = (generation, disk.target, disk.table1_digest)
        if key not in self._table1:
            try:
                self._table1[key] = read_table1(self.store, disk)
            except _DAMAGE as err:
                log.warning("domain %s: generation %d: %s: table 1: %s", self.store.name,
                            generation, disk.target, err)
                self._table1[key] = Problem(TABLE1, str(err))
        return self._table1[key]

    def _check_base(self, generation: int, disk: PointDisk, table1: CheckTable,
                    dc: DiskCheck) -> Problem | None:
        key = (generation, disk.target, disk.base)
        if key not in self._base:
            probe = DiskCheck(disk.target)
            path = self.store.resolve(disk.base)
            problem = self._check_volume(
                BASE, path, disk.base_format, table1,
                f"{disk.target} base gen {generation}", probe,
                self._sample_of(path, stored_in_base(table1)))
            self._base[key] = (problem, probe.checked)
        problem, checked = self._base[key]
        dc.checked = max(dc.checked, checked)
        return problem

    def _check_generation_record(self, generation: int, domain: DomainCheck) -> None:
        """``generation.json`` is what the next backup compares with: a damaged one or a
        table digest that disagrees with table 1 is damage, even if no point is lost."""
        if generation in self._generations_checked:
            return
        self._generations_checked[generation] = True
        try:
            rec = self.store.read_generation(generation)
        except _DAMAGE as err:
            domain.problems.append(f"generation {generation}: {err}")
            return
        for target, gdisk in rec.disks.items():
            path = self.store.disk_dir(generation, target) / gdisk.table
            try:
                read_check(self.store, path,
                           expected_body_digest=bytes.fromhex(gdisk.table_digest))
            except _DAMAGE as err:
                domain.problems.append(f"generation {generation}: {target}: {err}")

    # -- reading a volume -----------------------------------------------------------

    def _sample_of(self, volume: Any, stored: Any) -> Any:
        """A fresh sample of the blocks ``volume`` stores (None: read all of it).
        A point's sample is drawn from its own stored blocks, so a mismatch found
        there is its own volume's, never a base block showing through."""
        if self.sample is None:
            return None
        picked = draw(stored, self.sample, self.rng)
        self.tally.add(str(volume), int(stored.size), int(picked.size))
        return picked

    def _check_volume(self, kind: str, path: Any, fmt: str, expected: CheckTable,
                      label: str, dc: DiskCheck, indexes: Any,
                      backing: PinnedImage | None = None) -> Problem | None:
        if not path.is_file():
            return Problem(kind, f"{path} is missing")
        try:
            if indexes is None:
                mismatch = hash_image(self.daemon, path, fmt, expected, backing=backing,
                                      disk=label, phase="verify", progress=self.progress,
                                      key_file=pool_key_file(self.store))
            else:
                mismatch = hash_sampled(self.daemon, path, fmt, expected, indexes,
                                        backing=backing, disk=label, phase="verify",
                                        progress=self.progress,
                                        key_file=pool_key_file(self.store))
        except _DAMAGE as err:
            log.warning("domain %s: %s: cannot read %s: %s", self.store.name, label, path, err)
            return Problem(kind, f"cannot read {path}: {err}")
        dc.checked = max(dc.checked, mismatch.checked)
        if mismatch.ok:
            return None
        log.warning("domain %s: %s: %s %s: %s", self.store.name, label, kind, path,
                    mismatch.describe())
        return Problem(kind, f"{path}: {mismatch.describe()}", mismatch)
