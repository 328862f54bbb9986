"""Restore: write the disks of point N as image files, and prove them right first.

A restore is the moment a backup is worth something, so an image only gets
its final name once every block of it was shown to hold what table N says;
an image that does not match is kept, under ``<name>.unverified``, for
inspection -- deleting it would destroy the only evidence -- and the restore
fails with the blocks that differ (VerifyMismatchError).

Table N is the reference: rebuilt from table 1 and difference N, each file
checked against the manifest's checksums and the result against its
``table_digest`` (``pointread.read_point_tables``), before anything is written.

**A raw image is copied and checked in one pass** (``diskpass.run_disk_pass``
with :class:`~.imagewrite.RawImageWriter` as its target).  The point volume
is read through a read-only export of the storage daemon -- QEMU's qcow2 code
reading it through its base volume, exactly what a guest or ``verify`` reads
-- and every block is hashed from the read buffer; the non-zero blocks are
then written from *that same buffer* at *that same offset* into a new file,
which is fsynced.  What this proves, when the pass's table equals table N:

* every block that was written holds bytes whose XXH3-128 value is table N's
  entry: the buffer is neither changed nor reused between its hash and its
  write (the pass hands it back only after ``pwrite`` returned for all of it);
* every block that was not written is a hole or an all-zero block, and table
  N's entry for it is the value of zeros; the file was created by us
  (``O_EXCL``) and sized with ``ftruncate``, so those blocks read as zeros;
* the image is on the disk (fsync) before it gets its final name.

What it does not do is read the file back: that would only re-read our own
page cache (it cannot catch a disk that loses data later; ``verify`` of the
pool is what watches the backups themselves).  The trust placed in the
kernel is that a completed ``pwrite`` and ``fsync`` store what they were given.

**A qcow2 image** is written by ``qemu-img convert`` from the point volume
(stock QEMU code, sparse where the disk is zeros), fsynced, then hashed
through a read-only export -- as a guest reads it -- and compared with table
N: there the format is QEMU's, so the check reads what QEMU wrote.

Two refusals protect live data: an existing file is only replaced with
``force``, and a file that is a disk (or a backing image of a disk) of a
*running* libvirt domain is never replaced, ``force`` or not.

``define`` turns the restored images into a new, shut-off domain from the XML
saved with the point: new name, new UUID, new MAC addresses, restored disks as
sources.  The XML rewrite is a pure function, :func:`rewrite_domain_xml`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import re
import secrets
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from ..adapters import storagepool
from ..adapters.nbdclient import NbdClient
from ..adapters.domainxml import DOMAIN_NAME_RE, new_domain_xml, parse_disks, set_disk_source
from ..core.atomic import durable_rename, fsync_dir, fsync_path
from ..core.manifest import PointDisk, PointManifest
from ..errors import (
    CorruptFileError,
    HypervisorError,
    StorageError,
    UsageError,
    VerifyMismatchError,
    VmSnapBackupError,
)
from ..progress import ProgressCallback, ProgressEvent, emit
from .diskpass import run_disk_pass
from .imagewrite import RawImageWriter
from .interrupt import interruptible
from .pointread import (
    BlockMismatch,
    PointTables,
    PoolLike,
    compare_tables,
    hash_image,
    open_pool,
    read_daemon,
    read_point_tables,
    select_disks,
    select_point,
    with_phase,
)

__all__ = [
    "RESTORE_FORMATS",
    "UNVERIFIED_SUFFIX",
    "RestoredDisk",
    "DefinedDomain",
    "RestoreResult",
    "restore",
    "image_name",
    "unverified_name",
    "rewrite_domain_xml",
    "paths_in_use",
    "users_of",
]

log = logging.getLogger(__name__)

RESTORE_FORMATS = ("raw", "qcow2")
UNVERIFIED_SUFFIX = ".unverified"
DEFAULT_URI = "qemu:///system"

_PROGRESS_RE = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


# --- results ---------------------------------------------------------------------------

@dataclass(frozen=True)
class RestoredDisk:
    """One restored disk.  ``path`` is the final image when ``verified``, else the
    ``.unverified`` file kept for inspection (and ``mismatch`` says why).

    Where the time went: ``write_seconds`` writing the image (raw: the one pass
    that reads, hashes and writes; qcow2: ``qemu-img convert``), ``sync_seconds``
    its fsync, ``check_seconds`` the comparison with table N (raw: of the tables
    only; qcow2: reading the image back through an export).
    """

    target: str
    path: str
    format: str
    size: int
    allocated: int
    seconds: float
    write_seconds: float
    sync_seconds: float
    check_seconds: float
    verified: bool
    mismatch: Optional[BlockMismatch] = None

    def to_dict(self) -> Dict[str, Any]:
        return {
            "target": self.target, "path": self.path, "format": self.format,
            "bytes": self.size, "allocated": self.allocated,
            "seconds": round(self.seconds, 3),
            "write_seconds": round(self.write_seconds, 3),
            "sync_seconds": round(self.sync_seconds, 3),
            "check_seconds": round(self.check_seconds, 3),
            "verified": self.verified,
            "mismatch": self.mismatch.to_dict() if self.mismatch else None,
        }


@dataclass(frozen=True)
class DefinedDomain:
    """The shut-off domain ``define`` created; ``dropped`` lists disks of the saved XML
    that were left out (not restored, and not safe to share with the original)."""

    name: str
    uuid: str
    dropped: Tuple[str, ...] = ()

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "uuid": self.uuid, "dropped_disks": list(self.dropped)}


@dataclass(frozen=True)
class RestoreResult:
    domain: str
    uuid: str
    point: int
    generation: int
    snapshot_at: Optional[str]
    directory: str
    format: str
    disks: Tuple[RestoredDisk, ...]
    seconds: float
    defined: Optional[DefinedDomain] = None
    storage_pool: Optional[str] = None

    @property
    def ok(self) -> bool:
        return all(d.verified for d in self.disks)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "domain": self.domain, "uuid": self.uuid, "point": self.point,
            "generation": self.generation, "snapshot_at": self.snapshot_at,
            "directory": self.directory, "format": self.format, "ok": self.ok,
            "seconds": round(self.seconds, 3),
            "disks": [d.to_dict() for d in self.disks],
            "defined": self.defined.to_dict() if self.defined else None,
            "storage_pool": self.storage_pool,
        }


# --- pure helpers ----------------------------------------------------------------------

def image_name(target: str, fmt: str, prefix: Optional[str] = None) -> str:
    """``vda.raw``; in a libvirt storage pool ``<prefix>-vda.raw`` (volumes of many
    domains share one directory there)."""
    if fmt not in RESTORE_FORMATS:
        raise UsageError(f"restore writes raw or qcow2 images, not {fmt!r}")
    return f"{prefix}-{target}.{fmt}" if prefix else f"{target}.{fmt}"


def unverified_name(final: Path) -> Path:
    """Where an image that failed its check is kept: beside the name it did not get."""
    return final.with_name(final.name + UNVERIFIED_SUFFIX)


def _temp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.restore-{os.getpid()}-{secrets.token_hex(4)}")


def paths_in_use(domains: Iterable[Tuple[str, str]]) -> Dict[str, List[str]]:
    """Image paths used by domains, from ``(domain name, live XML)`` pairs.

    Sources and every backing image count: replacing a running disk's backing
    file under it is as destructive as replacing the disk.  Keys are real paths.
    """
    used: Dict[str, List[str]] = {}
    for name, xml in domains:
        for disk in parse_disks(xml):
            if disk.type not in ("file", "block"):
                continue
            paths = [disk.source] + [ref.path for ref in disk.backing_chain]
            for p in paths:
                if p:
                    used.setdefault(os.path.realpath(p), []).append(name)
    return used


def users_of(path: Path, used: Mapping[str, List[str]]) -> List[str]:
    """Domains in ``used`` (see :func:`paths_in_use`) whose disks include ``path``,
    by real path or by the same inode (a hard link is the same disk)."""
    real = os.path.realpath(path)
    names = list(used.get(real, []))
    try:
        st = os.stat(path)
    except OSError:
        return sorted(set(names))
    for other, doms in used.items():
        if other == real:
            continue
        with contextlib.suppress(OSError):
            o = os.stat(other)
            if (o.st_dev, o.st_ino) == (st.st_dev, st.st_ino):
                names.extend(doms)
    return sorted(set(names))


def rewrite_domain_xml(xml: str, name: str,
                       disks: Mapping[str, Tuple[str, str]]) -> Tuple[str, List[str]]:
    """The saved domain XML made into a new domain on the restored images.

    ``disks`` maps a target to ``(image path, format)``; returns ``(xml, dropped
    targets)``.  What else changes, and why, is :func:`new_domain_xml`'s to say.
    """
    return new_domain_xml(xml, name, {
        t: functools.partial(set_disk_source, path=path, fmt=fmt)
        for t, (path, fmt) in disks.items()})


# --- the outside world -----------------------------------------------------------------

class _Libvirt:
    """A lazily opened libvirt connection: a restore into a plain directory of new files
    needs none, and then must not fail for the lack of a libvirtd."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._hv: Any = None

    @property
    def conn(self) -> Any:
        if self._hv is None:
            from ..adapters.hypervisor import connect

            self._hv = connect(self.uri)
        return self._hv.conn

    def close(self) -> None:
        if self._hv is not None:
            self._hv.close()
            self._hv = None

    def used_paths(self) -> Dict[str, List[str]]:
        import libvirt

        conn = self.conn
        pairs = []
        try:
            for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                try:
                    pairs.append((dom.name(), dom.XMLDesc(0)))
                except libvirt.libvirtError as err:
                    if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                        raise
        except libvirt.libvirtError as err:
            raise HypervisorError(f"listing running domains on {self.uri}: "
                                  f"{err.get_error_message()}") from err
        return paths_in_use(pairs)

    def domain_exists(self, name: str) -> bool:
        import libvirt

        try:
            self.conn.lookupByName(name)
            return True
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return False
            raise HypervisorError(f"looking up domain '{name}' on {self.uri}: "
                                  f"{err.get_error_message()}") from err

    def define(self, xml: str, name: str) -> str:
        import libvirt

        try:
            dom = self.conn.defineXML(xml)
            return str(dom.UUIDString())
        except libvirt.libvirtError as err:
            raise HypervisorError(f"defining domain '{name}' on {self.uri}: "
                                  f"{err.get_error_message()}") from err


def _check_targets(finals: Mapping[str, Path], force: bool, lv: _Libvirt) -> None:
    """Refuse before any work: running domains' disks always, existing files without force."""
    existing = {t: p for t, p in finals.items() if os.path.lexists(p)}
    if not existing:
        return
    try:
        used = lv.used_paths()
    except VmSnapBackupError as err:
        if not force:
            t, p = next(iter(existing.items()))
            raise UsageError(f"{p} exists; restore does not replace files unless forced "
                             "(--force)") from None
        raise HypervisorError(f"cannot make sure that no running domain uses "
                              f"{', '.join(map(str, existing.values()))}: {err}") from err
    for target, path in existing.items():
        users = users_of(path, used)
        if users:
            raise UsageError(f"{path} is a disk of running domain {', '.join(users)}; a "
                             "restore never replaces a running domain's disk (shut it off, "
                             "or restore elsewhere)")
    if not force:
        paths = ", ".join(str(p) for p in existing.values())
        raise UsageError(f"{paths} exist(s); restore does not replace files unless forced "
                         "(--force)")
    for path in existing.values():
        if not path.is_file():
            raise UsageError(f"{path} is not a regular file; restore only replaces files")


def _convert(volume: Path, volume_format: str, out: Path, fmt: str, size: int, disk: str,
             progress: Optional[ProgressCallback]) -> None:
    """``qemu-img convert`` of the point volume (through its base) into ``out``.

    Zero regions stay unallocated (qemu-img's default ``-S 4k``).  Progress comes
    from ``-p``, which prints ``(x.xx/100%)`` on stdout.
    """
    argv = ["qemu-img", "convert", "-p", "-f", volume_format, "-O", fmt,
            os.fspath(volume), os.fspath(out)]
    log.debug("running %s", " ".join(argv))
    emit(progress, ProgressEvent(disk, "restore", 0, size))
    with tempfile.TemporaryFile() as errf:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=errf)
        except OSError as err:
            raise HypervisorError(f"cannot run qemu-img: {err.strerror or err}") from err
        try:
            assert proc.stdout is not None
            pending = b""
            while True:
                chunk = proc.stdout.read1(4096) if hasattr(proc.stdout, "read1") \
                    else proc.stdout.read(64)
                if not chunk:
                    break
                pending += chunk
                matches = list(_PROGRESS_RE.finditer(pending))
                if matches:
                    pct = float(matches[-1].group(1))
                    emit(progress, ProgressEvent(disk, "restore", int(size * pct / 100), size))
                    pending = pending[matches[-1].end():]
                pending = pending[-64:]
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        errf.seek(0)
        message = " ".join(errf.read().decode("utf-8", "replace").split())
    if rc != 0:
        if "No space left on device" in message or "Disk quota exceeded" in message:
            raise StorageError(f"no space left in {out.parent} while restoring {disk}: "
                               f"{message}")
        raise HypervisorError(f"qemu-img convert of {volume} failed ({rc}): {message}")
    emit(progress, ProgressEvent(disk, "restore", size, size, finished=True))


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _allocated(path: Path) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


# --- the workflow ----------------------------------------------------------------------

@dataclass
class _Plan:
    disk: PointDisk
    tables: PointTables
    volume: Path
    final: Path


def restore(
    domain: str,
    pool: PoolLike,
    *,
    point: Optional[int] = None,
    disks: Optional[Sequence[str]] = None,
    to: Optional["str | os.PathLike[str]"] = None,
    fmt: str = "raw",
    force: bool = False,
    define: Optional[str] = None,
    pool_volume: Optional[str] = None,
    uri: str = DEFAULT_URI,
    progress: Optional[ProgressCallback] = None,
    runtime_base: Optional[str] = None,
) -> RestoreResult:
    """Restore the disks of point ``point`` (newest when None) of ``domain``.

    Images go to the directory ``to``, or with ``pool_volume`` into that libvirt
    dir/netfs storage pool as volumes ``<define or domain>-<target>.<fmt>``.
    Every image is checked against table N before it gets its final name; a
    mismatch raises VerifyMismatchError after every disk was tried (the failing
    ones stay as ``<name>.unverified``), and ``define`` is then not done.
    """
    started = time.monotonic()
    if fmt not in RESTORE_FORMATS:
        raise UsageError(f"restore writes raw or qcow2 images, not {fmt!r}")
    if (to is None) == (pool_volume is None):
        raise UsageError("give exactly one of a directory (--to) and a libvirt storage pool "
                         "(--pool-volume)")
    if define is not None and not DOMAIN_NAME_RE.fullmatch(define):
        raise UsageError(f"not a usable domain name: {define!r}")
    the_pool = open_pool(pool, uri)
    store = the_pool.find_domain(domain)
    manifest = select_point(store, point)
    chosen = select_disks(manifest, disks)

    lv = _Libvirt(uri)
    try:
        storage_pool = None
        if pool_volume is not None:
            directory, storage_pool = storagepool.resolve_pool(pool_volume, uri)
            prefix: Optional[str] = define or manifest.domain.name
        else:
            assert to is not None
            directory = Path(os.path.abspath(os.fspath(to)))
            prefix = None
        if directory.exists() and not directory.is_dir():
            raise UsageError(f"{directory} is not a directory")

        plans = []
        for d in chosen:
            tables = read_point_tables(store, d)  # damaged tables: refuse before writing
            volume = store.resolve(d.volume)
            for rel, what in ((d.volume, "point volume"), (d.base, "base volume")):
                if not store.resolve(rel).is_file():
                    raise CorruptFileError(store.resolve(rel), f"{what} is missing")
            plans.append(_Plan(d, tables, volume,
                               directory / image_name(d.target, fmt, prefix)))
        _check_targets({p.disk.target: p.final for p in plans}, force, lv)
        if define is not None and lv.domain_exists(define):
            raise UsageError(f"domain '{define}' already exists; choose another name")

        if not directory.exists():
            try:
                os.makedirs(directory, mode=0o755)
            except OSError as err:
                raise StorageError(f"cannot create {directory}: {err.strerror}") from err

        restored = []
        # a signal unwinds through _restore_disk, which removes its temp file
        with interruptible("restore"), \
                read_daemon(f"restore-{store.name}", runtime_base) as daemon:
            for plan in plans:
                restored.append(_restore_disk(plan, fmt, daemon, progress))
        if storage_pool is not None:
            storagepool.refresh_pool(storage_pool, uri)

        result = RestoreResult(
            domain=manifest.domain.name, uuid=manifest.domain.uuid, point=manifest.point,
            generation=manifest.generation, snapshot_at=manifest.snapshot_at,
            directory=os.fspath(directory), format=fmt, disks=tuple(restored),
            seconds=time.monotonic() - started, storage_pool=storage_pool)
        if not result.ok:
            raise _mismatch_error(result)
        if define is not None:
            result = _define(result, manifest, define, lv)
        log.info("restored point %d of %s into %s in %.2f s", manifest.point,
                 manifest.domain.name, directory, result.seconds)
        return result
    finally:
        lv.close()


@dataclass
class _Timing:
    write: float = 0.0
    sync: float = 0.0
    check: float = 0.0


def _restore_disk(plan: _Plan, fmt: str, daemon: Any,
                  progress: Optional[ProgressCallback]) -> RestoredDisk:
    """Write one disk into a temp file, prove it against table N, then name it."""
    d = plan.disk
    tmp = _temp_name(plan.final)
    t0 = time.monotonic()
    timing = _Timing()
    kept = False
    try:
        if fmt == "raw":
            mismatch = _copy_checked(plan, daemon, tmp, timing, progress)
        else:
            mismatch = _convert_then_check(plan, fmt, daemon, tmp, timing, progress)
        if mismatch.ok:
            durable_rename(tmp, plan.final)
            path, verified, bad = plan.final, True, None
            log.info("%s: restored and verified %s", d.target, plan.final)
        else:
            path = unverified_name(plan.final)
            durable_rename(tmp, path)
            verified, bad = False, mismatch
            log.error("%s: restored image %s does not match point %s: %s", d.target, path,
                      plan.final, mismatch.describe())
        kept = True
    finally:
        if not kept:
            _unlink_quietly(tmp)
            with contextlib.suppress(OSError, VmSnapBackupError):
                fsync_dir(tmp.parent)
    return RestoredDisk(
        target=d.target, path=os.fspath(path), format=fmt, size=d.virtual_size,
        allocated=_allocated(path), seconds=time.monotonic() - t0,
        write_seconds=timing.write, sync_seconds=timing.sync, check_seconds=timing.check,
        verified=verified, mismatch=bad)


def _copy_checked(plan: _Plan, daemon: Any, tmp: Path, timing: _Timing,
                  progress: Optional[ProgressCallback]) -> BlockMismatch:
    """The raw image in one pass: read the point volume, hash, write (module docstring).

    The export reads with O_DIRECT (``direct``): the point volume is read once
    from end to end, so a page-cache copy per byte would be pure cost, and a
    restore does not evict the host's cache.
    """
    d = plan.disk
    expected = plan.tables.table
    t0 = time.monotonic()
    export = daemon.export_image(os.fspath(plan.volume), d.volume_format, direct=True)
    try:
        with NbdClient.open_unix(export.socket_path, export.name) as client, \
                RawImageWriter.create(tmp, client.size) as image:
            actual, stats = run_disk_pass(client, image, expected.block_size, None,
                                          disk=d.target,
                                          progress=with_phase(progress, "restore"))
            t1 = time.monotonic()
            image.flush()
            t2 = time.monotonic()
    finally:
        daemon.remove_export(export, force=True)
    log.debug("%s: %d blocks read, %d holes, %d written (%d bytes) in %.2f s", d.target,
              stats.read, stats.holes, stats.changed, stats.bytes_written, stats.seconds)
    mismatch = compare_tables(expected, actual)
    timing.write, timing.sync, timing.check = t1 - t0, t2 - t1, time.monotonic() - t2
    return mismatch


def _convert_then_check(plan: _Plan, fmt: str, daemon: Any, tmp: Path, timing: _Timing,
                        progress: Optional[ProgressCallback]) -> BlockMismatch:
    """A qcow2 image: ``qemu-img convert``, fsync, then hash it as a guest reads it."""
    d = plan.disk
    t0 = time.monotonic()
    _convert(plan.volume, d.volume_format, tmp, fmt, d.virtual_size, d.target, progress)
    os.chmod(tmp, 0o600)  # a disk's contents are as private as the pool's
    t1 = time.monotonic()
    fsync_path(tmp)
    t2 = time.monotonic()
    mismatch = hash_image(daemon, tmp, fmt, plan.tables.table, disk=d.target,
                          phase="check", progress=progress)
    timing.write, timing.sync, timing.check = t1 - t0, t2 - t1, time.monotonic() - t2
    return mismatch


def _mismatch_error(result: RestoreResult) -> VerifyMismatchError:
    parts = []
    for d in result.disks:
        if d.mismatch is not None:
            parts.append(f"{d.target}: {d.mismatch.describe()} (image kept as {d.path})")
    err = VerifyMismatchError(
        f"restore of point {result.point} of {result.domain} does not match its check "
        f"table: " + "; ".join(parts))
    err.result = result  # type: ignore[attr-defined]  # for callers that want the details
    return err


def _define(result: RestoreResult, manifest: PointManifest, name: str,
            lv: _Libvirt) -> RestoreResult:
    images = {d.target: (d.path, d.format) for d in result.disks}
    xml, dropped = rewrite_domain_xml(manifest.domain.xml, name, images)
    for target in dropped:
        log.warning("domain %s: disk %s was not restored and is left out of the new "
                    "domain", name, target)
    uuid = lv.define(xml, name)
    log.info("defined domain %s (%s) from point %d", name, uuid, manifest.point)
    return dataclasses.replace(result, defined=DefinedDomain(name, uuid, tuple(dropped)))
