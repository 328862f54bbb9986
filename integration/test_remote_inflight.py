"""The in-flight record a backup server holds on a remote hypervisor, as its hook sees it.

The hook on the hypervisor reads ``inflight/<uuid>.json`` under *its* runtime
directory and trusts a record while its pid is alive and one of ours.  Here
the hypervisor is 127.0.0.1 behind a private sshd, so this process can read
the record exactly as the hook would (:mod:`vmsnapbackup.core.inflight`).
"""
from __future__ import annotations

import os
import signal
import sys
import time
import uuid as uuidlib
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


from vmsnapbackup.adapters.hostfor import ssh_target_for
from vmsnapbackup.adapters.hostinflight import inflight_on
from vmsnapbackup.adapters.sshhost import SshHost
from vmsnapbackup.core import inflight
from vmsnapbackup.errors import LockedError

if TYPE_CHECKING:
    from sshd import SshdServer

pytest_plugins = ("sshd",)   # the shared private sshd fixture: imported by pytest


def _host(sshd: SshdServer) -> SshHost:
    target = ssh_target_for(sshd.uri())
    assert target is not None
    return SshHost(target).connect()


def _record() -> inflight.InflightRecord:
    return inflight.InflightRecord.now(str(uuidlib.uuid4()), "vsb-remote-rec", "backup",
                                       "/backup-server/pool", ["/var/lib/x.qcow2"])


def _gone_within(seconds: float, uuid: str) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        rec = inflight.read(uuid)
        if rec is None or not inflight.is_live(rec):
            return True
        time.sleep(0.05)   # polling the watchdog's kill up to a deadline
    return False


def test_record_is_live_on_the_hypervisor_while_we_are_connected(sshd: SshdServer) -> None:
    record = _record()
    host = _host(sshd)
    try:
        with inflight_on(host, record) as held:
            seen = inflight.read(record.uuid)   # the hypervisor's view: its hook's
            assert seen is not None and seen.pid == held.pid != os.getpid()
            assert seen.pool == "/backup-server/pool" and inflight.is_live(seen)
            # a second backup server (or this one again) is refused while it is live
            other = _host(sshd)
            try:
                with pytest.raises(LockedError, match="busy"), inflight_on(other, record):
                    pass
            finally:
                other.close()
        assert inflight.read(record.uuid) is None          # removed at the end
        assert _gone_within(10, record.uuid)
    finally:
        host.close()


def test_record_goes_stale_when_the_connection_dies(sshd: SshdServer) -> None:
    record = _record()
    host = _host(sshd)
    try:
        with inflight_on(host, record):
            assert inflight.is_live(inflight.read(record.uuid) or record)
            master = host._master   # the connection, cut as a network failure would
            assert master is not None
            os.kill(master.pid, signal.SIGKILL)
            # the holder dies with the session: the hook now sees a dead operation
            assert _gone_within(20, record.uuid)
            assert inflight.read(record.uuid) is not None   # stale, left for repair
    finally:
        host.close()
        inflight.clear(record.uuid)
