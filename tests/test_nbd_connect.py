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
    for bad in ("nbds://h/x", "nbds://h/x?tls-certificates=", "nbd+unix:///x",
                "http://h/x", "nbd:///x", "nbd://h:99999/x"):
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


# ---------------------------------------------------------------------------
# TLS addresses and files (a TLS session against QEMU: integration/test_nbd_tls.py)


def test_nbds_uri_carries_the_certificate_directory() -> None:
    address = parse_nbd_uri("nbds://hv1.example:10810/vda?tls-certificates=/etc/pki/vsb")
    assert address == NbdAddress("vda", host="hv1.example", port=10810, tls_dir="/etc/pki/vsb")
    assert address.uri == "nbds://hv1.example:10810/vda?tls-certificates=/etc/pki/vsb"
    assert parse_nbd_uri(address.uri) == address
    with pytest.raises(UsageError, match="only for TCP"):
        NbdAddress("vda", socket_path="/run/x.sock", tls_dir="/etc/pki/vsb")


def _tls_dir(tmp_path: Path, *names: str) -> Path:
    directory = tmp_path / "pki"
    directory.mkdir()
    for name in names:
        (directory / name).write_text("not a certificate\n")
    return directory


@pytest.mark.parametrize(("names", "message"), [
    ((), "has no ca-cert.pem"),
    (("ca-cert.pem",), "has no client-cert.pem"),
    (("ca-cert.pem", "client-cert.pem"), "has no client-key.pem"),
    (("ca-cert.pem", "client-cert.pem", "client-key.pem"), "ca-cert.pem is not a PEM"),
])
def test_incomplete_tls_directory_is_one_usage_line_before_dialling(
        tmp_path: Path, names: tuple[str, ...], message: str) -> None:
    directory = _tls_dir(tmp_path, *names)
    # port 9 on loopback has no server: dialling would be an ExportError
    with pytest.raises(UsageError, match=message) as info:
        NbdClient.connect_tcp("127.0.0.1", 9, "vda", tls_dir=directory)
    assert "\n" not in str(info.value)
    with pytest.raises(UsageError, match="does not exist"):
        NbdClient.open_uri(f"nbds://127.0.0.1:9/vda?tls-certificates={tmp_path / 'none'}")
