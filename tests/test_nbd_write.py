"""The NBD client's writes, zeroes and flush against a scripted server."""
from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest
from nbdfake import Conn, Disk, MiB, Starter, assert_one_line, pattern, scripted_servers

from vmsnapbackup.adapters import nbdproto as p
from vmsnapbackup.errors import ExportError, UsageError


@pytest.fixture
def fake() -> Iterator[Starter]:
    yield from scripted_servers()


# ---------------------------------------------------------------------------
# writing


def test_write_zeroes_flush_and_fast_zero_fallback(fake: Starter) -> None:
    disk = Disk(256 * 1024)
    flags = (p.TF_HAS_FLAGS | p.TF_SEND_FLUSH | p.TF_SEND_WRITE_ZEROES | p.TF_SEND_FAST_ZERO
             | p.TF_SEND_FUA)

    def script(conn: Conn) -> None:
        conn.handshake(size=len(disk.data), flags=flags)
        disk.serve(conn)

    server = fake(script)
    with server.client() as client:
        client.write(0, pattern(0, len(disk.data)), fua=True)
        assert not client.try_fast_zero(4096, 8192)
        client.write_zeroes(4096, 8192, fast=True)
        client.flush()
    server.join()
    expected = bytearray(pattern(0, len(disk.data)))
    expected[4096:12288] = bytes(8192)
    assert disk.data == expected
    cmds = [(r.cmd, r.flags) for r in disk.requests]
    assert cmds == [
        (p.CMD_WRITE, p.CMD_FLAG_FUA),
        (p.CMD_WRITE_ZEROES, p.CMD_FLAG_FAST_ZERO),
        (p.CMD_WRITE_ZEROES, p.CMD_FLAG_FAST_ZERO),
        (p.CMD_WRITE_ZEROES, 0),
        (p.CMD_FLUSH, 0),
        (p.CMD_DISC, 0),
    ]


def test_write_zeroes_without_server_support_writes_zero_data(fake: Starter) -> None:
    disk = Disk(128 * 1024)
    disk.data[:] = b"\x11" * len(disk.data)

    def script(conn: Conn) -> None:
        conn.handshake(size=len(disk.data), flags=p.TF_HAS_FLAGS)
        disk.serve(conn)

    server = fake(script)
    with server.client() as client:
        client.write_zeroes(1000, 100000, fast=True)
        client.flush()  # not offered: nothing is sent
    server.join()
    assert disk.data == b"\x11" * 1000 + bytes(100000) + b"\x11" * (128 * 1024 - 101000)
    assert {r.cmd for r in disk.requests} == {p.CMD_WRITE, p.CMD_DISC}


def test_write_many_splits_and_pipelines(fake: Starter) -> None:
    disk = Disk(1 * MiB)

    def script(conn: Conn) -> None:
        conn.handshake(size=len(disk.data), block_sizes=(512, 4096, 128 * 1024))
        disk.serve(conn)

    server = fake(script)
    with server.client() as client:
        buf = bytearray(300 * 1024)
        items = []
        for off in (0, 512 * 1024):
            buf[:] = pattern(off, len(buf))
            items.append((off, bytes(buf)))
        client.write_many(iter(items), depth=2)
    server.join()
    assert disk.data[:300 * 1024] == pattern(0, 300 * 1024)
    assert disk.data[512 * 1024:812 * 1024] == pattern(512 * 1024, 300 * 1024)
    assert max(r.length for r in disk.requests) == 128 * 1024


def test_write_to_read_only_export_is_refused_before_sending(fake: Starter) -> None:
    def script(conn: Conn) -> None:
        conn.handshake(flags=p.TF_HAS_FLAGS | p.TF_READ_ONLY)
        conn.wait_closed()

    with fake(script).client() as client, pytest.raises(ExportError, match="read-only"):
        client.write(0, b"x" * 512)


def test_enospc_on_write_carries_the_errno(fake: Starter) -> None:
    def script(conn: Conn) -> None:
        conn.handshake()
        req = conn.read_request()
        conn.simple(req.cookie, p.NBD_ENOSPC)
        conn.wait_closed()

    with fake(script).client() as client, pytest.raises(ExportError) as info:
        client.write(0, b"x" * 4096)
    assert "ENOSPC" in assert_one_line(info.value)
    assert info.value.errno == errno.ENOSPC


def test_unaligned_write_is_a_usage_error(fake: Starter) -> None:
    def script(conn: Conn) -> None:
        conn.handshake(block_sizes=(512, 4096, MiB))
        conn.wait_closed()

    with fake(script).client() as client, pytest.raises(UsageError,
                                                         match="minimum block size 512"):
        client.write(100, b"x" * 512)
