"""SshHost against a real sshd on 127.0.0.1: files, processes and socket forwarding."""
from __future__ import annotations

import errno
import os
import socket
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


from vmsnapbackup.adapters.hostfor import ssh_target_for
from vmsnapbackup.adapters.sshhost import SshHost

if TYPE_CHECKING:
    from sshd import SshdServer

pytest_plugins = ("sshd",)   # the shared private sshd fixture: imported by pytest


@pytest.fixture
def host(sshd: SshdServer) -> Iterator[SshHost]:
    target = ssh_target_for(sshd.uri())
    assert target is not None
    with SshHost(target) as h:
        yield h


def test_files_round_trip_with_remote_errnos(host: SshHost, tmp_path: Path) -> None:
    d = host.make_temp_dir(str(tmp_path), "r-")
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    f = os.path.join(d, "rec.json")
    host.write_file(f, b"\x00bytes\xff" * 1000, mode=0o640)
    assert Path(f).read_bytes() == b"\x00bytes\xff" * 1000
    info = host.stat(f)
    assert info is not None and info.is_file and info.permissions == 0o640
    assert info.size == 7000
    assert host.read_file(f, limit=3, from_end=True) == b"es\xff"
    assert host.read_file(f, limit=3) == b"\x00by"
    assert host.read_file(os.path.join(d, "none")) is None
    assert host.stat(os.path.join(d, "none")) is None
    host.create_file(os.path.join(d, "new"), mode=0o600)
    with pytest.raises(OSError) as exc:
        host.create_file(os.path.join(d, "new"))
    assert exc.value.errno == errno.EEXIST
    host.rename(f, os.path.join(d, "moved"))
    assert sorted(host.listdir(d)) == ["moved", "new"]
    host.mkdir(os.path.join(d, "a", "b"), 0o750, parents=True)
    assert stat.S_IMODE(os.stat(os.path.join(d, "a", "b")).st_mode) == 0o750
    with pytest.raises(OSError) as exc:
        host.rmdir(d)
    assert exc.value.errno == errno.ENOTEMPTY
    assert host.unlink(os.path.join(d, "moved")) is True
    assert host.unlink(os.path.join(d, "moved")) is False


def test_run_returns_the_remote_status(host: SshHost) -> None:
    done = host.run(["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=30)
    assert (done.returncode, done.stdout, done.stderr.strip()) == (3, b"out\n", b"err")
    assert host.run(["sh", "-c", "umask"], timeout=30).stdout.strip() == b"0077"


def test_started_process_dies_with_its_session(host: SshHost, tmp_path: Path) -> None:
    log = str(tmp_path / "sleep.log")
    proc = host.start(["sleep", "600"], log_path=log)
    assert host.process_alive(proc.pid)
    assert host.process_name(proc.pid) == "sleep"
    assert host.process_arguments(proc.pid) == ["sleep", "600"]
    host.close()   # the connection goes away: the remote watchdog kills it
    assert proc.wait(timeout=20) is not None
    # the watchdog reads EOF once sshd closes the channel, then SIGKILLs: bounded wait
    deadline = time.monotonic() + 20
    while not _zombie_or_gone(proc.pid):
        assert time.monotonic() < deadline, "remote process outlived its ssh session"
        time.sleep(0.05)


def _zombie_or_gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except OSError:
        return True


def test_reach_socket_forwards_a_remote_unix_socket(host: SshHost, tmp_path: Path) -> None:
    remote = str(tmp_path / "remote.sock")
    with socket.socket(socket.AF_UNIX) as srv:
        srv.bind(remote)
        srv.listen(1)
        local = host.reach_socket(remote)
        assert local != remote
        with socket.socket(socket.AF_UNIX) as cli:
            cli.connect(local)
            conn, _ = srv.accept()
            with conn:
                cli.sendall(b"ping")
                assert conn.recv(4) == b"ping"


def test_libvirt_follows_the_same_uri_over_ssh(sshd: SshdServer) -> None:
    """The URI that gives SshHost its target also opens libvirt's own ssh transport."""
    from vmsnapbackup.adapters.hypervisor import connect

    with connect(sshd.uri()) as remote, connect("qemu:///system") as local:
        assert sorted(remote.domain_uuid(d) for d in remote.list_domains()) == \
            sorted(local.domain_uuid(d) for d in local.list_domains())


def test_remote_storage_daemon_serves_the_image_through_the_forward(
        host: SshHost, tmp_path: Path) -> None:
    """The data path of a remote backup: a daemon started over ssh exports the image
    read-only; our NBD client reads it through the forwarded socket, byte for byte."""
    import subprocess

    from vmsnapbackup.adapters.nbdclient import NbdClient
    from vmsnapbackup.adapters.storagedaemon import StorageDaemon

    img = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "4M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xa5 64k 128k", str(img)],
                   check=True, capture_output=True)
    ref = tmp_path / "ref.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(img), str(ref)],
                   check=True)
    run_base = tmp_path / "run"
    run_base.mkdir(mode=0o700)
    with StorageDaemon(str(run_base), tag="remote", host=host) as d:
        exp = d.export_image(str(img), "qcow2", name="vda")
        local = host.reach_socket(exp.socket_path)
        assert local != exp.socket_path
        with NbdClient.open_unix(local, "vda") as nbd:
            got = b"".join(nbd.read(off, 1 << 20) for off in range(0, 4 << 20, 1 << 20))
    assert got == ref.read_bytes()
    assert got[64 << 10] == 0xa5
