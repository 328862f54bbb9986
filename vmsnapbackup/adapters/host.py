"""The hypervisor host as everything but libvirt sees it: its processes and its files.

Why one seam: a backup touches the host in three ways besides libvirt calls --
it runs tools to completion (``qemu-img``), it keeps a long-running
``qemu-storage-daemon`` alive and stops it again, and it reads and writes a few
small files (the runtime directory, overlays, pid files).  Workflows reach all
three only through a :class:`Host`, so the same workflow runs on the machine it
is on (:class:`LocalHost`) or on a remote hypervisor.

How :class:`~.sshhost.SshHost` implements it (nothing above adapters changes):

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

import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Callable, Protocol

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


# The local implementation lives in its own module; it is re-exported here so
# ``from .host import LOCAL`` keeps working (it needs the classes above first).
from .localhost import LOCAL, LocalHost  # noqa: E402
