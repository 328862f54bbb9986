"""The machine we run on as a :class:`~.host.Host`: plain ``subprocess`` and ``os``.

Why apart from the protocol: the protocol is what every adapter codes against;
this is one of its implementations (the other is :class:`~.sshhost.SshHost`),
and it carries the local-only details -- the parent-death signal, reading
``/proc`` directly, atomic local writes.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Mapping, Sequence
from typing import Callable

from ..core.atomic import atomic_write_bytes, fsync_path
from ..errors import HypervisorError
from .host import CHILD_UMASK, Completed, FileInfo, Host, HostProcess

__all__ = ["LOCAL", "LocalHost"]

def _tied_to_us(args: list[str], verb: str = "start") -> list[str]:
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
        raise HypervisorError(f"cannot {verb} {args[0]}: no such executable")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise HypervisorError(f"cannot {verb} " + args[0] + ": setpriv (util-linux) is not "
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
        # Every child is tied to us: a SIGKILLed command (a rebase's qemu-img convert,
        # a backup's qemu-img commit) must not leave a child writing into the pool
        # after we are gone.  Safe for all: run() blocks the forking thread until the
        # child exits, so the death signal (which follows that thread) never fires early.
        args = [os.fspath(a) for a in argv]
        with tempfile.TemporaryFile() as errf:
            try:
                proc = subprocess.Popen(
                    _tied_to_us(args, "run"), stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=errf, close_fds=True,
                    start_new_session=True, umask=CHILD_UMASK)
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
                start_new_session=True, umask=CHILD_UMASK, cwd="/")
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
