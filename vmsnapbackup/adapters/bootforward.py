"""A boot's NBD export carried to a remote hypervisor: one long-lived ssh reverse forward.

Why a process of its own, and not a channel of the command's ssh master: the
boot domain runs on the hypervisor for as long as it is wanted, far beyond the
``vmsnapbackup boot`` command (whose master dies with it, by design: §10).  So
the boot's storage daemon, serving the point *here*, gets a companion ``ssh -N
-R HVSOCK:LOCALSOCK`` started in a session of its own, with the URI's user,
port, key and host-key policy (:func:`.sshhost.ssh_base_argv`), keep-alives, and
``ExitOnForwardFailure`` (a forward that cannot be made is an exit, not a quiet
ssh without it).  sshd creates ``HVSOCK`` under its ``StreamLocalBindMask``
(owner-only); the caller hands it to the hypervisor's QEMU user.

Its pid and log live in the boot's state directory here, next to the daemon's;
a pid is only trusted when that process's command line names this forward
(pid reuse), as for the daemon.
"""
from __future__ import annotations

import logging
import os
import subprocess

import tenacity

from ..errors import ExportError, HypervisorError
from . import processes
from .host import LOCAL, Host
from .hostfor import SshTarget
from .sshhost import ssh_base_argv

__all__ = ["FORWARD_LOG", "FORWARD_PID", "running_forward", "start_forward", "stop_forward"]

log = logging.getLogger(__name__)

FORWARD_PID = "forward.pid"
FORWARD_LOG = "forward.log"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


def _spec(remote_socket: str, local_socket: str) -> str:
    return f"{remote_socket}:{local_socket}"


def running_forward(state_dir: str, remote_socket: str, local_socket: str) -> int | None:
    """The pid of this boot's forward if it runs, else None."""
    data = LOCAL.read_file(os.path.join(state_dir, FORWARD_PID), limit=64)
    try:
        pid = int(data.strip()) if data else None
    except ValueError:
        return None
    if pid is None or not processes.started_with(pid, _spec(remote_socket, local_socket),
                                                            program="ssh"):
        return None
    return pid


def start_forward(target: SshTarget, host: Host, state_dir: str, remote_socket: str,
                  local_socket: str, *, timeout: float = START_TIMEOUT) -> int:
    """Start the forward and wait until ``remote_socket`` exists on ``host``; its pid.

    On failure nothing of it keeps running (ExportError with ssh's words).
    """
    host.unlink(remote_socket)   # a dead forward's socket (StreamLocalBindUnlink too)
    argv = [*ssh_base_argv(target, "none"), "-N", "-o", "ExitOnForwardFailure=yes",
            "-o", "StreamLocalBindUnlink=yes", "-o", "ServerAliveInterval=15",
            "-R", _spec(remote_socket, local_socket), target.destination]
    logpath = os.path.join(state_dir, FORWARD_LOG)
    with open(logpath, "ab") as logf:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                start_new_session=True)   # outlives this command

    def waiting() -> bool:
        info = host.stat(remote_socket)
        return proc.poll() is None and (info is None or not info.is_socket)

    try:
        tenacity.Retrying(retry=tenacity.retry_if_result(bool),
                          stop=tenacity.stop_after_delay(timeout),
                          wait=tenacity.wait_exponential(multiplier=0.01, max=0.3))(waiting)
        ready = proc.poll() is None
    except tenacity.RetryError:
        ready = False
    if not ready:
        proc.kill()
        proc.wait()
        with open(logpath, "rb") as f:
            why = " ".join(f.read()[-2000:].decode("utf-8", "replace").split())
        raise ExportError(f"cannot forward the boot's export to {host.name}:{remote_socket} "
                          f"over ssh: {why or 'no socket appeared'}")
    LOCAL.write_file(os.path.join(state_dir, FORWARD_PID), f"{proc.pid}\n".encode())
    log.info("ssh pid %d forwards %s to %s:%s", proc.pid, local_socket, host.name,
             remote_socket)
    return proc.pid


def stop_forward(state_dir: str, remote_socket: str, local_socket: str) -> bool:
    """Stop this boot's forward if it runs; True if one was stopped."""
    pid = running_forward(state_dir, remote_socket, local_socket)
    if pid is None:
        return False
    try:
        processes.stop(pid, timeout=STOP_TIMEOUT, what=f"ssh forward of {state_dir}")
    except HypervisorError as err:
        raise ExportError(str(err)) from err
    log.info("stopped the ssh forward pid %d of %s", pid, state_dir)
    return True
