"""Which :class:`Host` a libvirt connection URI names: this machine or one over ssh.

Why here: the URI is the one place the user says where the hypervisor is, so
the ssh parameters are read from it exactly as ``virsh`` reads them --
``qemu+ssh://[user@]host[:port]/system?keyfile=K&no_verify=1`` -- and nothing
else has to be configured for processes and files to follow libvirt there.
"""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from ..errors import UsageError

__all__ = ["SshTarget", "ssh_target_for"]

_TRUE = {"1", "yes", "true"}


@dataclass(frozen=True)
class SshTarget:
    """Where and how to reach a remote hypervisor with OpenSSH's client."""

    host: str
    user: str | None = None
    port: int | None = None
    keyfile: str | None = None
    no_verify: bool = False

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host


def ssh_target_for(uri: str | None) -> SshTarget | None:
    """The ssh target of a ``+ssh`` URI; None for a local (or non-ssh) URI."""
    if not uri:
        return None
    parts = urlsplit(uri)
    scheme = parts.scheme
    if "+" not in scheme or scheme.split("+", 1)[1] not in ("ssh", "libssh", "libssh2"):
        return None
    if not parts.hostname:
        raise UsageError(f"connection URI {uri!r} names no host to ssh to")
    try:
        port = parts.port
    except ValueError:
        raise UsageError(f"connection URI {uri!r} has a bad port") from None
    query = parse_qs(parts.query)
    keyfile = query.get("keyfile", [None])[-1]
    no_verify = (query.get("no_verify", ["0"])[-1] or "0").lower() in _TRUE
    return SshTarget(host=parts.hostname, user=parts.username, port=port,
                     keyfile=keyfile, no_verify=no_verify)
