from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from vmsnapbackup.core import atomic
from vmsnapbackup.errors import PoolFullError, PoolReadOnlyError, UsageError


def _names(d: Path) -> list:
    return sorted(p.name for p in d.iterdir())


def test_atomic_write_content_lands_whole_with_private_mode(tmp_path: Path) -> None:
    target = tmp_path / "file.bin"
    data = os.urandom(300_000)
    old = os.umask(0o077 ^ 0o777)  # a permissive umask must not widen our mode
    try:
        with atomic_write_ctx(target) as f:
            f.write(data[:1000])
            f.write(data[1000:])
            # nothing visible under the final name until the block ends
            assert not target.exists()
            tmps = [n for n in _names(tmp_path) if n.startswith(".file.bin.tmp-")]
            assert len(tmps) == 1 and f"-{os.getpid()}-" in tmps[0]
    finally:
        os.umask(old)
    assert target.read_bytes() == data
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert _names(tmp_path) == ["file.bin"]


def atomic_write_ctx(path: Path, **kw):  # small indirection keeps the test readable
    return atomic.atomic_write(path, **kw)


def test_atomic_write_replaces_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")
    atomic.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"


def test_exception_in_body_leaves_no_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "f"
    with pytest.raises(RuntimeError):
        with atomic.atomic_write(target) as f:
            f.write(b"half")
            raise RuntimeError("boom")
    assert _names(tmp_path) == []


def test_exception_in_body_keeps_old_content(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_write(target) as f:
            f.write(b"new")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old"
    assert _names(tmp_path) == ["f"]


def test_unrelated_oserror_in_body_is_not_mapped(tmp_path: Path) -> None:
    """An EACCES about some other file must not read as "pool is read-only"."""
    target = tmp_path / "f"
    other = tmp_path / "elsewhere"
    with pytest.raises(PermissionError):
        with atomic.atomic_write(target):
            raise PermissionError(errno.EACCES, "Permission denied", str(other))
    assert _names(tmp_path) == []


def test_exclusive_refuses_existing_and_keeps_it(tmp_path: Path) -> None:
    target = tmp_path / "f"
    atomic.atomic_write_bytes(target, b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        atomic.atomic_write_bytes(target, b"second", exclusive=True)
    assert target.read_bytes() == b"first"
    assert _names(tmp_path) == ["f"]


def test_atomic_write_json_is_ascii_sorted(tmp_path: Path) -> None:
    target = tmp_path / "r.json"
    atomic.atomic_write_json(target, {"b": 1, "a": "é"})
    text = target.read_bytes()
    assert text.decode("ascii").index('"a"') < text.decode("ascii").index('"b"')
    assert text.endswith(b"\n")


def test_make_private_dir_creates_parents_0700(tmp_path: Path) -> None:
    d = tmp_path / "a" / "b" / "c"
    old = os.umask(0)
    try:
        assert atomic.make_private_dir(d) == d
    finally:
        os.umask(old)
    for p in (tmp_path / "a", tmp_path / "a" / "b", d):
        assert stat.S_IMODE(p.stat().st_mode) == 0o700
    atomic.make_private_dir(d)  # idempotent


def test_make_private_dir_over_a_file_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"")
    with pytest.raises(UsageError, match="not a directory"):
        atomic.make_private_dir(tmp_path / "x" / "y")


def test_durable_rename_moves_partial(tmp_path: Path) -> None:
    src = tmp_path / "base.qcow2.partial"
    src.write_bytes(b"data")
    atomic.durable_rename(src, tmp_path / "base.qcow2")
    assert _names(tmp_path) == ["base.qcow2"]
    assert (tmp_path / "base.qcow2").read_bytes() == b"data"


def test_is_temp_name() -> None:
    assert atomic.is_temp_name(".x.tmp-1-ab")
    assert atomic.is_temp_name("point-000002.qcow2.partial")
    assert not atomic.is_temp_name("point-000002.qcow2")


# --- real ENOSPC / EROFS on a tiny tmpfs (root only) -------------------------------------

@contextlib.contextmanager
def tiny_tmpfs(size: str = "64k") -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    d = Path(tempfile.mkdtemp(prefix="vsb-tmpfs-"))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(d)],
                       capture_output=True)
    if r.returncode != 0:
        d.rmdir()
        pytest.skip(f"cannot mount tmpfs: {r.stderr.decode(errors='replace').strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)
        d.rmdir()


def test_enospc_maps_to_pool_full_and_cleans_temp() -> None:
    with tiny_tmpfs() as d:
        target = d / "big.bin"
        with pytest.raises(PoolFullError) as ei:
            with atomic.atomic_write(target) as f:
                for _ in range(64):
                    f.write(b"\xab" * 8192)
        assert str(target) in str(ei.value)
        assert isinstance(ei.value.__cause__, OSError)
        assert ei.value.__cause__.errno == errno.ENOSPC
        assert _names(d) == []


def test_erofs_maps_to_pool_read_only() -> None:
    with tiny_tmpfs() as d:
        subprocess.run(["mount", "-o", "remount,ro", str(d)], check=True)
        target = d / "f"
        with pytest.raises(PoolReadOnlyError) as ei:
            atomic.atomic_write_bytes(target, b"x")
        assert str(target) in str(ei.value)
        assert ei.value.__cause__.errno == errno.EROFS
        with pytest.raises(PoolReadOnlyError):
            atomic.make_private_dir(d / "sub")


def test_eacces_maps_to_pool_read_only(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # root ignores modes; drop to nobody in a child to get a real EACCES
        d = tmp_path / "locked"
        d.mkdir(mode=0o755)
        os.chmod(tmp_path, 0o755)
        code = (
            "import os,sys\n"
            "from vmsnapbackup.core.atomic import atomic_write_bytes\n"
            "from vmsnapbackup.errors import PoolReadOnlyError\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "try:\n"
            f"    atomic_write_bytes({str(d / 'f')!r}, b'x')\n"
            "except PoolReadOnlyError as e:\n"
            "    print('MAPPED', e.__cause__.errno); sys.exit(0)\n"
            "sys.exit(3)\n"
        )
        import sys
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == ["MAPPED", str(errno.EACCES)]
    else:
        d = tmp_path / "locked"
        d.mkdir(mode=0o500)
        try:
            with pytest.raises(PoolReadOnlyError):
                atomic.atomic_write_bytes(d / "f", b"x")
        finally:
            d.chmod(0o700)
