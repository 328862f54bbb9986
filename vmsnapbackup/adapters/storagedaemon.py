"""The export step: serve images over NBD from a private ``qemu-storage-daemon``.

Why a daemon of our own per backup rather than QEMU's built-in NBD server:
the running domain's QEMU belongs to libvirt (touching its monitor behind
libvirt's back is unsupported), and a separate process can open the *frozen*
image read-only next to the guest's QEMU, serve the writable point volume
being filled, and be killed without harming the guest.

Everything the daemon creates lives in one private 0700 runtime directory
(QMP socket, NBD socket, pid file, log), so cleaning up is "stop that PID,
remove that directory" -- which is also what ``repair`` does through
:func:`stop_leftover_daemon` when a backup died without its ``close()``.

How the daemon is kept from outliving us:

* ``close()`` / ``__exit__`` always removes the exports, sends QMP ``quit``,
  waits for the PID, SIGKILLs it (by PID, never by name) if it lingers and
  removes the runtime directory; also when the ``with`` body raises.
* SIGTERM, SIGINT and SIGHUP delivered to our process become
  :class:`~vmsnapbackup.errors.BackupInterruptedError` while the daemon is
  open (only where nobody installed a handler before us, and only in the
  main thread), so the ``with`` block unwinds and cleans up.
* The daemon is started with ``PR_SET_PDEATHSIG = SIGKILL``: if we die
  without cleaning up (SIGKILL, crash), the kernel kills the daemon. Only the
  runtime directory stays behind then; ``repair`` removes it.
  Caveat (Linux semantics): the death signal follows the *thread* that started
  the daemon, so start it from a thread that lives as long as it is used (the
  main thread). The QMP client is also bound to the starting thread's event
  loop: use one :class:`StorageDaemon` from one thread.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import json
import logging
import os
import re
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
import types
import urllib.parse
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Set

import tenacity
from qemu.qmp import ExecuteError, QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from vmsnapbackup import errors

__all__ = [
    "Export",
    "StorageDaemon",
    "stop_leftover_daemon",
    "relative_backing_path",
    "detect_format",
    "RUNTIME_DIR_PREFIX",
]

log = logging.getLogger(__name__)

#: Every runtime directory we create starts with this; cleanup refuses others.
RUNTIME_DIR_PREFIX = "qsd-"
QMP_SOCKET = "qmp.sock"
NBD_SOCKET = "nbd.sock"
PID_FILE = "qsd.pid"
LOG_FILE = "qsd.log"
#: The only names a runtime directory may hold; anything else means "not ours".
_RUNTIME_FILES = frozenset({QMP_SOCKET, NBD_SOCKET, PID_FILE, LOG_FILE})

_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
_PR_SET_PDEATHSIG = 1
_EXPORT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_FORMAT_RE = re.compile(r"^[a-z0-9_-]{1,32}$")
# QEMU's file-posix wording for an image-lock conflict: `Failed to get "write"
# lock` (someone else does not share what we need) and `Failed to get shared
# "write" lock` (someone else holds what we refuse to share).
_LOCK_ERROR_RE = re.compile(r'Failed to get (shared )?"[a-z ]+" lock')
_HANDLED_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP")


def _sanitize_tag(tag: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9_.-]", "_", tag)[:32]
    return clean or "vmsnapbackup"


def relative_backing_path(image: str, backing: str) -> str:
    """The backing path to store in ``image``: relative to ``image``'s directory.

    Relative so that the whole pool can be moved or mounted elsewhere and
    point volumes still find their base volume. A leading ``./`` is added when
    the first component holds a ``:``, which QEMU would otherwise read as a
    protocol prefix (``nbd:...``).
    """
    rel = os.path.relpath(os.path.abspath(backing), os.path.dirname(os.path.abspath(image)))
    if ":" in rel.split("/", 1)[0]:
        rel = "./" + rel
    return rel


def _tail(path: Optional[str], limit: int = 2000) -> str:
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _default_runtime_base() -> str:
    """The host runtime directory of FORMAT §11, shared with the in-flight records."""
    from ..core.inflight import runtime_root

    return str(runtime_root())


def qemu_opt(value: str) -> str:
    """Escape a value for QEMU's ``key=value,...`` option syntax."""
    return value.replace(",", ",,")


#: QEMU allocates a bounce buffer for every NBD request and frees it after the
#: reply; glibc serves each one of 128 KiB or more with a fresh mmap, i.e. page
#: faults and zeroing for every byte moved, twice.  Keeping such blocks in the
#: heap made a disk pass 30 % faster (docs/benchmarks.md).
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=4194304:glibc.malloc.trim_threshold=67108864"


def _daemon_environment() -> Dict[str, str]:
    env = dict(os.environ)
    current = env.get("GLIBC_TUNABLES")
    env["GLIBC_TUNABLES"] = f"{current}:{MALLOC_TUNABLES}" if current else MALLOC_TUNABLES
    return env


def _make_death_signal_setup() -> Callable[[], None]:
    """Build the ``preexec_fn`` that ties the daemon's life to ours.

    ``prctl`` is resolved here, in the parent, so the child only makes one
    foreign call between fork and exec. The ``getppid`` check closes the race
    where we die between ``fork`` and ``prctl``: the death signal would never
    come, so the child gives up instead of running unowned.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    prctl = libc.prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent = os.getpid()
    sig = int(signal.SIGKILL)

    def setup() -> None:
        if prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
            os._exit(126)
        if os.getppid() != parent:
            os._exit(125)

    return setup


def _image_lock_message(path: str, qemu_message: str) -> Optional[str]:
    if _LOCK_ERROR_RE.search(qemu_message):
        return (
            f"{path} is in use by a running QEMU (image lock): another QEMU process "
            f"(a running domain, qemu-nbd, qemu-img, ...) holds it; QEMU said: {qemu_message}"
        )
    return None


def detect_format(path: str) -> str:
    """Ask ``qemu-img info`` for an image's format.

    Callers that know the format (from the domain XML or the pool manifest)
    should pass it instead: probing lets a raw image whose guest wrote a qcow2
    header be read as qcow2, with a backing file of the guest's choosing.
    ``-U`` (force-share) is only for the probe, so an image in use still
    reports its format; the export itself takes proper locks.
    """
    try:
        proc = subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", path],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise errors.ExportError(f"cannot run qemu-img info on {path}: {err}") from err
    if proc.returncode != 0:
        raise errors.ExportError(
            f"qemu-img info {path} failed: {proc.stderr.strip() or proc.returncode}"
        )
    try:
        fmt = json.loads(proc.stdout)["format"]
    except (ValueError, KeyError, TypeError) as err:
        raise errors.ExportError(f"qemu-img info {path}: unexpected output") from err
    return str(fmt)


@dataclass(frozen=True)
class Export:
    """One NBD export served by a :class:`StorageDaemon`.

    ``size`` is QEMU's virtual size of the image, which for a raw file whose
    length is not a multiple of 512 is rounded *up* to 512 (the tail reads as
    zeros).
    """

    name: str
    socket_path: Optional[str]   # None when the NBD server listens on TCP
    image_path: str
    fmt: str
    writable: bool
    size: int
    node_name: str
    file_node: str
    export_id: str
    host: Optional[str] = None
    port: Optional[int] = None
    #: the persistent dirty bitmap the export serves as ``qemu:dirty-bitmap:<name>``
    #: (None: not asked, or refused -- ``bitmap_refused`` says why)
    bitmap: Optional[str] = None
    bitmap_refused: Optional[str] = None

    @property
    def uri(self) -> str:
        """``nbd+unix:///NAME?socket=PATH`` (or ``nbd://HOST:PORT/NAME`` on TCP),
        understood by qemu-img, qemu-io, nbdinfo."""
        if self.socket_path is None:
            host = f"[{self.host}]" if self.host and ":" in self.host else self.host
            return f"nbd://{host}:{self.port}/{self.name}"
        sock = urllib.parse.quote(self.socket_path, safe="/")
        return f"nbd+unix:///{self.name}?socket={sock}"


class StorageDaemon:
    """A private ``qemu-storage-daemon`` with one NBD server on a unix socket.

    Use as a context manager (or call :meth:`start` / :meth:`close`)::

        with StorageDaemon(tag="web1-vda") as qsd:
            exp = qsd.export_image(frozen, "qcow2", name="vda")
            ... read exp.uri / exp.socket_path + exp.name ...

    ``runtime_base`` is the directory *under which* the private 0700 runtime
    directory ``qsd-TAG-XXXXXXXX`` is created (default ``/run/vmsnapbackup``
    for root, else ``$XDG_RUNTIME_DIR/vmsnapbackup``, else the temp dir);
    it is never removed itself.
    """

    def __init__(
        self,
        runtime_base: Optional[str] = None,
        tag: str = "vmsnapbackup",
        *,
        binary: str = "qemu-storage-daemon",
        start_timeout: float = 15.0,
        command_timeout: float = 300.0,
        stop_timeout: float = 15.0,
        handle_signals: bool = True,
        nbd_address: Optional[Dict[str, Any]] = None,
    ) -> None:
        """``nbd_address`` is a QMP SocketAddress for the NBD server (``{"type": "unix",
        "data": {"path": P}}`` or ``{"type": "inet", "data": {"host": H, "port": "P"}}``);
        by default it is a socket in the private runtime directory, reachable by root only.
        """
        self.tag = _sanitize_tag(tag)
        self._nbd_address = nbd_address
        self._runtime_base = runtime_base
        self._binary = binary
        self._start_timeout = float(start_timeout)
        self._command_timeout = float(command_timeout)
        self._stop_timeout = float(stop_timeout)
        self._handle_signals = handle_signals

        self._runtime_dir: Optional[str] = None
        self._proc: Optional["subprocess.Popen[bytes]"] = None
        self._qmp: Optional[QEMUMonitorProtocol] = None
        self._exports: List[Export] = []
        self._deleted_export_ids: Set[str] = set()
        self._counter = 0
        self._started = False
        self._closed = False
        self._closing = False
        self._old_handlers: Dict[int, Any] = {}
        self._pending_signal: Optional[int] = None
        self._deferred_signal: Optional[int] = None

    # ------------------------------------------------------------ properties
    @property
    def pid(self) -> Optional[int]:
        """The daemon's PID (for the backup journal), None before start."""
        return self._proc.pid if self._proc is not None else None

    @property
    def runtime_dir(self) -> Optional[str]:
        """The private runtime directory (for the backup journal)."""
        return self._runtime_dir

    @property
    def nbd_socket(self) -> Optional[str]:
        """The NBD server's unix socket, None when it listens on TCP."""
        if self._nbd_address is None:
            return self._path(NBD_SOCKET)
        if self._nbd_address.get("type") == "unix":
            return str(self._nbd_address["data"]["path"])
        return None

    def _nbd_server_address(self) -> Dict[str, Any]:
        if self._nbd_address is None:
            return {"type": "unix", "data": {"path": self._path(NBD_SOCKET)}}
        return self._nbd_address

    @property
    def qmp_socket(self) -> str:
        return self._path(QMP_SOCKET)

    @property
    def exports(self) -> List[Export]:
        return list(self._exports)

    def _path(self, name: str) -> str:
        if self._runtime_dir is None:
            raise errors.ExportError("storage daemon is not started")
        return os.path.join(self._runtime_dir, name)

    # ------------------------------------------------------------- lifecycle
    def __enter__(self) -> "StorageDaemon":
        return self.start()

    def __exit__(
        self,
        exc_type: Optional[type],
        exc: Optional[BaseException],
        tb: Optional[types.TracebackType],
    ) -> None:
        self._close(raise_deferred=exc_type is None)

    def start(self) -> "StorageDaemon":
        """Start the daemon, connect QMP, start the NBD server.

        On any failure everything started so far is undone before raising.
        """
        if self._started:
            raise errors.UsageError("a StorageDaemon can only be started once")
        self._started = True
        try:
            self._make_runtime_dir()
            self._install_signal_handlers()
            self._spawn()
            self._connect()
            self._cmd(
                "nbd-server-start",
                addr=self._nbd_server_address(),
            )
        except BaseException:
            self._close(raise_deferred=False)
            raise
        log.info(
            "[%s] storage daemon pid %s serving NBD on %s", self.tag, self.pid, self.nbd_socket
        )
        return self

    def close(self) -> None:
        """Remove every export, stop the daemon and delete its runtime directory.

        Safe to call more than once and after a failed :meth:`start`.
        """
        self._close(raise_deferred=True)

    def _make_runtime_dir(self) -> None:
        base = self._runtime_base or _default_runtime_base()
        try:
            os.makedirs(base, mode=0o700, exist_ok=True)
            path = tempfile.mkdtemp(prefix=f"{RUNTIME_DIR_PREFIX}{self.tag}-", dir=base)
            os.chmod(path, 0o700)
        except OSError as err:
            raise errors.ExportError(
                f"cannot create a runtime directory under {base}: {err.strerror}"
            ) from err
        self._runtime_dir = path
        longest = max(len(os.fsencode(self._path(n))) for n in (QMP_SOCKET, NBD_SOCKET))
        if longest > _SUN_PATH_MAX:
            raise errors.UsageError(
                f"runtime directory {path} is too long for a unix socket path "
                f"({longest} > {_SUN_PATH_MAX} bytes); choose a shorter runtime base"
            )

    def _spawn(self) -> None:
        argv = [
            self._binary,
            "--chardev",
            f"socket,path={qemu_opt(self.qmp_socket)},server=on,wait=off,id=vsbqmp",
            "--monitor",
            "chardev=vsbqmp",
            "--pidfile",
            self._path(PID_FILE),
        ]
        log.debug("[%s] starting %s", self.tag, " ".join(argv))
        with open(self._path(LOG_FILE), "wb") as logf:
            try:
                # A new session keeps the terminal's Ctrl-C away from the
                # daemon, so that *we* decide the order of the shutdown.
                self._proc = subprocess.Popen(
                    argv,
                    env=_daemon_environment(),
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    close_fds=True,
                    start_new_session=True,
                    preexec_fn=_make_death_signal_setup(),
                )
            except OSError as err:
                raise errors.ExportError(
                    f"cannot start {self._binary}: {err.strerror or err}"
                ) from err

    def _daemon_gone_error(self, what: str) -> errors.ExportError:
        assert self._proc is not None
        rc = self._proc.poll()
        tail = _tail(self._path(LOG_FILE))
        msg = f"{what}: qemu-storage-daemon exited with status {rc}"
        if tail:
            msg += f"; its output ends with: {tail}"
        return errors.ExportError(msg)

    def _probe_greeting(self) -> None:
        """One attempt: does the QMP socket answer with a greeting line?

        Done on a plain socket with a timeout because the QMP client's
        connect has none: a daemon that accepted but never greets would
        otherwise hang us forever.
        """
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise self._daemon_gone_error("storage daemon failed to start")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(min(2.0, self._start_timeout))
            sock.connect(self.qmp_socket)
            data = b""
            while b"\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    raise ConnectionResetError("QMP socket closed before the greeting")
                data += chunk
            if b'"QMP"' not in data:
                raise errors.ExportError(f"{self.qmp_socket} does not speak QMP")

    def _connect(self) -> None:
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(OSError),
            stop=tenacity.stop_after_delay(self._start_timeout),
            wait=tenacity.wait_exponential(multiplier=0.005, max=0.2),
            reraise=True,
        )
        try:
            retrying(self._probe_greeting)
        except OSError as err:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise self._daemon_gone_error("storage daemon failed to start") from err
            tail = _tail(self._path(LOG_FILE))
            raise errors.ExportError(
                f"storage daemon (pid {self.pid}) did not answer on {self.qmp_socket} "
                f"within {self._start_timeout:g} s ({err})" + (f"; output: {tail}" if tail else "")
            ) from err
        qmp = QEMUMonitorProtocol(self.qmp_socket, nickname=f"qsd-{self.tag}")
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
            self._remove_runtime_dir()
            self._restore_signal_handlers()
            self._closed = True
            self._closing = False
        if self._deferred_signal is not None and raise_deferred:
            signum, self._deferred_signal = self._deferred_signal, None
            raise errors.BackupInterruptedError(
                f"interrupted by {signal.Signals(signum).name} while stopping the storage daemon"
            )

    def _shutdown_daemon(self) -> None:
        if self._qmp is not None:
            alive = self._proc is not None and self._proc.poll() is None
            # a hung daemon must not hold up an interrupted backup for long
            self._qmp.settimeout(self._stop_timeout)
            for exp in list(reversed(self._exports)):
                if not alive:
                    break
                try:
                    self.remove_export(exp, force=True)
                except errors.VmSnapBackupError as err:
                    log.warning("[%s] could not remove export %s: %s", self.tag, exp.name, err)
            self._exports.clear()
            if alive:
                with contextlib.suppress(Exception):
                    self._qmp.cmd("quit")
            with contextlib.suppress(Exception):
                self._qmp.close()
            self._qmp = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=self._stop_timeout)
            except subprocess.TimeoutExpired:
                log.warning(
                    "[%s] storage daemon pid %s did not quit within %g s; killing it",
                    self.tag, self._proc.pid, self._stop_timeout,
                )
                self._proc.kill()
                self._proc.wait()
            rc = self._proc.returncode
            tail = _tail(self._path(LOG_FILE)) if self._runtime_dir else ""
            if rc != 0:
                log.warning("[%s] storage daemon exited with %s; output: %s", self.tag, rc, tail)
            elif tail:
                log.debug("[%s] storage daemon output: %s", self.tag, tail)

    def _remove_runtime_dir(self) -> None:
        if self._runtime_dir is None:
            return
        own = self._nbd_address
        if own is not None and own.get("type") == "unix":
            # a socket the caller placed outside the runtime dir: QEMU leaves it behind
            path = str(own["data"]["path"])
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)
        try:
            _remove_runtime_dir(self._runtime_dir)
        except (OSError, errors.VmSnapBackupError) as err:
            log.warning("[%s] could not remove %s: %s", self.tag, self._runtime_dir, err)

    # --------------------------------------------------------------- signals
    def _install_signal_handlers(self) -> None:
        if not self._handle_signals or threading.current_thread() is not threading.main_thread():
            return
        for name in _HANDLED_SIGNALS:
            signum = getattr(signal, name, None)
            if signum is None:
                continue
            current = signal.getsignal(signum)
            default = signal.default_int_handler if name == "SIGINT" else signal.SIG_DFL
            if current is not default:
                continue  # the application chose its own handling: leave it
            self._old_handlers[int(signum)] = current
            signal.signal(signum, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        for signum, handler in self._old_handlers.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signum, handler)
        self._old_handlers.clear()

    def _on_signal(self, signum: int, frame: Optional[types.FrameType]) -> None:
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

    def _cmd(self, command: str, *, _image: Optional[str] = None, **arguments: Any) -> Any:
        if self._qmp is None:
            raise errors.ExportError("storage daemon is not running")
        try:
            result = self._qmp.cmd(command, **arguments)
        except errors.BackupInterruptedError:
            self._pending_signal = None
            raise
        except ExecuteError as err:
            qemu_message = str(err)
            if _image is not None:
                locked = _image_lock_message(_image, qemu_message)
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

    def _wait_export_deleted(self, export_id: str) -> None:
        """Wait for BLOCK_EXPORT_DELETED: deletion finishes only once clients are gone."""
        assert self._qmp is not None
        timeout = self._stop_timeout if self._closing else self._command_timeout
        deadline = time.monotonic() + timeout
        while export_id not in self._deleted_export_ids:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                event = self._qmp.pull_event(wait=float(remaining))
            except asyncio.TimeoutError:
                break
            except (QMPError, OSError, EOFError) as err:
                raise errors.ExportError(f"lost the storage daemon while waiting: {err}") from err
            if event is None:
                continue
            log.debug("[%s] QMP event %s", self.tag, event.get("event"))
            if event.get("event") == "BLOCK_EXPORT_DELETED":
                self._deleted_export_ids.add(str(event.get("data", {}).get("id")))
        if export_id in self._deleted_export_ids:
            self._deleted_export_ids.discard(export_id)
            return
        remaining_ids = [e.get("id") for e in self._cmd("query-block-exports")]
        if export_id in remaining_ids:
            raise errors.ExportError(
                f"export {export_id} was not deleted within {timeout:g} s "
                "(an NBD client still connected?)"
            )

    # --------------------------------------------------------------- exports
    def _next_ids(self) -> "tuple[str, str, str]":
        self._counter += 1
        n = self._counter
        return f"vsbf{n}", f"vsbd{n}", f"vsbe{n}"

    def _check_name(self, name: Optional[str], default: str) -> str:
        name = default if name is None else name
        if not _EXPORT_NAME_RE.match(name):
            raise errors.UsageError(
                f"bad export name {name!r}: use letters, digits, '.', '_' and '-'"
            )
        if any(e.name == name for e in self._exports):
            raise errors.UsageError(f"export name {name!r} is already in use")
        return name

    def _add_export(self, path: str, fmt: Optional[str], writable: bool, name: Optional[str],
                    direct: bool = False, bitmap: Optional[str] = None) -> Export:
        if self._qmp is None or self._closed:
            raise errors.ExportError("storage daemon is not running")
        path = os.path.abspath(path)
        try:
            st = os.stat(path)
        except FileNotFoundError as err:
            raise errors.NotFoundError(f"image {path} does not exist") from err
        except OSError as err:
            raise errors.ExportError(f"cannot access image {path}: {err.strerror}") from err
        if fmt is None:
            fmt = detect_format(path)
        if not _FORMAT_RE.match(fmt):
            raise errors.UsageError(f"bad image format {fmt!r}")
        file_node, node, export_id = self._next_ids()
        name = self._check_name(name, node)
        driver = "host_device" if stat.S_ISBLK(st.st_mode) else "file"
        common: Dict[str, Any] = {"read-only": not writable}
        if writable:
            # lets WRITE_ZEROES with MAY_TRIM leave holes (raw) or zero clusters (qcow2)
            common["discard"] = "unmap"
        file_node_args = {"driver": driver, "node-name": file_node, "filename": path, **common}
        direct = self._add_node(path, file_node_args, direct,
                                cache={"direct": True}, aio="native")
        try:
            # the backing images QEMU opens below the format node (a point volume's
            # base) inherit its cache mode: without it the base, read once end to
            # end, went through the page cache and cost twice the time
            self._add_node(path, {"driver": fmt, "node-name": node, "file": file_node,
                                  **common}, direct, cache={"direct": True})
            export_args: Dict[str, Any] = {"type": "nbd", "id": export_id, "node-name": node,
                                           "name": name, "writable": writable}
            refused = None
            if bitmap is not None:
                refused = self._bitmap_problem(node, bitmap)
            try:
                if bitmap is not None and refused is None:
                    try:
                        self._cmd("block-export-add", _image=path, **export_args,
                                  bitmaps=[bitmap])
                    except errors.ExportError as err:
                        refused = f"QEMU would not export it: {err}"
                if bitmap is None or refused is not None:
                    self._cmd("block-export-add", _image=path, **export_args)
            except BaseException:
                self._undo(lambda: self._cmd("blockdev-del", **{"node-name": node}))
                raise
        except BaseException:
            self._undo(lambda: self._cmd("blockdev-del", **{"node-name": file_node}))
            raise
        export = Export(
            name=name,
            socket_path=self.nbd_socket,
            image_path=path,
            fmt=fmt,
            writable=writable,
            size=0,
            node_name=node,
            file_node=file_node,
            export_id=export_id,
            bitmap=bitmap if bitmap is not None and refused is None else None,
            bitmap_refused=refused,
            **self._tcp_endpoint(),
        )
        if refused is not None:
            log.info("[%s] %s: dirty bitmap %s not used: %s", self.tag, path, bitmap, refused)
        self._exports.append(export)
        size = self._virtual_size(node)
        export = dataclasses.replace(export, size=size)
        self._exports[-1] = export
        log.info(
            "[%s] exported %s (%s, %s, %d bytes) as %s",
            self.tag, path, fmt, "writable" if writable else "read-only", size, export.uri,
        )
        return export

    def _add_node(self, path: str, args: Dict[str, Any], direct: bool,
                  **direct_options: Any) -> bool:
        """``blockdev-add``, with ``direct_options`` (O_DIRECT) when ``direct``.

        A filesystem without O_DIRECT (tmpfs) answers EINVAL: the node is then
        added without them, reading through the page cache.  Returns whether
        the node reads directly.
        """
        if direct:
            try:
                self._cmd("blockdev-add", _image=path, **args, **direct_options)
                return True
            except errors.ExportError as err:
                if "Invalid argument" not in str(err):
                    raise
                log.info("[%s] %s: no O_DIRECT here, reading through the page cache",
                         self.tag, path)
        self._cmd("blockdev-add", _image=path, **args)
        return False

    def _undo(self, action: Callable[[], Any]) -> None:
        try:
            action()
        except errors.VmSnapBackupError as err:
            log.warning("[%s] clean-up after a failed export: %s", self.tag, err)

    def _tcp_endpoint(self) -> Dict[str, Any]:
        addr = self._nbd_address
        if addr is None or addr.get("type") != "inet":
            return {}
        return {"host": str(addr["data"]["host"]), "port": int(addr["data"]["port"])}

    def _bitmap_problem(self, node: str, bitmap: str) -> Optional[str]:
        """Why ``bitmap`` of ``node`` cannot be trusted, or None when it can."""
        for info in self._cmd("query-named-block-nodes", flat=True):
            if info.get("node-name") != node:
                continue
            for bm in info.get("dirty-bitmaps") or ():
                if bm.get("name") != bitmap:
                    continue
                if not bm.get("persistent", False):
                    return "it is not persistent"
                if bm.get("inconsistent", False):
                    return "QEMU marks it inconsistent (its writer stopped with it in use)"
                return None
            return "the image has no such bitmap"
        return f"block node {node} vanished from the storage daemon"

    def _virtual_size(self, node: str) -> int:
        for info in self._cmd("query-named-block-nodes", flat=True):
            if info.get("node-name") == node:
                return int(info["image"]["virtual-size"])
        raise errors.ExportError(f"block node {node} vanished from the storage daemon")

    def export_image(self, path: str, fmt: Optional[str] = None, *, name: Optional[str] = None,
                     direct: bool = False, bitmap: Optional[str] = None) -> Export:
        """Export an image read-only (the frozen image, a point volume, ...).

        ``fmt`` None probes the format with qemu-img (see :func:`detect_format`
        for why callers should rather pass it). An image held for writing by
        a running QEMU is refused with an "is in use by a running QEMU (image
        lock)" :class:`ExportError`.

        ``direct`` reads with O_DIRECT and native AIO, when the filesystem allows
        it: for an image read once from end to end (the frozen image), which
        then neither costs a page-cache copy per byte nor evicts the host's cache.

        ``bitmap`` also serves that persistent dirty bitmap of the image, but
        only when QEMU holds it intact: present, persistent and not
        ``inconsistent`` (the flag QEMU leaves on a bitmap whose writer died
        with it in use).  Otherwise the export is made without it and
        :attr:`Export.bitmap_refused` says why: a caller that cannot trust a
        bitmap must read everything, which is slower but never wrong.
        """
        return self._add_export(path, fmt, False, name, direct, bitmap)

    def open_writable(self, path: str, fmt: Optional[str] = None, *, name: Optional[str] = None) -> Export:
        """Export an existing image writable (for instance a raw base volume)."""
        return self._add_export(path, fmt, True, name)

    def create_writable(
        self,
        path: str,
        *,
        size: Optional[int] = None,
        backing: Optional[str] = None,
        backing_fmt: Optional[str] = None,
        fmt: str = "qcow2",
        cluster_size: int = 65536,
        name: Optional[str] = None,
    ) -> Export:
        """Create a new image (never overwriting) and export it writable.

        With ``backing`` the qcow2 stores the backing path relative to its own
        directory (see :func:`relative_backing_path`); ``size`` then defaults
        to the backing image's size. ``fmt="raw"`` creates a sparse raw file.
        The file is removed again if the export fails. Data written through
        the export reaches the disk (fdatasync) when the export is removed.
        """
        path = os.path.abspath(path)
        if fmt not in ("qcow2", "raw"):
            raise errors.UsageError(f"cannot create images of format {fmt!r}")
        if backing is not None and fmt != "qcow2":
            raise errors.UsageError("only a qcow2 image can have a backing file")
        if size is None and backing is None:
            raise errors.UsageError("create_writable needs a size or a backing image")
        if size is not None and size <= 0:
            raise errors.UsageError(f"bad image size {size}")
        if os.path.lexists(path):
            raise errors.UsageError(f"{path} already exists; create_writable never overwrites")
        argv = ["qemu-img", "create", "-q", "-f", fmt]
        if fmt == "qcow2":
            argv += ["-o", f"cluster_size={int(cluster_size)}"]
        if backing is not None:
            if backing_fmt is None:
                backing_fmt = detect_format(os.path.abspath(backing))
            argv += ["-b", relative_backing_path(path, backing), "-F", backing_fmt]
        argv.append(path)
        if size is not None:
            argv.append(str(int(size)))
        self._run_qemu_img(argv, path)
        try:
            return self._add_export(path, fmt, True, name)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise

    @staticmethod
    def _run_qemu_img(argv: List[str], path: str) -> None:
        try:
            proc = subprocess.run(
                argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            raise errors.ExportError(f"cannot run {' '.join(argv[:2])}: {err}") from err
        if proc.returncode != 0:
            message = proc.stderr.strip() or f"exit status {proc.returncode}"
            with contextlib.suppress(OSError):
                if os.path.exists(path) and os.path.getsize(path) == 0:
                    os.unlink(path)
            if "No space left on device" in message or "Disk quota exceeded" in message:
                raise errors.PoolFullError(f"cannot create {path}: {message}")
            raise errors.ExportError(f"qemu-img create {path} failed: {message}")

    def remove_export(self, export: Export, *, force: bool = False) -> None:
        """Stop serving ``export`` and close its image.

        Without ``force`` QEMU refuses while an NBD client is connected; with
        it the clients are dropped. Returns once QEMU reports the export
        deleted and the image is closed (flushed): only then may the image be
        committed, renamed or sealed. Removing an unknown export is a no-op.
        """
        if export not in self._exports:
            return
        self._cmd("block-export-del", id=export.export_id, mode="hard" if force else "safe")
        self._wait_export_deleted(export.export_id)
        self._exports.remove(export)
        self._cmd("blockdev-del", **{"node-name": export.node_name})
        self._cmd("blockdev-del", **{"node-name": export.file_node})
        log.info("[%s] removed export %s of %s", self.tag, export.name, export.image_path)


# ---------------------------------------------------------------- repair aid
def _remove_runtime_dir(path: str) -> None:
    """Remove one of *our* runtime directories, refusing anything else.

    The path may come from a journal on disk; a damaged journal must not make
    us delete an arbitrary directory, hence the name and content checks.
    """
    if not os.path.basename(os.path.normpath(path)).startswith(RUNTIME_DIR_PREFIX):
        raise errors.UsageError(f"{path} is not a vmsnapbackup runtime directory")
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return
    foreign = [n for n in names if n not in _RUNTIME_FILES]
    if foreign:
        raise errors.UsageError(
            f"{path} holds files vmsnapbackup did not create ({', '.join(sorted(foreign))}); "
            "not removing it"
        )
    for n in names:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(path, n))
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(path)


def _process_alive(pid: int) -> bool:
    """True while any thread of ``pid`` still runs.

    The leader turns zombie as soon as it exits, but the process keeps its open
    files (and QEMU's image locks) until its last thread is gone: a thread still
    finishing native AIO can hold the frozen image's lock for a moment longer.
    """
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
        return False
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in (b"Z", b"X"):
            return True
    return False


def daemon_arguments(pid: int) -> Optional[List[str]]:
    """The arguments of ``pid`` if it is a running qemu-storage-daemon, else None.

    What a caller matches against the sockets or files it started a daemon
    with, so that a PID from a journal or a pid file, reused since by some
    unrelated process, is never taken for ours.  A zombie has no command line.
    """
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode("utf-8", "surrogateescape") for a in f.read().split(b"\0") if a]
    except OSError:
        return None
    if not argv or "qemu-storage-daemon" not in os.path.basename(argv[0]):
        return None
    return argv[1:]


def _is_daemon_of(pid: int, runtime_dir: str) -> bool:
    """True if ``pid`` is a qemu-storage-daemon started with sockets in ``runtime_dir``."""
    needle = os.path.join(os.path.normpath(runtime_dir), "")
    return any(needle in a for a in daemon_arguments(pid) or ())


def _is_exiting_daemon(pid: int) -> bool:
    """A qemu-storage-daemon on its way out: no command line any more, its name still there."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if f.read():
                return False
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().startswith(b"qemu-storage")
    except OSError:
        return False


def _wait_gone(pid: int, timeout: float) -> None:
    try:
        tenacity.Retrying(
            retry=tenacity.retry_if_result(bool),
            stop=tenacity.stop_after_delay(timeout),
            wait=tenacity.wait_exponential(multiplier=0.005, max=0.2),
        )(_process_alive, pid)
    except tenacity.RetryError:
        raise errors.ExportError(f"leftover storage daemon pid {pid} does not finish "
                                 "exiting") from None


def _stop_process(pid: int, runtime_dir: str, timeout: float) -> None:
    log.info("stopping leftover storage daemon pid %d (%s)", pid, runtime_dir)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        try:
            tenacity.Retrying(
                retry=tenacity.retry_if_result(bool),
                stop=tenacity.stop_after_delay(timeout / 2),
                wait=tenacity.wait_exponential(multiplier=0.005, max=0.2),
            )(_process_alive, pid)
            return
        except tenacity.RetryError:
            continue
    raise errors.ExportError(f"leftover storage daemon pid {pid} does not die")


def stop_leftover_daemon(
    pid: Optional[int], runtime_dir: str, *, timeout: float = 15.0
) -> bool:
    """Stop the daemon a dead backup left behind and remove its runtime dir.

    For ``repair``: ``pid`` and ``runtime_dir`` are what the journal recorded
    (:attr:`StorageDaemon.pid`, :attr:`StorageDaemon.runtime_dir`); the pid
    file in the directory is consulted too. A process is only signalled if it
    is a qemu-storage-daemon whose command line names that directory (PID
    reuse). Refuses (UsageError) a directory that is not one of ours.
    Returns True if a live daemon was stopped.
    """
    if not os.path.basename(os.path.normpath(runtime_dir)).startswith(RUNTIME_DIR_PREFIX):
        raise errors.UsageError(f"{runtime_dir} is not a vmsnapbackup runtime directory")
    candidates = [pid] if pid is not None else []
    with contextlib.suppress(OSError, ValueError):
        with open(os.path.join(runtime_dir, PID_FILE)) as f:
            candidates.append(int(f.read().strip()))
    stopped = False
    for candidate in dict.fromkeys(candidates):
        if not _process_alive(candidate):
            continue
        if _is_daemon_of(candidate, runtime_dir):
            _stop_process(candidate, runtime_dir, timeout)
            stopped = True
        elif _is_exiting_daemon(candidate):
            # killed with its parent and still tearing down (its command line is gone
            # already, its image locks not yet): wait, or a commit fails on the lock.
            # It was dying already: nothing was stopped here.
            _wait_gone(candidate, timeout)
    try:
        _remove_runtime_dir(runtime_dir)
    except OSError as err:
        if err.errno != errno.ENOENT:
            raise errors.ExportError(f"cannot remove {runtime_dir}: {err.strerror}") from err
    return stopped

