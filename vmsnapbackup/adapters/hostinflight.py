"""The in-flight record on the hypervisor, also when we run on another machine.

Why on the hypervisor: its libvirt hook refuses a start or a migration of a
domain a backup is working on by reading ``inflight/<uuid>.json`` under the
*hypervisor's* runtime directory (FORMAT.md §11, :mod:`..core.inflight`).  A
backup server that drives a remote hypervisor must publish its record there,
or the hook would let a migration pull the domain away mid-backup.

The hook trusts a record while its pid is alive and one of ours.  Our own pid
means nothing on the hypervisor, so a remote record names a *holder*: a tiny
process started over our ssh connection whose command line carries
``vmsnapbackup-inflight`` and which the remote watchdog of
:meth:`~.sshhost.SshHost.start` kills as soon as our session ends.  The record
is therefore live exactly as long as we are connected, and stale (left for
``repair``, as a local one is after a crash) once we or the connection die.

On this machine (:class:`~.localhost.LocalHost`) it is :func:`core.inflight.inflight`
unchanged, with its directory lock.  Remotely the check-and-replace is not
under that lock; the pool's domain lock already serialises our own backups of
one domain, so what it could race is only another backup server's operation.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import posixpath
from collections.abc import Iterator

from ..core import inflight
from ..core.inflight import InflightRecord
from ..errors import CorruptFileError, HypervisorError, LockedError, VmSnapBackupError
from .host import Host, HostProcess
from .localhost import LocalHost

__all__ = ["HOLDER_NAME", "clear_stale_on", "host_runtime_root", "inflight_on", "is_live_on",
           "read_on", "records_on"]

log = logging.getLogger(__name__)

#: The holder's argv[0]: the hook's liveness check looks for "vmsnapbackup".
HOLDER_NAME = "vmsnapbackup-inflight"
_HOLD_SECONDS = "2147483647"
_MAX_RECORD = 1 << 20


def host_runtime_root(host: Host) -> str:
    """The host's runtime directory (§11): ``/run/vmsnapbackup`` for root, else a per-user
    directory in /tmp (what :func:`core.inflight.runtime_root` picks without $XDG)."""
    if isinstance(host, LocalHost):
        return str(inflight.runtime_root())
    done = host.run(["id", "-u"], timeout=30)
    if not done.ok:
        raise HypervisorError(f"{host.name}: cannot tell our user id: {done.message()}")
    uid = int(done.stdout.strip() or b"-1")
    return "/run/vmsnapbackup" if uid == 0 else f"/tmp/vmsnapbackup-{uid}"


def _record_path(host: Host, uuid: str) -> str:
    return posixpath.join(host_runtime_root(host), "inflight", f"{uuid}.json")


def read_on(host: Host, uuid: str) -> InflightRecord | None:
    """The domain's record on ``host``; None when there is none."""
    if isinstance(host, LocalHost):
        return inflight.read(uuid)
    path = _record_path(host, uuid)
    data = host.read_file(path, limit=_MAX_RECORD)
    if data is None:
        return None
    try:
        return InflightRecord.from_json(json.loads(data.decode("utf-8")), path)
    except (UnicodeDecodeError, ValueError) as err:
        raise CorruptFileError(path, f"not valid JSON ({err})") from None


def records_on(host: Host) -> list[InflightRecord]:
    """Every readable record on ``host`` (``repair --all`` looks for stale ones there:
    a remote backup's record lives on the hypervisor, never here); damaged ones are
    logged and skipped, as :func:`core.inflight.records` does."""
    if isinstance(host, LocalHost):
        return inflight.records()
    try:
        names = host.listdir(posixpath.dirname(_record_path(host, "x")))
    except FileNotFoundError:
        return []
    return inflight.collect_records(names, lambda name: read_on(host, name[:-len(".json")]),
                                    f" on {host.name}")


def is_live_on(host: Host, record: InflightRecord) -> bool:
    """The hook's liveness rule (:func:`core.inflight.is_live`), asked of ``host``."""
    if isinstance(host, LocalHost):
        return inflight.is_live(record)
    argv = host.process_arguments(record.pid) or []
    return bool(argv) and any(w in "\0".join(argv) for w in ("python", "vmsnapbackup"))


def clear_stale_on(host: Host, uuid: str) -> bool:
    """Remove the domain's record on ``host`` if its holder is gone (repair); True if removed."""
    if isinstance(host, LocalHost):
        rec = inflight.read(uuid)
        return rec is not None and not inflight.is_live(rec) and inflight.clear(uuid, rec.pid)
    try:
        rec = read_on(host, uuid)
    except CorruptFileError:
        rec = None
    if rec is not None and is_live_on(host, rec):
        return False
    return host.unlink(_record_path(host, uuid))


def _start_holder(host: Host) -> HostProcess:
    # bash's exec -a: the holder's command line is "vmsnapbackup-inflight <n>", one
    # process (no shell left behind), SIGKILLed by the session watchdog when we go
    return host.start(["bash", "-c", f'exec -a {HOLDER_NAME} sleep {_HOLD_SECONDS}'],
                      log_path="/dev/null", tie_to_us=True)


@contextlib.contextmanager
def inflight_on(host: Host, record: InflightRecord) -> Iterator[InflightRecord]:
    """Hold ``record`` on ``host`` for the block (see the module docstring)."""
    if isinstance(host, LocalHost):
        with inflight.inflight(record) as held:
            yield held
        return
    path = _record_path(host, record.uuid)
    try:
        existing = read_on(host, record.uuid)
    except CorruptFileError as err:
        log.warning("replacing damaged in-flight record on %s: %s", host.name, err)
        existing = None
    if existing is not None and is_live_on(host, existing):
        raise LockedError(
            f"domain {existing.name} ({existing.uuid}) is busy on {host.name}: "
            f"{existing.operation} by pid {existing.pid} since {existing.since}")
    holder = _start_holder(host)
    held = dataclasses.replace(record, pid=holder.pid)
    try:
        host.mkdir(posixpath.dirname(path), 0o700, parents=True, exist_ok=True)
        host.write_file(path, json.dumps(held.to_json(), indent=1).encode() + b"\n",
                        mode=0o600)
        log.debug("in-flight record %s:%s held by pid %d", host.name, path, holder.pid)
        yield held
    finally:
        try:
            current = read_on(host, record.uuid)
            if current is not None and current.pid == held.pid:
                host.unlink(path)
        except (OSError, VmSnapBackupError) as err:
            log.warning("could not remove in-flight record of %s on %s: %s",
                        record.name, host.name, err)
        with contextlib.suppress(OSError, VmSnapBackupError):
            holder.kill()
            holder.wait(10)
