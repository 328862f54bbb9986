"""A scripted NBD server on a socketpair, for the client's unit tests.

The scripted server exists for the failure paths a real qemu-nbd never takes
(bad magic, replies for unknown requests, oversized or overlapping chunks,
silence, a server that drips), and for exact control of reply order and chunk
shapes.  The same client against a real server: integration/test_nbdclient.py
and integration/test_nbd_tls.py.
"""
from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from typing import Callable

from vmsnapbackup.adapters import nbdproto as p
from vmsnapbackup.adapters.nbdclient import NbdClient
from vmsnapbackup.errors import ExportError

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
        except BaseException as exc:  # noqa: BLE001 (re-raised by scripted_servers)
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


Script = Callable[[Conn], None]
Starter = Callable[[Script], Fake]


def scripted_servers() -> Iterator[Starter]:
    """The body of each test module's ``fake`` fixture: start scripted servers.

    Every server started is stopped afterwards, and a failure inside a script
    (an assertion about what the client sent) fails the test.
    """
    made: list[Fake] = []

    def start(script: Script) -> Fake:
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
