"""Unit tests of the NBD client against a scripted server on a socketpair.

The scripted server exists for the failure paths a real qemu-nbd never takes
(bad magic, replies for unknown requests, oversized chunks, silence), and for
exact control of reply order and chunk shapes.  The same paths against a real
server live in integration/test_nbdclient.py.
"""
from __future__ import annotations

import errno
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Callable

import pytest

from vmsnapbackup.adapters import nbdproto as p
from vmsnapbackup.adapters.nbdclient import (
    BlockSizes,
    Extent,
    NbdAddress,
    NbdClient,
    parse_nbd_uri,
)
from vmsnapbackup.errors import ExportError, UsageError

TIMEOUT = 2.0
CONTEXT_ID = 7
DIRTY_ID = 9
DIRTY = p.dirty_bitmap_context("bm0")
BOTH = {p.META_BASE_ALLOCATION: CONTEXT_ID, DIRTY: DIRTY_ID}
MiB = 1024 * 1024
GiB = 1024 * MiB


# ---------------------------------------------------------------------------
# scripted server


class Request:
    def __init__(self, flags: int, cmd: int, cookie: int, offset: int, length: int,
                 payload: bytes = b"") -> None:
        self.flags, self.cmd, self.cookie = flags, cmd, cookie
        self.offset, self.length, self.payload = offset, length, payload

    def __repr__(self) -> str:
        return f"Request(cmd={self.cmd}, off={self.offset}, len={self.length})"


class Conn:
    """The server's end of the socketpair, with protocol helpers."""

    def __init__(self, sock: socket.socket, stop: threading.Event) -> None:
        self.sock = sock
        self.stop = stop
        self.client_flags: int | None = None
        self.options: list[tuple[int, bytes]] = []
        self.meta_queries: list[list[str]] = []

    # raw I/O
    def recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError("client went away")
            buf += chunk
        return buf

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    # handshake
    def greeting(self, hflags: int = p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES) -> None:
        self.send(p.GREETING.pack(p.NBDMAGIC, p.IHAVEOPT, hflags))
        (self.client_flags,) = p.CLIENT_FLAGS.unpack(self.recv_exact(4))

    def read_option(self) -> tuple[int, bytes]:
        magic, option, length = p.OPTION_HEADER.unpack(self.recv_exact(p.OPTION_HEADER.size))
        assert magic == p.IHAVEOPT
        data = self.recv_exact(length)
        self.options.append((option, data))
        return option, data

    def option_reply(self, option: int, rtype: int, data: bytes = b"") -> None:
        self.send(p.OPTION_REPLY.pack(p.OPTION_REPLY_MAGIC, option, rtype, len(data)) + data)

    def handshake(self, size: int = 1 * MiB,
                  flags: int = p.TF_HAS_FLAGS | p.TF_SEND_FLUSH | p.TF_SEND_WRITE_ZEROES,
                  block_sizes: tuple[int, int, int] | None = (1, 4096, 32 * MiB),
                  structured: bool = True, meta: bool = True,
                  offer: dict[str, int] | None = None) -> None:
        """Play a well-behaved server up to the transmission phase.

        ``offer``: the contexts this server has, by name and id; it selects
        those the client asks for, in the order asked (default: only
        base:allocation, or none when ``meta`` is false).
        """
        if offer is None:
            offer = {p.META_BASE_ALLOCATION: CONTEXT_ID} if meta else {}
        self.greeting()
        while True:
            option, data = self.read_option()
            if option == p.OPT_STRUCTURED_REPLY:
                self.option_reply(option, p.REP_ACK if structured else p.REP_ERR_UNSUP)
            elif option == p.OPT_SET_META_CONTEXT:
                queries = parse_meta_queries(data)
                self.meta_queries.append(queries)
                for query in queries:
                    if query in offer:
                        self.option_reply(option, p.REP_META_CONTEXT,
                                          p.U32.pack(offer[query]) + query.encode())
                self.option_reply(option, p.REP_ACK)
            elif option == p.OPT_GO:
                self.option_reply(option, p.REP_INFO, p.INFO_EXPORT_PAYLOAD.pack(
                    p.INFO_EXPORT, size, flags))
                if block_sizes is not None:
                    self.option_reply(option, p.REP_INFO, p.INFO_BLOCK_SIZE_PAYLOAD.pack(
                        p.INFO_BLOCK_SIZE, *block_sizes))
                self.option_reply(option, p.REP_ACK)
                return
            else:
                self.option_reply(option, p.REP_ERR_UNSUP)

    # transmission
    def read_request(self) -> Request:
        magic, flags, cmd, cookie, offset, length = p.REQUEST.unpack(
            self.recv_exact(p.REQUEST.size))
        assert magic == p.REQUEST_MAGIC
        payload = self.recv_exact(length) if cmd == p.CMD_WRITE else b""
        return Request(flags, cmd, cookie, offset, length, payload)

    def simple(self, cookie: int, error: int = 0, data: bytes = b"") -> None:
        self.send(p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, error, cookie) + data)

    def chunk(self, cookie: int, rtype: int, payload: bytes, done: bool = False,
              length: int | None = None) -> None:
        flags = p.REPLY_FLAG_DONE if done else 0
        size = len(payload) if length is None else length
        self.send(p.STRUCTURED_REPLY.pack(p.STRUCTURED_REPLY_MAGIC, flags, rtype, cookie,
                                          size) + payload)

    def data(self, cookie: int, offset: int, data: bytes, done: bool = False) -> None:
        self.chunk(cookie, p.REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", offset) + data, done)

    def hole(self, cookie: int, offset: int, size: int, done: bool = False) -> None:
        self.chunk(cookie, p.REPLY_TYPE_OFFSET_HOLE, p.OFFSET_HOLE_PAYLOAD.pack(offset, size),
                   done)

    def none(self, cookie: int) -> None:
        self.chunk(cookie, p.REPLY_TYPE_NONE, b"", done=True)

    def error(self, cookie: int, err: int, message: str = "", done: bool = True) -> None:
        msg = message.encode()
        self.chunk(cookie, p.REPLY_TYPE_ERROR, p.ERROR_HEAD.pack(err, len(msg)) + msg, done)

    def status(self, cookie: int, extents: list[tuple[int, int]], context: int = CONTEXT_ID,
               done: bool = True) -> None:
        payload = p.U32.pack(context) + b"".join(struct.pack(">II", n, f) for n, f in extents)
        self.chunk(cookie, p.REPLY_TYPE_BLOCK_STATUS, payload, done)

    def wait_closed(self) -> None:
        """Block until the client goes away (or the test ends)."""
        self.sock.settimeout(0.05)
        while not self.stop.is_set():
            try:
                if not self.sock.recv(65536):
                    return
            except socket.timeout:
                continue
            except OSError:
                return


def parse_meta_queries(data: bytes) -> list[str]:
    """The context names in a SET_META_CONTEXT option (after the export name)."""
    (name_len,) = p.U32.unpack_from(data)
    pos = 4 + name_len
    (count,) = p.U32.unpack_from(data, pos)
    pos += 4
    queries = []
    for _ in range(count):
        (length,) = p.U32.unpack_from(data, pos)
        queries.append(data[pos + 4:pos + 4 + length].decode())
        pos += 4 + length
    assert pos == len(data), "trailing bytes in SET_META_CONTEXT"
    return queries


class Disk:
    """An in-memory export that answers like a polite server."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.requests: list[Request] = []
        self.disconnected = False

    def serve(self, conn: Conn, structured: bool = True) -> None:
        while True:
            try:
                req = conn.read_request()
            except EOFError:
                return
            self.requests.append(req)
            if req.cmd == p.CMD_DISC:
                self.disconnected = True
                return
            if req.cmd == p.CMD_READ:
                body = bytes(self.data[req.offset:req.offset + req.length])
                if structured:
                    conn.data(req.cookie, req.offset, body, done=True)
                else:
                    conn.simple(req.cookie, 0, body)
            elif req.cmd == p.CMD_WRITE:
                self.data[req.offset:req.offset + req.length] = req.payload
                conn.simple(req.cookie)
            elif req.cmd == p.CMD_WRITE_ZEROES:
                if req.flags & p.CMD_FLAG_FAST_ZERO:
                    conn.error(req.cookie, p.NBD_ENOTSUP, "not fast")
                    continue
                self.data[req.offset:req.offset + req.length] = bytes(req.length)
                conn.simple(req.cookie)
            elif req.cmd == p.CMD_FLUSH:
                conn.none(req.cookie)
            else:
                conn.error(req.cookie, p.NBD_EINVAL, "unexpected")


class Fake:
    """Runs one script on a thread against the client's end of a socketpair."""

    def __init__(self, script: Callable[[Conn], None]) -> None:
        self.client_sock, server_sock = socket.socketpair()
        self.stop = threading.Event()
        self.conn = Conn(server_sock, self.stop)
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(script,), daemon=True)
        self.thread.start()

    def _run(self, script: Callable[[Conn], None]) -> None:
        try:
            script(self.conn)
        except (EOFError, ConnectionError, socket.timeout):
            pass  # the client hung up first: fine for a script
        except BaseException as exc:  # reported by the fixture
            self.failure = exc

    def client(self, **options: object) -> NbdClient:
        options.setdefault("timeout", TIMEOUT)
        return NbdClient(self.client_sock, "disk0", **options)  # type: ignore[arg-type]

    def join(self) -> None:
        """Wait for the script to end (the client must have hung up)."""
        self.thread.join(5)
        assert not self.thread.is_alive(), "scripted server did not finish"

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(5)
        assert not self.thread.is_alive(), "scripted server did not finish"
        self.conn.sock.close()
        self.client_sock.close()


@pytest.fixture
def fake() -> Iterator[Callable[[Callable[[Conn], None]], Fake]]:
    made: list[Fake] = []

    def start(script: Callable[[Conn], None]) -> Fake:
        server = Fake(script)
        made.append(server)
        return server

    yield start
    for server in made:
        server.finish()
    for server in made:
        if server.failure is not None:
            raise server.failure


def pattern(offset: int, length: int) -> bytes:
    """Bytes that differ at every offset, so misplaced data shows."""
    return bytes((i * 7 + (i >> 8) * 13) & 0xFF for i in range(offset, offset + length))


def assert_one_line(err: ExportError) -> str:
    text = str(err)
    assert "\n" not in text and text
    return text


# ---------------------------------------------------------------------------
# handshake


def test_handshake_negotiates_export_info_and_block_sizes(fake):
    seen: dict[str, object] = {}

    def script(conn: Conn) -> None:
        conn.handshake(size=5 * MiB + 123, block_sizes=(512, 4096, 1 * MiB),
                       flags=p.TF_HAS_FLAGS | p.TF_CAN_MULTI_CONN | p.TF_READ_ONLY)
        seen["flags"] = conn.client_flags
        seen["options"] = [o for o, _ in conn.options]
        seen["go"] = conn.options[-1][1]
        conn.wait_closed()

    server = fake(script)
    with server.client() as client:
        assert client.size == 5 * MiB + 123
        assert client.block_sizes == BlockSizes(512, 4096, 1 * MiB)
        assert client.max_request == 1 * MiB
        assert client.can_multi_conn and client.read_only
        assert not client.can_flush and not client.can_write_zeroes
        assert client.structured_replies and client.can_block_status
    server.finish()
    assert seen["flags"] == p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES
    assert seen["options"] == [p.OPT_STRUCTURED_REPLY, p.OPT_SET_META_CONTEXT, p.OPT_GO]
    go = seen["go"]
    assert isinstance(go, bytes)
    name_len = p.U32.unpack_from(go)[0]
    assert go[4:4 + name_len] == b"disk0"
    assert go[4 + name_len:] == p.U16.pack(1) + p.U16.pack(p.INFO_BLOCK_SIZE)


def test_server_without_structured_replies_still_reads(fake):
    disk = Disk(256 * 1024)
    disk.data[:] = pattern(0, len(disk.data))

    def script(conn: Conn) -> None:
        conn.handshake(size=len(disk.data), structured=False)
        disk.serve(conn, structured=False)

    server = fake(script)
    with server.client() as client:
        assert not client.structured_replies and not client.can_block_status
        assert client.read(1000, 5000) == pattern(1000, 5000)
        assert list(client.block_status()) == [Extent(0, len(disk.data), 0)]
    server.join()
    assert disk.disconnected


def test_unknown_export_is_a_clean_error(fake):
    def script(conn: Conn) -> None:
        conn.greeting()
        while True:
            option, _ = conn.read_option()
            if option == p.OPT_GO:
                conn.option_reply(option, p.REP_ERR_UNKNOWN, b"export 'disk0' not present")
                conn.wait_closed()
                return
            conn.option_reply(option, p.REP_ACK)

    with pytest.raises(ExportError, match=r"no such export: export 'disk0' not present"):
        fake(script).client()


def test_bad_greeting_magic(fake):
    def script(conn: Conn) -> None:
        conn.send(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        conn.wait_closed()

    with pytest.raises(ExportError, match="not an NBD server") as info:
        fake(script).client()
    assert_one_line(info.value)


def test_option_reply_too_large(fake):
    def script(conn: Conn) -> None:
        conn.greeting()
        option, _ = conn.read_option()
        conn.send(p.OPTION_REPLY.pack(p.OPTION_REPLY_MAGIC, option, p.REP_ACK, 0xFFFFFFF0))
        conn.wait_closed()

    with pytest.raises(ExportError, match=r"option reply too large \(4294967280 bytes\)"):
        fake(script).client()


def test_silent_server_during_handshake_times_out(fake):
    def script(conn: Conn) -> None:
        conn.greeting()
        conn.read_option()
        conn.wait_closed()  # never answers

    with pytest.raises(ExportError, match=r"no answer within 0.2 s"):
        fake(script).client(timeout=0.2)


# ---------------------------------------------------------------------------
# reading


def test_structured_read_with_hole_chunk_zero_fills_callers_buffer(fake):
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


def test_out_of_order_replies_are_matched_by_cookie(fake):
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


def test_reads_larger_than_max_block_are_split(fake):
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


def test_unaligned_read_is_widened_to_minimum_block_size(fake):
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


def test_read_chunks_covers_ranges_in_order(fake):
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


def test_read_outside_export_is_a_usage_error(fake):
    def script(conn: Conn) -> None:
        conn.handshake(size=4096)
        conn.wait_closed()

    with fake(script).client() as client, pytest.raises(UsageError, match="outside the export"):
        client.read(4000, 100)


def test_error_in_pipeline_raises_in_turn_and_keeps_connection(fake):
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


def test_abandoned_pipeline_is_drained_without_touching_buffers(fake):
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
# block status


def test_block_status_parses_merges_and_continues(fake):
    size = 3 * MiB
    requests: list[Request] = []

    def script(conn: Conn) -> None:
        conn.handshake(size=size)
        req = conn.read_request()
        requests.append(req)
        # first answer covers only 1 MiB + 64 KiB of the 3 MiB asked
        conn.status(req.cookie, [(512 * 1024, 0), (512 * 1024, p.STATE_ZERO),
                                 (65536, p.STATE_ZERO)])
        req = conn.read_request()
        requests.append(req)
        conn.status(req.cookie, [(MiB - 65536, p.STATE_HOLE | p.STATE_ZERO),
                                 (MiB, p.STATE_HOLE)])
        conn.wait_closed()

    with fake(script).client() as client:
        extents = list(client.block_status())
    assert [(r.cmd, r.offset, r.length) for r in requests] == [
        (p.CMD_BLOCK_STATUS, 0, size), (p.CMD_BLOCK_STATUS, MiB + 65536, 2 * MiB - 65536)]
    assert extents == [
        Extent(0, 512 * 1024, 0),
        Extent(512 * 1024, 512 * 1024 + 65536, p.STATE_ZERO),
        Extent(MiB + 65536, MiB - 65536, p.STATE_HOLE | p.STATE_ZERO),
        Extent(2 * MiB, MiB, p.STATE_HOLE),
    ]
    assert [e.kind for e in extents] == ["data", "zero", "hole", "data"]


def test_data_ranges_round_to_blocks_and_skip_zeroes(fake):
    def script(conn: Conn) -> None:
        conn.handshake(size=1 * MiB)
        req = conn.read_request()
        conn.status(req.cookie, [(4096, 0), (200 * 1024, p.STATE_ZERO | p.STATE_HOLE),
                                 (100, 0), (1 * MiB - 4096 - 200 * 1024 - 100 - 4096,
                                            p.STATE_ZERO),
                                 (4096, p.STATE_HOLE)])
        conn.wait_closed()

    with fake(script).client() as client:
        ranges = list(client.data_ranges(65536))
    assert ranges == [(0, 65536), (196608, 65536), (1 * MiB - 65536, 65536)]


def test_block_status_longer_than_asked_is_rejected(fake):
    def script(conn: Conn) -> None:
        conn.handshake(size=65536)
        req = conn.read_request()
        conn.status(req.cookie, [(65536, 0), (512, 0)])
        conn.wait_closed()

    with fake(script).client() as client:
        with pytest.raises(ExportError, match="block status describes 66048 bytes for a "
                                              "request of 65536"):
            list(client.block_status())


def test_block_status_for_unknown_context_is_rejected(fake):
    def script(conn: Conn) -> None:
        conn.handshake(size=65536)
        req = conn.read_request()
        conn.status(req.cookie, [(65536, 0)], context=99)
        conn.wait_closed()

    with fake(script).client() as client:
        with pytest.raises(ExportError, match="unknown metadata context 99"):
            list(client.block_status())


# ---------------------------------------------------------------------------
# dirty bitmap context


Runs = list[tuple[int, int, int]]  # (offset, length, flags), covering the export


class StatusModel:
    """Answers BLOCK_STATUS from per-context run lists, each chunk cut at its own cap.

    ``caps`` bounds how many bytes one chunk of a context describes, so the
    two chunks of one reply can end at different offsets (as QEMU's may).
    """

    def __init__(self, contexts: dict[int, Runs], caps: dict[int, int]) -> None:
        self.contexts = contexts
        self.caps = caps
        self.requests: list[Request] = []

    def descriptors(self, context: int, offset: int, length: int) -> list[tuple[int, int]]:
        end = min(offset + length, offset + self.caps.get(context, length))
        out: list[tuple[int, int]] = []
        for start, run, flags in self.contexts[context]:
            lo, hi = max(start, offset), min(start + run, end)
            if lo < hi:
                out.append((hi - lo, flags))
        assert out, "model does not cover the request"
        return out

    def answer(self, conn: Conn, req: Request) -> None:
        self.requests.append(req)
        ids = list(self.contexts)
        for index, context in enumerate(ids):
            conn.status(req.cookie, self.descriptors(context, req.offset, req.length),
                        context=context, done=index == len(ids) - 1)

    def serve(self, conn: Conn) -> None:
        while True:
            try:
                req = conn.read_request()
            except EOFError:
                return
            if req.cmd == p.CMD_DISC:
                return
            assert req.cmd == p.CMD_BLOCK_STATUS
            self.answer(conn, req)


def test_dirty_bitmap_asks_for_both_contexts_in_one_option(fake):
    def script(conn: Conn) -> None:
        conn.handshake(offer=BOTH)
        seen.extend(conn.meta_queries)
        seen.append([o for o, _ in conn.options])
        conn.wait_closed()

    seen: list[list[object]] = []
    server = fake(script)
    with server.client(dirty_bitmap="bm0") as client:
        assert client.can_block_status and client.can_dirty_status
        assert client.dirty_bitmap == "bm0"
    server.finish()
    assert seen == [[p.META_BASE_ALLOCATION, "qemu:dirty-bitmap:bm0"],
                    [p.OPT_STRUCTURED_REPLY, p.OPT_SET_META_CONTEXT, p.OPT_GO]]


def test_without_dirty_bitmap_only_base_allocation_is_asked(fake):
    def script(conn: Conn) -> None:
        conn.handshake(offer=BOTH)
        seen.extend(conn.meta_queries)
        conn.wait_closed()

    seen: list[list[str]] = []
    server = fake(script)
    with server.client() as client:
        assert client.can_block_status and not client.can_dirty_status
        with pytest.raises(UsageError, match="no dirty bitmap was asked for"):
            client.dirty_ranges(65536)
    server.finish()
    assert seen == [[p.META_BASE_ALLOCATION]]


def test_server_without_the_bitmap_selects_only_base_allocation(fake):
    def script(conn: Conn) -> None:
        conn.handshake(size=MiB, offer={p.META_BASE_ALLOCATION: CONTEXT_ID})
        req = conn.read_request()
        conn.status(req.cookie, [(MiB, p.STATE_ZERO)])
        conn.wait_closed()

    with fake(script).client(dirty_bitmap="bm0") as client:
        assert client.can_block_status and not client.can_dirty_status
        with pytest.raises(UsageError, match=r"did not offer qemu:dirty-bitmap:bm0"):
            client.dirty_ranges(65536)
        # the refused call sent nothing: the stream is still in step
        assert list(client.block_status()) == [Extent(0, MiB, p.STATE_ZERO)]


def test_server_selecting_only_the_dirty_context(fake):
    model = StatusModel({DIRTY_ID: [(0, 64 * 1024, 0), (64 * 1024, 4096, p.STATE_DIRTY),
                                    (68 * 1024, MiB - 68 * 1024, 0)]}, {})

    def script(conn: Conn) -> None:
        conn.handshake(size=MiB, offer={DIRTY: DIRTY_ID})
        model.serve(conn)

    with fake(script).client(dirty_bitmap="bm0") as client:
        assert client.can_dirty_status and not client.can_block_status
        # without base:allocation everything is data, and no request is needed
        assert list(client.block_status()) == [Extent(0, MiB, 0)]
        assert list(client.data_ranges(65536)) == [(0, MiB)]
        assert list(client.dirty_ranges(65536)) == [(65536, 65536)]
    assert len(model.requests) == 1


def test_dirty_ranges_widen_join_and_clip(fake):
    size = MiB + 4096  # the last block is short
    dirty_runs: Runs = [
        (0, 100, p.STATE_DIRTY),                    # block 0
        (100, 65536 - 100, 0),
        (65536, 512, 0b10),                         # reserved bit only: clean
        (66048, 131072 - 66048, 0),
        (131072 + 4096, 4096, p.STATE_DIRTY),       # block 2 ...
        (131072, 4096, 0),
        (131072 + 8192, 65536, p.STATE_DIRTY),      # ... joined with block 3
        (262144 - 57344, 57344, 0),
        (262144, 512 * 1024 - 262144, 0),
        (512 * 1024, 1, p.STATE_DIRTY | 0b10),       # one byte: block 8
        (512 * 1024 + 1, size - 4096 - 512 * 1024 - 1, 0),
        (size - 4096, 4096, p.STATE_DIRTY),         # tail, clipped to the export
    ]
    dirty_runs.sort()
    model = StatusModel({CONTEXT_ID: [(0, size, 0)], DIRTY_ID: dirty_runs}, {})

    def script(conn: Conn) -> None:
        conn.handshake(size=size, offer=BOTH)
        model.serve(conn)

    with fake(script).client(dirty_bitmap="bm0") as client:
        assert list(client.dirty_ranges(65536)) == [
            (0, 65536), (131072, 131072), (512 * 1024, 65536), (MiB, 4096)]
        # a window in the middle: clipped to what was asked
        assert list(client.dirty_ranges(65536, 50, 200 * 1024)) == [
            (50, 65536 - 50), (131072, 50 + 200 * 1024 - 131072)]
        # dirty bytes only outside the window do not count
        assert list(client.dirty_ranges(65536, 4096, 120 * 1024)) == []
        # a block size that joins everything in reach
        assert list(client.dirty_ranges(512 * 1024)) == [(0, MiB + 4096)]
        assert list(client.dirty_ranges(4096, size - 4096)) == [(size - 4096, 4096)]
        with pytest.raises(UsageError, match="outside the export"):
            client.dirty_ranges(4096, size - 4096, 4097)
        with pytest.raises(UsageError, match="block size must be positive"):
            client.dirty_ranges(0)
        assert list(client.dirty_ranges(4096, 100, 0)) == []


def test_contexts_answering_different_lengths_each_continue_on_their_own(fake):
    size = 4 * MiB
    base_runs: Runs = [(0, MiB, 0), (MiB, 3 * MiB, p.STATE_ZERO | p.STATE_HOLE)]
    dirty_runs: Runs = [(0, 3 * MiB, 0), (3 * MiB, 65536, p.STATE_DIRTY),
                        (3 * MiB + 65536, MiB - 65536, 0)]
    # base:allocation answers at most 1.5 MiB per chunk, the bitmap 2.5 MiB
    model = StatusModel({DIRTY_ID: dirty_runs, CONTEXT_ID: base_runs},
                        {CONTEXT_ID: 3 * MiB // 2, DIRTY_ID: 5 * MiB // 2})

    def script(conn: Conn) -> None:
        conn.handshake(size=size, offer=BOTH)
        model.serve(conn)

    with fake(script).client(dirty_bitmap="bm0") as client:
        assert list(client.dirty_ranges(65536)) == [(3 * MiB, 65536)]
        dirty_walk = [(r.offset, r.length) for r in model.requests]
        del model.requests[:]
        assert list(client.data_ranges(65536)) == [(0, MiB)]
        assert list(client.block_status()) == [
            Extent(0, MiB, 0), Extent(MiB, 3 * MiB, p.STATE_ZERO | p.STATE_HOLE)]
        base_walk = [(r.offset, r.length) for r in model.requests[:3]]
    assert dirty_walk == [(0, size), (5 * MiB // 2, size - 5 * MiB // 2)]
    assert base_walk == [(0, size), (3 * MiB // 2, size - 3 * MiB // 2),
                         (3 * MiB, MiB)]


def test_dirty_walk_over_a_disk_larger_than_4_gib(fake):
    size = 9 * GiB + 12 * 4096
    dirty_spots = [(5 * 4096, 4096), (3 * GiB - 4096, 8192), (8 * GiB + 65536, 3 * 4096),
                   (size - 4096, 4096)]
    dirty_runs: Runs = []
    pos = 0
    for start, length in dirty_spots:
        dirty_runs += [(pos, start - pos, 0), (start, length, p.STATE_DIRTY)]
        pos = start + length
    dirty_runs = [r for r in dirty_runs if r[1]]
    # the server also shortens every dirty chunk to 1 GiB + 4 KiB
    model = StatusModel({CONTEXT_ID: [(0, size, 0)], DIRTY_ID: dirty_runs},
                        {DIRTY_ID: GiB + 4096})

    def script(conn: Conn) -> None:
        conn.handshake(size=size, offer=BOTH, block_sizes=(512, 4096, 32 * MiB))
        model.serve(conn)

    with fake(script).client(dirty_bitmap="bm0") as client:
        got = list(client.dirty_ranges(65536))
    assert got == [(0, 65536), (3 * GiB - 65536, 131072), (8 * GiB + 65536, 65536),
                   (9 * GiB, 12 * 4096)]
    lengths = [r.length for r in model.requests]
    assert max(lengths) < 1 << 31
    assert all(r.offset % 512 == 0 and r.length % 512 == 0 for r in model.requests)
    # each request starts where the dirty chunk before it stopped
    for prev, nxt in zip(model.requests, model.requests[1:]):
        assert nxt.offset == prev.offset + min(prev.length, GiB + 4096)
    assert model.requests[-1].offset + model.requests[-1].length == size


def _dirty_status_against(fake, reply: Callable[[Conn, Request], None]) -> str:
    def script(conn: Conn) -> None:
        conn.handshake(size=MiB, offer=BOTH)
        req = conn.read_request()
        reply(conn, req)
        conn.wait_closed()

    client = fake(script).client(dirty_bitmap="bm0")
    with pytest.raises(ExportError) as info:
        list(client.dirty_ranges(65536))
    text = assert_one_line(info.value)
    with pytest.raises(ExportError, match="unusable"):
        client.read(0, 1)
    client.close()
    return text


def test_reply_without_the_dirty_chunk_is_a_protocol_error(fake):
    text = _dirty_status_against(
        fake, lambda c, r: c.status(r.cookie, [(r.length, 0)], context=CONTEXT_ID))
    assert "block-status reply without extents for qemu:dirty-bitmap:bm0" in text


def test_reply_without_the_allocation_chunk_is_a_protocol_error(fake):
    text = _dirty_status_against(
        fake, lambda c, r: c.status(r.cookie, [(r.length, 1)], context=DIRTY_ID))
    assert "block-status reply without extents for base:allocation" in text


def test_two_dirty_chunks_for_one_request_are_a_protocol_error(fake):
    def reply(conn: Conn, req: Request) -> None:
        conn.status(req.cookie, [(65536, 1)], context=DIRTY_ID, done=False)
        conn.status(req.cookie, [(req.length, 0)], context=CONTEXT_ID, done=False)
        conn.status(req.cookie, [(65536, 0)], context=DIRTY_ID)

    text = _dirty_status_against(fake, reply)
    assert "two block-status chunks for one context (qemu:dirty-bitmap:bm0)" in text


def test_chunk_for_an_unknown_context_is_a_protocol_error(fake):
    def reply(conn: Conn, req: Request) -> None:
        conn.status(req.cookie, [(req.length, 0)], context=CONTEXT_ID, done=False)
        conn.status(req.cookie, [(req.length, 1)], context=DIRTY_ID + 1)

    text = _dirty_status_against(fake, reply)
    assert f"block status for unknown metadata context {DIRTY_ID + 1}" in text


def test_dirty_chunk_longer_than_asked_is_a_protocol_error(fake):
    def reply(conn: Conn, req: Request) -> None:
        conn.status(req.cookie, [(req.length, 0)], context=CONTEXT_ID, done=False)
        conn.status(req.cookie, [(req.length, 1), (512, 0)], context=DIRTY_ID)

    text = _dirty_status_against(fake, reply)
    assert f"describes {MiB + 512} bytes for a request of {MiB} (qemu:dirty-bitmap:bm0)" in text


def test_error_reply_to_block_status_keeps_the_connection(fake):
    def script(conn: Conn) -> None:
        conn.handshake(size=MiB, offer=BOTH)
        req = conn.read_request()
        # one context answered, then the error: the missing chunk is no violation
        conn.status(req.cookie, [(req.length, 0)], context=CONTEXT_ID, done=False)
        conn.error(req.cookie, p.NBD_EIO, "bitmap read failed")
        StatusModel({CONTEXT_ID: [(0, MiB, 0)], DIRTY_ID: [(0, MiB, 1)]}, {}).serve(conn)

    with fake(script).client(dirty_bitmap="bm0") as client:
        with pytest.raises(ExportError, match="EIO.*bitmap read failed") as info:
            list(client.dirty_ranges(65536))
        assert info.value.errno == errno.EIO
        assert list(client.dirty_ranges(65536)) == [(0, MiB)]


def test_same_id_for_both_contexts_is_refused(fake):
    def script(conn: Conn) -> None:
        conn.handshake(offer={p.META_BASE_ALLOCATION: CONTEXT_ID, DIRTY: CONTEXT_ID})
        conn.wait_closed()

    with pytest.raises(ExportError, match="same metadata context id 7"):
        fake(script).client(dirty_bitmap="bm0")


def test_dirty_bitmap_without_allocation_asks_only_for_the_bitmap(fake):
    def script(conn: Conn) -> None:
        conn.handshake(offer=BOTH)
        seen.extend(conn.meta_queries)
        conn.wait_closed()

    seen: list[list[str]] = []
    server = fake(script)
    with server.client(block_status=False, dirty_bitmap="bm0") as client:
        assert client.can_dirty_status and not client.can_block_status
    server.finish()
    assert seen == [[DIRTY]]


def test_ack_with_payload_to_set_meta_context_is_refused(fake):
    def script(conn: Conn) -> None:
        conn.greeting()
        conn.read_option()
        conn.option_reply(p.OPT_STRUCTURED_REPLY, p.REP_ACK)
        conn.read_option()
        conn.option_reply(p.OPT_SET_META_CONTEXT, p.REP_ACK, b"junk")
        conn.wait_closed()

    with pytest.raises(ExportError, match="ACK to SET_META_CONTEXT carries data"):
        fake(script).client(dirty_bitmap="bm0")


def test_invalid_dirty_bitmap_name_is_a_usage_error():
    left, right = socket.socketpair()
    with left, right:
        for bad in ("", "x" * 4096):
            with pytest.raises(UsageError, match="invalid dirty bitmap name"):
                NbdClient(left, dirty_bitmap=bad)


# ---------------------------------------------------------------------------
# writing


def test_write_zeroes_flush_and_fast_zero_fallback(fake):
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


def test_write_zeroes_without_server_support_writes_zero_data(fake):
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


def test_write_many_splits_and_pipelines(fake):
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


def test_write_to_read_only_export_is_refused_before_sending(fake):
    def script(conn: Conn) -> None:
        conn.handshake(flags=p.TF_HAS_FLAGS | p.TF_READ_ONLY)
        conn.wait_closed()

    with fake(script).client() as client, pytest.raises(ExportError, match="read-only"):
        client.write(0, b"x" * 512)


def test_enospc_on_write_carries_the_errno(fake):
    def script(conn: Conn) -> None:
        conn.handshake()
        req = conn.read_request()
        conn.simple(req.cookie, p.NBD_ENOSPC)
        conn.wait_closed()

    with fake(script).client() as client, pytest.raises(ExportError) as info:
        client.write(0, b"x" * 4096)
    assert "ENOSPC" in assert_one_line(info.value)
    assert info.value.errno == errno.ENOSPC


def test_unaligned_write_is_a_usage_error(fake):
    def script(conn: Conn) -> None:
        conn.handshake(block_sizes=(512, 4096, MiB))
        conn.wait_closed()

    with fake(script).client() as client:
        with pytest.raises(UsageError, match="minimum block size 512"):
            client.write(100, b"x" * 512)


# ---------------------------------------------------------------------------
# hostile and broken servers


def _one_read_against(fake, reply: Callable[[Conn, Request], None], **options: object):
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


def test_bad_reply_magic(fake):
    text = _one_read_against(fake, lambda c, r: c.send(b"\xde\xad\xbe\xef" + bytes(12)))
    assert "bad reply magic 0xdeadbeef" in text


def test_reply_for_unknown_cookie(fake):
    text = _one_read_against(fake, lambda c, r: c.data(r.cookie + 1000, r.offset, b"x", True))
    assert f"unknown request cookie 0x{1000 + 1:x}" in text


def test_data_chunk_larger_than_asked(fake):
    def reply(conn: Conn, req: Request) -> None:
        conn.chunk(req.cookie, p.REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", req.offset),
                   done=True, length=8 + 0x7FFFFFF0)

    text = _one_read_against(fake, reply)
    assert "data chunk of 2147483632 bytes for a request of 8192" in text


def test_data_chunk_outside_the_request(fake):
    text = _one_read_against(fake, lambda c, r: c.data(r.cookie, r.offset + 8000, bytes(400)))
    assert "outside the request" in text


def test_hole_chunk_outside_the_request(fake):
    text = _one_read_against(fake, lambda c, r: c.hole(r.cookie, r.offset - 512, 1024, True))
    assert "hole chunk [3584, +1024) outside the request [4096, +8192)" in text


def test_overlapping_data_chunks(fake):
    def reply(conn: Conn, req: Request) -> None:
        conn.data(req.cookie, req.offset, bytes(req.length))
        conn.data(req.cookie, req.offset + 4096, bytes(512), True)

    assert "overlaps an earlier chunk" in _one_read_against(fake, reply)


def test_reply_done_before_all_data(fake):
    text = _one_read_against(fake, lambda c, r: c.data(r.cookie, r.offset, bytes(100), True))
    assert "read reply ended after 100 of 8192 bytes" in text


def test_simple_reply_to_read_after_structured_negotiation(fake):
    text = _one_read_against(fake, lambda c, r: c.simple(r.cookie, 0, bytes(r.length)))
    assert "simple reply to a read" in text


def test_oversized_error_chunk(fake):
    text = _one_read_against(fake, lambda c, r: c.chunk(
        r.cookie, p.REPLY_TYPE_ERROR, p.ERROR_HEAD.pack(5, 0), True, length=1 << 30))
    assert "error chunk of 1073741824 bytes" in text


def test_error_message_longer_than_chunk(fake):
    text = _one_read_against(fake, lambda c, r: c.chunk(
        r.cookie, p.REPLY_TYPE_ERROR, p.ERROR_HEAD.pack(5, 100) + b"short", True))
    assert "error message longer than its chunk" in text


def test_endless_error_chunks(fake):
    def reply(conn: Conn, req: Request) -> None:
        one = p.STRUCTURED_REPLY.pack(p.STRUCTURED_REPLY_MAGIC, 0, p.REPLY_TYPE_ERROR,
                                      req.cookie, 6) + p.ERROR_HEAD.pack(5, 0)
        conn.send(one * 5000)

    assert "endless error chunks" in _one_read_against(fake, reply)


def test_connection_dropped_mid_reply(fake):
    def reply(conn: Conn, req: Request) -> None:
        conn.send(p.STRUCTURED_REPLY.pack(p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE,
                                          p.REPLY_TYPE_OFFSET_DATA, req.cookie, 8 + req.length)
                  + struct.pack(">Q", req.offset) + bytes(1000))
        conn.sock.shutdown(socket.SHUT_WR)

    text = _one_read_against(fake, reply)
    assert "server closed the connection while receiving read data (1000 of 8192" in text


def test_read_times_out(fake):
    text = _one_read_against(fake, lambda c, r: None, timeout=0.2)
    assert "no answer within 0.2 s while waiting for a reply" in text


def test_server_error_on_read_maps_errno_and_keeps_connection(fake):
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


def test_eshutdown_refuses_further_requests(fake):
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


# ---------------------------------------------------------------------------
# addresses


def test_parse_nbd_uris():
    assert parse_nbd_uri("nbd+unix:///disk%200?socket=/run/x/nbd.sock") == NbdAddress(
        export_name="disk 0", socket_path="/run/x/nbd.sock")
    assert parse_nbd_uri("nbd://example.org:10810/vda") == NbdAddress(
        export_name="vda", host="example.org", port=10810)
    assert parse_nbd_uri("nbd://[::1]/") == NbdAddress(export_name="", host="::1")
    for bad in ("nbds://h/x", "nbd+unix:///x", "http://h/x", "nbd:///x", "nbd://h:99999/x"):
        with pytest.raises(UsageError):
            parse_nbd_uri(bad)


def test_address_uri_round_trips():
    for addr in (NbdAddress("a b", socket_path="/tmp/s s.sock"),
                 NbdAddress("vda", host="::1", port=1234)):
        assert parse_nbd_uri(addr.uri) == addr


def test_connect_to_unix_socket_path(tmp_path):
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


def test_connect_failure_is_an_export_error(tmp_path):
    with pytest.raises(ExportError, match="cannot connect to NBD server at unix:") as info:
        NbdClient.open_unix(tmp_path / "missing.sock", timeout=TIMEOUT)
    assert info.value.errno == errno.ENOENT
