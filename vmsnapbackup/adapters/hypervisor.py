"""libvirt: find a domain, read its disks, take the external snapshot, commit it back.

With :mod:`.domain`, :mod:`.blockjobs`, :mod:`.checkpoints` and
:mod:`.offline` it is all that talks to libvirt about domains (errors are
translated in :mod:`.libvirterrors`).  Two habits run through it:

* every libvirt error becomes a one-line :class:`HypervisorError` carrying
  libvirt's own words, so the CLI can show it as is;
* we only ever commit or delete an image whose name carries our overlay
  marker and that is the disk's current top image: a snapshot someone else
  took, or a disk in a state we did not leave it in, is refused with an
  explanation instead of being merged.

Block-job completion (:mod:`.blockjobs`) is learned from the ``BLOCK_JOB_2``
event, which needs libvirt's default event loop registered before the
connection is opened and a thread running it; :func:`connect` does both (once
per process).
"""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid as uuid_mod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Union

import libvirt
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential

from vmsnapbackup.adapters import checkpoints
from vmsnapbackup.adapters.blockjobs import BlockJobs, CommitResult
from vmsnapbackup.adapters.domain import Domain
from vmsnapbackup.adapters.domainxml import (
    OVERLAY_MARKER,
    Disk,
    ImageRef,
    SkippedDisk,
    backup_disks,
    find_disk,
    is_our_overlay,
    overlay_id,
    overlay_path,
    parse_disks,
    same_image,
    snapshot_xml,
    unsupported_reason,
)
from vmsnapbackup.adapters.libvirterrors import message, open_connection, translated
from vmsnapbackup.errors import (
    HypervisorError,
    NotFoundError,
    RepairNeededError,
    UnsupportedDiskError,
    UsageError,
)

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "DEFAULT_URI",
    "OVERLAY_MARKER",
    "CommitResult",
    "Disk",
    "Domain",
    "Hypervisor",
    "ImageRef",
    "OverlayFor",
    "SkippedDisk",
    "SnapshotResult",
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

_event_loop_lock = threading.Lock()
_event_loop_started = False


#: How long a backup waits for a restarted libvirtd before it leaves the commit to repair.
RECONNECT_DEADLINE = 60.0


def _run_event_loop() -> None:
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except libvirt.libvirtError as err:  # pragma: no cover - libvirt internal failure
            log.warning("libvirt event loop: %s", message(err))


def _ensure_event_loop() -> None:
    """Register libvirt's default event loop and start its thread, once per process.

    Must happen before ``libvirt.open``: a connection opened earlier never
    delivers events.
    """
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
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
    overlays: dict[str, str]
    frozen: dict[str, ImageRef]
    seconds: float


OverlayFor = Union[Callable[[Disk], str], Mapping[str, str]]


class Hypervisor:
    """One libvirt connection with block-job events flowing.

    Use :func:`connect` to get one, preferably as a context manager.
    Domains are passed around as :class:`Domain` from :meth:`find_domain`.
    """

    def __init__(self, uri: str, conn: libvirt.virConnect) -> None:
        self.uri = uri
        self.conn = conn
        self._jobs = BlockJobs()
        self._callback_id: int | None = None
        self._watch_block_jobs()

    # -- connection -------------------------------------------------------

    def _watch_block_jobs(self) -> None:
        with translated(f"cannot watch block jobs on {self.uri}"):
            self._callback_id = self.conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, self._jobs.on_event, None
            )

    def revive(self, dom: Domain, deadline: float = RECONNECT_DEADLINE) -> Domain:
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
        log.warning("the connection to %s was lost (libvirtd restarted?); reconnecting",
                    self.uri)
        try:
            self.close()
        except Exception:  # the old connection is dead: nothing to release cleanly
            log.debug("closing the dead connection", exc_info=True)
        try:
            conn: libvirt.virConnect = Retrying(
                retry=retry_if_exception(lambda e: isinstance(e, libvirt.libvirtError)),
                stop=stop_after_delay(deadline),
                wait=wait_exponential(multiplier=0.1, max=2.0),
                reraise=True,
            )(libvirt.open, self.uri)
        except libvirt.libvirtError as err:
            raise HypervisorError(
                f"lost the connection to {self.uri} and could not reconnect within "
                f"{deadline:.0f} s: {message(err)}") from err
        self.conn = conn
        try:
            conn.setKeepAlive(5, 3)
        except libvirt.libvirtError as err:
            log.debug("keepalive on %s: %s", self.uri, message(err))
        self._watch_block_jobs()
        log.info("reconnected to %s", self.uri)
        return self.find_domain(dom.uuid)   # kept in Domain: no call to the dead daemon

    def close(self) -> None:
        if self._callback_id is not None:
            try:
                self.conn.domainEventDeregisterAny(self._callback_id)
            except libvirt.libvirtError as err:
                log.debug("deregistering block job events: %s", message(err))
            self._callback_id = None
        try:
            self.conn.close()
        except libvirt.libvirtError as err:
            log.debug("closing %s: %s", self.uri, message(err))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- domains ----------------------------------------------------------

    def find_domain(self, ident: str | int) -> Domain:
        """The domain named ``ident``, or with that UUID, or with that numeric id."""
        lookups: list[tuple[Callable[[], Domain], str]] = []
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
                return Domain(lookup())
            except libvirt.libvirtError as err:
                if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise HypervisorError(
                        f"looking up domain '{text}' by {how} on {self.uri}: {message(err)}"
                    ) from err
        raise NotFoundError(f"domain '{text}' not found on {self.uri}")

    def list_domains(self) -> list[Domain]:
        """Every domain defined or running on the connection."""
        with translated(f"listing the domains of {self.uri}"):
            return [Domain(d) for d in self.conn.listAllDomains(0)]

    def define(self, xml: str) -> Domain:
        """Define (or redefine) a persistent domain from ``xml``."""
        with translated(f"defining a domain on {self.uri}"):
            return Domain(self.conn.defineXML(xml))

    def domain_name(self, dom: Domain) -> str:
        return dom.name

    def domain_uuid(self, dom: Domain) -> str:
        return dom.uuid

    def is_active(self, dom: Domain) -> bool:
        return dom.is_active()

    def domain_xml(self, dom: Domain, inactive: bool = False) -> str:
        """The live XML (what QEMU runs now), or with ``inactive`` the persistent config."""
        return dom.xml(inactive=inactive)

    # -- disks ------------------------------------------------------------

    def disks(self, dom: Domain, inactive: bool = False) -> list[Disk]:
        return parse_disks(self.domain_xml(dom, inactive=inactive))

    def backup_disks(
        self, dom: Domain, select: Sequence[str] | None = None
    ) -> tuple[list[Disk], list[SkippedDisk]]:
        """The disks to back up and those skipped, from the live XML.

        For a shut-off domain the live XML is its configuration, which is what
        the workflow reads directly (no snapshot needed).
        """
        return backup_disks(self.domain_xml(dom), select)

    def top_image(self, dom: Domain, target: str) -> ImageRef:
        """The image the guest writes to now (our overlay while a backup runs)."""
        return find_disk(self.domain_xml(dom), target).top

    # -- snapshot ---------------------------------------------------------

    def snapshot(
        self,
        dom: Domain,
        disks: Sequence[Disk],
        overlay_for: OverlayFor,
        quiesce: bool | None = None,
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
        overlays: dict[str, str] = {}
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
            dom.virdomain.snapshotCreateXML(xml, flags)
        except libvirt.libvirtError as err:
            if quiesce is None and err.get_error_code() in _NO_AGENT_CODES:
                log.warning(
                    "domain '%s': no usable guest agent (%s); the snapshot is crash-consistent",
                    name,
                    message(err),
                )
                quiesced = False
                with translated(what):
                    dom.virdomain.snapshotCreateXML(xml, _SNAPSHOT_FLAGS)
            else:
                kind = "quiesced " if quiesced else ""
                raise HypervisorError(f"{kind}{what}: {message(err)}") from err
        seconds = time.monotonic() - started

        frozen: dict[str, ImageRef] = {}
        after = {d.target: d for d in self.disks(dom)}
        for target, path in overlays.items():
            now = after.get(target)
            if now is None or not same_image(now.source, path) or not now.backing_chain:
                raise HypervisorError(
                    f"after the snapshot disk '{target}' of domain '{name}' does not run on "
                    f"overlay {path} over a frozen image: run repair"
                )
            frozen[target] = now.backing_chain[0]
        log.info(
            "domain '%s': snapshot of %s in %.3f s (%s)",
            name,
            ", ".join(overlays),
            seconds,
            "quiesced" if quiesced else "crash-consistent",
        )
        return SnapshotResult(quiesced=quiesced, overlays=overlays, frozen=frozen, seconds=seconds)

    # -- commit -----------------------------------------------------------

    def commit(self, dom: Domain, target: str, overlay_path: str, timeout: float = 3600.0,
               pivot_timeout: float = 60.0) -> CommitResult:
        """Merge our overlay on ``target`` back and pivot (see :meth:`BlockJobs.commit`)."""
        return self._jobs.commit(dom, target, overlay_path, timeout=timeout,
                                 pivot_timeout=pivot_timeout)

    # -- checkpoints (persistent dirty bitmaps): see :mod:`.checkpoints` ---------

    def qemu_run(self, dom: Domain) -> str | None:
        return checkpoints.qemu_run(dom)

    def checkpoint_names(self, dom: Domain) -> list[str]:
        return checkpoints.checkpoint_names(dom)

    def create_checkpoint(self, dom: Domain, name: str, bitmap_targets: Sequence[str],
                          description: str = "") -> None:
        checkpoints.create_checkpoint(dom, name, bitmap_targets, description)

    def delete_checkpoint(self, dom: Domain, name: str) -> bool:
        return checkpoints.delete_checkpoint(dom, name)


def connect(uri: str = DEFAULT_URI) -> Hypervisor:
    """Open ``uri`` with block-job events flowing (see the module docstring)."""
    _ensure_event_loop()
    conn = open_connection(uri)
    try:
        conn.setKeepAlive(5, 3)
    except libvirt.libvirtError as err:
        log.debug("keepalive on %s: %s", uri, message(err))
    try:
        return Hypervisor(uri, conn)
    except BaseException:
        conn.close()
        raise
