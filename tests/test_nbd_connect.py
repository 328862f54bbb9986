"""NBD addresses, URIs and connecting (unix sockets; TLS set-up errors)."""
from __future__ import annotations

import errno
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from nbdfake import TIMEOUT, Conn, Disk, Starter, pattern, scripted_servers

from vmsnapbackup.adapters.nbdclient import (
    NbdAddress,
    NbdClient,
    parse_nbd_uri,
)
from vmsnapbackup.errors import ExportError, UsageError


@pytest.fixture
def fake() -> Iterator[Starter]:
    yield from scripted_servers()


# ---------------------------------------------------------------------------
# addresses


def test_parse_nbd_uris() -> None:
    assert parse_nbd_uri("nbd+unix:///disk%200?socket=/run/x/nbd.sock") == NbdAddress(
        export_name="disk 0", socket_path="/run/x/nbd.sock")
    assert parse_nbd_uri("nbd://example.org:10810/vda") == NbdAddress(
        export_name="vda", host="example.org", port=10810)
    assert parse_nbd_uri("nbd://[::1]/") == NbdAddress(export_name="", host="::1")
    for bad in ("nbds://h/x", "nbd+unix:///x", "http://h/x", "nbd:///x", "nbd://h:99999/x"):
        with pytest.raises(UsageError):
            parse_nbd_uri(bad)


def test_address_uri_round_trips() -> None:
    for addr in (NbdAddress("a b", socket_path="/tmp/s s.sock"),
                 NbdAddress("vda", host="::1", port=1234)):
        assert parse_nbd_uri(addr.uri) == addr


def test_connect_to_unix_socket_path(tmp_path: Path) -> None:
    path = str(tmp_path / "nbd.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    disk = Disk(8192)
    disk.data[:] = pattern(0, 8192)
    stop = threading.Event()

    def serve() -> None:
        sock, _ = listener.accept()
        with sock:
            conn = Conn(sock, stop)
            conn.handshake(size=8192)
            disk.serve(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with NbdClient.open_uri(f"nbd+unix:///disk0?socket={path}", timeout=TIMEOUT) as client:
            assert client.read(100, 100) == pattern(100, 100)
    finally:
        stop.set()
        thread.join(5)
        listener.close()
    assert disk.disconnected


def test_connect_failure_is_an_export_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="cannot connect to NBD server at unix:") as info:
        NbdClient.open_unix(tmp_path / "missing.sock", timeout=TIMEOUT)
    assert info.value.errno == errno.ENOENT
