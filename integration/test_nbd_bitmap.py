"""The NBD client's dirty-bitmap context against a real ``qemu-nbd``.

Images carry a persistent bitmap made with ``qemu-img bitmap``; writes made
after it by ``qemu-io`` are what the bitmap must show.  The server helpers
are integration/test_nbdclient.py's.
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from test_nbdclient import (
    GiB,
    KiB,
    MiB,
    Starter,
    _open,
    _run,
    _sparse_qcow2,
    _zero_runs,
    qemu_nbd_servers,
)

from vmsnapbackup.errors import UsageError

pytestmark = pytest.mark.integration


@pytest.fixture
def qemu_nbd(tmp_path: Path) -> Iterator[Starter]:
    yield from qemu_nbd_servers(tmp_path)


# ---------------------------------------------------------------------------
# dirty bitmap context


def _bitmapped_qcow2(path: Path, size: int, before: Sequence[tuple[int, int]],
                     after: Sequence[str], granularity: int) -> None:
    """A qcow2 with data written before persistent bitmap ``bm0`` exists, then ``after``.

    ``after`` are qemu-io commands; qemu-io opens the image read-write, so
    the enabled persistent bitmap records what they write.
    """
    _sparse_qcow2(path, size, [("data", offset, length) for offset, length in before])
    _run("qemu-img", "bitmap", "--add", "-g", str(granularity), "-f", "qcow2", str(path), "bm0")
    commands: list[str] = []
    for command in after:
        commands += ["-c", command]
    _run("qemu-io", "-f", "qcow2", *commands, str(path))
    info = json.loads(_run("qemu-img", "info", "--output=json", "-f", "qcow2", str(path)))
    bitmaps = info["format-specific"]["data"]["bitmaps"]
    # enabled ("auto") and cleanly stored (not "in-use"), with the granularity asked
    assert bitmaps == [{"name": "bm0", "granularity": granularity, "flags": ["auto"]}]


def _qemu_dirty_runs(socket_path: str, bitmap: str) -> list[tuple[int, int]]:
    """QEMU's own reading of the bitmap over NBD: dirty shows as ``"data": false``."""
    mapped = json.loads(_run(
        "qemu-img", "map", "--output=json", "--image-opts",
        f"driver=nbd,server.type=unix,server.path={socket_path},"
        f"x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}"))
    runs = _zero_runs([(e["start"], e["length"], not e["data"]) for e in mapped])
    return [(start, length) for start, length, dirty in runs if dirty]


def test_dirty_ranges_match_the_bitmap_and_data_ranges_still_work(
        tmp_path: Path, qemu_nbd: Starter) -> None:
    size = 48 * MiB + 192 * KiB  # not a multiple of the 1 MiB backup block below
    image = tmp_path / "dirty.qcow2"
    _bitmapped_qcow2(
        image, size,
        before=[(0, 256 * KiB), (10 * MiB, 2 * MiB), (size - 64 * KiB, 64 * KiB)],
        after=["write -P 0x5a 1M 64k",           # one 64 KiB block
               "write -P 0x5b 5124k 8k",         # inside a granule, not aligned to it
               "write -P 0x5c 11M 4k",           # over data written before the bitmap
               "write -z 20M 1M",                # zeroes are writes too
               f"write -P 0x5d {size - 4096} 4k"],  # the export's last bytes
        granularity=16 * KiB)
    server = qemu_nbd(image, "qcow2", extra=["--bitmap=bm0"])
    expected_granules = [(1 * MiB, 64 * KiB), (5 * MiB, 16 * KiB), (11 * MiB, 16 * KiB),
                         (20 * MiB, 1 * MiB), (size - 16 * KiB, 16 * KiB)]
    assert _qemu_dirty_runs(server.address, "bm0") == expected_granules
    with _open(server, dirty_bitmap="bm0") as client:
        assert client.can_dirty_status and client.can_block_status
        # at the bitmap's own granularity: exactly QEMU's answer
        assert list(client.dirty_ranges(16 * KiB)) == expected_granules
        # widened to 64 KiB blocks, neighbours joined
        assert list(client.dirty_ranges(64 * KiB)) == [
            (1 * MiB, 64 * KiB), (5 * MiB, 64 * KiB), (11 * MiB, 64 * KiB),
            (20 * MiB, 1 * MiB), (size - 64 * KiB, 64 * KiB)]
        # 1 MiB blocks: 1 MiB..; 5 MiB..; 11 MiB..; 20 MiB; the short last block
        assert list(client.dirty_ranges(MiB)) == [
            (1 * MiB, MiB), (5 * MiB, MiB), (11 * MiB, MiB), (20 * MiB, MiB),
            (48 * MiB, 192 * KiB)]
        # a window, walked in pieces, gives the same answer clipped
        assert list(client.dirty_ranges(64 * KiB, 5 * MiB + 100, 7 * MiB)) == [
            (5 * MiB + 100, 64 * KiB - 100), (11 * MiB, 64 * KiB)]
        # base:allocation on the same connection is unaffected by the second context
        with_bitmap = list(client.data_ranges(64 * KiB))
        extents = list(client.block_status())
    mapped = json.loads(_run("qemu-img", "map", "--output=json", "-f", "qcow2", "-U",
                             str(image)))
    expected = _zero_runs([(e["start"], e["length"], bool(e["zero"])) for e in mapped])
    assert _zero_runs([(e.offset, e.length, e.reads_as_zero) for e in extents]) == expected
    with _open(server) as plain:
        assert not plain.can_dirty_status
        assert list(plain.data_ranges(64 * KiB)) == with_bitmap
        with pytest.raises(UsageError, match="no dirty bitmap was asked for"):
            plain.dirty_ranges(64 * KiB)
    assert with_bitmap[0] == (0, 256 * KiB) and (20 * MiB, MiB) not in with_bitmap


def test_dirty_walk_of_a_disk_larger_than_4_gib(tmp_path: Path, qemu_nbd: Starter) -> None:
    size = 6 * GiB + 64 * KiB
    image = tmp_path / "big.qcow2"
    _bitmapped_qcow2(image, size, before=[(4 * GiB, MiB)],
                     after=["write -P 0x61 64k 64k", f"write -P 0x62 {4 * GiB + 512 * KiB} 4k",
                            f"write -P 0x63 {5 * GiB - 64 * KiB} 128k",
                            f"write -P 0x64 {size - 64 * KiB} 64k"],
                     granularity=64 * KiB)
    server = qemu_nbd(image, "qcow2", extra=["--bitmap=bm0"])
    expected = [(64 * KiB, 64 * KiB), (4 * GiB + 512 * KiB, 64 * KiB),
                (5 * GiB - 64 * KiB, 128 * KiB), (size - 64 * KiB, 64 * KiB)]
    assert _qemu_dirty_runs(server.address, "bm0") == expected
    with _open(server, dirty_bitmap="bm0") as client:
        assert list(client.dirty_ranges(64 * KiB)) == expected
        assert list(client.dirty_ranges(4 * MiB)) == [
            (0, 4 * MiB), (4 * GiB, 4 * MiB), (5 * GiB - 4 * MiB, 8 * MiB),
            (6 * GiB, 64 * KiB)]
        assert list(client.data_ranges(64 * KiB)) == [
            (64 * KiB, 64 * KiB), (4 * GiB, MiB), (5 * GiB - 64 * KiB, 128 * KiB),
            (size - 64 * KiB, 64 * KiB)]


def test_bitmap_the_export_does_not_carry_is_not_an_error(
        tmp_path: Path, qemu_nbd: Starter) -> None:
    image = tmp_path / "nobitmap.qcow2"
    _bitmapped_qcow2(image, 4 * MiB, before=[(0, 64 * KiB)], after=["write 1M 64k"],
                     granularity=64 * KiB)
    server = qemu_nbd(image, "qcow2", extra=["--bitmap=bm0"])
    with _open(server, dirty_bitmap="other") as client:
        assert client.can_block_status and not client.can_dirty_status
        with pytest.raises(UsageError, match="did not offer qemu:dirty-bitmap:other"):
            client.dirty_ranges(64 * KiB)
        assert list(client.data_ranges(64 * KiB)) == [(0, 64 * KiB), (1 * MiB, 64 * KiB)]
