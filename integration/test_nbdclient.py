"""The NBD client against a real ``qemu-nbd``.

Every test starts its own qemu-nbd on a unix socket in tmp_path (one on
TCP), and the fixture's finaliser always stops it.  Expected values come from
the image files themselves and from ``qemu-img map`` / ``qemu-img compare``,
never from the client under test.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Callable

import pytest
from tenacity import retry, retry_if_result, stop_after_delay, wait_fixed

from vmsnapbackup.adapters.nbdclient import (
    EXTENT_DATA,
    NbdClient,
    parse_nbd_uri,
)
from vmsnapbackup.errors import ExportError, UsageError

pytestmark = pytest.mark.integration

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

if shutil.which("qemu-nbd") is None or shutil.which("qemu-img") is None:  # pragma: no cover
    pytest.skip("qemu-nbd and qemu-img are needed", allow_module_level=True)


# ---------------------------------------------------------------------------
# helpers


class QemuNbd:
    """A qemu-nbd process serving one image; ``address`` is what clients dial."""

    def __init__(self, proc: subprocess.Popen[bytes], address: str, log: Path) -> None:
        self.proc = proc
        self.address = address
        self.log = log

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _wait_until(ready: Callable[[], bool], seconds: float = 10.0) -> bool:
    @retry(retry=retry_if_result(lambda ok: not ok), stop=stop_after_delay(seconds),
           wait=wait_fixed(0.02), retry_error_callback=lambda state: False)
    def poll() -> bool:
        return ready()

    return poll()


def _tcp_ready(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


Starter = Callable[..., QemuNbd]


@pytest.fixture
def qemu_nbd(tmp_path: Path) -> Iterator[Starter]:
    yield from qemu_nbd_servers(tmp_path)


def qemu_nbd_servers(tmp_path: Path) -> Iterator[Starter]:
    """Start qemu-nbd on an image; every server started is stopped at teardown."""
    started: list[QemuNbd] = []

    def start(image: Path, fmt: str, *, read_only: bool = True, name: str | None = None,
              tcp: bool = False, extra: Sequence[str] = ()) -> QemuNbd:
        index = len(started)
        log = tmp_path / f"qemu-nbd-{index}.log"
        args = ["qemu-nbd", f"--format={fmt}", "--persistent", "--shared=4"]
        if tcp:
            port = _free_port()
            args += ["--bind=127.0.0.1", f"--port={port}"]
            address = f"nbd://127.0.0.1:{port}/{name or ''}"
        else:
            sock = tmp_path / f"nbd-{index}.sock"
            args.append(f"--socket={sock}")
            address = str(sock)
        if read_only:
            args.append("--read-only")
        if name is not None:
            args.append(f"--export-name={name}")
        args += [*extra, str(image)]
        with open(log, "wb") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        server = QemuNbd(proc, address, log)
        started.append(server)

        def ready() -> bool:
            return _tcp_ready(port) if tcp else Path(address).exists()

        if not _wait_until(lambda: proc.poll() is not None or ready()) or proc.poll() is not None:
            pytest.fail(f"qemu-nbd did not start: {log.read_text(errors='replace')}")
        return server

    yield start
    for server in started:
        server.stop()


def _run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def _open(server: QemuNbd, *, timeout: float = 10.0, depth: int = 4,
          dirty_bitmap: str | None = None) -> NbdClient:
    if "://" in server.address:
        return NbdClient.open_uri(server.address, timeout=timeout, depth=depth,
                                  dirty_bitmap=dirty_bitmap)
    return NbdClient.open_unix(server.address, timeout=timeout, depth=depth,
                               dirty_bitmap=dirty_bitmap)


def _random_bytes(rng: random.Random, n: int) -> bytes:
    return rng.getrandbits(8 * n).to_bytes(n, "little") if n else b""


def _sparse_qcow2(path: Path, size: int, writes: Sequence[tuple[str, int, int]]) -> None:
    """A qcow2 with data and zero writes applied through qemu-io."""
    _run("qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size))
    commands: list[str] = []
    for kind, offset, length in writes:
        if kind == "data":
            commands += ["-c", f"write -P 0x{(offset // 4096) % 251 + 1:02x} {offset} {length}"]
        elif kind == "zero":
            commands += ["-c", f"write -z {offset} {length}"]
        else:
            commands += ["-c", f"discard {offset} {length}"]
    _run("qemu-io", "-f", "qcow2", *commands, str(path))


def _zero_runs(entries: Sequence[tuple[int, int, bool]]) -> list[tuple[int, int, bool]]:
    """Merge (start, length, reads_as_zero) into maximal runs."""
    runs: list[tuple[int, int, bool]] = []
    for start, length, zero in entries:
        if runs and runs[-1][2] == zero and runs[-1][0] + runs[-1][1] == start:
            runs[-1] = (runs[-1][0], runs[-1][1] + length, zero)
        else:
            runs.append((start, length, zero))
    return runs


# ---------------------------------------------------------------------------
# reading


def test_reads_known_bytes_at_unaligned_offsets_and_disk_end(
        tmp_path: Path, qemu_nbd: Starter) -> None:
    size = 5 * MiB + 1536  # a multiple of 512, not of 64 KiB
    rng = random.Random(1)
    content = _random_bytes(rng, size)
    image = tmp_path / "disk.raw"
    image.write_bytes(content)
    server = qemu_nbd(image, "raw")
    with _open(server) as client:
        assert client.size == size
        assert client.read_only and client.structured_replies and client.can_block_status
        for offset, length in [(0, 1), (1, 4095), (511, 513), (65535, 65537), (1234567, 3 * MiB),
                               (size - 1, 1), (size - 70000, 70000), (size - 1536, 1536),
                               (3 * MiB + 17, 0)]:
            assert client.read(offset, length) == content[offset:offset + length], (offset,
                                                                                      length)
        whole = bytearray(size)
        client.read_into(0, whole)
        assert whole == content
        with pytest.raises(UsageError, match="outside the export"):
            client.read(size - 100, 101)
        # the connection is still fine after a refused call
        assert client.read(size - 100, 100) == content[-100:]


def test_extents_match_qemu_img_map(tmp_path: Path, qemu_nbd: Starter) -> None:
    size = 64 * MiB + 192 * KiB
    image = tmp_path / "sparse.qcow2"
    _sparse_qcow2(image, size, [
        ("data", 0, 64 * KiB),
        ("data", 1 * MiB + 4 * KiB, 200 * KiB),
        ("zero", 3 * MiB, 1 * MiB),
        ("data", 10 * MiB, 5 * MiB),
        ("zero", 12 * MiB, 128 * KiB),
        ("data", 40 * MiB, 64 * KiB),
        ("discard", 40 * MiB, 64 * KiB),
        ("data", size - 64 * KiB, 64 * KiB),
    ])
    mapped = json.loads(_run("qemu-img", "map", "--output=json", "-f", "qcow2", str(image)))
    expected = _zero_runs([(e["start"], e["length"], bool(e["zero"])) for e in mapped])
    server = qemu_nbd(image, "qcow2")
    with _open(server) as client:
        extents = list(client.block_status())
        # one extent may be asked for in pieces of any size: compare merged runs
        got = _zero_runs([(e.offset, e.length, e.reads_as_zero) for e in extents])
        assert got == expected
        assert sum(e.length for e in extents) == size
        # walking in small pieces gives the same answer
        pieces = []
        for start in range(0, size, 7 * MiB):
            pieces += list(client.block_status(start, min(7 * MiB, size - start)))
        assert _zero_runs([(e.offset, e.length, e.reads_as_zero) for e in pieces]) == expected
        # what data_ranges leaves out reads as zeroes, what it keeps has the data
        ranges = list(client.data_ranges(64 * KiB))
        assert ranges[0] == (0, 64 * KiB) and ranges[-1] == (size - 64 * KiB, 64 * KiB)
        covered = sum(length for _, length in ranges)
        data_bytes = sum(e.length for e in extents if e.kind == EXTENT_DATA)
        assert data_bytes <= covered < data_bytes + 2 * 64 * KiB * len(ranges)
        pos = 0
        for start, length in ranges + [(size, 0)]:
            if start > pos:
                assert client.read(pos, start - pos) == bytes(start - pos)
            pos = start + length


def test_pipelined_reads_return_the_same_bytes_as_single_reads(
        tmp_path: Path, qemu_nbd: Starter) -> None:
    size = 24 * MiB
    rng = random.Random(7)
    writes = [("data", rng.randrange(0, size // 4096 - 64) * 4096, rng.randrange(1, 64) * 4096)
              for _ in range(40)]
    image = tmp_path / "mixed.qcow2"
    _sparse_qcow2(image, size, writes)
    raw = tmp_path / "mixed.raw"
    _run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(raw))
    content = raw.read_bytes()
    server = qemu_nbd(image, "qcow2")
    with _open(server, depth=8) as client:
        single = hashlib.sha256()
        for offset in range(0, size, 1 * MiB):
            single.update(client.read(offset, 1 * MiB))
        assert single.digest() == hashlib.sha256(content).digest()

        chunked = hashlib.sha256()
        expected_offset = 0
        for offset, view in client.read_chunks([(0, size)], chunk_size=256 * KiB):
            assert offset == expected_offset
            chunked.update(view)
            expected_offset += len(view)
        assert chunked.digest() == single.digest()

        ring = [bytearray(3 * MiB + 4096) for _ in range(4)]  # odd size: unaligned pieces
        requests = [(off, ring[i % 4]) for i, off in enumerate(range(0, size - 3 * MiB,
                                                                     2 * MiB + 512))]
        for offset, view in client.read_many(iter(requests), depth=4):
            assert bytes(view) == content[offset:offset + len(view)]

        # only the data ranges, the way the backup reads
        for offset, view in client.read_chunks(client.data_ranges(64 * KiB), chunk_size=MiB):
            assert bytes(view) == content[offset:offset + len(view)]


def test_tcp_uri_and_named_export(tmp_path: Path, qemu_nbd: Starter) -> None:
    image = tmp_path / "small.raw"
    content = _random_bytes(random.Random(3), 1 * MiB)
    image.write_bytes(content)
    server = qemu_nbd(image, "raw", name="vda", tcp=True)
    assert server.address.startswith("nbd://127.0.0.1:")
    with NbdClient.open_uri(server.address, timeout=10.0) as client:
        assert client.export_name == "vda"
        assert client.read(12345, 6789) == content[12345:12345 + 6789]
    with pytest.raises(ExportError, match="cannot open export 'nope'") as info:
        address = parse_nbd_uri(server.address)
        assert address.host is not None
        NbdClient.connect_tcp(address.host, address.port, "nope", timeout=10.0)
    assert "\n" not in str(info.value)


def test_read_only_export_offers_multi_conn_and_refuses_writes(
        tmp_path: Path, qemu_nbd: Starter) -> None:
    image = tmp_path / "ro.raw"
    image.write_bytes(bytes(1 * MiB))
    server = qemu_nbd(image, "raw")
    with _open(server) as client:
        assert client.read_only
        assert client.can_multi_conn  # qemu-nbd offers it on read-only exports
        with pytest.raises(ExportError, match="read-only"):
            client.write(0, b"x" * 4096)


# ---------------------------------------------------------------------------
# writing


def test_writes_and_zeroes_into_qcow2_match_expected_raw(tmp_path: Path, qemu_nbd: Starter) -> None:
    size = 41 * MiB + 4096
    rng = random.Random(11)
    base = tmp_path / "base.raw"
    base_bytes = _random_bytes(rng, size)
    base.write_bytes(base_bytes)
    image = tmp_path / "target.qcow2"
    _run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(base), str(image))
    expected = bytearray(base_bytes)
    server = qemu_nbd(image, "qcow2", read_only=False)
    with _open(server) as client:
        assert not client.read_only and client.can_write_zeroes and client.can_flush
        # single writes, one larger than the largest request, one at the very end
        for offset, length in [(0, 4096), (777, 1000), (2 * MiB, 34 * MiB),
                               (size - 4096, 4096)]:
            data = _random_bytes(rng, length)
            client.write(offset, data, fua=True)
            expected[offset:offset + length] = data
        # pipelined writes from one reused buffer
        buf = bytearray(64 * KiB)

        def items() -> Iterator[tuple[int, bytearray]]:
            for offset in range(37 * MiB, 39 * MiB, 128 * KiB):
                buf[:] = _random_bytes(rng, len(buf))
                expected[offset:offset + len(buf)] = buf
                yield offset, buf

        client.write_many(items(), depth=4)
        # zeroes: over data, unaligned, whole clusters (fast when offered)
        for offset, length, fast in [(100, 5000, False), (2 * MiB, 1 * MiB, True),
                                     (3 * MiB + 512, 2 * MiB, True), (size - 65536, 65536, False)]:
            client.write_zeroes(offset, length, fast=fast)
            expected[offset:offset + length] = bytes(length)
        client.flush()
        assert client.read(0, size) == expected
    server.stop()
    want = tmp_path / "expected.raw"
    want.write_bytes(expected)
    result = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(want),
                             str(image)], check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_fast_zero_on_qcow2_clusters(tmp_path: Path, qemu_nbd: Starter) -> None:
    image = tmp_path / "fz.qcow2"
    _sparse_qcow2(image, 4 * MiB, [("data", 0, 4 * MiB)])
    server = qemu_nbd(image, "qcow2", read_only=False)
    with _open(server) as client:
        done = client.try_fast_zero(1 * MiB, 1 * MiB)
        if client.can_fast_zero:
            assert done
            assert client.read(1 * MiB, 1 * MiB) == bytes(1 * MiB)
        else:
            assert not done
        assert client.read(0, 4096) == bytes([0x01]) * 4096
        client.flush()
    server.stop()
    mapped = json.loads(_run("qemu-img", "map", "--output=json", "-f", "qcow2", str(image)))
    zero = [(e["start"], e["length"]) for e in mapped if e["zero"]]
    if done:
        assert (1 * MiB, 1 * MiB) in zero


def test_server_going_away_is_a_clean_error(tmp_path: Path, qemu_nbd: Starter) -> None:
    image = tmp_path / "gone.raw"
    image.write_bytes(bytes(4 * MiB))
    server = qemu_nbd(image, "raw")
    client = _open(server, timeout=5.0)
    try:
        assert client.read(0, 4096) == bytes(4096)
        server.stop()
        with pytest.raises(ExportError) as info:
            client.read(0, 4096)
        assert "\n" not in str(info.value)
    finally:
        client.close()
    assert os.path.exists(image)
