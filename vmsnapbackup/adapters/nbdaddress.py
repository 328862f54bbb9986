"""Where an NBD export is: a unix socket or a TCP host/port, a name, maybe TLS.

Kept apart from the client so that the code that *names* an export (the
storage daemon, ``mount``, a remote hypervisor) can build and print one
without opening a connection.  The URI forms are the ones ``qemu-img`` and
libnbd's ``nbdinfo`` accept, so what we print a person can paste:
``nbd+unix:///NAME?socket=PATH``, ``nbd://HOST:PORT/NAME`` and, with TLS,
``nbds://HOST:PORT/NAME?tls-certificates=DIR`` (libnbd's query spelling).
"""
from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from ..errors import UsageError

__all__ = ["DEFAULT_PORT", "NbdAddress", "parse_nbd_uri"]

#: The NBD port IANA assigned.
DEFAULT_PORT = 10809


@dataclass(frozen=True)
class NbdAddress:
    """Where an export is: a unix socket path or a TCP host/port, plus a name.

    ``tls_dir`` (TCP only): a directory of x509 files in QEMU's names
    (``ca-cert.pem``, ``client-cert.pem``, ``client-key.pem``); the client
    then insists on STARTTLS and presents its certificate.
    """

    export_name: str = ""
    socket_path: str | None = None
    host: str | None = None
    port: int = DEFAULT_PORT
    tls_dir: str | None = None

    def __post_init__(self) -> None:
        if (self.socket_path is None) == (self.host is None):
            raise UsageError("an NBD address needs exactly one of a socket path or a host")
        if self.tls_dir is not None and self.host is None:
            raise UsageError("NBD over TLS is only for TCP addresses (a unix socket is "
                             "protected by its file mode)")

    @property
    def uri(self) -> str:
        """The address as an NBD URI (the form ``qemu-img`` and ``nbdinfo`` accept)."""
        name = urllib.parse.quote(self.export_name, safe="")
        if self.socket_path is not None:
            sock = urllib.parse.quote(self.socket_path, safe="/")
            return f"nbd+unix:///{name}?socket={sock}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        if self.tls_dir is not None:
            certs = urllib.parse.quote(self.tls_dir, safe="/")
            return f"nbds://{host}:{self.port}/{name}?tls-certificates={certs}"
        return f"nbd://{host}:{self.port}/{name}"

    def __str__(self) -> str:
        return self.uri


def parse_nbd_uri(uri: str) -> NbdAddress:
    """Parse ``nbd://host[:port]/name``, ``nbd+unix:///name?socket=PATH`` or
    ``nbds://host[:port]/name?tls-certificates=DIR``.

    ``nbds`` needs its certificate directory in the URI: a TLS address that
    silently picked some default directory would hide which keys were used.
    vsock schemes are refused: a half-understood address is worse than none.
    """
    try:
        parts = urllib.parse.urlsplit(uri)
        port_value = parts.port
    except ValueError as exc:
        raise UsageError(f"not an NBD URI: {uri!r} ({exc})") from None
    scheme = parts.scheme.lower()
    path = parts.path
    if path not in ("", "/") and not path.startswith("/"):
        raise UsageError(f"not an NBD URI: {uri!r}")
    name = urllib.parse.unquote(path.removeprefix("/"))
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    if scheme in ("nbd", "nbd+tcp", "nbds", "nbds+tcp"):
        if not parts.hostname:
            raise UsageError(f"NBD URI without a host: {uri!r}")
        tls_dir = None
        if scheme.startswith("nbds"):
            certs = query.get("tls-certificates")
            if not certs or not certs[0]:
                raise UsageError(f"nbds URI without ?tls-certificates=DIR: {uri!r}")
            tls_dir = certs[0]
        return NbdAddress(export_name=name, host=parts.hostname,
                          port=port_value or DEFAULT_PORT, tls_dir=tls_dir)
    if scheme == "nbd+unix":
        sockets = query.get("socket")
        if not sockets or not sockets[0]:
            raise UsageError(f"nbd+unix URI without ?socket=PATH: {uri!r}")
        if parts.netloc:
            raise UsageError(f"nbd+unix URI must not name a host: {uri!r}")
        return NbdAddress(export_name=name, socket_path=sockets[0])
    raise UsageError(f"not an NBD URI (want nbd://, nbds:// or nbd+unix://): {uri!r}")
