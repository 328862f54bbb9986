"""Compressed pools on the real stack (FORMAT.md §15.1): a running domain backed up with
``compression="zstd"`` writes qcow2 volumes with zstd compressed clusters that stock
qemu-img reads, and every point restores bit-exact; the pool default applies to later
backups; ``list`` reports the stored size and the ratio.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict

import pytest
from domains import DiskModel

from vmsnapbackup.core.pool import Pool
from vmsnapbackup.errors import ExitCode

pytestmark = pytest.mark.integration

if not all(shutil.which(b) for b in ("qemu-storage-daemon", "qemu-img")):
    pytest.skip("needs qemu-storage-daemon and qemu-img", allow_module_level=True)

KiB = 1024
MiB = 1024 * KiB


def _read_image(path: Path, fmt: str) -> bytes:
    out = path.with_name(path.name + ".check.raw")
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(path), str(out)],
                   check=True, capture_output=True)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def _qemu_img_json(*args: str) -> Any:
    res = subprocess.run(["qemu-img", *args, "--output=json"], check=True,
                         capture_output=True, text=True)
    return json.loads(res.stdout)


def _compressed_clusters(volume: Path) -> int:
    """How many of the volume's own clusters are compressed (``qemu-img check``)."""
    res = subprocess.run(["qemu-img", "check", "--output=json", str(volume)],
                         capture_output=True, text=True)
    doc = json.loads(res.stdout)
    assert doc.get("corruptions", 0) == 0 and doc.get("leaks", 0) == 0, doc
    return int(doc.get("compressed-clusters", 0))


def test_compressed_pool_restores_every_point(running_domain, tmp_path: Path,  # type: ignore[no-untyped-def]
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from vmsnapbackup.cli import main
    from vmsnapbackup.workflows.backup import backup
    from vmsnapbackup.workflows.restore import restore
    from vmsnapbackup.workflows.verify import verify

    dom = running_domain
    pool = tmp_path / "pool"
    model = DiskModel(dom)
    expected: Dict[int, Dict[str, bytes]] = {}
    model.write("vda", 0, 2 * MiB, 0xAA)
    model.write("vdb", 1 * MiB, 64 * KiB, 0x11)
    model.write("vdb", 32 * MiB, 12 * KiB, 0x77)          # vdb's short last block
    first = backup(dom.name, pool, compression="zstd")
    expected[first.point] = model.snapshot()
    model.write("vda", 128 * KiB, 64 * KiB, 0xBB)
    model.zero("vda", 0, 64 * KiB)
    model.write("vdb", 4 * MiB + 512, 4 * KiB, 0x22)       # unaligned: a whole block differs
    expected[backup(dom.name, pool).point] = model.snapshot()   # the pool's default: zstd
    model.write("vda", 60 * MiB, 1 * MiB, 0xCC)
    model.zero("vdb", 1 * MiB, 64 * KiB)
    expected[backup(dom.name, pool).point] = model.snapshot()
    assert sorted(expected) == [1, 2, 3]

    the_pool = Pool.open(pool)
    assert the_pool.compression == "zstd", "the backup that created the pool recorded it"
    store = the_pool.domain(dom.uuid)
    for n in expected:
        m = store.read_manifest(n)
        for d in m.disks:
            assert d.compression == "zstd"
            volume = store.resolve(d.volume)
            assert d.volume_bytes == volume.stat().st_size
            info = _qemu_img_json("info", str(volume))
            assert info["format-specific"]["data"]["compression-type"] == "zstd", info
            if d.blocks.changed - d.blocks.zero > 0:
                assert _compressed_clusters(volume) > 0, f"point {n} {d.target}"
    # the 2 MiB of 0xAA in vda's base: 32 blocks, each a small compressed cluster
    base_vda = store.resolve(store.read_manifest(1).disks[0].volume)
    assert store.read_manifest(1).disks[0].target == "vda"
    assert _compressed_clusters(base_vda) >= 32
    assert base_vda.stat().st_size < 1 * MiB

    for n, disks in expected.items():
        for fmt in ("raw", "qcow2"):
            out = tmp_path / f"p{n}-{fmt}"
            result = restore(dom.name, pool, point=n, to=out, fmt=fmt)
            assert result.ok
            for d in result.disks:
                assert _read_image(Path(d.path), fmt) == disks[d.target], \
                    f"point {n} {d.target} ({fmt})"
            shutil.rmtree(out)
    report = verify(pool, domain=dom.name)
    assert report.ok, report

    assert main(["--pool", str(pool), "list", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    rows = {p["point"]: p for p in doc["points"]}
    assert rows[1]["compression"] == "zstd"
    assert rows[1]["volume_bytes"] > 0 and rows[1]["ratio"] < 0.5, rows[1]
    assert main(["--pool", str(pool), "list"]) == 0
    assert "RATIO" in capsys.readouterr().out

    # "none" overrides the pool's default for one backup
    model.write("vda", 8 * MiB, 64 * KiB, 0xDD)
    plain = backup(dom.name, pool, compression="none")
    d = store.read_manifest(plain.point).disks[0]
    assert d.compression is None
    assert _compressed_clusters(store.resolve(d.volume)) == 0


def test_compress_with_a_raw_base_is_refused_before_any_pool(running_domain, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                           capsys: pytest.CaptureFixture[str],
                                                           ) -> None:
    from vmsnapbackup.cli import main

    pool = tmp_path / "pool"
    rc = main(["--pool", str(pool), "backup", running_domain.name, "--compress", "zstd",
               "--base-format", "raw"])
    assert rc == ExitCode.USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "compress" in err[0]
    assert not pool.exists()


def test_mount_boot_and_prune_of_a_compressed_pool(running_domain, make_domain,  # type: ignore[no-untyped-def]
                                                   libvirt_conn, tmp_path: Path) -> None:
    """The other readers open compressed volumes unchanged: a pool created with the
    default ``zstd`` (so the plain ``backup()`` calls of test_access's two points
    compress), served by mount, booted, pruned, and the kept point restored exactly."""
    from test_access import Points, pool_state, qemu_io_read, read_all

    from vmsnapbackup.workflows.access import boot_point, discard_boot, mount_point
    from vmsnapbackup.workflows.prune import prune
    from vmsnapbackup.workflows.restore import restore

    pool = tmp_path / "pool"
    Pool.create(pool, compression="zstd")
    points = Points(running_domain, pool)
    for n in (1, 2):
        assert {d.compression for d in points.store.read_manifest(n).disks} == {"zstd"}
        for target in ("vda", "vdb"):
            with mount_point(points.dom.name, pool, n, target) as m:
                assert read_all(m.uri) == points.expected[n][target], (n, target)

    overlay_root = make_domain.scratch_dir("vsb-boot")
    name = f"{points.dom.name}-boot"
    before = pool_state(pool)
    boot_point(points.dom.name, pool, 2, name, overlay_dir=overlay_root)
    try:
        dom = libvirt_conn.lookupByName(name)
        assert qemu_io_read(dom, "virtio-disk0", 512 * 1024, 1 * MiB, 0x33).startswith(
            "read 1048576/1048576")
        assert qemu_io_read(dom, "virtio-disk1", 32 * MiB, 12 * 1024, 0x22).startswith(
            "read 12288/12288")
    finally:
        assert discard_boot(name, overlay_dir=overlay_root).domain_removed
    assert pool_state(pool) == before

    report = prune(points.dom.name, pool, keep_last=1)
    assert [p.number for p in report.removed] == [1]
    assert [p.number for p in points.store.points()] == [2]
    out = tmp_path / "restored"
    result = restore(points.dom.name, pool, point=2, to=out, fmt="raw")
    for d in result.disks:
        assert _read_image(Path(d.path), "raw") == points.expected[2][d.target]


def test_large_blocks_with_mixed_data_restore_bit_exact(make_domain, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """256 KiB blocks (so 256 KiB compressed clusters: more than NBD's usual 64 KiB
    minimum block size, which QEMU's compress filter announces) over a disk that mixes
    random clusters (stored uncompressed) and text-like ones (compressed), written by
    many requests in flight; then guest writes that cover a block partly, zero one and
    land next to an unchanged one: every point restores bit-exact."""
    import os
    import random

    from domains import DiskSpec

    from vmsnapbackup.adapters.nbdclient import NbdClient
    from vmsnapbackup.adapters.storagedaemon import StorageDaemon
    from vmsnapbackup.workflows.backup import backup
    from vmsnapbackup.workflows.restore import restore

    bs = 256 * KiB
    dom = make_domain(disks=[DiskSpec("vda", "qcow2", 16 * MiB)], start=False)
    model = DiskModel(dom)
    rng = random.Random(14)
    words = [f"{rng.randrange(10**6)}-word" for _ in range(500)]
    text = " ".join(rng.choice(words) for _ in range(600_000)).encode()
    data = bytearray()
    for k in range(20):     # 10 MiB in 512 KiB pieces, random and text alternating
        data += os.urandom(512 * KiB) if k % 2 else text[k * 512 * KiB:(k + 1) * 512 * KiB]
    with StorageDaemon(tag="t-fill") as daemon:
        export = daemon.open_writable(str(dom.disks["vda"]), "qcow2", name="fill")
        assert export.socket_path is not None
        with NbdClient.open_unix(export.socket_path, export.name) as client:
            client.write_many(((1 * MiB + pos, data[pos:pos + 512 * KiB])
                               for pos in range(0, len(data), 512 * KiB)), depth=16)
            client.flush()
        daemon.remove_export(export)
    model.disks["vda"][1 * MiB:1 * MiB + len(data)] = data
    dom.start()

    pool = tmp_path / "pool"
    expected: Dict[int, Dict[str, bytes]] = {}
    expected[backup(dom.name, pool, compression="zstd", block_size=bs).point] = model.snapshot()
    model.write("vda", 1 * MiB + 512 * KiB + 4 * KiB, 8 * KiB, 0x5A)   # part of a random block
    model.zero("vda", 2 * MiB, bs)                                     # a text block: zeros
    model.write("vda", 14 * MiB, 3 * bs, 0x33)                         # holes: new data
    expected[backup(dom.name, pool, block_size=bs).point] = model.snapshot()
    model.write("vda", 1 * MiB, 1 * MiB, 0x44)                         # over both kinds
    expected[backup(dom.name, pool, block_size=bs).point] = model.snapshot()

    store = Pool.open(pool).domain(dom.uuid)
    base = store.resolve(store.read_manifest(1).disks[0].volume)
    info = _qemu_img_json("info", str(base))
    assert info["cluster-size"] == bs, info
    check = json.loads(subprocess.run(["qemu-img", "check", "--output=json", str(base)],
                                      capture_output=True, text=True).stdout)
    # the text blocks compressed, the random ones stored as they are
    assert 0 < check["compressed-clusters"] < check["allocated-clusters"], check
    for n, disks in expected.items():
        out = tmp_path / f"p{n}"
        result = restore(dom.name, pool, point=n, to=out, fmt="raw")
        assert result.ok
        for d in result.disks:
            assert _read_image(Path(d.path), "raw") == disks[d.target], f"point {n}"
        shutil.rmtree(out)
