"""The export step's process: one private ``qemu-storage-daemon``, its runtime
directory and its QMP connection -- started, watched and always stopped.

Why a daemon of our own rather than QEMU's built-in NBD server: the running
domain's QEMU belongs to libvirt (touching its monitor behind libvirt's back is
unsupported), and a separate process can open the *frozen* image read-only next
to the guest's QEMU, serve the writable point volume being filled, and be
killed without harming the guest.  The exports themselves are
:mod:`~vmsnapbackup.adapters.storagedaemon`'s job; this module is the one
launcher of the daemon for backup, restore, verify, mount and (detached, see
:mod:`~vmsnapbackup.adapters.bootdaemon`) boot.

Everything the daemon creates lives in one private 0700 runtime directory (QMP
socket, NBD socket, pid file, log), so cleaning up is "stop that PID, remove
that directory" -- also what ``repair`` does through ``stop_leftover_daemon``
when a backup died without its ``close()``
(:mod:`~vmsnapbackup.adapters.daemonleftover`).  How the daemon is kept from
outliving us:

* ``close()`` always removes the exports, sends QMP ``quit``, waits for the PID,
  SIGKILLs it (by PID, never by name) if it lingers and removes the runtime
  directory; also when the ``with`` body raises;
* SIGTERM, SIGINT and SIGHUP become :class:`~vmsnapbackup.errors.BackupInterruptedError`
  while the daemon is open (only where nobody installed a handler before us,
  and only in the main thread), so the ``with`` block unwinds and cleans up;
* the daemon dies with us (the host's ``tie_to_us``: ``PR_SET_PDEATHSIG`` locally),
  so after a SIGKILL or a crash only the runtime directory stays; ``repair``
  removes it.  The death signal follows the *thread* that started the daemon,
  and the QMP client is bound to that thread's event loop: use one daemon from
  one thread, the main thread.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from typing import Any

import tenacity
from qemu.qmp import ExecuteError, QMPError

from .. import errors
from . import processes
from .daemonlaunch import (
    MALLOC_TUNABLES,
    daemon_environment,
    launch_daemon,
    qemu_opt,
    sanitize_tag,
    wait_exit,
)
from .daemonqmp import DaemonQMP, NoGreetingError, image_lock_message, translate_refusal
from .host import LOCAL, Host, HostProcess

__all__ = [
    "MALLOC_TUNABLES",
    "RUNTIME_DIR_PREFIX",
    "DaemonProcess",
    "daemon_environment",
    "image_lock_message",
    "launch_daemon",
    "qemu_opt",
]

log = logging.getLogger(__name__)

#: Every runtime directory we create starts with this; cleanup refuses others.
RUNTIME_DIR_PREFIX = "qsd-"
QMP_SOCKET = "qmp.sock"
NBD_SOCKET = "nbd.sock"
PID_FILE = "qsd.pid"
LOG_FILE = "qsd.log"
#: The only names a runtime directory may hold; anything else means "not ours".
RUNTIME_FILES = frozenset({QMP_SOCKET, NBD_SOCKET, PID_FILE, LOG_FILE})
SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux

def _default_runtime_base() -> str:
    """The host runtime directory of FORMAT §11, shared with the in-flight records."""
    from ..core.inflight import runtime_root

    return str(runtime_root())


class DaemonProcess:
    """The process side of a :class:`~.storagedaemon.StorageDaemon` (see the module
    docstring).  Subclasses say what runs once the daemon answers
    (:meth:`_on_started`) and what is undone before it quits (:meth:`_before_quit`)."""

    def __init__(self, runtime_base: str | None = None, tag: str = "vmsnapbackup", *,
                 host: Host = LOCAL, binary: str = "qemu-storage-daemon",
                 start_timeout: float = 15.0, command_timeout: float = 300.0,
                 stop_timeout: float = 15.0, handle_signals: bool = True) -> None:
        self.tag = sanitize_tag(tag)
        self.host = host
        self._runtime_base = runtime_base
        self._binary = binary
        self._start_timeout = float(start_timeout)
        self._command_timeout = float(command_timeout)
        self._stop_timeout = float(stop_timeout)
        self._handle_signals = handle_signals
        self._runtime_dir: str | None = None
        self._proc: HostProcess | None = None
        self._qmp: DaemonQMP | None = None
        self._signals = contextlib.ExitStack()
        self._started = False
        self._closed = False
        self._closing = False
        self._pending_signal: int | None = None
        self._deferred_signal: int | None = None

    @property
    def pid(self) -> int | None:
        """The daemon's PID (for the backup journal), None before start."""
        return self._proc.pid if self._proc is not None else None

    @property
    def runtime_dir(self) -> str | None:
        """The private runtime directory (for the backup journal)."""
        return self._runtime_dir

    @property
    def qmp_socket(self) -> str:
        return self._path(QMP_SOCKET)

    def _path(self, name: str) -> str:
        if self._runtime_dir is None:
            raise errors.ExportError("storage daemon is not started")
        return os.path.join(self._runtime_dir, name)

    # ------------------------------------------------------------- lifecycle
    def start(self) -> DaemonProcess:
        """Start the daemon and connect QMP; on any failure undo everything first."""
        if self._started:
            raise errors.UsageError("a StorageDaemon can only be started once")
        self._started = True
        try:
            self._make_runtime_dir()
            if self._handle_signals:
                self._signals.enter_context(
                    processes.stop_signals(self._on_signal, only_if_default=True))
            self._spawn_and_connect()
            self._on_started()
        except BaseException:
            self._close(raise_deferred=False)
            raise
        return self

    def close(self) -> None:
        """Remove every export, stop the daemon and delete its runtime directory.
        Safe to call more than once and after a failed :meth:`start`."""
        self._close(raise_deferred=True)

    def _on_started(self) -> None:
        """Hook: runs once QMP answers."""

    def _before_quit(self, alive: bool) -> None:
        """Hook: runs before ``quit`` (``alive``: the daemon still runs)."""

    def _after_stop(self) -> None:
        """Hook: runs after the daemon is gone, before its directory is removed."""

    def _make_runtime_dir(self) -> None:
        base = os.path.abspath(self._runtime_base or _default_runtime_base())
        try:
            self.host.mkdir(base, 0o700, parents=True, exist_ok=True)
            path = self.host.make_temp_dir(base, f"{RUNTIME_DIR_PREFIX}{self.tag}-")
        except OSError as err:
            raise errors.ExportError(
                f"cannot create a runtime directory under {base}: {err.strerror}") from err
        self._runtime_dir = path
        from .daemonleftover import sweep_once

        sweep_once(base, self.host)   # what killed commands left here, once per command
        longest = max(len(os.fsencode(self._path(n))) for n in (QMP_SOCKET, NBD_SOCKET))
        if longest > SUN_PATH_MAX:
            raise errors.UsageError(
                f"runtime directory {path} is too long for a unix socket path "
                f"({longest} > {SUN_PATH_MAX} bytes); choose a shorter runtime base")

    def _spawn(self) -> None:
        self._proc = launch_daemon(
            self.host,
            ["--chardev", f"socket,path={qemu_opt(self.qmp_socket)},server=on,wait=off,id=vsbqmp",
             "--monitor", "chardev=vsbqmp", "--pidfile", self._path(PID_FILE)],
            log_path=self._path(LOG_FILE), tie_to_us=True, binary=self._binary)

    def _tail(self) -> str:
        if self._runtime_dir is None:
            return ""
        with contextlib.suppress(OSError):
            data = self.host.read_file(self._path(LOG_FILE), limit=2000, from_end=True)
            return (data or b"").decode("utf-8", "replace").strip()
        return ""

    def _daemon_gone_error(self, what: str) -> errors.ExportError:
        assert self._proc is not None
        msg = f"{what}: qemu-storage-daemon exited with status {self._proc.poll()}"
        tail = self._tail()
        return errors.ExportError(msg + (f"; its output ends with: {tail}" if tail else ""))

    def _spawn_and_connect(self) -> None:
        """Start the daemon and connect QMP.  A daemon that takes the connection but
        never greets (see :mod:`.daemonqmp`) is replaced by a fresh one, once."""
        for attempt in (1, 2):
            self._spawn()
            try:
                self._connect()
                return
            except NoGreetingError as err:
                tail = self._tail()
                if attempt == 2:
                    raise errors.ExportError(
                        f"{err} (pid {self.pid}), twice" + (f"; output: {tail}" if tail else "")
                    ) from err
                log.warning("[%s] %s (pid %s); starting a new storage daemon",
                            self.tag, err, self.pid)
                self._discard_daemon()

    def _discard_daemon(self) -> None:
        """Kill a daemon that never answered and clear its socket and pid file."""
        assert self._proc is not None
        self._proc.kill()
        self._proc.wait(None)
        self._proc = None
        for name in (QMP_SOCKET, PID_FILE):
            self.host.unlink(self._path(name))

    def _wait_for_socket(self, deadline: float) -> None:
        """Wait until the daemon has bound its QMP socket (checked on its host, so
        this holds for a forwarded socket too) or has died."""
        assert self._proc is not None
        proc = self._proc

        class _NotYet(Exception):
            pass

        def bound() -> None:
            if proc.poll() is not None:
                raise self._daemon_gone_error("storage daemon failed to start")
            info = self.host.stat(self.qmp_socket, follow=False)
            if info is None or not info.is_socket:
                raise _NotYet

        try:
            tenacity.Retrying(
                retry=tenacity.retry_if_exception_type(_NotYet),
                stop=tenacity.stop_before_delay(max(deadline - time.monotonic(), 0.0)),
                wait=tenacity.wait_exponential(multiplier=0.005, max=0.02),
                reraise=True,
            )(bound)
        except _NotYet:
            tail = self._tail()
            raise errors.ExportError(
                f"storage daemon (pid {self.pid}) did not answer: no socket {self.qmp_socket} "
                f"within {self._start_timeout:g} s" + (f"; output: {tail}" if tail else "")
            ) from None

    def _connect(self) -> None:
        deadline = time.monotonic() + self._start_timeout
        self._wait_for_socket(deadline)
        qmp = DaemonQMP(f"qsd-{self.tag}")
        try:
            qmp.connect(self.host.reach_socket(self.qmp_socket), deadline)
        except BaseException as err:
            qmp.close(0.0)
            assert self._proc is not None
            if isinstance(err, errors.ExportError) and not isinstance(err, NoGreetingError) \
                    and self._proc.poll() is not None:
                raise self._daemon_gone_error("storage daemon failed to start") from err
            raise
        qmp.timeout = self._command_timeout
        self._qmp = qmp

    def _close(self, raise_deferred: bool) -> None:
        if self._closed:
            return
        self._closing = True
        try:
            self._shutdown_daemon()
        finally:
            with contextlib.suppress(Exception):
                self._after_stop()
            self._remove_runtime_dir()
            self._signals.close()
            self._closed = True
            self._closing = False
        if self._deferred_signal is not None and raise_deferred:
            signum, self._deferred_signal = self._deferred_signal, None
            raise errors.BackupInterruptedError(
                f"interrupted by {signal.Signals(signum).name} while stopping the storage daemon")

    def _shutdown_daemon(self) -> None:
        if self._qmp is not None:
            alive = self._proc is not None and self._proc.poll() is None
            # a hung daemon must not hold up an interrupted backup for long
            self._qmp.timeout = self._stop_timeout
            self._before_quit(alive)
            if alive:
                with contextlib.suppress(Exception):
                    self._qmp.cmd("quit")
            with contextlib.suppress(Exception):
                self._qmp.close(self._stop_timeout)
            self._qmp = None
        if self._proc is not None:
            rc = wait_exit(self.host, self._proc, self._stop_timeout)
            if rc is None:
                log.warning("[%s] storage daemon pid %s did not quit within %g s; killing it",
                            self.tag, self._proc.pid, self._stop_timeout)
                self._proc.kill()
                rc = self._proc.wait(None)
            tail = self._tail()
            if rc != 0:
                log.warning("[%s] storage daemon exited with %s; output: %s", self.tag, rc, tail)
            elif tail:
                log.debug("[%s] storage daemon output: %s", self.tag, tail)

    def _remove_runtime_dir(self) -> None:
        if self._runtime_dir is None:
            return
        from .daemonleftover import remove_runtime_dir

        try:
            remove_runtime_dir(self._runtime_dir, self.host)
        except (OSError, errors.VmSnapBackupError) as err:
            log.warning("[%s] could not remove %s: %s", self.tag, self._runtime_dir, err)

    # --------------------------------------------------------------- signals
    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self._closing:
            log.warning("[%s] %s received while stopping the storage daemon", self.tag, name)
            self._deferred_signal = signum
            return
        log.warning("[%s] %s received: stopping", self.tag, name)
        self._pending_signal = signum
        raise errors.BackupInterruptedError(f"interrupted by {name}")

    # ------------------------------------------------------------------- QMP
    def qmp(self, command: str, **arguments: Any) -> Any:
        """Run one QMP command; QEMU's refusal becomes :class:`ExportError`."""
        return self._cmd(command, **arguments)

    def _cmd(self, command: str, *, _image: str | None = None, **arguments: Any) -> Any:
        if self._qmp is None:
            raise errors.ExportError("storage daemon is not running")
        try:
            result = self._qmp.cmd(command, arguments or None)
        except errors.BackupInterruptedError:
            self._pending_signal = None
            raise
        except ExecuteError as err:
            raise translate_refusal(command, err, _image) from err
        except asyncio.TimeoutError as err:
            raise errors.ExportError(
                f"storage daemon gave no reply to {command} within {self._command_timeout:g} s"
            ) from err
        except (QMPError, OSError, EOFError) as err:
            if self._proc is not None and self._proc.poll() is not None:
                raise self._daemon_gone_error(f"{command} failed") from err
            raise errors.ExportError(f"{command} failed: {type(err).__name__}: {err}") from err
        # A signal that arrived inside an asyncio callback is swallowed by the
        # event loop (it logs "Exception in callback"): deliver it here.
        if self._pending_signal is not None and not self._closing:
            signum, self._pending_signal = self._pending_signal, None
            raise errors.BackupInterruptedError(f"interrupted by {signal.Signals(signum).name}")
        return result

    def _pull_event(self, wait: float) -> dict[str, Any] | None:
        """The next QMP event within ``wait`` seconds, None when none came."""
        assert self._qmp is not None
        try:
            return self._qmp.pull_event(wait)
        except (QMPError, OSError, EOFError) as err:
            raise errors.ExportError(f"lost the storage daemon while waiting: {err}") from err
