"""Disk images, sockets and volumes are private from their first instant (issue 12).

The attacker is a local unprivileged user (``nobody``).  Every test runs with the
widest umask (000), as a careless caller would, and checks the mode of what we
create *while it is in use*: the pool's volumes during the disk pass, a restored
qcow2 image during ``qemu-img convert``, a mount's socket while it serves.  Each
attack is also run against a deliberately wide control file in the same place,
so a passing test means our file is private, not that the attack cannot work.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_restore import MiB, SyntheticPool, patterned, three_points

from vmsnapbackup.progress import ProgressEvent
from vmsnapbackup.workflows.access import mount_point
from vmsnapbackup.workflows.restore import restore

pytestmark = pytest.mark.integration

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture
def wide_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory ``nobody`` can reach (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="vsb-private-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def nobody_reads(path: Path) -> bool:
    """Whether user nobody can open ``path`` for reading."""
    proc = subprocess.run(NOBODY + ["dd", f"if={path}", "of=/dev/null", "count=1",
                                    "status=none"], capture_output=True, timeout=30,
                          check=False)
    return proc.returncode == 0


def nobody_connects(path: Path) -> bool:
    """Whether user nobody can connect to the unix socket ``path``."""
    code = ("import socket,sys; s=socket.socket(socket.AF_UNIX); "
            "s.settimeout(5); s.connect(sys.argv[1])")
    proc = subprocess.run(NOBODY + ["/usr/bin/python3", "-c", code, str(path)],
                          capture_output=True, timeout=30, check=False)
    return proc.returncode == 0


def children(name: str) -> list[int]:
    """Our child processes running ``name``."""
    me = str(os.getpid())
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, IndexError):
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
            if fields[1].decode() == me and comm.startswith(name) and fields[0] != b"Z":
                found.append(int(pid))
    return found


def umask_of(pid: int) -> str:
    with open(f"/proc/{pid}/status") as f:
        return next(line.split()[1] for line in f if line.startswith("Umask:"))


def test_restored_qcow2_is_private_during_the_convert(tmp_path: Path, open_dir: Path,
                                                      wide_umask: None) -> None:
    # big enough that qemu-img is still running when it reports its first progress
    sp = SyntheticPool(tmp_path / "pool")
    sp.add_point({"vda": bytes(patterned(128 * MiB, 7))})
    out = open_dir / "out"
    seen: dict[str, object] = {}

    def watch(ev: ProgressEvent) -> None:
        if ev.phase != "restore" or ev.disk != "vda" or "mode" in seen:
            return
        converting = children("qemu-img")
        if not converting:
            return   # before the convert started
        temp = [p for p in out.iterdir() if p.name.startswith(".vda.qcow2.restore-")]
        assert len(temp) == 1, list(out.iterdir())
        seen["mode"] = stat.S_IMODE(temp[0].stat().st_mode)
        seen["umask"] = umask_of(converting[0])
        seen["nobody"] = nobody_reads(temp[0])
        control = out / "control"
        control.write_bytes(b"x")
        os.chmod(control, 0o644)
        seen["control"] = nobody_reads(control)
        control.unlink()

    result = restore(sp.name, sp.pool, point=1, to=out, fmt="qcow2", progress=watch)
    assert result.ok
    assert seen.get("control") is True, f"the attack itself must work on a 0644 file: {seen}"
    assert seen["mode"] == 0o600 and seen["nobody"] is False, seen
    assert seen["umask"] == "0077", "qemu-img runs with umask 077"
    for d in result.disks:
        assert stat.S_IMODE(os.stat(d.path).st_mode) == 0o600
        assert not nobody_reads(Path(d.path))


def test_restored_raw_is_private(tmp_path: Path, open_dir: Path, wide_umask: None) -> None:
    sp = three_points(tmp_path)
    result = restore(sp.name, sp.pool, point=2, to=open_dir / "raw")
    for d in result.disks:
        assert stat.S_IMODE(os.stat(d.path).st_mode) == 0o600
        assert not nobody_reads(Path(d.path))


def test_pool_volumes_are_private_from_creation(tmp_path: Path, wide_umask: None) -> None:
    """The synthetic pool writes its volumes exactly as a backup does (create_writable)."""
    sp = three_points(tmp_path)
    volumes = sorted(p for p in sp.pool.root.rglob("*.qcow2"))
    assert any(p.name.startswith("base") for p in volumes)
    assert any(p.name.startswith("point") for p in volumes)
    for p in volumes:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p


def test_mount_socket_is_private_whatever_the_umask(tmp_path: Path, open_dir: Path,
                                                    wide_umask: None) -> None:
    sp = three_points(tmp_path)
    sock = open_dir / "point.sock"
    with mount_point(sp.name, sp.pool, 2, "vda", socket=str(sock)) as m:
        assert m.socket_path == str(sock)
        st = sock.stat()
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == os.getuid()
        daemons = children("qemu-storage")
        assert daemons and {umask_of(p) for p in daemons} == {"0077"}, \
            "the socket was created under umask 077, i.e. owner-only from its creation"
        assert not nobody_connects(sock)
        # the control: the same attack against a socket that lets everyone in
        import socket as socketlib

        with socketlib.socket(socketlib.AF_UNIX) as wide:
            wide.bind(str(open_dir / "wide.sock"))
            wide.listen(1)
            os.chmod(open_dir / "wide.sock", 0o777)
            assert nobody_connects(open_dir / "wide.sock")
    assert not sock.exists()
