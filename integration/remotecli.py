"""Run the CLI as a backup server that cannot see the hypervisor's files.

Why a private mount namespace: 127.0.0.1 stands in for the remote hypervisor,
so without it the CLI could quietly open the images or the runtime directory
itself and a "remote" test would prove nothing.  ``unshare --mount`` with a
tmpfs over the image root and the runtime directory leaves only ssh and NBD to
reach the data; the shell first checks that both really look empty.
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

IMAGES_ROOT = "/var/lib/libvirt/images"
RUNTIME_DIR = "/run/vmsnapbackup"

_BLIND = (
    'set -e; for d in "$IMAGES" "$RUNTIME"; do mkdir -p "$d"; '
    'mount -t tmpfs -o mode=0700,size=64m vsb-blind "$d"; '
    'if [ -n "$(ls -A "$d")" ]; then echo "$d is not empty" >&2; exit 99; fi; done; '
    'exec "$@"'
)


@dataclass(frozen=True)
class CliRun:
    returncode: int
    stdout: str
    stderr: str


def _blind_argv(argv: Sequence[str]) -> list[str]:
    # unshare, env and sh all exec: the CLI keeps the pid Popen reports
    return ["unshare", "--mount", "--propagation", "private", "env",
            f"IMAGES={IMAGES_ROOT}", f"RUNTIME={RUNTIME_DIR}", "sh", "-c", _BLIND, "sh",
            sys.executable, "-m", "vmsnapbackup", *argv]


def _env(extra: Mapping[str, str] | None) -> dict[str, str] | None:
    return None if extra is None else {**os.environ, **extra}


def blind_cli(argv: Sequence[str], *, timeout: float = 600,
              env: Mapping[str, str] | None = None) -> CliRun:
    """``python -m vmsnapbackup ARGV`` where the hypervisor's directories are empty tmpfs
    (``env``: extra environment, e.g. a local runtime directory the test can look into)."""
    done = subprocess.run(_blind_argv(argv), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False, env=_env(env))
    return CliRun(done.returncode, done.stdout, done.stderr)


def blind_popen(argv: Sequence[str], *,
                env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
    """:func:`blind_cli` started in the background (stdout and stderr piped)."""
    return subprocess.Popen(_blind_argv(argv), stdin=subprocess.DEVNULL, env=_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def ssh_master_of(pid: int) -> int | None:
    """The OpenSSH master (``ssh ... -M``) the CLI process ``pid`` started, if any."""
    out = subprocess.run(["pgrep", "-P", str(pid), "-x", "ssh"], capture_output=True,
                         text=True, check=False).stdout.split()
    for child in out:
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if b"-M" in args:
            return int(child)
    return None
