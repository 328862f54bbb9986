"""A real OpenSSH server on 127.0.0.1 standing in for a remote hypervisor.

Why a private sshd: the remote path must be proven through the same client,
keys and forwarding a real deployment uses, without touching the machine's own
ssh service or configuration.  It listens on a free port of its own with a
generated host key and accepts only a generated client key for root.

The remote tests share it as the module-scoped fixture ``sshd``: a test module
names this file in ``pytest_plugins``.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SSHD = "/usr/sbin/sshd"
_DEADLINE = 20.0


@dataclass(frozen=True)
class SshdServer:
    port: int
    keyfile: str

    def uri(self, *, no_verify: bool = True) -> str:
        query = f"?keyfile={self.keyfile}" + ("&no_verify=1" if no_verify else "")
        return f"qemu+ssh://root@127.0.0.1:{self.port}/system{query}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5) as s:
        return s.recv(4).startswith(b"SSH-")
    return False


@contextlib.contextmanager
def running_sshd(workdir: Path) -> Iterator[SshdServer]:
    """Start sshd -D on a free port; stop it (by its pid) on exit."""
    if not os.path.exists(SSHD):
        raise RuntimeError("openssh-server is not installed (scripts/setup.sh installs it)")
    workdir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(workdir, 0o700)
    hostkey, userkey = workdir / "host_ed25519", workdir / "client_ed25519"
    for key in (hostkey, userkey):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                       check=True, stdin=subprocess.DEVNULL)
    shutil.copy(f"{userkey}.pub", workdir / "authorized_keys")
    os.chmod(workdir / "authorized_keys", 0o600)
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)   # privilege separation dir
    port = _free_port()
    config = workdir / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {hostkey}\n"
        f"PidFile {workdir}/sshd.pid\nAuthorizedKeysFile {workdir}/authorized_keys\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        "AllowStreamLocalForwarding yes\nAllowTcpForwarding yes\nMaxSessions 64\n"
        "MaxStartups 64\n")
    with open(workdir / "sshd.log", "ab") as log:
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)],
                                stdin=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + _DEADLINE
        while not _listening(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshd did not start: {(workdir / 'sshd.log').read_text()}")
            time.sleep(0.05)  # polled up to a deadline
        yield SshdServer(port=port, keyfile=str(userkey))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshdServer]:
    """One private sshd per test module (see :func:`running_sshd`)."""
    with running_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server
