"""The NBD client's handshake against a scripted server (see nbdfake.py)."""
from __future__ import annotations

import ssl
from collections.abc import Iterator

import pytest
from nbdfake import Conn, Disk, MiB, Starter, assert_one_line, pattern, scripted_servers

from vmsnapbackup.adapters import nbdproto as p
from vmsnapbackup.adapters.nbdclient import (
    BlockSizes,
    Extent,
)
from vmsnapbackup.errors import ExportError, UsageError


@pytest.fixture
def fake() -> Iterator[Starter]:
    yield from scripted_servers()


# ---------------------------------------------------------------------------
# handshake


def test_handshake_negotiates_export_info_and_block_sizes(fake: Starter) -> None:
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


def test_server_without_structured_replies_still_reads(fake: Starter) -> None:
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


def test_unknown_export_is_a_clean_error(fake: Starter) -> None:
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


def test_bad_greeting_magic(fake: Starter) -> None:
    def script(conn: Conn) -> None:
        conn.send(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        conn.wait_closed()

    with pytest.raises(ExportError, match="not an NBD server") as info:
        fake(script).client()
    assert_one_line(info.value)


def test_option_reply_too_large(fake: Starter) -> None:
    def script(conn: Conn) -> None:
        conn.greeting()
        option, _ = conn.read_option()
        conn.send(p.OPTION_REPLY.pack(p.OPTION_REPLY_MAGIC, option, p.REP_ACK, 0xFFFFFFF0))
        conn.wait_closed()

    with pytest.raises(ExportError, match=r"option reply too large \(4294967280 bytes\)"):
        fake(script).client()


def test_silent_server_during_handshake_times_out(fake: Starter) -> None:
    def script(conn: Conn) -> None:
        conn.greeting()
        conn.read_option()
        conn.wait_closed()  # never answers

    with pytest.raises(ExportError, match=r"no answer within 0.2 s"):
        fake(script).client(timeout=0.2)


# ---------------------------------------------------------------------------
# STARTTLS (the TLS session itself is proven against QEMU: integration/test_nbd_tls.py)


def _tls_options() -> dict[str, object]:
    return {"tls": ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), "tls_hostname": "localhost"}


@pytest.mark.parametrize("refusal", [p.REP_ERR_POLICY, p.REP_ERR_UNSUP])
def test_a_refused_starttls_never_falls_back_to_plain_text(fake: Starter, refusal: int) -> None:
    seen: list[int] = []

    def script(conn: Conn) -> None:
        conn.greeting()
        option, _ = conn.read_option()
        seen.append(option)
        conn.option_reply(option, refusal, b"TLS not configured")
        conn.wait_closed()

    server = fake(script)
    with pytest.raises(ExportError, match=r"server refused TLS \(.*TLS not configured\); "
                                          r"refusing to continue in plain text") as info:
        server.client(**_tls_options())
    assert_one_line(info.value)
    server.finish()
    assert seen == [p.OPT_STARTTLS]  # asked first, and nothing after the refusal


def test_starttls_needs_fixed_newstyle(fake: Starter) -> None:
    def script(conn: Conn) -> None:
        conn.greeting(hflags=p.FLAG_NO_ZEROES)
        conn.wait_closed()

    with pytest.raises(ExportError, match="cannot negotiate TLS"):
        fake(script).client(**_tls_options())


@pytest.mark.parametrize("structured", [True, False])
def test_a_server_that_requires_tls_says_so(fake: Starter, structured: bool) -> None:
    # QEMU answers NBD_REP_ERR_TLS_REQD to every option but STARTTLS
    def script(conn: Conn) -> None:
        conn.greeting()
        while True:
            option, _ = conn.read_option()
            conn.option_reply(option, p.REP_ERR_TLS_REQD, b"Option 0x8 not permitted before TLS")

    with pytest.raises(ExportError, match="server requires TLS: connect with a TLS "
                                          "certificate directory") as info:
        fake(script).client(structured_replies=structured)
    assert_one_line(info.value)


def test_tls_without_a_server_name_is_a_usage_error(fake: Starter) -> None:
    server = fake(lambda conn: conn.wait_closed())
    with pytest.raises(UsageError, match="server's name"):
        server.client(tls=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
