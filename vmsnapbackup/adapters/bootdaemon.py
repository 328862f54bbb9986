"""A boot's storage daemon: it serves a point read-only for as long as the boot
domain may run, which is longer than the ``vmsnapbackup boot`` command.

So unlike a backup's daemon it is not tied to us and needs no monitor: its whole
configuration (one read-only file and format node plus a read-only NBD export
per disk) is on its command line, and it is started through the same launcher
(:func:`~.daemonlaunch.launch_daemon`) in a session of its own.  Not with
QEMU's ``--daemonize``: that sets umask 027, and the NBD socket would be
group-readable for a moment.  Ready means the pid file exists: QEMU writes it
after creating the exports and the NBD server and before accepting connections
(a documented order).  The socket is then handed to the QEMU user with mode
0600, so no other local user can read the backup through it.

Its pid file, log and socket live in the boot directory; a pid is only trusted
when that process's command line names this directory's socket (pid reuse).
A point of an encrypted pool (FORMAT.md §15.2) is opened with the pool's key as a
``secret`` object whose *file* the daemon reads: the command line (readable in
/proc by every local user) names the key file, never holds the key.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import tenacity

from ..errors import ExportError, HypervisorError
from . import processes
from .daemonlaunch import launch_daemon, qemu_opt
from .exportnodes import format_node_args
from .host import LOCAL, Host, HostProcess
from .pinnedchain import PinnedImage, secret_objects

__all__ = ["LOGFILE", "PIDFILE", "SOCKET", "ServedImage", "daemon_args", "running_pid",
           "serve", "stop"]

log = logging.getLogger(__name__)

SOCKET = "nbd.sock"
PIDFILE = "qsd.pid"
LOGFILE = "qsd.log"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0


@dataclass(frozen=True)
class ServedImage:
    """One disk of the boot: the image (opened read-only) and its export name.

    ``chain`` (a point volume from a pool) gives the backing chain explicitly --
    the manifest's base, or null -- so the name in the qcow2 header is never
    followed (docs/DESIGN.md §8); the caller checked the header against it.
    """

    export: str
    image: str
    fmt: str
    chain: PinnedImage | None = None


def _format_node(i: int, img: ServedImage) -> str:
    if img.chain is None or img.fmt != "qcow2":
        return f"driver={img.fmt},node-name=vsbd{i},file=vsbf{i},read-only=on"
    tree = format_node_args(img.fmt, f"vsbd{i}", f"vsbf{i}", writable=False, pinned=img.chain)
    return json.dumps(tree, separators=(",", ":"))   # --blockdev takes JSON for a tree


def daemon_args(directory: str, images: Sequence[ServedImage]) -> list[str]:
    """The daemon's arguments: read-only nodes and exports, socket and pid file in
    ``directory``."""
    args: list[str] = []
    for key in _keys(images):    # an encrypted pool's: QEMU reads the file, never argv
        args += ["--object", key]
    for i, img in enumerate(images):
        args += ["--blockdev", (f"driver=file,node-name=vsbf{i},"
                 f"filename={qemu_opt(img.image)},read-only=on"),
                 "--blockdev", _format_node(i, img)]
    args += ["--nbd-server",
             f"addr.type=unix,addr.path={qemu_opt(os.path.join(directory, SOCKET))}"]
    for i, img in enumerate(images):
        args += ["--export", (f"type=nbd,id=vsbe{i},node-name=vsbd{i},"
                 f"name={qemu_opt(img.export)},writable=off")]
    args += ["--pidfile", os.path.join(directory, PIDFILE)]
    return args


def _keys(images: Sequence[ServedImage]) -> list[str]:
    """The ``secret`` object of the pool key the images are opened with (FORMAT
    §15.2), none for a plain pool; one object, since a point comes from one pool."""
    chains = [img.chain for img in images if img.chain is not None and img.chain.key_files()]
    keys = {k for chain in chains for k in chain.key_files()}
    if len(keys) > 1:
        raise ExportError(f"a boot serves points of one pool, not of {len(keys)} key files")
    return secret_objects(chains[0]) if chains else []


def _needle(directory: str) -> str:
    return f"addr.path={qemu_opt(os.path.join(directory, SOCKET))}"


def running_pid(directory: str, host: Host = LOCAL) -> int | None:
    """The pid of this directory's daemon if it runs, else None."""
    data = host.read_file(os.path.join(directory, PIDFILE), limit=64)
    try:
        pid = int(data.strip()) if data else None
    except ValueError:
        return None
    if pid is None or not processes.started_with(pid, _needle(directory), host):
        return None
    return pid


def _wait_ready(proc: HostProcess, directory: str, host: Host, timeout: float) -> bool:
    """Wait until the pid file exists (ready) or the daemon exited; True when ready."""
    pidfile = os.path.join(directory, PIDFILE)

    def waiting() -> bool:
        return proc.poll() is None and host.stat(pidfile) is None

    try:
        tenacity.Retrying(retry=tenacity.retry_if_result(bool),
                          stop=tenacity.stop_after_delay(timeout),
                          wait=tenacity.wait_exponential(multiplier=0.005, max=0.2))(waiting)
    except tenacity.RetryError:
        return False
    return proc.poll() is None


def serve(directory: str, images: Sequence[ServedImage], owner: tuple[int, int] | None, *,
          host: Host = LOCAL, timeout: float = START_TIMEOUT) -> int:
    """Start this boot's daemon and hand its socket to ``owner`` (uid, gid) with mode
    0600; returns its pid.  On failure nothing of it keeps running."""
    for name in (SOCKET, PIDFILE):
        host.unlink(os.path.join(directory, name))
    logfile = os.path.join(directory, LOGFILE)
    proc = launch_daemon(host, daemon_args(directory, images), log_path=logfile,
                         tie_to_us=False)
    ready = _wait_ready(proc, directory, host, timeout)
    pid = running_pid(directory, host) if ready else None
    if pid != proc.pid:
        proc.kill()
        status = proc.wait(STOP_TIMEOUT)
        tail = (host.read_file(logfile, limit=2000, from_end=True) or b"").decode(
            "utf-8", "replace")
        raise ExportError(f"qemu-storage-daemon for {directory} failed to start "
                          f"(exit status {status}): {' '.join(tail.split())}")
    sock = os.path.join(directory, SOCKET)
    # created under umask 077 (owner-only); the QEMU user must be able to connect
    if owner is not None:
        host.chown(sock, owner[0], owner[1])
    host.chmod(sock, 0o600)
    log.info("boot %s: storage daemon pid %d serves the point on %s",
             os.path.basename(directory), pid, sock)
    return pid


def stop(directory: str, host: Host = LOCAL, timeout: float = STOP_TIMEOUT) -> bool:
    """Stop this boot's daemon if it runs; True if one was stopped."""
    pid = running_pid(directory, host)
    if pid is None:
        return False
    try:
        processes.stop(pid, timeout=timeout, host=host, what=f"storage daemon of {directory}")
    except HypervisorError as err:
        raise ExportError(str(err)) from err
    log.info("boot %s: stopped storage daemon pid %d", os.path.basename(directory), pid)
    return True
