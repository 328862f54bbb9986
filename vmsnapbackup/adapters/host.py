"""The hypervisor host as everything but libvirt sees it: its processes and its files.

Why one seam: a backup touches the host in three ways besides libvirt calls --
it runs tools to completion (``qemu-img``), it keeps a long-running
``qemu-storage-daemon`` alive and stops it again, and it reads and writes a few
small files (the runtime directory, overlays, pid files).  Workflows reach all
three only through a :class:`Host`, so the same workflow runs on the machine it
is on (:class:`LocalHost`) or on a remote hypervisor.

How an ``SshHost`` is added (the next step; nothing above adapters changes):

* one OpenSSH master connection per host (``ssh -M -S CTL -o ControlPersist``,
  honouring libvirt's ``keyfile``, ``no_verify``, port and user the way virsh
  does); every call below is one ``ssh -S CTL host -- ...`` over it;
* :meth:`Host.run` sends the argv through ``shlex.join`` behind ``umask 077;``
  and returns the remote exit status; :meth:`Host.start` runs
  ``sh -c 'umask 077; echo $$; exec ARGV >LOG 2>&1'`` and reads the pid from the
  first line; the handle's ``poll``/``wait`` follow the ssh session, ``kill``
  is a remote ``kill -9 PID``.  ``tie_to_us`` becomes a remote watchdog that
  kills the daemon when the session's sshd child goes away;
* process questions read the remote ``/proc/PID/{cmdline,comm,task/*/stat}``
  with one ``cat`` each; files are ``stat -c``, ``mv``, ``mkdir -m``,
  ``mktemp -d``, ``cat``, and ``write_file`` streams into a temp name, then
  ``sync``/``mv`` -- every OSError is rebuilt from the remote errno;
* :meth:`Host.reach_socket` forwards a remote unix socket (QMP, NBD) to a
  private local one with ``ssh -O forward -L LOCAL:REMOTE`` and returns the
  local path; :class:`LocalHost` returns the path unchanged.

Contract shared by every implementation: file operations raise ``OSError``
with the errno the host reported; processes are started with umask 077, stdin
from /dev/null and in a new session (our terminal's Ctrl-C is ours to handle).
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Callable, Protocol

from ..core.atomic import atomic_write_bytes, fsync_path
from ..errors import HypervisorError

__all__ = [
    "CHILD_UMASK",
    "LOCAL",
    "Completed",
    "FileInfo",
    "Host",
    "HostProcess",
    "LocalHost",
]

#: Every child process creates its files owner-only (sockets, logs, images).
CHILD_UMASK = 0o077


@dataclass(frozen=True)
class Completed:
    """A finished command: its exit status and what it printed."""

    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def message(self) -> str:
        """stderr as one line, or the exit status when it printed nothing."""
        text = " ".join(self.stderr.decode("utf-8", "replace").split())
        return text or f"exit status {self.returncode}"


@dataclass(frozen=True)
class FileInfo:
    """What callers need of a host file's ``stat`` (also over ssh: ``stat -c``)."""

    mode: int
    size: int
    uid: int
    gid: int
    allocated: int

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_socket(self) -> bool:
        return stat.S_ISSOCK(self.mode)

    @property
    def is_block_device(self) -> bool:
        return stat.S_ISBLK(self.mode)

    @property
    def permissions(self) -> int:
        return stat.S_IMODE(self.mode)


class HostProcess(Protocol):
    """A long-running process started by :meth:`Host.start`."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None:
        """Its exit status, or None while it runs."""

    def wait(self, timeout: float | None) -> int | None:
        """Wait for it to exit; its status, or None when ``timeout`` passed first."""

    def kill(self) -> None:
        """SIGKILL it (by pid, never by name)."""


class Host(Protocol):
    """Processes and files on the hypervisor host (see the module docstring)."""

    name: str

    # -- processes --------------------------------------------------------------------
    def run(self, argv: Sequence[str], *, timeout: float | None,
            on_stdout: Callable[[bytes], None] | None = None) -> Completed:
        """Run ``argv`` to completion.  ``on_stdout`` gets stdout as it comes (then
        ``Completed.stdout`` is empty).  Cannot start, or ``timeout`` passed (it is
        killed then): HypervisorError.  A BaseException while waiting kills it too."""

    def start(self, argv: Sequence[str], *, log_path: str,
              env: Mapping[str, str] | None = None, tie_to_us: bool = True) -> HostProcess:
        """Start a long-running process, stdout and stderr into ``log_path``.
        ``env`` adds to the environment; ``tie_to_us`` kills it when we die."""

    def process_arguments(self, pid: int) -> list[str] | None:
        """The full argv of ``pid``; None when it is gone or a zombie (no command line)."""

    def process_name(self, pid: int) -> str | None:
        """The kernel's short name of ``pid`` (``comm``), None when it is gone."""

    def process_alive(self, pid: int) -> bool:
        """True while any thread of ``pid`` still runs (a zombie leader whose threads
        still hold files and image locks is alive)."""

    def send_signal(self, pid: int, sig: int) -> bool:
        """Signal ``pid``; False when there is no such process."""

    def reach_socket(self, path: str) -> str:
        """A path on *this* machine that connects to the host's unix socket ``path``."""

    # -- files ------------------------------------------------------------------------
    def stat(self, path: str, *, follow: bool = True) -> FileInfo | None:
        """None when ``path`` does not exist."""

    def listdir(self, path: str) -> list[str]: ...

    def mkdir(self, path: str, mode: int, *, parents: bool = False,
              exist_ok: bool = False) -> None:
        """Create ``path`` with exactly ``mode`` (the umask does not apply)."""

    def make_temp_dir(self, parent: str, prefix: str) -> str:
        """A new 0700 directory ``parent/prefixXXXXXXXX``."""

    def rmdir(self, path: str) -> None: ...

    def unlink(self, path: str, *, missing_ok: bool = True) -> bool:
        """True when something was removed."""

    def rename(self, src: str, dst: str) -> None: ...

    def chmod(self, path: str, mode: int) -> None: ...

    def chown(self, path: str, uid: int, gid: int) -> None: ...

    def read_file(self, path: str, *, limit: int = 1 << 20,
                  from_end: bool = False) -> bytes | None:
        """At most ``limit`` bytes (the last ones with ``from_end``); None if missing."""

    def write_file(self, path: str, data: bytes, *, mode: int = 0o600) -> None:
        """Replace ``path`` atomically (temp, fsync, rename, fsync dir) with ``mode``."""

    def create_file(self, path: str, *, mode: int = 0o600) -> None:
        """Create an empty ``path`` with ``mode`` from the first instant (O_EXCL)."""

    def fsync(self, path: str) -> None: ...


# ------------------------------------------------------------------------ local
def _tied_to_us(args: list[str]) -> list[str]:
    """``args`` run under ``setpriv --pdeathsig KILL``: the kernel kills the child when
    the thread that started it dies, so a SIGKILLed backup leaves no daemon behind.

    Done by util-linux's ``setpriv`` (present on every Debian-like host) rather than a
    Python ``preexec_fn``: with a ``preexec_fn`` Python must ``fork`` a multi-threaded
    process and run Python code in the child before ``exec``, which its documentation
    calls unsafe; without one it can use ``vfork``/``posix_spawn`` and runs no Python in
    the child.  The death signal follows the *thread* that forked: start from a thread
    that lives as long as the process is used (the main thread).  If we die in the
    instant between the fork and ``setpriv``'s ``prctl`` the child outlives us; its
    runtime directory then names it for ``repair``.
    """
    if shutil.which(args[0]) is None:  # as Popen would say, not after setpriv's exec fails
        raise HypervisorError(f"cannot start {args[0]}: no such executable")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise HypervisorError("cannot start " + args[0] + ": setpriv (util-linux) is not "
                              "installed; it ties our child processes to our lifetime")
    return [setpriv, "--pdeathsig", "KILL", "--", *args]


class _LocalProcess:
    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self._proc = proc

    @property
    def pid(self) -> int:
        return self._proc.pid

    def poll(self) -> int | None:
        return self._proc.poll()

    def wait(self, timeout: float | None) -> int | None:
        try:
            return self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        self._proc.kill()


class LocalHost:
    """The machine we run on."""

    name = "localhost"

    # -- processes --------------------------------------------------------------------
    def run(self, argv: Sequence[str], *, timeout: float | None,
            on_stdout: Callable[[bytes], None] | None = None) -> Completed:
        args = [os.fspath(a) for a in argv]
        with tempfile.TemporaryFile() as errf:
            try:
                proc = subprocess.Popen(
                    args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errf,
                    close_fds=True, start_new_session=True, umask=CHILD_UMASK)
            except OSError as err:
                raise HypervisorError(f"cannot run {args[0]}: {err.strerror or err}") from err
            out = b""
            try:
                out = self._collect(proc, args[0], timeout, on_stdout)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            errf.seek(0)
            err_bytes = errf.read()
        return Completed(tuple(args), proc.returncode, out, err_bytes)

    @staticmethod
    def _collect(proc: subprocess.Popen[bytes], name: str, timeout: float | None,
                 on_stdout: Callable[[bytes], None] | None) -> bytes:
        assert proc.stdout is not None
        if on_stdout is None:
            try:
                out, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise HypervisorError(
                    f"{name} did not finish within {timeout:g} s"
                ) from None
            return out
        # a watchdog thread enforces the deadline while this thread reads
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            proc.kill()

        timer = threading.Timer(timeout, expire) if timeout is not None else None
        if timer is not None:
            timer.daemon = True
            timer.start()
        try:
            while True:
                chunk = proc.stdout.read1(65536)  # type: ignore[attr-defined]
                if not chunk:
                    break
                on_stdout(chunk)
            proc.wait()
        finally:
            if timer is not None:
                timer.cancel()
        if expired.is_set():
            raise HypervisorError(
                f"{name} did not finish within {timeout:g} s")
        return b""

    def start(self, argv: Sequence[str], *, log_path: str,
              env: Mapping[str, str] | None = None, tie_to_us: bool = True) -> HostProcess:
        args = [os.fspath(a) for a in argv]
        full_env = dict(os.environ)
        full_env.update(env or {})
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            proc = subprocess.Popen(
                _tied_to_us(args) if tie_to_us else args, env=full_env,
                stdin=subprocess.DEVNULL, stdout=fd, stderr=subprocess.STDOUT, close_fds=True,
                start_new_session=True,
                umask=CHILD_UMASK, cwd="/")
        except OSError as err:
            raise HypervisorError(f"cannot start {args[0]}: {err.strerror or err}") from err
        finally:
            os.close(fd)
        return _LocalProcess(proc)

    def process_arguments(self, pid: int) -> list[str] | None:
        try:
            with open(f"/proc/{int(pid)}/cmdline", "rb") as f:
                raw = f.read()
        except OSError:
            return None
        argv = [a.decode("utf-8", "surrogateescape") for a in raw.split(b"\0") if a]
        return argv or None

    def process_name(self, pid: int) -> str | None:
        try:
            with open(f"/proc/{int(pid)}/comm", "rb") as f:
                return f.read().decode("utf-8", "replace").strip() or None
        except OSError:
            return None

    def process_alive(self, pid: int) -> bool:
        if pid <= 0:
            return False
        try:
            tasks = os.listdir(f"/proc/{int(pid)}/task")
        except OSError:
            return False
        for tid in tasks:
            try:
                with open(f"/proc/{int(pid)}/task/{tid}/stat", "rb") as f:
                    state = f.read().rsplit(b")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state not in (b"Z", b"X"):
                return True
        return False

    def send_signal(self, pid: int, sig: int) -> bool:
        if pid <= 0:
            return False
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return False
        return True

    def reach_socket(self, path: str) -> str:
        return path

    # -- files ------------------------------------------------------------------------
    def stat(self, path: str, *, follow: bool = True) -> FileInfo | None:
        try:
            st = os.stat(path) if follow else os.lstat(path)
        except FileNotFoundError:
            return None
        return FileInfo(st.st_mode, st.st_size, st.st_uid, st.st_gid, st.st_blocks * 512)

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def mkdir(self, path: str, mode: int, *, parents: bool = False,
              exist_ok: bool = False) -> None:
        if parents:
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                self.mkdir(parent, mode, parents=True, exist_ok=True)
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            if not exist_ok or not os.path.isdir(path):
                raise
            return
        os.chmod(path, mode)

    def make_temp_dir(self, parent: str, prefix: str) -> str:
        path = tempfile.mkdtemp(prefix=prefix, dir=parent)
        os.chmod(path, 0o700)
        return path

    def rmdir(self, path: str) -> None:
        os.rmdir(path)

    def unlink(self, path: str, *, missing_ok: bool = True) -> bool:
        try:
            os.unlink(path)
        except FileNotFoundError:
            if not missing_ok:
                raise
            return False
        return True

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(path, mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        os.chown(path, uid, gid)

    def read_file(self, path: str, *, limit: int = 1 << 20,
                  from_end: bool = False) -> bytes | None:
        try:
            with open(path, "rb") as f:
                if from_end:
                    size = f.seek(0, os.SEEK_END)
                    f.seek(max(0, size - limit))
                return f.read(limit)
        except FileNotFoundError:
            return None

    def write_file(self, path: str, data: bytes, *, mode: int = 0o600) -> None:
        atomic_write_bytes(path, data, mode)

    def create_file(self, path: str, *, mode: int = 0o600) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            os.fchmod(fd, mode)   # the umask may only take bits away: set exactly
        finally:
            os.close(fd)

    def fsync(self, path: str) -> None:
        fsync_path(path)


#: The host we run on (the default of every adapter that takes a ``host``).
LOCAL: Host = LocalHost()
