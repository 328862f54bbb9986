"""The storage daemon adapter against real qemu-storage-daemon, qemu-img and qemu-io.

Needs only the QEMU binaries (no libvirt). Every test checks or ensures that
no daemon process, socket or runtime directory is left behind.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Iterator, List, Optional

import pytest
import tenacity

from vmsnapbackup import errors
from vmsnapbackup.adapters.storagedaemon import (
    RUNTIME_DIR_PREFIX,
    Export,
    StorageDaemon,
    stop_leftover_daemon,
)

pytestmark = pytest.mark.integration

if not all(shutil.which(b) for b in ("qemu-storage-daemon", "qemu-img", "qemu-io", "stdbuf")):
    pytest.skip("needs qemu-storage-daemon, qemu-img, qemu-io", allow_module_level=True)

KiB = 1024
MiB = 1024 * KiB
DEADLINE = 20.0


# ------------------------------------------------------------------ helpers
def run(*argv: str, check: bool = True) -> "subprocess.CompletedProcess[str]":
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    return proc


def qemu_io(target: str, *commands: str, fmt: str = "raw", read_only: bool = False,
            check: bool = True) -> "subprocess.CompletedProcess[str]":
    argv: List[str] = ["qemu-io", "-f", fmt]
    if read_only:
        argv.append("-r")
    for c in commands:
        argv += ["-c", c]
    argv.append(target)
    proc = run(*argv, check=False)
    # qemu-io reports failed commands on stdout/stderr but may still exit 0
    failed = proc.returncode != 0 or "Pattern verification failed" in proc.stdout + proc.stderr \
        or "failed:" in proc.stdout + proc.stderr
    if check and failed:
        raise AssertionError(f"qemu-io {commands} on {target}: {proc.stdout}{proc.stderr}")
    return proc


def read_all(uri: str, out: Path) -> bytes:
    run("qemu-img", "convert", "-f", "raw", uri, "-O", "raw", str(out))
    return out.read_bytes()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != b"Z"


def wait_gone(pid: int, timeout: float = DEADLINE) -> bool:
    try:
        tenacity.Retrying(
            retry=tenacity.retry_if_result(bool),
            stop=tenacity.stop_after_delay(timeout),
            wait=tenacity.wait_exponential(multiplier=0.01, max=0.2),
        )(alive, pid)
        return True
    except tenacity.RetryError:
        return False


class QemuIo:
    """An interactive qemu-io kept open (to hold an image or an NBD connection)."""

    def __init__(self, target: str, fmt: str, *, read_only: bool = False) -> None:
        argv = ["stdbuf", "-oL", "qemu-io", "-f", fmt] + (["-r"] if read_only else []) + [target]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, bufsize=1,
        )

    def command(self, cmd: str, expect: str, timeout: float = DEADLINE) -> str:
        """Run one command and wait (select, with a deadline) for its reply."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        seen = ""
        end = time.monotonic() + timeout
        while expect not in seen:
            left = end - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, left))
            if not ready:
                raise AssertionError(f"qemu-io gave no {expect!r} within {timeout}s: {seen!r}")
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"qemu-io exited: {seen!r}")
            seen += line
        return seen

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def run_base() -> Iterator[str]:
    """A short runtime base (pytest's tmp paths can exceed the unix socket limit)."""
    base = tempfile.mkdtemp(prefix="vsbt-")
    try:
        yield base
    finally:
        leftovers = os.listdir(base)
        shutil.rmtree(base)
        assert leftovers == [], f"runtime dirs left behind: {leftovers}"


def assert_cleaned(d: StorageDaemon) -> None:
    assert d.pid is not None and d.runtime_dir is not None
    assert wait_gone(d.pid, 5.0), f"daemon pid {d.pid} still running"
    assert not os.path.exists(d.runtime_dir)


def pattern_image(path: Path, fmt: str, size: int, writes: List[str]) -> None:
    run("qemu-img", "create", "-q", "-f", fmt, str(path), str(size))
    qemu_io(str(path), *writes, fmt=fmt)


# --------------------------------------------------------------- read-only
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_export_read_only_reads_back_patterns(tmp_path: Path, run_base: str, fmt: str) -> None:
    size = 3 * MiB + 12 * KiB  # not a multiple of 64 KiB
    img = tmp_path / f"disk.{fmt}"
    pattern_image(img, fmt, size, [
        "write -P 0xaa 0 64k",
        "write -P 0x55 1M 128k",
        f"write -P 0xc3 {size - 4096} 4k",  # the odd tail
    ])
    with StorageDaemon(run_base, tag="ro") as d:
        exp = d.export_image(str(img), fmt, name="vda")
        assert isinstance(exp, Export)
        assert (exp.name, exp.fmt, exp.writable, exp.size) == ("vda", fmt, False, size)
        assert exp.socket_path == d.nbd_socket and exp.socket_path.startswith(d.runtime_dir or "?")
        assert exp.uri == f"nbd+unix:///vda?socket={exp.socket_path}"
        qemu_io(exp.uri, "read -P 0xaa 0 64k", "read -P 0 64k 960k", "read -P 0x55 1M 128k",
                f"read -P 0xc3 {size - 4096} 4k", f"read -P 0 {size - 8192} 4k", read_only=True)
        # the whole image, byte for byte, equals what qemu-img reads from the file itself
        got = read_all(exp.uri, tmp_path / "out.raw")
        run("qemu-img", "convert", "-f", fmt, "-O", "raw", str(img), str(tmp_path / "ref.raw"))
        assert len(got) == size
        assert got == (tmp_path / "ref.raw").read_bytes()
        # the export must really be wrong when the pattern is wrong (the check can fail)
        bad = qemu_io(exp.uri, "read -P 0x55 0 64k", read_only=True, check=False)
        assert "Pattern verification failed" in bad.stdout + bad.stderr
    assert_cleaned(d)


def test_format_is_detected_when_not_given(tmp_path: Path, run_base: str) -> None:
    img = tmp_path / "disk.qcow2"
    pattern_image(img, "qcow2", 2 * MiB, ["write -P 0x11 1M 64k"])
    with StorageDaemon(run_base, tag="auto") as d:
        exp = d.export_image(str(img))
        assert exp.fmt == "qcow2" and exp.size == 2 * MiB
        qemu_io(exp.uri, "read -P 0x11 1M 64k", "read -P 0 0 1M", read_only=True)


def test_raw_size_not_multiple_of_512_is_rounded_up(tmp_path: Path, run_base: str) -> None:
    """QEMU rounds a raw file's size up to 512; the tail reads as zeros."""
    img = tmp_path / "odd.raw"
    img.write_bytes(b"\x7f" * 100000)
    with StorageDaemon(run_base, tag="odd") as d:
        exp = d.export_image(str(img), "raw")
        assert exp.size == 100352
        got = read_all(exp.uri, tmp_path / "out.raw")
    assert got == b"\x7f" * 100000 + b"\0" * 352
    assert img.stat().st_size == 100000


def test_read_only_export_refuses_writes(tmp_path: Path, run_base: str) -> None:
    img = tmp_path / "disk.raw"
    pattern_image(img, "raw", MiB, ["write -P 0xaa 0 1M"])
    before = img.read_bytes()
    with StorageDaemon(run_base, tag="ro") as d:
        exp = d.export_image(str(img), "raw")
        res = qemu_io(exp.uri, "write -P 0x00 0 64k", check=False)
        assert res.returncode != 0 or "failed" in res.stdout + res.stderr
        assert "Permission denied" in res.stdout + res.stderr or "read-only" in res.stderr
        qemu_io(exp.uri, "read -P 0xaa 0 1M", read_only=True)
    assert img.read_bytes() == before


# ---------------------------------------------------------------- writable
def test_writable_qcow2_with_relative_backing(tmp_path: Path, run_base: str) -> None:
    pool = tmp_path / "pool"
    (pool / "points").mkdir(parents=True)
    base = pool / "base.raw"
    size = 2 * MiB + 64 * KiB
    pattern_image(base, "raw", size, ["write -P 0xaa 0 1M"])
    point = pool / "points" / "point-1.qcow2"
    with StorageDaemon(run_base, tag="rw") as d:
        exp = d.create_writable(str(point), backing=str(base), backing_fmt="raw",
                                cluster_size=64 * KiB, name="point-1")
        assert exp.writable and exp.fmt == "qcow2" and exp.size == size
        qemu_io(exp.uri,
                "write -P 0xbb 64k 64k",      # changed block
                "write -z 128k 64k",          # block that became zeros must hide the base
                "write -P 0xcc 2M 64k")       # beyond the base's data
        qemu_io(exp.uri, "read -P 0xaa 0 64k", "read -P 0xbb 64k 64k", "read -P 0 128k 64k",
                read_only=True)
        d.remove_export(exp)
        assert d.exports == []
        info = json.loads(run("qemu-img", "info", "--output=json", str(point)).stdout)
    assert_cleaned(d)
    assert info["backing-filename"] == "../base.raw"
    assert info["backing-filename-format"] == "raw"
    assert info["cluster-size"] == 64 * KiB
    expected = bytearray(base.read_bytes())
    expected[64 * KiB:128 * KiB] = b"\xbb" * (64 * KiB)
    expected[128 * KiB:192 * KiB] = bytes(64 * KiB)
    expected[2 * MiB:2 * MiB + 64 * KiB] = b"\xcc" * (64 * KiB)
    ref = tmp_path / "expected.raw"
    ref.write_bytes(bytes(expected))
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(point), str(ref))
    # the pool can move: the relative backing path still resolves
    moved = tmp_path / "moved-pool"
    pool.rename(moved)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw",
        str(moved / "points" / "point-1.qcow2"), str(ref))
    # and the check above can fail: a different expectation is reported as different
    expected[0] = 0x00
    ref.write_bytes(bytes(expected))
    assert run("qemu-img", "compare", "-f", "qcow2", "-F", "raw",
               str(moved / "points" / "point-1.qcow2"), str(ref), check=False).returncode == 1


def test_writable_raw_base_volume_and_open_writable(tmp_path: Path, run_base: str) -> None:
    base = tmp_path / "base.raw"
    with StorageDaemon(run_base, tag="raw") as d:
        exp = d.create_writable(str(base), size=MiB, fmt="raw", name="base")
        assert (exp.fmt, exp.size, exp.writable) == ("raw", MiB, True)
        qemu_io(exp.uri, "write -P 0x42 0 64k", "write -P 0x43 960k 64k")
        d.remove_export(exp)
        again = d.open_writable(str(base), "raw", name="base")
        qemu_io(again.uri, "write -P 0x44 64k 64k")
    data = base.read_bytes()
    assert data[:64 * KiB] == b"\x42" * (64 * KiB)
    assert data[64 * KiB:128 * KiB] == b"\x44" * (64 * KiB)
    assert data[960 * KiB:] == b"\x43" * (64 * KiB)
    assert data[128 * KiB:960 * KiB] == bytes(832 * KiB)


def test_create_writable_never_overwrites(tmp_path: Path, run_base: str) -> None:
    existing = tmp_path / "p.qcow2"
    existing.write_bytes(b"keep me")
    with StorageDaemon(run_base, tag="ow") as d:
        with pytest.raises(errors.UsageError, match="already exists"):
            d.create_writable(str(existing), size=MiB)
    assert existing.read_bytes() == b"keep me"


# ------------------------------------------------------------- image locks
@pytest.mark.parametrize("holder_read_only,writable", [(False, False), (True, True)])
def test_image_in_use_is_refused_clearly(tmp_path: Path, run_base: str,
                                         holder_read_only: bool, writable: bool) -> None:
    """A writer blocks even our read-only export; a reader blocks our writable one."""
    img = tmp_path / "active.qcow2"
    pattern_image(img, "qcow2", MiB, ["write -P 0xaa 0 64k"])
    other = tmp_path / "other.raw"
    pattern_image(other, "raw", MiB, [])
    holder = QemuIo(str(img), "qcow2", read_only=holder_read_only)
    try:
        holder.command("read -P 0xaa 0 512", "read 512/512")  # the image is open now
        with StorageDaemon(run_base, tag="lock") as d:
            with pytest.raises(errors.ExportError) as info:
                if writable:
                    d.open_writable(str(img), "qcow2")
                else:
                    d.export_image(str(img), "qcow2")
            msg = str(info.value)
            assert "is in use by a running QEMU (image lock)" in msg
            assert str(img) in msg and "lock" in msg
            # nothing half-made stays in the daemon, and it still serves other images
            assert d.qmp("query-named-block-nodes", flat=True) == []
            assert d.exports == []
            exp = d.export_image(str(other), "raw")
            qemu_io(exp.uri, "read -P 0 0 64k", read_only=True)
    finally:
        holder.close()
    assert_cleaned(d)
    # once the holder is gone the same image exports fine
    with StorageDaemon(run_base, tag="lock") as d2:
        exp = d2.export_image(str(img), "qcow2")
        qemu_io(exp.uri, "read -P 0xaa 0 64k", read_only=True)


def test_frozen_image_exports_without_force_share(tmp_path: Path, run_base: str) -> None:
    """After an external snapshot QEMU holds the frozen image read-only, as a backing file."""
    frozen = tmp_path / "vda.qcow2"
    pattern_image(frozen, "qcow2", 2 * MiB, ["write -P 0xaa 0 1M"])
    overlay = tmp_path / "vda.vmsnapbackup-1.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", frozen.name, "-F", "qcow2", str(overlay))
    guest = QemuIo(str(overlay), "qcow2")  # stands for the domain's QEMU writing the overlay
    try:
        guest.command("write -P 0xee 0 64k", "wrote 65536/65536")
        with StorageDaemon(run_base, tag="frozen") as d:
            exp = d.export_image(str(frozen), "qcow2", name="vda")
            qemu_io(exp.uri, "read -P 0xaa 0 1M", "read -P 0 1M 1M", read_only=True)
            with pytest.raises(errors.ExportError, match="image lock"):
                d.export_image(str(overlay), "qcow2")  # the active image stays refused
    finally:
        guest.close()
    assert_cleaned(d)


def test_missing_image_is_not_found(tmp_path: Path, run_base: str) -> None:
    with StorageDaemon(run_base, tag="nf") as d:
        with pytest.raises(errors.NotFoundError):
            d.export_image(str(tmp_path / "nope.qcow2"), "qcow2")
        with pytest.raises(errors.ExportError, match="QEMU refused blockdev-add"):
            bad = tmp_path / "bad.qcow2"
            bad.write_bytes(b"not a qcow2 image at all" * 100)
            d.export_image(str(bad), "qcow2")
        assert d.qmp("query-named-block-nodes", flat=True) == []


def test_remove_export_with_connected_client_needs_force(tmp_path: Path, run_base: str) -> None:
    img = tmp_path / "disk.raw"
    pattern_image(img, "raw", MiB, ["write -P 0xaa 0 1M"])
    with StorageDaemon(run_base, tag="cl") as d:
        exp = d.export_image(str(img), "raw")
        client = QemuIo(exp.uri, "raw", read_only=True)
        try:
            client.command("read -P 0xaa 0 64k", "read 65536/65536")
            with pytest.raises(errors.ExportError, match="block-export-del"):
                d.remove_export(exp)
            assert d.exports == [exp]
            d.remove_export(exp, force=True)
            assert d.exports == []
            assert d.qmp("query-block-exports") == []
        finally:
            client.close()
    assert_cleaned(d)


# ----------------------------------------------------------------- clean-up
def test_default_runtime_dir_is_private_and_removed(tmp_path: Path) -> None:
    with StorageDaemon(tag="dflt") as d:
        assert d.runtime_dir is not None and d.pid is not None
        st = os.stat(d.runtime_dir)
        assert stat.S_IMODE(st.st_mode) == 0o700
        assert os.path.basename(d.runtime_dir).startswith(RUNTIME_DIR_PREFIX + "dflt-")
        if os.geteuid() == 0:
            assert os.path.dirname(d.runtime_dir) == "/run/vmsnapbackup"
        assert stat.S_ISSOCK(os.stat(d.nbd_socket).st_mode)
        assert stat.S_ISSOCK(os.stat(d.qmp_socket).st_mode)
        assert alive(d.pid)
    assert_cleaned(d)


def test_exception_inside_with_cleans_up_even_with_a_client(tmp_path: Path, run_base: str) -> None:
    img = tmp_path / "disk.raw"
    pattern_image(img, "raw", MiB, ["write -P 0xaa 0 1M"])
    client: Optional[QemuIo] = None
    with pytest.raises(RuntimeError, match="boom"):
        with StorageDaemon(run_base, tag="exc") as d:
            exp = d.export_image(str(img), "raw")
            w = d.create_writable(str(tmp_path / "p.qcow2"), size=MiB)
            client = QemuIo(exp.uri, "raw", read_only=True)
            client.command("read -P 0xaa 0 64k", "read 65536/65536")
            assert len(d.exports) == 2 and w.writable
            raise RuntimeError("boom")
    assert client is not None
    client.close()
    assert_cleaned(d)


def test_stop_leftover_daemon_checks_the_pid(tmp_path: Path, run_base: str) -> None:
    """A journal's PID that now belongs to another process is never signalled."""
    other = subprocess.Popen(["sleep", "60"])
    try:
        fake_dir = Path(run_base) / (RUNTIME_DIR_PREFIX + "fake-x")
        fake_dir.mkdir(mode=0o700)
        (fake_dir / "nbd.sock").touch()
        assert stop_leftover_daemon(other.pid, str(fake_dir)) is False
        assert alive(other.pid)
        assert not fake_dir.exists()
        # a directory that is not ours is refused, whatever it holds
        with pytest.raises(errors.UsageError):
            stop_leftover_daemon(None, str(tmp_path))
        assert tmp_path.is_dir()
    finally:
        other.kill()
        other.wait()


def test_close_survives_a_daemon_that_died(tmp_path: Path, run_base: str) -> None:
    """stop_leftover_daemon (what repair uses) on a live daemon, then close() copes."""
    img = tmp_path / "disk.raw"
    pattern_image(img, "raw", MiB, [])
    d = StorageDaemon(run_base, tag="dead").start()
    try:
        d.export_image(str(img), "raw")
        assert d.pid is not None and d.runtime_dir is not None and alive(d.pid)
        assert stop_leftover_daemon(d.pid, d.runtime_dir) is True
        assert not alive(d.pid)
        assert not os.path.exists(d.runtime_dir)
        with pytest.raises(errors.ExportError):
            d.export_image(str(img), "raw", name="again")
    finally:
        d.close()
    assert_cleaned(d)


CHILD = textwrap.dedent(
    """
    import json, sys, time
    from vmsnapbackup import errors
    from vmsnapbackup.adapters.storagedaemon import StorageDaemon
    base, image = sys.argv[1], sys.argv[2]
    try:
        with StorageDaemon(base, tag="child") as d:
            d.export_image(image, "raw")
            print(json.dumps({"pid": d.pid, "dir": d.runtime_dir}), flush=True)
            time.sleep(120)
    except errors.BackupInterruptedError as err:
        print(json.dumps({"interrupted": str(err)}), flush=True)
        sys.exit(int(err.exit_code))
    sys.exit(0)
    """
)


@pytest.fixture
def subreaper() -> Iterator[None]:
    """Adopt orphans while the test runs, so an orphaned daemon can be reaped.

    Without it a daemon killed after its parent died becomes a zombie of PID 1,
    which on some containers never reaps.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_child_subreaper = 36
    assert libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) == 0
    try:
        yield
    finally:
        libc.prctl(pr_set_child_subreaper, 0, 0, 0, 0)


def reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def start_child(run_base: str, img: Path) -> "tuple[subprocess.Popen[str], dict]":
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, run_base, str(img)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], DEADLINE)
    if not ready:
        proc.kill()
        proc.wait()
        raise AssertionError("child did not start its daemon in time")
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        raise AssertionError(f"child failed: {proc.stderr.read() if proc.stderr else ''}")
    info = json.loads(line)
    assert alive(info["pid"]) and os.path.isdir(info["dir"])
    return proc, info


def finish_child(proc: "subprocess.Popen[str]", info: dict) -> None:
    """Whatever the test found, leave no child, daemon or runtime dir behind."""
    if proc.poll() is None:
        proc.kill()
    proc.communicate()
    if alive(info["pid"]) or os.path.exists(info["dir"]):
        stop_leftover_daemon(info["pid"], info["dir"])
    reap(info["pid"])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_parent_signal_cleans_up(tmp_path: Path, run_base: str, sig: signal.Signals,
                                 subreaper: None) -> None:
    img = tmp_path / "disk.raw"
    pattern_image(img, "raw", MiB, [])
    proc, info = start_child(run_base, img)
    try:
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=DEADLINE)
        assert proc.returncode == int(errors.ExitCode.INTERRUPTED), err
        assert f"interrupted by {sig.name}" in out
        assert wait_gone(info["pid"]), "daemon outlived its parent"
        assert not os.path.exists(info["dir"])
    finally:
        finish_child(proc, info)


def test_parent_sigkill_kills_daemon(tmp_path: Path, run_base: str, subreaper: None) -> None:
    """SIGKILL leaves no process (death signal); the runtime dir stays for repair."""
    img = tmp_path / "disk.raw"
    pattern_image(img, "raw", MiB, [])
    proc, info = start_child(run_base, img)
    try:
        proc.kill()
        proc.communicate(timeout=DEADLINE)
        assert wait_gone(info["pid"]), "daemon outlived its SIGKILLed parent"
        # what remains: the runtime dir with the NBD socket (and log / pid file);
        # repair removes it with stop_leftover_daemon (no live process to stop).
        assert os.path.isdir(info["dir"])
        assert set(os.listdir(info["dir"])) <= {"nbd.sock", "qmp.sock", "qsd.log", "qsd.pid"}
        assert stop_leftover_daemon(info["pid"], info["dir"]) is False
        assert not os.path.exists(info["dir"])
    finally:
        finish_child(proc, info)


# ------------------------------------------------------------ dirty bitmaps
def _dirty_map(exp: Export, bitmap: str) -> List[dict]:
    """qemu-img's own reading of the bitmap: with x-dirty-bitmap, dirty shows as data false."""
    opts = (f"driver=nbd,server.type=unix,server.path={exp.socket_path},export={exp.name},"
            f"x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}")
    out = run("qemu-img", "map", "--output=json", "--image-opts", opts).stdout
    return [e for e in json.loads(out) if not e["data"]]


def test_export_serves_an_intact_bitmap_and_refuses_others(tmp_path: Path, run_base: str) -> None:
    good, broken = tmp_path / "good.qcow2", tmp_path / "broken.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(good), str(16 * MiB))
    run("qemu-img", "bitmap", "--add", str(good), "bm0")
    qemu_io(str(good), "write -P 0x5a 1M 64k", fmt="qcow2")   # recorded by the bitmap
    shutil.copyfile(good, broken)
    # a writer that dies with the bitmap loaded leaves it "in use": inconsistent
    proc = subprocess.Popen(["qemu-io", "-f", "qcow2", "-c", "sleep 60000", str(broken)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        tenacity.Retrying(
            stop=tenacity.stop_after_delay(DEADLINE), wait=tenacity.wait_fixed(0.05),
            retry=tenacity.retry_if_result(lambda flags: "in-use" not in flags),
        )(lambda: run("qemu-img", "info", "-U", "--output=json", str(broken)).stdout)
    finally:
        proc.kill()
        proc.wait()
    with StorageDaemon(run_base, tag="bm") as d:
        exp = d.export_image(str(good), "qcow2", name="good", bitmap="bm0", direct=True)
        assert (exp.bitmap, exp.bitmap_refused) == ("bm0", None)
        assert [(e["start"], e["length"]) for e in _dirty_map(exp, "bm0")] == [(1 * MiB, 64 * KiB)]
        missing = d.export_image(str(good), "qcow2", name="missing", bitmap="nope")
        assert missing.bitmap is None and "no such bitmap" in (missing.bitmap_refused or "")
        bad = d.export_image(str(broken), "qcow2", name="broken", bitmap="bm0")
        assert bad.bitmap is None and "inconsistent" in (bad.bitmap_refused or "")
        plain = d.export_image(str(good), "qcow2", name="plain")
        assert (plain.bitmap, plain.bitmap_refused) == (None, None)
        # the exports refused a bitmap still serve the data
        qemu_io(bad.uri, "read -P 0x5a 1M 64k", read_only=True)
    assert_cleaned(d)


def _open_flags(pid: int, path: Path) -> List[int]:
    """The open flags of every descriptor of ``pid`` on ``path``."""
    flags = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != str(path):
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                line = next(x for x in f if x.startswith("flags:"))
        except (FileNotFoundError, StopIteration):
            continue
        flags.append(int(line.split()[1], 8))
    return flags


def test_direct_export_reads_the_backing_image_with_o_direct_too(tmp_path: Path,
                                                                 run_base: str) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    pattern_image(base, "qcow2", 4 * MiB, ["write -P 0x31 0 1M"])
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    with StorageDaemon(run_base, tag="direct") as d:
        exp = d.export_image(str(top), "qcow2", name="top", direct=True)
        assert d.pid is not None
        for image in (top, base):
            flags = _open_flags(d.pid, image)
            assert flags and all(f & os.O_DIRECT for f in flags), (image, [oct(f) for f in flags])
        qemu_io(exp.uri, "read -P 0x31 0 1M", read_only=True)
        plain = d.export_image(str(base), "qcow2", name="plain")
        assert plain.name == "plain"
        assert any(not f & os.O_DIRECT for f in _open_flags(d.pid, base))
    assert_cleaned(d)
