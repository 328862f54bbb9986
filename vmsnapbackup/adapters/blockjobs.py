"""Block jobs: the active commit that merges our overlay back, its READY wait and pivot.

The patent's last step (merge the overlay back while the VM runs) is one
libvirt active block commit: start it, wait until it is READY (the frozen
image has caught up with the overlay), pivot the disk onto the frozen image,
and check that the live XML says so.  Each wait is a deadline, never a fixed
sleep.

READY is learned from the ``BLOCK_JOB_2`` event (see :mod:`.hypervisor`,
which registers :meth:`BlockJobs.on_event` on the connection); polling
``blockJobInfo`` stays as a fallback so a lost event costs time, not a hang.

The rule of the hypervisor adapter holds: we only commit an image whose name
carries our overlay marker and that is the disk's current top image.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field

import libvirt
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception,
    retry_if_result,
    stop_after_delay,
    wait_exponential,
)

from vmsnapbackup.adapters.domain import Domain
from vmsnapbackup.adapters.domainxml import Disk, ImageRef, find_disk, is_our_overlay, same_image
from vmsnapbackup.adapters.host import LOCAL, Host
from vmsnapbackup.adapters.libvirterrors import message, translated
from vmsnapbackup.errors import HypervisorError, RepairNeededError, UsageError

__all__ = ["BLOCK_JOB_KINDS", "BlockJobs", "CommitResult", "block_job", "cancel_block_job"]

log = logging.getLogger(__name__)

# SHALLOW always: without it libvirt commits into the deepest image and
# flattens a template backing chain into it.
_COMMIT_FLAGS = (
    libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE
    | libvirt.VIR_DOMAIN_BLOCK_COMMIT_SHALLOW
    | libvirt.VIR_DOMAIN_BLOCK_COMMIT_DELETE
)

#: libvirt's block job types (virDomainBlockJobType), named as in messages.
BLOCK_JOB_KINDS = {
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_PULL: "pull",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY: "copy",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT: "commit",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT: "active-commit",
    getattr(libvirt, "VIR_DOMAIN_BLOCK_JOB_TYPE_BACKUP", 5): "backup",
}


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
    status: int | None = None


def block_job(dom: Domain, target: str) -> str | None:
    """The kind of block job running on ``target`` (``active-commit``, ...), or None."""
    with translated(f"block job of disk '{target}' of domain '{dom.name}'"):
        info = dom.virdomain.blockJobInfo(target, 0)
    if not info:
        return None
    kind = info.get("type")
    return BLOCK_JOB_KINDS.get(kind, f"type {kind}")


def cancel_block_job(dom: Domain, target: str) -> None:
    """Cancel a commit a dead backup left running, without pivoting.

    Safe for an active commit of our overlay: the guest stays on the overlay,
    which still holds every block; the blocks already copied into the frozen
    image are the same ones, and the fresh commit copies them again.  The call
    is synchronous (no ABORT_ASYNC): the job is gone when it returns.
    """
    with translated(f"cancelling the block job of disk '{target}' of domain '{dom.name}'"):
        dom.virdomain.blockJobAbort(target, 0)
    log.info("domain '%s': cancelled the block job left on disk '%s'", dom.name, target)


class BlockJobs:
    """The commits of one connection, woken by its block-job events."""

    def __init__(self, host: Host = LOCAL) -> None:
        self._host = host   # where the overlays are (removed there after a commit)
        self._waiters: dict[tuple[str, str], _JobWaiter] = {}
        self._lock = threading.Lock()

    def on_event(self, _conn: libvirt.virConnect, dom: libvirt.virDomain, disk: str,
                 job_type: int, status: int, _opaque: object) -> None:
        """libvirt's BLOCK_JOB_2 callback; runs in the event-loop thread: only record and wake."""
        log.debug("block job event: %s %s type=%s status=%s", dom.name(), disk, job_type, status)
        if status not in (
            libvirt.VIR_DOMAIN_BLOCK_JOB_READY,
            libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED,
            libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED,
        ):
            return
        with self._lock:
            waiter = self._waiters.get((dom.UUIDString(), disk))
        if waiter is not None and not waiter.done.is_set():
            waiter.status = status
            waiter.done.set()

    def commit(self, dom: Domain, target: str, overlay_path: str, timeout: float = 3600.0,
               pivot_timeout: float = 60.0) -> CommitResult:
        """Merge our overlay on ``target`` back into the frozen image and pivot to it.

        Refuses (RepairNeededError) unless the disk's top image is exactly
        ``overlay_path`` and carries our marker.  The export of the frozen
        image must be stopped first: commit needs its write lock.
        """
        name = dom.name
        if not is_our_overlay(overlay_path):
            raise UsageError(f"{overlay_path} is not a vmsnapbackup overlay: refusing to commit it")
        if not dom.is_active():
            raise RepairNeededError(
                f"domain '{name}' is shut off with disk '{target}' on overlay {overlay_path}: "
                "run repair to merge it offline"
            )
        disk = find_disk(dom.xml(), target)
        if not same_image(disk.source, overlay_path) or not is_our_overlay(disk.source):
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

        key = (dom.uuid, target)
        waiter = _JobWaiter()
        with self._lock:
            self._waiters[key] = waiter
        started = time.monotonic()
        try:
            try:
                dom.virdomain.blockCommit(target, None, None, 0, _COMMIT_FLAGS)
            except libvirt.libvirtError as err:
                text = message(err)
                hint = ""
                if re.search(r"\bwrite\W+lock\b", text):
                    hint = " (is an export still holding the frozen image? stop it first)"
                raise HypervisorError(
                    f"commit of disk '{target}' of domain '{name}': {text}{hint}"
                ) from err
            _wait_ready(dom, target, waiter, timeout, overlay_path)
            ready_seconds = time.monotonic() - started
            _pivot(dom, target, pivot_timeout)
        finally:
            with self._lock:
                self._waiters.pop(key, None)
        image = _verify_pivoted(dom, target, frozen, disk.backing_chain[1:])
        seconds = time.monotonic() - started
        if self._host.stat(overlay_path, follow=False) is not None:
            log.warning("libvirt left overlay %s after the commit; removing it", overlay_path)
            try:
                self._host.unlink(overlay_path)
            except OSError as err:
                raise HypervisorError(
                    f"disk '{target}' is committed but overlay {overlay_path} could not be "
                    f"removed: {err.strerror}"
                ) from err
        log.info("domain '%s': committed %s into %s (ready %.3f s, total %.3f s)",
                 name, overlay_path, image.path, ready_seconds, seconds)
        return CommitResult(target=target, image=image, ready_seconds=ready_seconds,
                            seconds=seconds)


def _wait_ready(dom: Domain, target: str, waiter: _JobWaiter, timeout: float,
                overlay: str) -> None:
    """Wait for READY: the event wakes us at once; polling covers a lost event."""
    name = dom.name

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
        with translated(f"commit job of disk '{target}' of domain '{name}'"):
            info = dom.virdomain.blockJobInfo(target, 0)
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

    def sleep(seconds: float) -> None:
        waiter.done.wait(seconds)   # the event ends the pause early

    retrying = Retrying(
        retry=retry_if_result(lambda is_ready: not is_ready),
        wait=wait_exponential(multiplier=0.02, max=2.0),
        stop=stop_after_delay(timeout),
        sleep=sleep,
    )
    try:
        retrying(ready)
    except RetryError:
        with translated(f"cancelling the commit of disk '{target}' of domain '{name}'"):
            dom.virdomain.blockJobAbort(target, 0)
        raise RepairNeededError(
            f"commit of disk '{target}' of domain '{name}' was not ready after {timeout:g} s "
            f"and was cancelled; the domain still runs on overlay {overlay}: run repair"
        ) from None


def _not_ready_for_pivot(err: BaseException) -> bool:
    return isinstance(err, libvirt.libvirtError) and (
        err.get_error_code() == libvirt.VIR_ERR_BLOCK_COPY_ACTIVE
        or "not ready for pivot" in (err.get_error_message() or "")
    )


def _pivot(dom: Domain, target: str, deadline: float) -> None:
    retrying = Retrying(
        retry=retry_if_exception(_not_ready_for_pivot),
        wait=wait_exponential(multiplier=0.02, max=1.0),
        stop=stop_after_delay(deadline),
        reraise=True,
    )
    with translated(f"pivot of disk '{target}' of domain '{dom.name}'"):
        retrying(dom.virdomain.blockJobAbort, target, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)


def _verify_pivoted(dom: Domain, target: str, frozen: ImageRef,
                    chain_below: tuple[ImageRef, ...]) -> ImageRef:
    def top() -> Disk:
        return find_disk(dom.xml(), target)

    retrying = Retrying(
        retry=retry_if_result(lambda disk: not same_image(disk.source, frozen.path)),
        wait=wait_exponential(multiplier=0.02, max=0.5),
        stop=stop_after_delay(10.0),
    )
    try:
        disk: Disk = retrying(top)
    except RetryError as err:
        now = err.last_attempt.result().source
        raise HypervisorError(
            f"after the pivot disk '{target}' of domain '{dom.name}' runs on {now}, "
            f"not on {frozen.path}: run repair"
        ) from None
    if [p.path for p in disk.backing_chain] != [p.path for p in chain_below]:
        log.warning(
            "disk '%s' of domain '%s': backing chain changed by the commit: %s -> %s",
            target, dom.name, [p.path for p in chain_below], [p.path for p in disk.backing_chain],
        )
    return disk.top
