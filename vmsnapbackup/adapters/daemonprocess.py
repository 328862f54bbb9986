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
import re
import signal
import socket
from typing import Any

import tenacity
from qemu.qmp import ExecuteError, QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from .. import errors
from . import processes
from .host import LOCAL, Host, HostProcess

__all__ = [
    "MALLOC_TUNABLES",
    "RUNTIME_DIR_PREFIX",
    "DaemonProcess",
    "daemon_environment",
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
# QEMU's file-posix wording for an image-lock conflict: `Failed to get "write"
# lock` (someone else does not share what we need) and `Failed to get shared
# "write" lock` (someone else holds what we refuse to share).
_LOCK_ERROR_RE = re.compile(r'Failed to get (shared )?"[a-z ]+" lock')

#: QEMU allocates a bounce buffer for every NBD request and frees it after the
#: reply; glibc serves each one of 128 KiB or more with a fresh mmap, i.e. page
#: faults and zeroing for every byte moved, twice.  Keeping such blocks in the
#: heap made a disk pass 30 % faster (docs/benchmarks.md).
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=4194304:glibc.malloc.trim_threshold=67108864"


def daemon_environment() -> dict[str, str]:
    """What the daemon's environment adds to ours: the malloc tunables above."""
    current = os.environ.get("GLIBC_TUNABLES")
    return {"GLIBC_TUNABLES": f"{current}:{MALLOC_TUNABLES}" if current else MALLOC_TUNABLES}


def qemu_opt(value: str) -> str:
    """Escape a value for QEMU's ``key=value,...`` option syntax."""
    return value.replace(",", ",,")


def sanitize_tag(tag: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9_.-]", "_", tag)[:32]
    return clean or "vmsnapbackup"


def image_lock_message(path: str, qemu_message: str) -> str | None:
    """Our sentence for QEMU's image-lock refusal, None for any other message."""
    if _LOCK_ERROR_RE.search(qemu_message):
        return (
            f"{path} is in use by a running QEMU (image lock): another QEMU process "
            f"(a running domain, qemu-nbd, qemu-img, ...) holds it; QEMU said: {qemu_message}"
        )
    return None


def launch_daemon(host: Host, args: list[str], *, log_path: str, tie_to_us: bool,
                  binary: str = "qemu-storage-daemon") -> HostProcess:
    """Start ``binary ARGS`` on ``host``: the one place a qemu-storage-daemon is started.

    Its environment carries :data:`MALLOC_TUNABLES`; like every child of a host it
    runs with umask 077 in a new session (the terminal's Ctrl-C is ours to
    handle), stdout and stderr into ``log_path`` (0600).  ``tie_to_us``: it dies
    with us (a backup's, restore's, verify's or mount's daemon); without, it
    outlives us (a boot's, which serves as long as the boot domain runs).
    """
    argv = [binary, *args]
    log.debug("starting %s", " ".join(argv))
    try:
        return host.start(argv, log_path=log_path, env=daemon_environment(),
                          tie_to_us=tie_to_us)
    except errors.HypervisorError as err:
        raise errors.ExportError(str(err)) from err


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
        self._qmp: QEMUMonitorProtocol | None = None
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
            self._spawn()
            self._connect()
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
        longest = max(len(os.fsencode(self._path(n))) for n in (QMP_SOCKET, NBD_SOCKET))
        if longest > SUN_PATH_MAX:
            raise errors.UsageError(
                f"runtime directory {path} is too long for a unix socket path "
                f"({longest} > {SUN_PATH_MAX} bytes); choose a shorter runtime base")

    def _spawn(self) -> None:
        argv = [self._binary,
                "--chardev", (f"socket,path={qemu_opt(self.qmp_socket)},server=on,wait=off,"
                "id=vsbqmp"),
                "--monitor", "chardev=vsbqmp",
                "--pidfile", self._path(PID_FILE)]
        log.debug("[%s] starting %s", self.tag, " ".join(argv))
        try:
            self._proc = self.host.start(argv, log_path=self._path(LOG_FILE),
                                         env=daemon_environment(), tie_to_us=True)
        except errors.HypervisorError as err:
            raise errors.ExportError(str(err)) from err

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

    def _probe_greeting(self, path: str) -> None:
        """One attempt: does the QMP socket answer with a greeting line?  On a plain
        socket with a timeout: the QMP client's connect has none."""
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise self._daemon_gone_error("storage daemon failed to start")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(min(2.0, self._start_timeout))
            sock.connect(path)
            data = b""
            while b"\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    raise ConnectionResetError("QMP socket closed before the greeting")
                data += chunk
            if b'"QMP"' not in data:
                raise errors.ExportError(f"{self.qmp_socket} does not speak QMP")

    def _connect(self) -> None:
        path = self.host.reach_socket(self.qmp_socket)
        try:
            tenacity.Retrying(
                retry=tenacity.retry_if_exception_type(OSError),
                stop=tenacity.stop_after_delay(self._start_timeout),
                wait=tenacity.wait_exponential(multiplier=0.005, max=0.2),
                reraise=True,
            )(self._probe_greeting, path)
        except OSError as err:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise self._daemon_gone_error("storage daemon failed to start") from err
            tail = self._tail()
            raise errors.ExportError(
                f"storage daemon (pid {self.pid}) did not answer on {self.qmp_socket} "
                f"within {self._start_timeout:g} s ({err})" + (f"; output: {tail}" if tail else "")
            ) from err
        qmp = QEMUMonitorProtocol(path, nickname=f"qsd-{self.tag}")
        try:
            qmp.connect()
        except (QMPError, OSError) as err:
            raise errors.ExportError(f"QMP connect to {self.qmp_socket} failed: {err}") from err
        qmp.settimeout(self._command_timeout)
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
            self._qmp.settimeout(self._stop_timeout)
            self._before_quit(alive)
            if alive:
                with contextlib.suppress(Exception):
                    self._qmp.cmd("quit")
            with contextlib.suppress(Exception):
                self._qmp.close()
            self._qmp = None
        if self._proc is not None:
            rc = self._proc.wait(self._stop_timeout)
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
            result = self._qmp.cmd(command, **arguments)
        except errors.BackupInterruptedError:
            self._pending_signal = None
            raise
        except ExecuteError as err:
            qemu_message = str(err)
            locked = image_lock_message(_image, qemu_message) if _image else None
            if locked:
                raise errors.ExportError(locked) from err
            what = f" for {_image}" if _image else ""
            raise errors.ExportError(f"QEMU refused {command}{what}: {qemu_message}") from err
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
            event: dict[str, Any] | None = self._qmp.pull_event(wait=wait)
        except asyncio.TimeoutError:
            return None
        except (QMPError, OSError, EOFError) as err:
            raise errors.ExportError(f"lost the storage daemon while waiting: {err}") from err
        return event
