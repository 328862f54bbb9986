"""A remote hypervisor reached over one OpenSSH control connection.

Why OpenSSH's client and one master connection: it already honours the
user's ssh configuration, keys and known hosts exactly as ``virsh`` does for
``qemu+ssh://`` URIs, and multiplexing every command, process and socket
forward over one authenticated connection keeps each call cheap and means the
data never crosses the network outside ssh (see :meth:`SshHost.reach_socket`).

Every command is sent through ``shlex.join`` behind ``umask 077;``; file
errors are rebuilt into ``OSError`` with the errno the remote tool reported.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Callable

from ..errors import HypervisorError
from .host import Completed, FileInfo, HostProcess
from .hostfor import SshTarget
from .localhost import _tied_to_us

__all__ = ["SshHost", "ssh_base_argv"]

_CONNECT_DEADLINE = 30.0
_SSH_FAILED = 255
#: The remote tools' words for the errnos the Host contract names.
_ERRNO_WORDS = (
    ("No such file or directory", errno.ENOENT),
    ("File exists", errno.EEXIST),
    ("cannot overwrite existing file", errno.EEXIST),   # bash noclobber
    ("Permission denied", errno.EACCES),
    ("Operation not permitted", errno.EPERM),
    ("Not a directory", errno.ENOTDIR),
    ("Is a directory", errno.EISDIR),
    ("Directory not empty", errno.ENOTEMPTY),
    ("No space left on device", errno.ENOSPC),
)


def ssh_base_argv(target: SshTarget, control: str) -> list[str]:
    """``ssh`` options shared by the master and every call multiplexed over it."""
    argv = ["ssh", "-S", control, "-o", "BatchMode=yes", "-o", "ServerAliveInterval=5",
            "-o", "ServerAliveCountMax=3"]
    if target.port is not None:
        argv += ["-p", str(target.port)]
    if target.keyfile:
        argv += ["-i", target.keyfile, "-o", "IdentitiesOnly=yes"]
    if target.no_verify:
        argv += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                 "-o", "LogLevel=ERROR"]
    return argv


def errno_from_message(message: str) -> int:
    """The errno a remote coreutils message stands for (EIO when unknown)."""
    for words, code in _ERRNO_WORDS:
        if words in message:
            return code
    return errno.EIO


class _SshProcess:
    """A remote process whose lifetime is one ssh session (see :meth:`SshHost.start`)."""

    def __init__(self, host: SshHost, session: subprocess.Popen[bytes], pid: int) -> None:
        self._host = host
        self._session = session
        self._pid = pid

    @property
    def pid(self) -> int:
        return self._pid

    def poll(self) -> int | None:
        return self._session.poll()

    def wait(self, timeout: float | None) -> int | None:
        try:
            return self._session.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        self._host.send_signal(self._pid, 9)
        if self._session.stdin is not None:
            self._session.stdin.close()


class SshHost:
    """:class:`~.host.Host` on a remote machine; ``close()`` ends the master connection."""

    def __init__(self, target: SshTarget, *, control_dir: str | None = None) -> None:
        self.name = target.host
        self.target = target
        self._own_dir = control_dir is None
        self._dir = control_dir or tempfile.mkdtemp(prefix="vsb-ssh-")
        os.chmod(self._dir, 0o700)
        self._control = os.path.join(self._dir, "ctl")
        self._forwards: list[tuple[str, str]] = []
        self._master: subprocess.Popen[bytes] | None = None

    # -- the master connection --------------------------------------------------------
    def _argv(self, *extra: str) -> list[str]:
        return [*ssh_base_argv(self.target, self._control), *extra]

    def _session_argv(self, *extra: str) -> list[str]:
        """A command over the master -- and only over it.  Without the master ssh would
        quietly dial a connection of its own; the impossible ProxyCommand (used only
        then) makes it fail instead.  Why: what we started remotely (the storage
        daemon, the in-flight holder) died with the master, so the hypervisor already
        takes our operation for dead and may repair it; we must not go on behind it."""
        return self._argv("-o", "ProxyCommand=false", *extra)

    def connect(self) -> SshHost:
        """Open the master connection; HypervisorError when it cannot be had in time."""
        errpath = os.path.join(self._dir, "master.err")
        with open(errpath, "wb") as errf:
            # tied to us: a backup server killed outright must not leave its master
            # holding the remote daemon and in-flight holder alive (and the domain busy)
            self._master = subprocess.Popen(
                _tied_to_us(self._argv("-M", "-N", "-o", "ControlPersist=no",
                                       self.target.destination)),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errf,
                start_new_session=True)
        deadline = time.monotonic() + _CONNECT_DEADLINE
        while time.monotonic() < deadline:
            if self._master.poll() is not None:
                with open(errpath, "rb") as f:
                    why = " ".join(f.read().decode("utf-8", "replace").split())
                raise HypervisorError(f"cannot ssh to {self.target.destination}: "
                                      f"{why or 'ssh exited'}")
            if os.path.exists(self._control) and self._check():
                return self
            time.sleep(0.05)  # polling the master up to a deadline
        self.close()
        raise HypervisorError(f"ssh to {self.target.destination} did not connect within "
                              f"{_CONNECT_DEADLINE:g} s")

    def _check(self) -> bool:
        done = subprocess.run(self._argv("-O", "check", self.target.destination),
                              stdin=subprocess.DEVNULL, capture_output=True, check=False)
        return done.returncode == 0

    def close(self) -> None:
        """Cancel the socket forwards and end the master (remote sessions end with it)."""
        for local, _remote in self._forwards:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(local)
        self._forwards.clear()
        if self._master is not None and self._master.poll() is None:
            subprocess.run(self._argv("-O", "exit", self.target.destination),
                           stdin=subprocess.DEVNULL, capture_output=True, check=False)
            try:
                self._master.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._master.kill()
                self._master.wait()
        if self._own_dir:   # the control socket, forwards and master.err go with it
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> SshHost:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- processes --------------------------------------------------------------------
    def _exec(self, script: str, *, timeout: float | None, data: bytes | None = None,
              on_stdout: Callable[[bytes], None] | None = None) -> Completed:
        argv = self._session_argv(self.target.destination, "--", "umask 077; " + script)
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE if data is not None
                                    else subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True)
        except OSError as err:
            raise HypervisorError(f"cannot run ssh: {err.strerror or err}") from err
        try:
            if on_stdout is None:
                out, err_b = proc.communicate(data, timeout=timeout)
            else:
                assert proc.stdout is not None and proc.stderr is not None
                while chunk := proc.stdout.read1(65536):  # type: ignore[attr-defined]
                    on_stdout(chunk)
                err_b = proc.stderr.read()
                proc.wait(timeout=timeout)
                out = b""
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise HypervisorError(f"{self.name}: {script.split()[0]} did not finish within "
                                  f"{timeout:g} s") from None
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if proc.returncode == _SSH_FAILED:
            why = " ".join(err_b.decode("utf-8", "replace").split())
            if self._master is not None and self._master.poll() is not None:
                why = "the ssh connection was lost"
            raise HypervisorError(f"ssh to {self.name} failed: {why or 'ssh exited'}")
        return Completed(tuple(argv), proc.returncode, out, err_b)

    def run(self, argv: Sequence[str], *, timeout: float | None,
            on_stdout: Callable[[bytes], None] | None = None) -> Completed:
        return self._exec(shlex.join(argv), timeout=timeout, on_stdout=on_stdout)

    def start(self, argv: Sequence[str], *, log_path: str,
              env: Mapping[str, str] | None = None, tie_to_us: bool = True) -> HostProcess:
        """The remote shell prints the process's pid, then (``tie_to_us``) waits on
        the session's stdin: when we or the connection die it reads EOF and SIGKILLs
        the process, so a remote daemon never outlives its backup unowned."""
        envs = [f"{k}={v}" for k, v in (env or {}).items()]
        cmd = shlex.join(["env", *envs, *argv]) if envs else shlex.join(argv)
        log = shlex.quote(log_path)
        # a background job's stdin is /dev/null, so the session's stdin waits on fd 3
        script = (f"exec 3<&0; cd / || exit 126; {cmd} 3<&- </dev/null >>{log} 2>&1 & p=$!; "
                  # report the pid once the child has exec'd (as Popen does), <= 2 s
                  "me=$(readlink /proc/$$/exe); n=0; while [ $n -lt 200 ] && "
                  "[ \"$(readlink /proc/$p/exe 2>/dev/null)\" = \"$me\" ]; do "
                  "sleep 0.01; n=$((n+1)); done; echo $p; "
                  + ("(read _ <&3; kill -9 $p 2>/dev/null) & w=$!; " if tie_to_us else "")
                  + "wait $p; rc=$?; "
                  + ("kill $w 2>/dev/null; " if tie_to_us else "") + "exit $rc")
        session = subprocess.Popen(
            self._session_argv(self.target.destination, "--", "umask 077; " + script),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            start_new_session=True)
        assert session.stdout is not None
        line = session.stdout.readline()
        try:
            pid = int(line)
        except ValueError:
            session.kill()
            session.wait()
            raise HypervisorError(f"cannot start {argv[0]} on {self.name}") from None
        return _SshProcess(self, session, pid)

    def _cat(self, path: str) -> bytes | None:
        done = self.run(["cat", path], timeout=30)
        return done.stdout if done.ok else None

    def process_arguments(self, pid: int) -> list[str] | None:
        raw = self._cat(f"/proc/{int(pid)}/cmdline")
        argv = [a.decode("utf-8", "surrogateescape") for a in (raw or b"").split(b"\0") if a]
        return argv or None

    def process_name(self, pid: int) -> str | None:
        raw = self._cat(f"/proc/{int(pid)}/comm")
        return raw.decode("utf-8", "replace").strip() or None if raw is not None else None

    def process_alive(self, pid: int) -> bool:
        if pid <= 0:
            return False
        done = self._exec(f"cat /proc/{int(pid)}/task/*/stat", timeout=30)
        for line in done.stdout.splitlines():
            parts = line.rsplit(b")", 1)
            if len(parts) == 2 and parts[1].split()[:1] not in ([b"Z"], [b"X"]):
                return True
        return False

    def send_signal(self, pid: int, sig: int) -> bool:
        if pid <= 0:
            return False
        return self.run(["kill", f"-{int(sig)}", str(int(pid))], timeout=30).ok

    def reach_socket(self, path: str) -> str:
        """Forward the remote unix socket to a private one in our 0700 control dir."""
        local = os.path.join(self._dir, f"fwd{len(self._forwards)}.sock")
        done = subprocess.run(
            self._argv("-O", "forward", "-o", "StreamLocalBindUnlink=yes",
                       "-L", f"{local}:{path}", self.target.destination),
            stdin=subprocess.DEVNULL, capture_output=True, check=False)
        if done.returncode != 0:
            raise HypervisorError(f"cannot forward {self.name}:{path} over ssh: "
                                  f"{' '.join(done.stderr.decode('utf-8', 'replace').split())}")
        self._forwards.append((local, path))
        return local

    # -- files ------------------------------------------------------------------------
    def _must(self, argv: Sequence[str], path: str, data: bytes | None = None) -> Completed:
        done = self._exec(shlex.join(argv), timeout=60, data=data)
        if not done.ok:
            message = done.message()
            raise OSError(errno_from_message(message), f"{self.name}: {message}", path)
        return done

    def stat(self, path: str, *, follow: bool = True) -> FileInfo | None:
        argv = ["stat", *(["-L"] if follow else []), "-c", "%f %s %u %g %b %B", path]
        done = self._exec(shlex.join(argv), timeout=30)
        if not done.ok:
            if errno_from_message(done.message()) == errno.ENOENT:
                return None
            raise OSError(errno_from_message(done.message()), done.message(), path)
        mode, size, uid, gid, blocks, unit = done.stdout.split()
        return FileInfo(int(mode, 16), int(size), int(uid), int(gid), int(blocks) * int(unit))

    def listdir(self, path: str) -> list[str]:
        out = self._must(["find", path, "-mindepth", "1", "-maxdepth", "1", "-printf",
                          "%f\\0"], path).stdout
        return [n.decode("utf-8", "surrogateescape") for n in out.split(b"\0") if n]

    def mkdir(self, path: str, mode: int, *, parents: bool = False,
              exist_ok: bool = False) -> None:
        if exist_ok or parents:
            info = self.stat(path)
            if info is not None:
                if info.is_dir and exist_ok:
                    return
                raise OSError(errno.EEXIST, "File exists", path)
        self._must(["mkdir", *(["-p"] if parents else []), "-m", f"{mode:o}", path], path)
        self.chmod(path, mode)

    def make_temp_dir(self, parent: str, prefix: str) -> str:
        out = self._must(["mktemp", "-d", "-p", parent, prefix + "XXXXXXXX"], parent).stdout
        path = out.decode("utf-8", "surrogateescape").strip()
        self.chmod(path, 0o700)
        return path

    def rmdir(self, path: str) -> None:
        self._must(["rmdir", path], path)

    def unlink(self, path: str, *, missing_ok: bool = True) -> bool:
        if self.stat(path, follow=False) is None:
            if not missing_ok:
                raise OSError(errno.ENOENT, "No such file or directory", path)
            return False
        self._must(["rm", "-f", "--", path], path)
        return True

    def rename(self, src: str, dst: str) -> None:
        self._must(["mv", "-T", "--", src, dst], src)

    def chmod(self, path: str, mode: int) -> None:
        self._must(["chmod", f"{mode:o}", path], path)

    def chown(self, path: str, uid: int, gid: int) -> None:
        self._must(["chown", f"{int(uid)}:{int(gid)}", path], path)

    def read_file(self, path: str, *, limit: int = 1 << 20,
                  from_end: bool = False) -> bytes | None:
        argv = ["tail" if from_end else "head", "-c", str(int(limit)), path]
        done = self._exec(shlex.join(argv), timeout=60)
        if not done.ok:
            if errno_from_message(done.message()) == errno.ENOENT:
                return None
            raise OSError(errno_from_message(done.message()), done.message(), path)
        return done.stdout

    def write_file(self, path: str, data: bytes, *, mode: int = 0o600) -> None:
        """Stream into a temp name beside ``path``, sync it, rename, sync the directory."""
        folder = os.path.dirname(path) or "."
        tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
        q = shlex.quote
        script = (f"cat >{q(tmp)} && chmod {mode:o} {q(tmp)} && sync {q(tmp)} && "
                  f"mv -T -- {q(tmp)} {q(path)} && sync {q(folder)} || "
                  f"{{ rc=$?; rm -f -- {q(tmp)}; exit $rc; }}")
        done = self._exec(script, timeout=120, data=data)
        if not done.ok:
            raise OSError(errno_from_message(done.message()), done.message(), path)

    def create_file(self, path: str, *, mode: int = 0o600) -> None:
        q = shlex.quote
        done = self._exec(f"set -C; : >{q(path)} && chmod {mode:o} {q(path)}", timeout=30)
        if not done.ok:
            raise OSError(errno_from_message(done.message()), done.message(), path)

    def fsync(self, path: str) -> None:
        self._must(["sync", path], path)
