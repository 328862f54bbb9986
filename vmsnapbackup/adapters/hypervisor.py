"""libvirt: find a domain, read its disks, take the external snapshot, commit it back.

This is the only module that talks to libvirt.  Two habits run through it:

* every libvirt error becomes a one-line :class:`HypervisorError` carrying
  libvirt's own words, so the CLI can show it as is;
* we only ever commit or delete an image whose name carries our overlay
  marker and that is the disk's current top image: a snapshot someone else
  took, or a disk in a state we did not leave it in, is refused with an
  explanation instead of being merged.

Block-job completion is learned from the ``BLOCK_JOB_2`` event, which needs
libvirt's default event loop registered before the connection is opened and a
thread running it; :func:`connect` does both (once per process).  Polling
``blockJobInfo`` stays as a fallback so a lost event costs time, not a hang.
"""
from __future__ import annotations

import logging
import re
import os
import threading
import time
import uuid as uuid_mod
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import libvirt
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception,
    retry_if_result,
    stop_after_delay,
    wait_exponential,
)

from vmsnapbackup.adapters.domainxml import (
    OVERLAY_MARKER,
    Disk,
    ImageRef,
    SkippedDisk,
    backup_disks,
    checkpoint_xml,
    find_disk,
    is_our_overlay,
    overlay_id,
    overlay_path,
    parse_disks,
    snapshot_xml,
    unsupported_reason,
)
from vmsnapbackup.errors import (
    HypervisorError,
    NotFoundError,
    RepairNeededError,
    UnsupportedDiskError,
    UsageError,
)

__all__ = [
    "DEFAULT_URI",
    "OVERLAY_MARKER",
    "Disk",
    "ImageRef",
    "SkippedDisk",
    "SnapshotResult",
    "CommitResult",
    "OverlayFor",
    "Hypervisor",
    "connect",
    "is_our_overlay",
    "overlay_id",
    "overlay_path",
]

log = logging.getLogger(__name__)

DEFAULT_URI = "qemu:///system"

#: libvirt error codes meaning "no usable guest agent": 74 when no agent channel
#: is configured, 86 when the channel exists but no agent answers, 97 when it
#: answers out of sync.  Only these turn quiesce=None into a crash-consistent snapshot.
_NO_AGENT_CODES = frozenset(
    {
        libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED,
        libvirt.VIR_ERR_AGENT_UNRESPONSIVE,
        libvirt.VIR_ERR_AGENT_UNSYNCED,
    }
)

_SNAPSHOT_FLAGS = (
    libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
    | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
    | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
)
# SHALLOW always: without it libvirt commits into the deepest image and
# flattens a template backing chain into it.
_COMMIT_FLAGS = (
    libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE
    | libvirt.VIR_DOMAIN_BLOCK_COMMIT_SHALLOW
    | libvirt.VIR_DOMAIN_BLOCK_COMMIT_DELETE
)

_event_loop_lock = threading.Lock()
_event_loop_started = False


#: How long a backup waits for a restarted libvirtd before it leaves the commit to repair.
RECONNECT_DEADLINE = 60.0


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _libvirt_message(err: libvirt.libvirtError) -> str:
    return _one_line(err.get_error_message() or str(err))


@contextmanager
def _libvirt_errors(what: str) -> Iterator[None]:
    """Turn a libvirtError into a HypervisorError that says what we were doing."""
    try:
        yield
    except libvirt.libvirtError as err:
        raise HypervisorError(f"{what}: {_libvirt_message(err)}") from err


def _silence_libvirt_stderr(_ctx: object, err: object) -> None:
    # libvirt prints every error to stderr by default; we raise them instead.
    log.debug("libvirt: %s", err)


def _run_event_loop() -> None:
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except libvirt.libvirtError as err:  # pragma: no cover - libvirt internal failure
            log.warning("libvirt event loop: %s", _libvirt_message(err))


def _ensure_event_loop() -> None:
    """Register libvirt's default event loop and start its thread, once per process.

    Must happen before ``libvirt.open``: a connection opened earlier never
    delivers events.
    """
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.registerErrorHandler(_silence_libvirt_stderr, None)
        libvirt.virEventRegisterDefaultImpl()
        threading.Thread(target=_run_event_loop, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


@dataclass(frozen=True)
class SnapshotResult:
    """What an external snapshot left behind, per disk target.

    ``frozen`` is read back from the live XML after the snapshot (never
    assumed): it is the image to export, now opened read-only by QEMU.
    """

    quiesced: bool
    overlays: Dict[str, str]
    frozen: Dict[str, ImageRef]
    seconds: float


@dataclass(frozen=True)
class CommitResult:
    """A finished commit: the disk runs on ``image`` again (the former frozen image)."""

    target: str
    image: ImageRef
    ready_seconds: float
    seconds: float


@dataclass
class _JobWaiter:
    done: threading.Event = field(default_factory=threading.Event)
    status: Optional[int] = None


OverlayFor = Union[Callable[[Disk], str], Mapping[str, str]]


class Hypervisor:
    """One libvirt connection with block-job events flowing.

    Use :func:`connect` to get one, preferably as a context manager.
    Domains are passed around as ``libvirt.virDomain`` handles from
    :meth:`find_domain`.
    """

    def __init__(self, uri: str, conn: libvirt.virConnect) -> None:
        self.uri = uri
        self.conn = conn
        self._waiters: Dict[Tuple[str, str], _JobWaiter] = {}
        self._waiters_lock = threading.Lock()
        self._callback_id: Optional[int] = None
        self._watch_block_jobs()

    # -- connection -------------------------------------------------------

    def _watch_block_jobs(self) -> None:
        with _libvirt_errors(f"cannot watch block jobs on {self.uri}"):
            self._callback_id = self.conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, self._on_block_job, None
            )

    def revive(self, dom: libvirt.virDomain, deadline: float = RECONNECT_DEADLINE
               ) -> libvirt.virDomain:
        """``dom`` on a live connection: reconnect first if libvirtd went away meanwhile.

        A libvirtd restart (a package upgrade, an admin) closes every client
        connection while the domains keep running -- on our overlays, in the
        middle of a backup.  The backup needs libvirt again only to commit, so
        it revives the connection there instead of leaving the commit to a
        repair.  Waits up to ``deadline`` seconds for libvirtd to answer.
        """
        try:
            if self.conn.isAlive():
                return dom
        except libvirt.libvirtError:
            pass
        uuid = dom.UUIDString()   # kept in the object: no call to the dead daemon
        log.warning("the connection to %s was lost (libvirtd restarted?); reconnecting",
                    self.uri)
        try:
            self.close()
        except Exception:  # the old connection is dead: nothing to release cleanly
            log.debug("closing the dead connection", exc_info=True)
        try:
            conn = Retrying(
                retry=retry_if_exception(lambda e: isinstance(e, libvirt.libvirtError)),
                stop=stop_after_delay(deadline),
                wait=wait_exponential(multiplier=0.1, max=2.0),
                reraise=True,
            )(libvirt.open, self.uri)
        except libvirt.libvirtError as err:
            raise HypervisorError(
                f"lost the connection to {self.uri} and could not reconnect within "
                f"{deadline:.0f} s: {_libvirt_message(err)}") from err
        self.conn = conn
        try:
            conn.setKeepAlive(5, 3)
        except libvirt.libvirtError as err:
            log.debug("keepalive on %s: %s", self.uri, _libvirt_message(err))
        self._watch_block_jobs()
        log.info("reconnected to %s", self.uri)
        return self.find_domain(uuid)

    def close(self) -> None:
        if self._callback_id is not None:
            try:
                self.conn.domainEventDeregisterAny(self._callback_id)
            except libvirt.libvirtError as err:
                log.debug("deregistering block job events: %s", _libvirt_message(err))
            self._callback_id = None
        try:
            self.conn.close()
        except libvirt.libvirtError as err:
            log.debug("closing %s: %s", self.uri, _libvirt_message(err))

    def __enter__(self) -> "Hypervisor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- domains ----------------------------------------------------------

    def find_domain(self, ident: Union[str, int]) -> libvirt.virDomain:
        """The domain named ``ident``, or with that UUID, or with that numeric id."""
        lookups: List[Tuple[Callable[[], libvirt.virDomain], str]] = []
        text = str(ident)
        if not isinstance(ident, int):
            lookups.append((lambda: self.conn.lookupByName(text), "name"))
            try:
                canonical = str(uuid_mod.UUID(text))
            except ValueError:
                pass
            else:
                lookups.append((lambda: self.conn.lookupByUUIDString(canonical), "uuid"))
        if text.isdigit():
            lookups.append((lambda: self.conn.lookupByID(int(text)), "id"))
        for lookup, how in lookups:
            try:
                return lookup()
            except libvirt.libvirtError as err:
                if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise HypervisorError(
                        f"looking up domain '{text}' by {how} on {self.uri}: {_libvirt_message(err)}"
                    ) from err
        raise NotFoundError(f"domain '{text}' not found on {self.uri}")

    def domain_name(self, dom: libvirt.virDomain) -> str:
        return str(dom.name())

    def domain_uuid(self, dom: libvirt.virDomain) -> str:
        return str(dom.UUIDString())

    def is_active(self, dom: libvirt.virDomain) -> bool:
        with _libvirt_errors(f"state of domain '{dom.name()}'"):
            return bool(dom.isActive())

    def domain_xml(self, dom: libvirt.virDomain, inactive: bool = False) -> str:
        """The live XML (what QEMU runs now), or with ``inactive`` the persistent config."""
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        with _libvirt_errors(f"XML of domain '{dom.name()}'"):
            return str(dom.XMLDesc(flags))

    # -- disks ------------------------------------------------------------

    def disks(self, dom: libvirt.virDomain, inactive: bool = False) -> List[Disk]:
        return parse_disks(self.domain_xml(dom, inactive=inactive))

    def backup_disks(
        self, dom: libvirt.virDomain, select: Optional[Sequence[str]] = None
    ) -> Tuple[List[Disk], List[SkippedDisk]]:
        """The disks to back up and those skipped, from the live XML.

        For a shut-off domain the live XML is its configuration, which is what
        the workflow reads directly (no snapshot needed).
        """
        return backup_disks(self.domain_xml(dom), select)

    def top_image(self, dom: libvirt.virDomain, target: str) -> ImageRef:
        """The image the guest writes to now (our overlay while a backup runs)."""
        return find_disk(self.domain_xml(dom), target).top

    # -- snapshot ---------------------------------------------------------

    def snapshot(
        self,
        dom: libvirt.virDomain,
        disks: Sequence[Disk],
        overlay_for: OverlayFor,
        quiesce: Optional[bool] = None,
    ) -> SnapshotResult:
        """External disk-only snapshot of ``disks``; the other disks are left alone.

        ``quiesce``: True demands a guest-agent freeze (failing without one),
        None tries it and falls back to crash-consistent when there is no
        usable agent, False does not ask.
        """
        name = self.domain_name(dom)
        if not disks:
            raise UsageError(f"no disk of domain '{name}' to snapshot")
        if not self.is_active(dom):
            raise HypervisorError(f"domain '{name}' is not running: read its images directly")
        live = {d.target: d for d in self.disks(dom)}
        overlays: Dict[str, str] = {}
        for disk in disks:
            current = live.get(disk.target)
            if current is None:
                raise NotFoundError(f"disk '{disk.target}' not found in domain '{name}'")
            reason = unsupported_reason(current)
            if reason is not None:
                raise UnsupportedDiskError(f"disk '{disk.target}' cannot be backed up: {reason}")
            path = overlay_for(current) if callable(overlay_for) else overlay_for[disk.target]
            if not os.path.isabs(path) or not is_our_overlay(path):
                raise UsageError(
                    f"overlay {path!r} must be an absolute path whose name carries "
                    f"'{OVERLAY_MARKER}<id>.qcow2'"
                )
            if os.path.lexists(path):
                raise RepairNeededError(
                    f"overlay {path} already exists (left by an interrupted backup?): run repair"
                )
            overlays[disk.target] = path
        if len(set(overlays.values())) != len(overlays):
            raise UsageError(f"two disks of domain '{name}' would share one overlay file")

        xml = snapshot_xml(overlays, list(live))
        started = time.monotonic()
        quiesced = quiesce is not False
        flags = _SNAPSHOT_FLAGS | (libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE if quiesced else 0)
        what = f"snapshot of domain '{name}'"
        try:
            dom.snapshotCreateXML(xml, flags)
        except libvirt.libvirtError as err:
            if quiesce is None and err.get_error_code() in _NO_AGENT_CODES:
                log.warning(
                    "domain '%s': no usable guest agent (%s); the snapshot is crash-consistent",
                    name,
                    _libvirt_message(err),
                )
                quiesced = False
                with _libvirt_errors(what):
                    dom.snapshotCreateXML(xml, _SNAPSHOT_FLAGS)
            else:
                kind = "quiesced " if quiesced else ""
                raise HypervisorError(f"{kind}{what}: {_libvirt_message(err)}") from err
        seconds = time.monotonic() - started

        frozen: Dict[str, ImageRef] = {}
        after = {d.target: d for d in self.disks(dom)}
        for target, path in overlays.items():
            disk = after.get(target)
            if disk is None or not _same_path(disk.source, path) or not disk.backing_chain:
                raise HypervisorError(
                    f"after the snapshot disk '{target}' of domain '{name}' does not run on "
                    f"overlay {path} over a frozen image: run repair"
                )
            frozen[target] = disk.backing_chain[0]
        log.info(
            "domain '%s': snapshot of %s in %.3f s (%s)",
            name,
            ", ".join(overlays),
            seconds,
            "quiesced" if quiesced else "crash-consistent",
        )
        return SnapshotResult(quiesced=quiesced, overlays=overlays, frozen=frozen, seconds=seconds)

    # -- commit -----------------------------------------------------------

    def commit(
        self,
        dom: libvirt.virDomain,
        target: str,
        overlay_path: str,
        timeout: float = 3600.0,
        pivot_timeout: float = 60.0,
    ) -> CommitResult:
        """Merge our overlay on ``target`` back into the frozen image and pivot to it.

        Refuses (RepairNeededError) unless the disk's top image is exactly
        ``overlay_path`` and carries our marker.  The export of the frozen
        image must be stopped first: commit needs its write lock.
        """
        name = self.domain_name(dom)
        if not is_our_overlay(overlay_path):
            raise UsageError(f"{overlay_path} is not a vmsnapbackup overlay: refusing to commit it")
        if not self.is_active(dom):
            raise RepairNeededError(
                f"domain '{name}' is shut off with disk '{target}' on overlay {overlay_path}: "
                "run repair to merge it offline"
            )
        disk = find_disk(self.domain_xml(dom), target)
        if not _same_path(disk.source, overlay_path) or not is_our_overlay(disk.source):
            raise RepairNeededError(
                f"disk '{target}' of domain '{name}' runs on {disk.source}, not on our overlay "
                f"{overlay_path}: refusing to commit; if a snapshot was taken on top of ours, "
                "merge it first, then run repair"
            )
        if not disk.backing_chain:
            raise RepairNeededError(
                f"overlay {overlay_path} of disk '{target}' has no backing image: run repair"
            )
        frozen = disk.backing_chain[0]

        key = (self.domain_uuid(dom), target)
        waiter = _JobWaiter()
        with self._waiters_lock:
            self._waiters[key] = waiter
        started = time.monotonic()
        try:
            try:
                dom.blockCommit(target, None, None, 0, _COMMIT_FLAGS)
            except libvirt.libvirtError as err:
                message = _libvirt_message(err)
                hint = ""
                if re.search(r"\bwrite\W+lock\b", message):
                    hint = " (is an export still holding the frozen image? stop it first)"
                raise HypervisorError(
                    f"commit of disk '{target}' of domain '{name}': {message}{hint}"
                ) from err
            self._wait_ready(dom, name, target, waiter, timeout, overlay_path)
            ready_seconds = time.monotonic() - started
            self._pivot(dom, name, target, pivot_timeout)
        finally:
            with self._waiters_lock:
                self._waiters.pop(key, None)
        image = self._verify_pivoted(dom, name, target, frozen, disk.backing_chain[1:])
        seconds = time.monotonic() - started
        if os.path.lexists(overlay_path):
            log.warning("libvirt left overlay %s after the commit; removing it", overlay_path)
            try:
                os.unlink(overlay_path)
            except OSError as err:
                raise HypervisorError(
                    f"disk '{target}' is committed but overlay {overlay_path} could not be "
                    f"removed: {err.strerror}"
                ) from err
        log.info(
            "domain '%s': committed %s into %s (ready %.3f s, total %.3f s)",
            name,
            overlay_path,
            image.path,
            ready_seconds,
            seconds,
        )
        return CommitResult(target=target, image=image, ready_seconds=ready_seconds, seconds=seconds)

    def _on_block_job(
        self,
        _conn: libvirt.virConnect,
        dom: libvirt.virDomain,
        disk: str,
        job_type: int,
        status: int,
        _opaque: object,
    ) -> None:
        # Runs in the event-loop thread: only record and wake.
        log.debug("block job event: %s %s type=%s status=%s", dom.name(), disk, job_type, status)
        if status not in (
            libvirt.VIR_DOMAIN_BLOCK_JOB_READY,
            libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED,
            libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED,
        ):
            return
        with self._waiters_lock:
            waiter = self._waiters.get((dom.UUIDString(), disk))
        if waiter is not None and not waiter.done.is_set():
            waiter.status = status
            waiter.done.set()

    def _wait_ready(
        self,
        dom: libvirt.virDomain,
        name: str,
        target: str,
        waiter: _JobWaiter,
        timeout: float,
        overlay: str,
    ) -> None:
        """Wait for READY: the event wakes us at once; polling covers a lost event."""

        def ready() -> bool:
            if waiter.done.is_set():
                if waiter.status != libvirt.VIR_DOMAIN_BLOCK_JOB_READY:
                    state = "failed" if waiter.status == libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED else (
                        "was cancelled"
                    )
                    raise HypervisorError(
                        f"commit of disk '{target}' of domain '{name}' {state}; "
                        f"it still runs on overlay {overlay}: run repair"
                    )
                log.debug("commit of disk '%s': READY event", target)
                return True
            with _libvirt_errors(f"commit job of disk '{target}' of domain '{name}'"):
                info = dom.blockJobInfo(target, 0)
            if not info:
                raise HypervisorError(
                    f"commit job of disk '{target}' of domain '{name}' vanished before it was "
                    f"ready; check the domain log, then run repair"
                )
            # libvirt reports cur == end only once the job can pivot; a
            # premature guess is caught by the pivot's own retry.
            polled_ready = info.get("cur") == info.get("end")
            if polled_ready:
                log.debug("commit of disk '%s': job info says ready (%s)", target, info)
            return bool(polled_ready)

        retrying = Retrying(
            retry=retry_if_result(lambda is_ready: not is_ready),
            wait=wait_exponential(multiplier=0.02, max=2.0),
            stop=stop_after_delay(timeout),
            sleep=lambda seconds: waiter.done.wait(seconds) and None,
        )
        try:
            retrying(ready)
        except RetryError:
            with _libvirt_errors(f"cancelling the commit of disk '{target}' of domain '{name}'"):
                dom.blockJobAbort(target, 0)
            raise RepairNeededError(
                f"commit of disk '{target}' of domain '{name}' was not ready after {timeout:g} s "
                f"and was cancelled; the domain still runs on overlay {overlay}: run repair"
            ) from None

    def _pivot(self, dom: libvirt.virDomain, name: str, target: str, deadline: float) -> None:
        retrying = Retrying(
            retry=retry_if_exception(_not_ready_for_pivot),
            wait=wait_exponential(multiplier=0.02, max=1.0),
            stop=stop_after_delay(deadline),
            reraise=True,
        )
        with _libvirt_errors(f"pivot of disk '{target}' of domain '{name}'"):
            retrying(dom.blockJobAbort, target, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)

    def _verify_pivoted(
        self,
        dom: libvirt.virDomain,
        name: str,
        target: str,
        frozen: ImageRef,
        chain_below: Tuple[ImageRef, ...],
    ) -> ImageRef:
        def top() -> Disk:
            return find_disk(self.domain_xml(dom), target)

        retrying = Retrying(
            retry=retry_if_result(lambda disk: not _same_path(disk.source, frozen.path)),
            wait=wait_exponential(multiplier=0.02, max=0.5),
            stop=stop_after_delay(10.0),
        )
        try:
            disk = retrying(top)
        except RetryError as err:
            now = err.last_attempt.result().source
            raise HypervisorError(
                f"after the pivot disk '{target}' of domain '{name}' runs on {now}, "
                f"not on {frozen.path}: run repair"
            ) from None
        if [p.path for p in disk.backing_chain] != [p.path for p in chain_below]:
            log.warning(
                "disk '%s' of domain '%s': backing chain changed by the commit: %s -> %s",
                target,
                name,
                [p.path for p in chain_below],
                [p.path for p in disk.backing_chain],
            )
        return disk.top


    # -- checkpoints (persistent dirty bitmaps) --------------------------------

    def qemu_run(self, dom: libvirt.virDomain) -> Optional[str]:
        """Which QEMU process runs the domain: ``<host boot id>:<domain id>`` (None: shut off).

        libvirt gives a domain a new id each time it starts, and ids restart
        after a host reboot, hence the boot id.  A dirty bitmap can only miss
        writes made while no QEMU had the image open, that is between two runs.
        """
        try:
            with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
                boot = f.read().strip()
        except OSError:
            return None
        with _libvirt_errors(f"id of domain '{self.domain_name(dom)}'"):
            ident = int(dom.ID())
        return f"{boot}:{ident}" if ident > 0 else None

    def checkpoint_names(self, dom: libvirt.virDomain) -> List[str]:
        """Names of the domain's libvirt checkpoints (ours and anybody else's)."""
        with _libvirt_errors(f"list of checkpoints of domain '{self.domain_name(dom)}'"):
            return sorted(str(cp.getName()) for cp in dom.listAllCheckpoints(0))

    def create_checkpoint(self, dom: libvirt.virDomain, name: str,
                          bitmap_targets: Sequence[str], description: str = "") -> None:
        """A checkpoint with a bitmap named ``name`` on ``bitmap_targets`` (running domain).

        From here on QEMU marks every write to those disks in the bitmap, and
        libvirt carries the bitmap through our snapshot/commit cycle (it
        re-creates it in the overlay and merges it back on commit).
        """
        what = f"checkpoint {name} of domain '{self.domain_name(dom)}'"
        xml = checkpoint_xml(name, bitmap_targets, [d.target for d in self.disks(dom)],
                             description)
        with _libvirt_errors(what):
            dom.checkpointCreateXML(xml, 0)
        log.info("domain '%s': checkpoint %s on %s", self.domain_name(dom), name,
                 ", ".join(bitmap_targets))

    def delete_checkpoint(self, dom: libvirt.virDomain, name: str) -> bool:
        """Delete checkpoint ``name`` with its bitmaps; False when there is none.

        libvirt 9 deletes bitmaps only from a running domain; of a shut-off
        one only the checkpoint's metadata goes, so nobody trusts the bitmap
        any more, and the bitmap itself stays in the image (harmless, and
        removable with ``qemu-img bitmap --remove``).
        """
        what = f"deleting checkpoint {name} of domain '{self.domain_name(dom)}'"
        try:
            cp = dom.checkpointLookupByName(name, 0)
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
                return False
            raise HypervisorError(f"{what}: {_libvirt_message(err)}") from err
        flags = 0 if self.is_active(dom) else libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY
        with _libvirt_errors(what):
            cp.delete(flags)
        log.info("domain '%s': deleted checkpoint %s%s", self.domain_name(dom), name,
                 "" if not flags else " (metadata only: the domain is shut off)")
        return True


def _same_path(a: Optional[str], b: Optional[str]) -> bool:
    return bool(a) and bool(b) and os.path.normpath(a or "") == os.path.normpath(b or "")


def _not_ready_for_pivot(err: BaseException) -> bool:
    return isinstance(err, libvirt.libvirtError) and (
        err.get_error_code() == libvirt.VIR_ERR_BLOCK_COPY_ACTIVE
        or "not ready for pivot" in (err.get_error_message() or "")
    )


def connect(uri: str = DEFAULT_URI) -> Hypervisor:
    """Open ``uri`` with block-job events flowing (see the module docstring)."""
    _ensure_event_loop()
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as err:
        raise HypervisorError(f"cannot connect to {uri}: {_libvirt_message(err)}") from err
    if conn is None:  # pragma: no cover - old bindings returned None
        raise HypervisorError(f"cannot connect to {uri}")
    try:
        conn.setKeepAlive(5, 3)
    except libvirt.libvirtError as err:
        log.debug("keepalive on %s: %s", uri, _libvirt_message(err))
    try:
        return Hypervisor(uri, conn)
    except BaseException:
        conn.close()
        raise
