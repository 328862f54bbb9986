"""The NBD client's reads against a scripted server: pipelining, holes, splitting."""
from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest
from nbdfake import Conn, Disk, MiB, Request, Starter, assert_one_line, pattern, scripted_servers

from vmsnapbackup.adapters import nbdproto as p
from vmsnapbackup.errors import ExportError, UsageError


@pytest.fixture
def fake() -> Iterator[Starter]:
    yield from scripted_servers()


# ---------------------------------------------------------------------------
# reading


def test_structured_read_with_hole_chunk_zero_fills_callers_buffer(fake: Starter) -> None:
    def script(conn: Conn) -> None:
        conn.handshake()
        req = conn.read_request()
        assert (req.cmd, req.offset, req.length) == (p.CMD_READ, 4096, 12288)
        # out of order within the reply: tail data, then the hole, then the head
        conn.data(req.cookie, 4096 + 8192, pattern(4096 + 8192, 4096))
        conn.hole(req.cookie, 4096 + 1000, 7192)
        conn.data(req.cookie, 4096, pattern(4096, 1000))
        conn.none(req.cookie)
        conn.wait_closed()

    with fake(script).client() as client:
        buf = bytearray(b"\xff" * 12288)
        client.read_into(4096, buf)
        assert bytes(buf) == pattern(4096, 1000) + bytes(7192) + pattern(4096 + 8192, 4096)


def test_out_of_order_replies_are_matched_by_cookie(fake: Starter) -> None:
    offsets = [0, 65536, 131072, 196608, 262144, 327680]
    orders: list[list[int]] = []

    def script(conn: Conn) -> None:
        conn.handshake()
        batch: list[Request] = []
        answered = 0
        while answered < len(offsets):
            batch.append(conn.read_request())
            if len(batch) == 3 or answered + len(batch) == len(offsets):
                orders.append([r.offset for r in batch])
                for req in reversed(batch):
                    conn.data(req.cookie, req.offset, pattern(req.offset, req.length), True)
                answered += len(batch)
                batch = []
        conn.wait_closed()

    with fake(script).client() as client:
        bufs = [bytearray(65536) for _ in range(3)]
        got = []
        for i, (off, view) in enumerate(client.read_many(
                ((o, bufs[i % 3]) for i, o in enumerate(offsets)), depth=3)):
            got.append(off)
            assert bytes(view) == pattern(off, 65536)
        assert got == offsets
    assert orders == [offsets[:3], offsets[3:]]


def test_reads_larger_than_max_block_are_split(fake: Starter) -> None:
    disk = Disk(1 * MiB)
    disk.data[:] = pattern(0, len(disk.data))

    def script(conn: Conn) -> None:
        conn.handshake(size=len(disk.data), block_sizes=(1, 4096, 64 * 1024))
        disk.serve(conn)

    server = fake(script)
    with server.client() as client:
        assert client.read(10, 200 * 1024) == pattern(10, 200 * 1024)
    server.join()
    reads = [r for r in disk.requests if r.cmd == p.CMD_READ]
    assert [r.length for r in reads] == [65536, 65536, 65536, 8192]
    assert reads[0].offset == 10


def test_unaligned_read_is_widened_to_minimum_block_size(fake: Starter) -> None:
    disk = Disk(64 * 1024)
    disk.data[:] = pattern(0, len(disk.data))

    def script(conn: Conn) -> None:
        conn.handshake(size=len(disk.data), block_sizes=(512, 4096, 1 * MiB))
        disk.serve(conn)

    server = fake(script)
    with server.client() as client:
        assert client.read(1000, 3000) == pattern(1000, 3000)
        assert client.read(64 * 1024 - 7, 7) == pattern(64 * 1024 - 7, 7)
    server.join()
    reads = [(r.offset, r.length) for r in disk.requests if r.cmd == p.CMD_READ]
    assert reads == [(512, 3584), (64 * 1024 - 512, 512)]


def test_read_chunks_covers_ranges_in_order(fake: Starter) -> None:
    disk = Disk(4 * MiB)
    disk.data[:] = pattern(0, len(disk.data))

    def script(conn: Conn) -> None:
        conn.handshake(size=len(disk.data))
        disk.serve(conn)

    ranges = [(0, 300 * 1024), (1 * MiB, 2 * MiB + 5)]
    with fake(script).client() as client:
        seen = [(off, bytes(view)) for off, view in
                client.read_chunks(ranges, chunk_size=256 * 1024, depth=3)]
    assert [off for off, _ in seen] == [0, 256 * 1024] + [
        1 * MiB + i * 256 * 1024 for i in range(9)]
    for off, data in seen:
        assert data == pattern(off, len(data))
    assert sum(len(d) for _, d in seen) == 300 * 1024 + 2 * MiB + 5


def test_read_outside_export_is_a_usage_error(fake: Starter) -> None:
    def script(conn: Conn) -> None:
        conn.handshake(size=4096)
        conn.wait_closed()

    with fake(script).client() as client, pytest.raises(UsageError, match="outside the export"):
        client.read(4000, 100)


def test_error_in_pipeline_raises_in_turn_and_keeps_connection(fake: Starter) -> None:
    disk = Disk(1 * MiB)
    disk.data[:] = pattern(0, len(disk.data))

    def script(conn: Conn) -> None:
        conn.handshake(size=len(disk.data))
        for _ in range(4):
            req = conn.read_request()
            if req.offset == 65536:
                conn.error(req.cookie, p.NBD_EIO, "bad sector")
            else:
                conn.data(req.cookie, req.offset, pattern(req.offset, req.length), True)
        disk.serve(conn)

    with fake(script).client() as client:
        results = client.read_many(((o, bytearray(65536)) for o in range(0, 4 * 65536, 65536)),
                                   depth=4)
        off, view = next(results)
        assert off == 0 and bytes(view) == pattern(0, 65536)
        with pytest.raises(ExportError) as info:
            next(results)
        text = assert_one_line(info.value)
        assert "EIO" in text and "bad sector" in text and "offset 65536" in text
        assert info.value.errno == errno.EIO and info.value.errno_name == "EIO"
        # the two requests behind the failed one were collected: the stream is in sync
        assert client.read(5, 10) == pattern(5, 10)


def test_abandoned_pipeline_is_drained_without_touching_buffers(fake: Starter) -> None:
    disk = Disk(1 * MiB)
    disk.data[:] = pattern(0, len(disk.data))

    def script(conn: Conn) -> None:
        conn.handshake(size=len(disk.data))
        disk.serve(conn)

    with fake(script).client() as client:
        bufs = [bytearray(65536) for _ in range(4)]
        for off, view in client.read_many(((i * 65536, bufs[i % 4]) for i in range(8)),
                                          depth=4):
            assert off == 0
            break
        for buf in bufs[1:]:
            buf[:] = b"\x5a" * 65536  # the caller reuses its buffers at once
        assert client.read(65536 * 7, 16) == pattern(65536 * 7, 16)
        assert all(bytes(buf) == b"\x5a" * 65536 for buf in bufs[1:])


# ---------------------------------------------------------------------------
