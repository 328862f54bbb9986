"""Encrypted pools on the real stack (FORMAT.md §15.2): a running domain backed up with
``--encrypt --key-file`` writes LUKS qcow2 volumes and sealed tables and XML; every
point restores bit-exact with the key; a block the guest wrote, and its XXH3 value,
appear in no file of the pool; without the key or with another one every reader
refuses with one line and writes nothing; stock qemu-img opens a point with the key.
"""
from __future__ import annotations

import json
import os
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
BLOCK = 64 * KiB          # the default block size: the marker fills one block exactly
MARKER = 0x5A             # the guest's marker: a whole block of this byte
MARKER_AT = 5 * MiB


def _key(path: Path, text: bytes) -> Path:
    path.write_bytes(text)
    path.chmod(0o600)
    return path


def _all_files(root: Path) -> list[Path]:
    return [Path(d) / f for d, _dirs, files in os.walk(root) for f in files]


def _stock_read(point: Path, key: Path) -> bytes:
    """A point read with stock qemu-img and the key, as docs/FORMAT.md §15.3 shows."""
    out = point.with_name(point.name + ".stock.raw")
    opts = ("driver=qcow2,file.filename=" + str(point) + ",encrypt.key-secret=k0")
    if "point-" in point.name:
        opts += ",backing.encrypt.key-secret=k0"
    subprocess.run(["qemu-img", "convert", "--object", f"secret,id=k0,file={key}",
                    "--image-opts", opts, "-O", "raw", str(out)],
                   check=True, capture_output=True)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def _plain_qcow2(path: Path) -> bytes:
    out = path.with_name(path.name + ".raw")
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(path), str(out)],
                   check=True, capture_output=True)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def _qemu_img_info(volume: Path) -> Any:
    res = subprocess.run(["qemu-img", "info", "--output=json", str(volume)], check=True,
                         capture_output=True, text=True)
    return json.loads(res.stdout)


def test_encrypted_pool_end_to_end(running_domain, tmp_path: Path,  # type: ignore[no-untyped-def]
                                   capsys: pytest.CaptureFixture[str]) -> None:
    from vmsnapbackup.cli import main
    from vmsnapbackup.core.checktable import hash_blocks
    from vmsnapbackup.core.poolkey import read_check
    from vmsnapbackup.workflows.backup import backup
    from vmsnapbackup.workflows.pointread import open_pool
    from vmsnapbackup.workflows.restore import restore
    from vmsnapbackup.workflows.verify import verify

    dom = running_domain
    pool = tmp_path / "pool"
    key = _key(tmp_path / "pool.key", b"correct horse battery staple, pool key 0001\n")
    wrong = _key(tmp_path / "other.key", b"another key file of at least 32 bytes, 0002\n")
    model = DiskModel(dom)
    expected: Dict[int, Dict[str, bytes]] = {}
    model.write("vda", MARKER_AT, BLOCK, MARKER)
    model.write("vdb", 1 * MiB, 64 * KiB, 0x11)
    model.write("vdb", 32 * MiB, 12 * KiB, 0x77)          # vdb's short last block
    first = backup(dom.name, pool, encrypt=True, key_file=str(key))
    expected[first.point] = model.snapshot()
    model.write("vda", 128 * KiB, 64 * KiB, 0xBB)
    model.zero("vdb", 1 * MiB, 64 * KiB)
    model.write("vdb", 4 * MiB + 512, 4 * KiB, MARKER)     # the marker in a point volume too
    # an encrypted pool encrypts every backup; --encrypt need not be repeated
    expected[backup(dom.name, pool, key_file=str(key)).point] = model.snapshot()
    model.write("vda", 60 * MiB, 1 * MiB, 0xCC)
    expected[backup(dom.name, pool, encrypt=True, key_file=str(key)).point] = model.snapshot()
    assert sorted(expected) == [1, 2, 3]

    # the header: version 3, salt and key id, no key
    header = json.loads((pool / "vmsnapbackup-pool.json").read_bytes())
    assert header["version"] == 3 and header["encryption"]["volumes"] == "qcow2-luks-aes-256-xts"
    assert key.read_bytes().strip() not in (pool / "vmsnapbackup-pool.json").read_bytes()

    the_pool = open_pool(pool, key_file=str(key))
    store = the_pool.domain(dom.uuid)
    for n in expected:
        m = store.read_manifest(n)
        assert m.version == 3 and m.domain.xml == "" and m.domain.xml_sealed
        for d in m.disks:
            info = _qemu_img_info(store.resolve(d.volume))
            assert info["encrypted"] is True, info
            enc = info["format-specific"]["data"]["encrypt"]
            assert enc["format"] == "luks" and enc["cipher-alg"] == "aes-256", enc
            assert enc["cipher-mode"] == "xts", enc

    # the marker block and its XXH3 value: in the plain table (proof the search
    # would find them), in no file of the pool
    vda1 = store.read_manifest(1).disk("vda")
    table1 = read_check(store, store.resolve(vda1.table))
    value = hash_blocks(bytes([MARKER]) * BLOCK, BLOCK, MARKER_AT // BLOCK).values[0]
    assert table1.value(MARKER_AT // BLOCK) == bytes(value)
    needles = [bytes([MARKER]) * 256, bytes(value), bytes(value)[::-1], b"<domain"]
    files = _all_files(pool)
    assert len(files) >= 10
    for path in files:
        data = path.read_bytes()
        for needle in needles:
            assert needle not in data, f"{needle[:16]!r} found in {path}"

    # every point restores bit-exact with the key, raw and qcow2
    for n, disks in expected.items():
        for fmt in ("raw", "qcow2"):
            out = tmp_path / f"p{n}-{fmt}"
            result = restore(dom.name, pool, point=n, to=out, fmt=fmt, key_file=str(key))
            assert result.ok
            for d in result.disks:
                got = Path(d.path).read_bytes() if fmt == "raw" else _plain_qcow2(Path(d.path))
                assert got == disks[d.target], f"point {n} {d.target} ({fmt})"
            shutil.rmtree(out)
    assert verify(pool, domain=dom.name, key_file=str(key)).ok

    # stock qemu-img opens a point with the key (FORMAT §15.3)
    vda3 = store.read_manifest(3).disk("vda")
    assert _stock_read(store.resolve(vda3.volume), key) == expected[3]["vda"]

    # restore --define opens the sealed XML
    out = tmp_path / "defined"
    restored = restore(dom.name, pool, point=2, to=out, key_file=str(key),
                       define=f"{dom.name}-enc")
    assert restored.defined is not None
    subprocess.run(["virsh", "-c", "qemu:///system", "undefine", f"{dom.name}-enc"],
                   check=True, capture_output=True)
    shutil.rmtree(out)

    # without the key, or with another: one line, its exit code, nothing written
    before = sorted((str(p), p.stat().st_size) for p in _all_files(pool))
    base = ["--pool", str(pool)]
    cases = [
        (["restore", dom.name, "--to", str(tmp_path / "r1")], ExitCode.USAGE),
        (["restore", dom.name, "--to", str(tmp_path / "r2"), "--key-file", str(wrong)],
         ExitCode.INTEGRITY),
        (["verify", dom.name, "--key-file", str(wrong)], ExitCode.INTEGRITY),
        (["verify", dom.name], ExitCode.USAGE),
        (["backup", dom.name, "--key-file", str(wrong)], ExitCode.INTEGRITY),
        (["backup", dom.name], ExitCode.USAGE),
        (["boot", dom.name, "--point", "1", "--name", "x-enc"], ExitCode.USAGE),
    ]
    for argv, code in cases:
        rc = main([*base, *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == code, (argv, rc, err)
        assert len(err) == 1, (argv, err)
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()
    assert sorted((str(p), p.stat().st_size) for p in _all_files(pool)) == before
    assert Pool.open(pool).domain(dom.uuid).points()[-1].number == 3


def test_encrypt_refusals_before_any_pool(running_domain, tmp_path: Path,  # type: ignore[no-untyped-def]
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from vmsnapbackup.cli import main

    key = _key(tmp_path / "pool.key", b"correct horse battery staple, pool key 0001\n")
    pool = tmp_path / "pool"
    for extra in (["--base-format", "raw"], ["--compress", "zstd"]):
        rc = main(["--pool", str(pool), "backup", running_domain.name, "--encrypt",
                   "--key-file", str(key), *extra])
        assert rc == ExitCode.USAGE
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
        assert not pool.exists()
    # a plain pool does not become encrypted
    plain = tmp_path / "plain"
    Pool.create(plain)
    rc = main(["--pool", str(plain), "backup", running_domain.name, "--encrypt",
               "--key-file", str(key)])
    assert rc == ExitCode.USAGE
    assert "not encrypted" in capsys.readouterr().err
