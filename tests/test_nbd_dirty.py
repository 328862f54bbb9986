"""QEMU's dirty-bitmap metadata context against a scripted server: negotiation and walks."""
from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from typing import Callable

import pytest
from nbdfake import (
    BOTH,
    CONTEXT_ID,
    DIRTY,
    DIRTY_ID,
    Conn,
    GiB,
    MiB,
    Request,
    Runs,
    Starter,
    StatusModel,
    assert_one_line,
    scripted_servers,
)

from vmsnapbackup.adapters import nbdproto as p
from vmsnapbackup.adapters.nbdclient import (
    Extent,
    NbdClient,
)
from vmsnapbackup.errors import ExportError, UsageError


@pytest.fixture
def fake() -> Iterator[Starter]:
    yield from scripted_servers()


# block status


def test_block_status_parses_merges_and_continues(fake: Starter) -> None:
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


def test_data_ranges_round_to_blocks_and_skip_zeroes(fake: Starter) -> None:
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


def test_block_status_longer_than_asked_is_rejected(fake: Starter) -> None:
    def script(conn: Conn) -> None:
        conn.handshake(size=65536)
        req = conn.read_request()
        conn.status(req.cookie, [(65536, 0), (512, 0)])
        conn.wait_closed()

    with fake(script).client() as client, pytest.raises(
            ExportError, match="block status describes 66048 bytes for a request of 65536"):
        list(client.block_status())


def test_block_status_for_unknown_context_is_rejected(fake: Starter) -> None:
    def script(conn: Conn) -> None:
        conn.handshake(size=65536)
        req = conn.read_request()
        conn.status(req.cookie, [(65536, 0)], context=99)
        conn.wait_closed()

    with fake(script).client() as client, pytest.raises(
            ExportError, match="unknown metadata context 99"):
        list(client.block_status())


# ---------------------------------------------------------------------------
# dirty bitmap context


def test_dirty_bitmap_asks_for_both_contexts_in_one_option(fake: Starter) -> None:
    def script(conn: Conn) -> None:
        conn.handshake(offer=BOTH)
        seen.extend(conn.meta_queries)
        seen.append([o for o, _ in conn.options])
        conn.wait_closed()

    seen: list[list[str] | list[int]] = []
    server = fake(script)
    with server.client(dirty_bitmap="bm0") as client:
        assert client.can_block_status and client.can_dirty_status
        assert client.dirty_bitmap == "bm0"
    server.finish()
    assert seen == [[p.META_BASE_ALLOCATION, "qemu:dirty-bitmap:bm0"],
                    [p.OPT_STRUCTURED_REPLY, p.OPT_SET_META_CONTEXT, p.OPT_GO]]


def test_without_dirty_bitmap_only_base_allocation_is_asked(fake: Starter) -> None:
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


def test_server_without_the_bitmap_selects_only_base_allocation(fake: Starter) -> None:
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


def test_server_selecting_only_the_dirty_context(fake: Starter) -> None:
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


def test_dirty_ranges_widen_join_and_clip(fake: Starter) -> None:
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


def test_contexts_answering_different_lengths_each_continue_on_their_own(fake: Starter) -> None:
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


def test_dirty_walk_over_a_disk_larger_than_4_gib(fake: Starter) -> None:
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


def _dirty_status_against(fake: Starter, reply: Callable[[Conn, Request], None]) -> str:
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


def test_reply_without_the_dirty_chunk_is_a_protocol_error(fake: Starter) -> None:
    text = _dirty_status_against(
        fake, lambda c, r: c.status(r.cookie, [(r.length, 0)], context=CONTEXT_ID))
    assert "block-status reply without extents for qemu:dirty-bitmap:bm0" in text


def test_reply_without_the_allocation_chunk_is_a_protocol_error(fake: Starter) -> None:
    text = _dirty_status_against(
        fake, lambda c, r: c.status(r.cookie, [(r.length, 1)], context=DIRTY_ID))
    assert "block-status reply without extents for base:allocation" in text


def test_two_dirty_chunks_for_one_request_are_a_protocol_error(fake: Starter) -> None:
    def reply(conn: Conn, req: Request) -> None:
        conn.status(req.cookie, [(65536, 1)], context=DIRTY_ID, done=False)
        conn.status(req.cookie, [(req.length, 0)], context=CONTEXT_ID, done=False)
        conn.status(req.cookie, [(65536, 0)], context=DIRTY_ID)

    text = _dirty_status_against(fake, reply)
    assert "two block-status chunks for one context (qemu:dirty-bitmap:bm0)" in text


def test_chunk_for_an_unknown_context_is_a_protocol_error(fake: Starter) -> None:
    def reply(conn: Conn, req: Request) -> None:
        conn.status(req.cookie, [(req.length, 0)], context=CONTEXT_ID, done=False)
        conn.status(req.cookie, [(req.length, 1)], context=DIRTY_ID + 1)

    text = _dirty_status_against(fake, reply)
    assert f"block status for unknown metadata context {DIRTY_ID + 1}" in text


def test_dirty_chunk_longer_than_asked_is_a_protocol_error(fake: Starter) -> None:
    def reply(conn: Conn, req: Request) -> None:
        conn.status(req.cookie, [(req.length, 0)], context=CONTEXT_ID, done=False)
        conn.status(req.cookie, [(req.length, 1), (512, 0)], context=DIRTY_ID)

    text = _dirty_status_against(fake, reply)
    assert f"describes {MiB + 512} bytes for a request of {MiB} (qemu:dirty-bitmap:bm0)" in text


def test_error_reply_to_block_status_keeps_the_connection(fake: Starter) -> None:
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


def test_same_id_for_both_contexts_is_refused(fake: Starter) -> None:
    def script(conn: Conn) -> None:
        conn.handshake(offer={p.META_BASE_ALLOCATION: CONTEXT_ID, DIRTY: CONTEXT_ID})
        conn.wait_closed()

    with pytest.raises(ExportError, match="same metadata context id 7"):
        fake(script).client(dirty_bitmap="bm0")


def test_dirty_bitmap_without_allocation_asks_only_for_the_bitmap(fake: Starter) -> None:
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


def test_ack_with_payload_to_set_meta_context_is_refused(fake: Starter) -> None:
    def script(conn: Conn) -> None:
        conn.greeting()
        conn.read_option()
        conn.option_reply(p.OPT_STRUCTURED_REPLY, p.REP_ACK)
        conn.read_option()
        conn.option_reply(p.OPT_SET_META_CONTEXT, p.REP_ACK, b"junk")
        conn.wait_closed()

    with pytest.raises(ExportError, match="ACK to SET_META_CONTEXT carries data"):
        fake(script).client(dirty_bitmap="bm0")


def test_invalid_dirty_bitmap_name_is_a_usage_error() -> None:
    left, right = socket.socketpair()
    with left, right:
        for bad in ("", "x" * 4096):
            with pytest.raises(UsageError, match="invalid dirty bitmap name"):
                NbdClient(left, dirty_bitmap=bad)
