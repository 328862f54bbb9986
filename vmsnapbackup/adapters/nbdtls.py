"""The client side of NBD over TLS: x509 files from a directory, QEMU's way.

QEMU (``tls-creds-x509,dir=DIR``), libvirt and libnbd all read a directory
with fixed file names; we read the same names, so one directory made for
``qemu-nbd``/``qemu-storage-daemon`` clients serves us too:

- ``ca-cert.pem``: the authority the server's certificate must chain to;
- ``client-cert.pem`` and ``client-key.pem``: our certificate and key, sent
  so that a server with ``verify-peer=on`` lets us in.

The server's certificate is checked against ``ca-cert.pem`` only (not the
system's authorities: an export is ours, not the web's) and must name the
host we dial (or ``hostname`` when given).  Every problem with the files is
one :class:`~vmsnapbackup.errors.UsageError` line, raised before any
connection is made.
"""
from __future__ import annotations

import os
import ssl
from pathlib import Path

from ..errors import UsageError

__all__ = ["CA_CERT", "CLIENT_CERT", "CLIENT_KEY", "DEFAULT_TLS_DIR", "client_tls_context"]

CA_CERT = "ca-cert.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"
#: QEMU's default x509 directory (``default_tls_x509_cert_dir`` in qemu.conf).
DEFAULT_TLS_DIR = "/etc/pki/qemu"


def _ssl_reason(exc: ssl.SSLError) -> str:
    return str(exc.reason or exc.strerror or exc).lower().replace("_", " ")


def client_tls_context(tls_dir: str | os.PathLike[str]) -> ssl.SSLContext:
    """A TLS client context from ``tls_dir`` (see the module docstring).

    TLS 1.2 at least; hostname checking on.  Raises UsageError naming the
    file when one is missing, unreadable or not what its name says.
    """
    directory = Path(tls_dir)
    if not directory.is_dir():
        raise UsageError(f"TLS directory {directory} does not exist (want {CA_CERT}, "
                         f"{CLIENT_CERT} and {CLIENT_KEY} in it)")
    for name in (CA_CERT, CLIENT_CERT, CLIENT_KEY):
        path = directory / name
        if not path.is_file():
            raise UsageError(f"TLS directory {directory} has no {name} (want {CA_CERT}, "
                             f"{CLIENT_CERT} and {CLIENT_KEY})")
        if not os.access(path, os.R_OK):
            raise UsageError(f"TLS file {path} is not readable")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verify_mode REQUIRED, check_hostname
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cafile=str(directory / CA_CERT))
    except ssl.SSLError as exc:
        raise UsageError(f"TLS file {directory / CA_CERT} is not a PEM certificate: "
                         f"{_ssl_reason(exc)}") from None
    def encrypted_key() -> str:
        # Without this, OpenSSL would prompt on the terminal (or hang without one).
        raise UsageError(f"TLS file {directory / CLIENT_KEY} is encrypted; QEMU's x509 "
                         f"directories hold unencrypted keys (protect it with mode 0600)")

    try:
        context.load_cert_chain(str(directory / CLIENT_CERT), str(directory / CLIENT_KEY),
                                password=encrypted_key)
    except ssl.SSLError as exc:
        raise UsageError(f"TLS files {directory / CLIENT_CERT} and {CLIENT_KEY}: not a "
                         f"matching PEM certificate and key: {_ssl_reason(exc)}") from None
    return context
