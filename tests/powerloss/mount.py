"""Mount the power-loss file system for a test, and always unmount it.

:class:`PowerLossMount` starts :mod:`powerloss.fusefs` in a process of its own,
waits (with a deadline) until the mount point is a mount, and on exit unmounts
with ``fusermount3 -u`` (lazily if something still holds it) and reaps the
server.  :meth:`PowerLossMount.recover` then builds the state a disk keeps
after the cut for one :class:`~powerloss.model.Variant`.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import TracebackType

import tenacity

from powerloss.logfile import read_log
from powerloss.model import DurableState, Op, Variant, materialize, replay

__all__ = ["PowerLossMount", "fuse_available", "recover"]

TESTS_DIR = Path(__file__).resolve().parent.parent
MOUNT_DEADLINE = 20.0


def fuse_available() -> str | None:
    """None if a FUSE mount can work here, else why not."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is absent"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (apt-get install fuse3)"
    try:
        import pyfuse3  # noqa: F401
    except ImportError as exc:
        return f"pyfuse3 is not importable: {exc}"
    return None


class PowerLossMount:
    """``backing`` is served at ``mountpoint``; every call is logged to ``log``."""

    def __init__(self, backing: Path, mountpoint: Path, log: Path, *,
                 cut_at: int | None = None, kill_pgid: int | None = None) -> None:
        self.backing, self.mountpoint, self.log = backing, mountpoint, log
        self.cut_at, self.kill_pgid = cut_at, kill_pgid
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr_path = log.with_suffix(".stderr")

    def __enter__(self) -> PowerLossMount:  # noqa: PYI034
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "powerloss.fusefs", str(self.backing), str(self.mountpoint),
                str(self.log)]
        if self.cut_at is not None:
            argv += ["--cut-at", str(self.cut_at)]
        if self.kill_pgid is not None:
            argv += ["--kill-pgid", str(self.kill_pgid)]
        env = dict(os.environ, PYTHONPATH=str(TESTS_DIR))
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=err,
                                         stderr=err, start_new_session=True)
        try:
            self._wait_mounted()
        except BaseException:
            self.unmount()
            raise
        return self

    def _wait_mounted(self) -> None:
        @tenacity.retry(stop=tenacity.stop_after_delay(MOUNT_DEADLINE),
                        wait=tenacity.wait_fixed(0.05), reraise=True,
                        retry=tenacity.retry_if_exception_type(TimeoutError))
        def check() -> None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"powerloss fs exited ({self.proc.returncode}): "
                                   f"{self.stderr_path.read_text(errors='replace')[-2000:]}")
            if not os.path.ismount(self.mountpoint):
                raise TimeoutError(f"{self.mountpoint} not mounted within {MOUNT_DEADLINE} s")
        check()

    def cut_now(self) -> None:
        """Lose power at once (SIGUSR1 to the server)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGUSR1)

    def set_kill_pgid(self, pgid: int) -> None:  # pragma: no cover - used by the soak
        self.kill_pgid = pgid

    def is_mounted(self) -> bool:
        """From /proc/mounts: os.path.ismount says False once the disk fails with EIO."""
        target = os.path.realpath(self.mountpoint)
        with open("/proc/self/mounts") as f:
            return any(line.split()[1] == target for line in f if len(line.split()) > 1)

    def unmount(self) -> None:
        if self.is_mounted():
            rc = subprocess.run(["fusermount3", "-u", str(self.mountpoint)],
                                stderr=subprocess.DEVNULL, check=False).returncode
            if rc != 0:
                subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)],
                               stderr=subprocess.DEVNULL, check=False)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=MOUNT_DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.unmount()

    def operations(self) -> tuple[list[Op], list[Op]]:
        return read_log(self.log)


def recover(log: Path, variant: Variant, out: Path, upto: int | None = None) -> list[str]:
    """Build in ``out`` what the disk keeps when the power went after ``upto`` operations
    (all of the log when None), under ``variant``."""
    seed, ops = read_log(log)
    state: DurableState = replay([*seed, *(ops if upto is None else ops[:upto])])
    return materialize(state, variant, out)
