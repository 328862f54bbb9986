"""Block status (base:allocation) against a scripted server: extents, ranges, limits."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
from nbdfake import (
    Conn,
    MiB,
    Request,
    Starter,
    scripted_servers,
)

from vmsnapbackup.adapters import nbdproto as p
from vmsnapbackup.adapters.nbdclient import (
    Extent,
)
from vmsnapbackup.errors import ExportError


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



