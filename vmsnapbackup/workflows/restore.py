"""Restore: write the disks of point N as image files, and prove them right first.

A restore is the moment a backup is worth something, so an image only gets
its final name once every block of it was shown to hold what table N says;
an image that does not match is kept, under ``<name>.unverified``, for
inspection -- deleting it would destroy the only evidence -- and the restore
fails with the blocks that differ (VerifyMismatchError).

Table N is the reference: rebuilt from table 1 and difference N, each file
checked against the manifest's checksums and the result against its
``table_digest`` (``pointread.read_point_tables``), before anything is written.
How one disk is written and proved (raw in one pass, qcow2 by ``qemu-img
convert`` then read back) is :mod:`.restoreimage`'s to say; which files may be
replaced, and the domain ``define`` makes, :mod:`.restoretarget`'s.

Every image is 0600 from its creation: a disk's contents are as private as the
pool's.  Over ``qemu+ssh`` the images of ``--pool-volume`` (and so of
``--define``) are written on the hypervisor, through a storage daemon there
(:mod:`.restoreremote`).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapters import storagepool
from ..adapters.host import LOCAL
from ..adapters.hostfor import ssh_target_for
from ..adapters.newdomain import DOMAIN_NAME_RE
from ..adapters.pinnedchain import check_header
from ..adapters.sourceexport import DataPath
from ..core.defaults import DEFAULT_URI
from ..core.manifest import PointManifest
from ..core.poolkey import with_domain_xml
from ..errors import StorageError, UsageError, VerifyMismatchError
from ..progress import ProgressCallback
from .interrupt import interruptible
from .pointread import (
    PoolLike,
    open_pool,
    pinned_volume,
    read_daemon,
    read_point_tables,
    reading,
    select_disks,
    select_point,
)
from .restoreimage import DiskPlan, RestoredDisk, restore_disk
from .restoreremote import RemoteRestore, remote_volume, restore_remote_disks
from .restoresweep import sweep_stale_temps
from .restoretarget import (
    RESTORE_FORMATS,
    UNVERIFIED_SUFFIX,
    LazyHypervisor,
    check_targets,
    image_name,
    paths_in_use,
    rewrite_domain_xml,
    unverified_name,
    users_of,
)

__all__ = [
    "RESTORE_FORMATS",
    "UNVERIFIED_SUFFIX",
    "DefinedDomain",
    "RestoreResult",
    "RestoredDisk",
    "image_name",
    "paths_in_use",
    "restore",
    "rewrite_domain_xml",
    "unverified_name",
    "users_of",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DefinedDomain:
    """The shut-off domain ``define`` created; ``dropped`` lists disks of the saved XML
    that were left out (not restored, and not safe to share with the original)."""

    name: str
    uuid: str
    dropped: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "uuid": self.uuid, "dropped_disks": list(self.dropped)}


@dataclass(frozen=True)
class RestoreResult:
    domain: str
    uuid: str
    point: int
    generation: int
    snapshot_at: str | None
    directory: str
    format: str
    disks: tuple[RestoredDisk, ...]
    seconds: float
    defined: DefinedDomain | None = None
    storage_pool: str | None = None
    #: newer points skipped because damaged (only when no point was asked for)
    skipped_damaged: tuple[int, ...] = ()

    @property
    def ok(self) -> bool:
        return all(d.verified for d in self.disks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "domain": self.domain, "uuid": self.uuid, "point": self.point,
            "generation": self.generation, "snapshot_at": self.snapshot_at,
            "directory": self.directory, "format": self.format, "ok": self.ok,
            "seconds": round(self.seconds, 3),
            "disks": [d.to_dict() for d in self.disks],
            "defined": self.defined.to_dict() if self.defined else None,
            "storage_pool": self.storage_pool,
            "skipped_damaged": list(self.skipped_damaged),
        }


def restore(
    domain: str,
    pool: PoolLike,
    *,
    point: int | None = None,
    disks: Sequence[str] | None = None,
    to: str | os.PathLike[str] | None = None,
    fmt: str = "raw",
    force: bool = False,
    define: str | None = None,
    pool_volume: str | None = None,
    trust_pool_xml: bool = False,
    uri: str = DEFAULT_URI,
    progress: ProgressCallback | None = None,
    runtime_base: str | None = None,
    key_file: str | os.PathLike[str] | None = None,
    data_path: DataPath | None = None,
) -> RestoreResult:
    """Restore the disks of point ``point`` (newest when None) of ``domain``.

    Images go to the directory ``to``, or with ``pool_volume`` into that libvirt
    dir/netfs storage pool as volumes ``<define or domain>-<target>.<fmt>``.
    Every image is checked against table N before it gets its final name; a
    mismatch raises VerifyMismatchError after every disk was tried (the failing
    ones stay as ``<name>.unverified``), and ``define`` is then not done.
    ``define`` leaves out of the pool's saved XML what reaches into the host
    (passthrough, ``qemu:commandline``; docs/DESIGN.md §8) unless ``trust_pool_xml``.
    ``key_file`` is the key of an encrypted pool (FORMAT §15.2).

    Over ``qemu+ssh`` a ``pool_volume`` is the hypervisor's storage pool and the
    images are written there (:mod:`.restoreremote`; ``data_path``: NBD over TLS
    instead of ssh forwarding); ``to`` is a directory on this server.
    """
    started = time.monotonic()
    if fmt not in RESTORE_FORMATS:
        raise UsageError(f"restore writes raw or qcow2 images, not {fmt!r}")
    if (to is None) == (pool_volume is None):
        raise UsageError("give exactly one of a directory (--to) and a libvirt storage pool "
                         "(--pool-volume)")
    if define is not None and not DOMAIN_NAME_RE.fullmatch(define):
        raise UsageError(f"not a usable domain name: {define!r}")
    on_hypervisor = _check_remote(uri, define, pool_volume)
    store = open_pool(pool, uri, key_file).find_domain(domain)
    # no prune removes what this restore reads, from the manifest to the last volume
    with reading(store):
        manifest = with_domain_xml(store, select_point(store, point))
        skipped: tuple[int, ...] = ()
        if point is None:
            skipped = tuple(p.number for p in store.damaged_points() if p.number > manifest.point)
            if skipped:
                log.warning("domain %s: WARNING: newer point(s) %s are damaged and were skipped; "
                            "restoring the older point %d (run verify)", store.name,
                            ", ".join(map(str, skipped)), manifest.point)
        chosen = select_disks(manifest, disks)

        lv = LazyHypervisor(uri)
        try:
            storage_pool = None
            if pool_volume is not None:
                directory, storage_pool = storagepool.resolve_pool(pool_volume, uri)
                prefix: str | None = define or manifest.domain.name
            else:
                assert to is not None
                directory = Path(os.path.abspath(os.fspath(to)))
                prefix = None
            if not on_hypervisor and directory.exists() and not directory.is_dir():
                raise UsageError(f"{directory} is not a directory")

            plans = []
            for d in chosen:
                tables = read_point_tables(store, d)  # damaged tables: refuse before writing
                volume = pinned_volume(store, d)   # missing volumes: refuse before writing
                check_header(volume)   # so is a header naming another backing file
                name = image_name(d.target, fmt, prefix)
                if on_hypervisor:
                    final = Path(remote_volume(lv.hv.host, os.fspath(directory), name))
                elif pool_volume:
                    final = storagepool.contained_volume(directory, name)
                else:
                    final = directory / name
                plans.append(DiskPlan(d, tables, volume, final))
            if not on_hypervisor:   # remote_volume refused every existing file
                check_targets({p.disk.target: p.final for p in plans}, force, lv)
            if define is not None and lv.domain_exists(define):
                raise UsageError(f"domain '{define}' already exists; choose another name")
            if not on_hypervisor:
                _prepare_directory(directory)

            tag = f"restore-{store.name}"
            # a signal unwinds through restore_disk, which removes its temp file
            with interruptible("restore"), read_daemon(tag, runtime_base) as daemon:
                if on_hypervisor:
                    remote = RemoteRestore(lv.hv.host, data_path or DataPath())
                    restored = restore_remote_disks(plans, fmt, daemon, remote, tag, progress)
                else:
                    restored = [restore_disk(plan, fmt, daemon, progress) for plan in plans]
            if storage_pool is not None:
                storagepool.refresh_pool(storage_pool, uri)

            result = RestoreResult(
                domain=manifest.domain.name, uuid=manifest.domain.uuid, point=manifest.point,
                generation=manifest.generation, snapshot_at=manifest.snapshot_at,
                directory=os.fspath(directory), format=fmt, disks=tuple(restored),
                seconds=time.monotonic() - started, storage_pool=storage_pool,
                skipped_damaged=skipped)
            if not result.ok:
                raise _mismatch_error(result)
            if define is not None:
                result = _define(result, manifest, define, lv, trust_pool_xml)
            log.info("restored point %d of %s into %s in %.2f s", manifest.point,
                     manifest.domain.name, directory, result.seconds)
            return result
        finally:
            lv.close()


def _check_remote(uri: str, define: str | None, pool_volume: str | None) -> bool:
    """Whether the images go to a remote hypervisor (``--pool-volume`` over qemu+ssh);
    refuses what cannot work there: a path for ``--pool-volume`` (it names the
    hypervisor's libvirt storage pool), ``--define`` of images left on this server."""
    if ssh_target_for(uri) is None:
        return False
    if pool_volume is None:
        if define is not None:
            raise UsageError(f"restore --define on {uri} needs --pool-volume POOLNAME: the "
                             "images must be on the hypervisor the new domain runs on")
        return False
    if storagepool.looks_like_path(pool_volume):
        raise UsageError(f"--pool-volume on {uri} names a libvirt storage pool of the "
                         f"hypervisor, not a path: {pool_volume!r}")
    return True


def _prepare_directory(directory: Path) -> None:
    """Create the local target directory and remove what a killed restore left there."""
    if not directory.exists():
        try:
            LOCAL.mkdir(os.fspath(directory), 0o755, parents=True)
        except OSError as err:
            raise StorageError(f"cannot create {directory}: {err.strerror}") from err
    sweep_stale_temps(directory)


def _mismatch_error(result: RestoreResult) -> VerifyMismatchError:
    parts = [f"{d.target}: {d.mismatch.describe()} (image kept as {d.path})"
             for d in result.disks if d.mismatch is not None]
    err = VerifyMismatchError(
        f"restore of point {result.point} of {result.domain} does not match its check "
        f"table: " + "; ".join(parts))
    err.result = result  # type: ignore[attr-defined]  # for callers that want the details
    return err


def _define(result: RestoreResult, manifest: PointManifest, name: str,
            lv: LazyHypervisor, trust: bool) -> RestoreResult:
    images = {d.target: (d.path, d.format) for d in result.disks}
    xml, dropped = rewrite_domain_xml(manifest.domain.xml, name, images, trust=trust)
    for target in dropped:
        log.warning("domain %s: disk %s was not restored and is left out of the new "
                    "domain", name, target)
    uuid = lv.define(xml, name)
    log.info("defined domain %s (%s) from point %d", name, uuid, manifest.point)
    return dataclasses.replace(result, defined=DefinedDomain(name, uuid, tuple(dropped)))
