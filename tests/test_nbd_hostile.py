"""Broken and hostile NBD servers: every one ends in one clear line, never a hang."""
from __future__ import annotations

import errno
import socket
import struct
import time
from collections.abc import Iterator
from typing import Callable

import pytest
from nbdfake import (
    Conn,
    MiB,
    Request,
    Starter,
    assert_one_line,
    pattern,
    scripted_servers,
)

from vmsnapbackup.adapters import nbdproto as p
from vmsnapbackup.errors import ExportError


@pytest.fixture
def fake() -> Iterator[Starter]:
    yield from scripted_servers()


# ---------------------------------------------------------------------------
# hostile and broken servers


def _one_read_against(fake: Starter, reply: Callable[[Conn, Request], None],
                      **options: object) -> str:
    def script(conn: Conn) -> None:
        conn.handshake(size=1 * MiB)
        req = conn.read_request()
        reply(conn, req)
        conn.wait_closed()

    client = fake(script).client(**options)
    with pytest.raises(ExportError) as info:
        client.read_into(4096, bytearray(8192))
    text = assert_one_line(info.value)
    # a protocol failure leaves the client unusable, with a clear word
    with pytest.raises(ExportError, match="unusable"):
        client.read(0, 1)
    client.close()
    return text


def test_bad_reply_magic(fake: Starter) -> None:
    text = _one_read_against(fake, lambda c, r: c.send(b"\xde\xad\xbe\xef" + bytes(12)))
    assert "bad reply magic 0xdeadbeef" in text


def test_reply_for_unknown_cookie(fake: Starter) -> None:
    text = _one_read_against(fake, lambda c, r: c.data(r.cookie + 1000, r.offset, b"x", True))
    assert f"unknown request cookie 0x{1000 + 1:x}" in text


def test_data_chunk_larger_than_asked(fake: Starter) -> None:
    def reply(conn: Conn, req: Request) -> None:
        conn.chunk(req.cookie, p.REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", req.offset),
                   done=True, length=8 + 0x7FFFFFF0)

    text = _one_read_against(fake, reply)
    assert "data chunk of 2147483632 bytes for a request of 8192" in text


def test_data_chunk_outside_the_request(fake: Starter) -> None:
    text = _one_read_against(fake, lambda c, r: c.data(r.cookie, r.offset + 8000, bytes(400)))
    assert "outside the request" in text


def test_hole_chunk_outside_the_request(fake: Starter) -> None:
    text = _one_read_against(fake, lambda c, r: c.hole(r.cookie, r.offset - 512, 1024, True))
    assert "hole chunk [3584, +1024) outside the request [4096, +8192)" in text


def test_overlapping_data_chunks(fake: Starter) -> None:
    def reply(conn: Conn, req: Request) -> None:
        conn.data(req.cookie, req.offset, bytes(req.length))
        conn.data(req.cookie, req.offset + 4096, bytes(512), True)

    assert "overlaps an earlier chunk" in _one_read_against(fake, reply)


def test_overlapping_chunks_that_add_up_are_rejected(fake: Starter) -> None:
    # [4096, +4096) twice: 8192 bytes "received", [8192, 12288) never written
    def reply(conn: Conn, req: Request) -> None:
        conn.data(req.cookie, req.offset, bytes(4096))
        conn.data(req.cookie, req.offset, bytes(4096), True)

    text = _one_read_against(fake, reply)
    assert "protocol error: data chunk [4096, +4096) overlaps an earlier chunk of the reply " \
           "to [4096, +8192)" in text


def test_hole_overlapping_data_is_rejected_and_stale_bytes_never_pass(fake: Starter) -> None:
    # data [4096, +4096) and a hole [6144, +4096): 8192 bytes in all, but
    # [10240, 12288) keeps what the buffer held before
    def script(conn: Conn) -> None:
        conn.handshake(size=1 * MiB)
        req = conn.read_request()
        conn.data(req.cookie, req.offset, b"\x11" * 4096)
        conn.hole(req.cookie, req.offset + 2048, 4096, True)
        conn.wait_closed()

    stale = bytearray(b"\xaa" * 8192)
    client = fake(script).client()
    with pytest.raises(ExportError, match=r"hole chunk \[6144, \+4096\) overlaps an earlier"):
        client.read_into(4096, stale)
    client.close()


@pytest.mark.parametrize("order", [(1, 0), (2, 0, 1), (0, 2, 1), (1, 2, 0)])
def test_chunks_out_of_order_that_tile_the_request_are_accepted(
        fake: Starter, order: tuple[int, ...]) -> None:
    # three pieces of [4096, +12288): each order must fill the buffer exactly
    pieces = [(0, 4096), (4096, 4096), (8192, 4096)] if len(order) == 3 else \
        [(0, 6144), (6144, 6144)]

    def script(conn: Conn) -> None:
        conn.handshake(size=1 * MiB)
        req = conn.read_request()
        for n, index in enumerate(order):
            rel, length = pieces[index]
            done = n == len(order) - 1
            if index == 1 and len(order) == 3:
                conn.hole(req.cookie, req.offset + rel, length, done)
            else:
                conn.data(req.cookie, req.offset + rel, pattern(4096 + rel, length), done)
        conn.wait_closed()

    want = bytearray(pattern(4096, 12288))
    if len(order) == 3:
        want[4096:8192] = bytes(4096)
    buf = bytearray(b"\xaa" * 12288)
    with fake(script).client() as client:
        client.read_into(4096, buf)
        assert buf == want


def _drip(conn: Conn, data: bytes, interval: float, seconds: float) -> None:
    """Send ``data`` a byte per ``interval``; after ``seconds``, the rest at once."""
    end = time.monotonic() + seconds
    for pos in range(len(data)):
        if time.monotonic() > end:
            conn.send(data[pos:])
            return
        conn.send(data[pos:pos + 1])
        if conn.stop.wait(interval):
            return


def test_a_dripping_server_cannot_stretch_a_read_beyond_the_timeout(fake: Starter) -> None:
    # a byte every 20 ms keeps every single receive well inside 0.5 s; only
    # a deadline for the whole request ends the read (else it succeeds after 4 s)
    def reply(conn: Conn, req: Request) -> None:
        body = bytes(req.length)
        chunk = p.STRUCTURED_REPLY.pack(p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE,
                                        p.REPLY_TYPE_OFFSET_DATA, req.cookie, 8 + len(body))
        _drip(conn, chunk + struct.pack(">Q", req.offset) + body, 0.02, 4.0)

    start = time.monotonic()
    text = _one_read_against(fake, reply, timeout=0.5)
    assert "no answer within 0.5 s while" in text
    assert time.monotonic() - start < 3.0


def test_a_dripping_greeting_cannot_stretch_the_handshake(fake: Starter) -> None:
    def script(conn: Conn) -> None:
        greeting = p.GREETING.pack(p.NBDMAGIC, p.IHAVEOPT, p.FLAG_FIXED_NEWSTYLE)
        _drip(conn, greeting, 0.1, 4.0)
        conn.wait_closed()

    with pytest.raises(ExportError, match=r"no answer within 0.5 s while reading the greeting"):
        fake(script).client(timeout=0.5)


def test_reply_done_before_all_data(fake: Starter) -> None:
    text = _one_read_against(fake, lambda c, r: c.data(r.cookie, r.offset, bytes(100), True))
    assert "read reply ended after 100 of 8192 bytes" in text


def test_simple_reply_to_read_after_structured_negotiation(fake: Starter) -> None:
    text = _one_read_against(fake, lambda c, r: c.simple(r.cookie, 0, bytes(r.length)))
    assert "simple reply to a read" in text


def test_oversized_error_chunk(fake: Starter) -> None:
    text = _one_read_against(fake, lambda c, r: c.chunk(
        r.cookie, p.REPLY_TYPE_ERROR, p.ERROR_HEAD.pack(5, 0), True, length=1 << 30))
    assert "error chunk of 1073741824 bytes" in text


def test_error_message_longer_than_chunk(fake: Starter) -> None:
    text = _one_read_against(fake, lambda c, r: c.chunk(
        r.cookie, p.REPLY_TYPE_ERROR, p.ERROR_HEAD.pack(5, 100) + b"short", True))
    assert "error message longer than its chunk" in text


def test_endless_error_chunks(fake: Starter) -> None:
    def reply(conn: Conn, req: Request) -> None:
        one = p.STRUCTURED_REPLY.pack(p.STRUCTURED_REPLY_MAGIC, 0, p.REPLY_TYPE_ERROR,
                                      req.cookie, 6) + p.ERROR_HEAD.pack(5, 0)
        conn.send(one * 5000)

    assert "endless error chunks" in _one_read_against(fake, reply)


def test_connection_dropped_mid_reply(fake: Starter) -> None:
    def reply(conn: Conn, req: Request) -> None:
        conn.send(p.STRUCTURED_REPLY.pack(p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE,
                                          p.REPLY_TYPE_OFFSET_DATA, req.cookie, 8 + req.length)
                  + struct.pack(">Q", req.offset) + bytes(1000))
        conn.sock.shutdown(socket.SHUT_WR)

    text = _one_read_against(fake, reply)
    assert "server closed the connection while receiving read data (1000 of 8192" in text


def test_read_times_out(fake: Starter) -> None:
    text = _one_read_against(fake, lambda c, r: None, timeout=0.2)
    assert "no answer within 0.2 s while waiting for a reply" in text


def test_server_error_on_read_maps_errno_and_keeps_connection(fake: Starter) -> None:
    def script(conn: Conn) -> None:
        conn.handshake()
        req = conn.read_request()
        conn.error(req.cookie, 12345, "weird\nfailure")
        req = conn.read_request()
        conn.data(req.cookie, req.offset, b"ok", True)
        conn.wait_closed()

    with fake(script).client() as client:
        with pytest.raises(ExportError) as info:
            client.read(0, 4096)
        text = assert_one_line(info.value)
        assert "error 12345" in text and "weird failure" in text
        assert info.value.errno == errno.EINVAL
        assert client.read(0, 2) == b"ok"


def test_eshutdown_refuses_further_requests(fake: Starter) -> None:
    def script(conn: Conn) -> None:
        conn.handshake()
        req = conn.read_request()
        conn.error(req.cookie, p.NBD_ESHUTDOWN, "going down")
        conn.wait_closed()

    with fake(script).client() as client:
        with pytest.raises(ExportError, match="ESHUTDOWN"):
            client.read(0, 512)
        with pytest.raises(ExportError, match="shutting down"):
            client.read(0, 512)
