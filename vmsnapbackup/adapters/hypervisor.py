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
import threading
import uuid as uuid_mod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Callable

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
)
from vmsnapbackup.adapters.host import LOCAL, Host
from vmsnapbackup.adapters.hostopen import open_host
from vmsnapbackup.adapters.libvirterrors import message, open_connection, translated
from vmsnapbackup.adapters.snapshot import OverlayFor, SnapshotResult, take_snapshot
from vmsnapbackup.core.defaults import DEFAULT_URI
from vmsnapbackup.errors import HypervisorError, NotFoundError

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


class Hypervisor:
    """One libvirt connection with block-job events flowing.

    Use :func:`connect` to get one, preferably as a context manager.
    Domains are passed around as :class:`Domain` from :meth:`find_domain`.
    """

    def __init__(self, uri: str, conn: libvirt.virConnect, host: Host = LOCAL,
                 close_host: Callable[[], None] | None = None) -> None:
        self.uri = uri
        self.conn = conn
        #: where the domains' images, QEMU and our storage daemons are: this machine,
        #: or the remote hypervisor of a ``qemu+ssh`` URI (every host touch goes here)
        self.host = host
        self._close_host = close_host
        self._jobs = BlockJobs(host)
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

    def close_host(self) -> None:
        """End the host connection too (the ssh master of a remote hypervisor)."""
        if self._close_host is not None:
            close, self._close_host = self._close_host, None
            close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.close()
        finally:
            self.close_host()

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
        """External disk-only snapshot of ``disks`` (see :func:`.snapshot.take_snapshot`)."""
        return take_snapshot(dom, disks, overlay_for, quiesce, host=self.host)

    # -- commit -----------------------------------------------------------

    def commit(self, dom: Domain, target: str, overlay_path: str, timeout: float = 3600.0,
               pivot_timeout: float = 60.0) -> CommitResult:
        """Merge our overlay on ``target`` back and pivot (see :meth:`BlockJobs.commit`)."""
        return self._jobs.commit(dom, target, overlay_path, timeout=timeout,
                                 pivot_timeout=pivot_timeout)

    # -- checkpoints (persistent dirty bitmaps): see :mod:`.checkpoints` ---------

    def qemu_run(self, dom: Domain) -> str | None:
        return checkpoints.qemu_run(dom, self.host)

    def checkpoint_names(self, dom: Domain) -> list[str]:
        return checkpoints.checkpoint_names(dom)

    def create_checkpoint(self, dom: Domain, name: str, bitmap_targets: Sequence[str],
                          description: str = "") -> None:
        checkpoints.create_checkpoint(dom, name, bitmap_targets, description)

    def delete_checkpoint(self, dom: Domain, name: str) -> bool:
        return checkpoints.delete_checkpoint(dom, name)


def connect(uri: str = DEFAULT_URI) -> Hypervisor:
    """Open ``uri`` with block-job events flowing (see the module docstring).

    The :class:`Hypervisor` carries the URI's host (:func:`.hostopen.open_host`):
    this machine for a local URI, one ssh control connection for ``qemu+ssh``;
    leaving its ``with`` block closes both connections.
    """
    _ensure_event_loop()
    host, close_host = open_host(uri)
    try:
        conn = open_connection(uri)
        try:
            conn.setKeepAlive(5, 3)
        except libvirt.libvirtError as err:
            log.debug("keepalive on %s: %s", uri, message(err))
        try:
            return Hypervisor(uri, conn, host, close_host)
        except BaseException:
            conn.close()
            raise
    except BaseException:
        if close_host is not None:
            close_host()
        raise
