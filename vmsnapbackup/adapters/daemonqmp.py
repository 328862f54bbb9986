"""The QMP connection to one daemon of ours: connected once, with a deadline on
every step, and QEMU's refusals turned into our errors.

Why not qemu.qmp's synchronous ``legacy`` shim: its ``connect()`` has no
timeout, so a daemon that accepts the connection but never sends its greeting
holds a backup forever -- which is what a soak found (both socket queues empty,
us in ``epoll_wait``, the daemon in ``poll``).  It happened after a *second*
connection: we used to probe the socket (connect, read the greeting, close) and
then let qemu.qmp connect again, and QEMU 7.2, whose monitor runs in its I/O
thread, can lose the new client's greeting while it is still closing the old
one.  So here:

* the socket is connected **once**; only a refused or not yet existing socket
  (the window between the daemon's ``bind`` and ``listen``, or a forwarded
  socket whose far end does not listen yet) is tried again;
* the greeting and the capabilities negotiation must finish before a deadline;
  past it :class:`NoGreetingError` tells the caller to stop this daemon and
  start a fresh one (:class:`~.daemonprocess.DaemonProcess` does, once);
* every command and every wait for an event has its own timeout.

The async :class:`qemu.qmp.QMPClient` runs on an event loop private to this
connection, so daemons used from different threads (``backup --parallel``)
never share one.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import re
import time
from collections.abc import Awaitable, MutableMapping
from typing import Any, TypeVar, cast

from qemu.qmp import ConnectError, ExecuteError, QMPClient, QMPError

from .. import errors

__all__ = ["DaemonQMP", "NoGreetingError", "image_lock_message", "translate_refusal"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# QEMU's file-posix wording for an image-lock conflict: `Failed to get "write"
# lock` (someone else does not share what we need) and `Failed to get shared
# "write" lock` (someone else holds what we refuse to share).
_LOCK_ERROR_RE = re.compile(r'Failed to get (shared )?"[a-z ]+" lock')

#: Errors of one connect attempt that mean "nobody listens yet": try again.
_NOT_LISTENING = (errno.ECONNREFUSED, errno.ENOENT)


class NoGreetingError(errors.ExportError):
    """The daemon took the connection but gave no greeting before the deadline."""


def image_lock_message(path: str, qemu_message: str) -> str | None:
    """Our sentence for QEMU's image-lock refusal, None for any other message."""
    if _LOCK_ERROR_RE.search(qemu_message):
        return (
            f"{path} is in use by a running QEMU (image lock): another QEMU process "
            f"(a running domain, qemu-nbd, qemu-img, ...) holds it; QEMU said: {qemu_message}"
        )
    return None


def _not_listening(err: ConnectError) -> bool:
    """Whether a failed connect met a socket nobody listens on (yet)."""
    cause = err.exc
    if isinstance(cause, OSError):
        return cause.errno in _NOT_LISTENING
    # through an ssh-forwarded socket, a refused far end is an EOF before the greeting
    return isinstance(cause, EOFError)


class _Quiet(logging.LoggerAdapter):  # type: ignore[type-arg]
    """qemu.qmp logs every failed connect and lost session at ERROR; we turn each
    of those into one error of our own, so its lines go to DEBUG."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        self.logger.log(level if level >= logging.CRITICAL else logging.DEBUG,
                        msg, *args, **kwargs)

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]
                ) -> tuple[Any, MutableMapping[str, Any]]:
        return msg, kwargs


class DaemonQMP:
    """A synchronous QMP client for one daemon; use it from one thread."""

    def __init__(self, nickname: str) -> None:
        self._nickname = nickname
        self._loop = asyncio.new_event_loop()
        self._client: QMPClient | None = None
        #: the timeout of :meth:`cmd` (None: wait forever)
        self.timeout: float | None = None

    def _run(self, work: Awaitable[_T], timeout: float | None) -> _T:
        return self._loop.run_until_complete(asyncio.wait_for(work, timeout))

    def connect(self, path: str, deadline: float, poll: float = 0.01) -> None:
        """Connect to the QMP socket at ``path`` and negotiate before ``deadline``
        (a :func:`time.monotonic` value).

        Raises :class:`NoGreetingError` when a connection stood but the greeting
        or the negotiation did not finish in time, and :class:`ExportError` when
        nobody listened until the deadline.
        """
        wait = poll
        while True:
            client = QMPClient(self._nickname)
            client.logger = cast(logging.Logger, _Quiet(log.getChild(self._nickname)))
            remaining = deadline - time.monotonic()
            try:
                self._run(client.connect(path), max(remaining, 0.0))
            except asyncio.TimeoutError as err:
                raise NoGreetingError(
                    f"no QMP greeting on {path} within the start deadline") from err
            except ConnectError as err:
                if not _not_listening(err) or time.monotonic() + wait >= deadline:
                    raise errors.ExportError(f"QMP connect to {path} failed: {err}") from err
                # the bind-to-listen window: back off a little, never past the deadline
                self._run(asyncio.sleep(wait), None)
                wait = min(wait * 2, 0.2)
                continue
            except (QMPError, OSError) as err:
                raise errors.ExportError(f"QMP connect to {path} failed: {err}") from err
            self._client = client
            return

    @property
    def connected(self) -> bool:
        return self._client is not None

    def cmd(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one command within :attr:`timeout`; QEMU's own refusal is
        :class:`qemu.qmp.ExecuteError`, a missed deadline :class:`asyncio.TimeoutError`."""
        if self._client is None:
            raise errors.ExportError("storage daemon is not running")
        return self._run(self._client.execute(command, arguments), self.timeout)

    def pull_event(self, wait: float) -> dict[str, Any] | None:
        """The next event within ``wait`` seconds, None when none came."""
        if self._client is None:
            raise errors.ExportError("storage daemon is not running")
        try:
            message = self._run(self._client.events.get(), wait)
        except asyncio.TimeoutError:
            return None
        return dict(message)

    def close(self, timeout: float) -> None:
        """Disconnect (within ``timeout``) and release the event loop."""
        client, self._client = self._client, None
        try:
            if client is not None:
                self._run(client.disconnect(), timeout)
        finally:
            self._loop.close()


def translate_refusal(command: str, err: ExecuteError, image: str | None) -> errors.ExportError:
    """QEMU's refusal of ``command`` (about ``image``, if any) in our words."""
    qemu_message = str(err)
    locked = image_lock_message(image, qemu_message) if image else None
    if locked:
        return errors.ExportError(locked)
    what = f" for {image}" if image else ""
    return errors.ExportError(f"QEMU refused {command}{what}: {qemu_message}")
