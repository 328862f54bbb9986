"""The NBD client over TLS against a real qemu-storage-daemon with x509 credentials.

Certificates are made here with the openssl CLI (a CA, a server certificate
for 127.0.0.1, client certificates, and a second CA that nobody trusts), laid
out in QEMU's file names.  The daemon requires client certificates
(``verify-peer=on``), so every test that reads proves both directions: we
verified the server, and the server accepted us.  Expected bytes come from
the image file, never from the client under test.
"""
from __future__ import annotations

import hashlib
import random
import shutil
import signal
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from tenacity import retry, retry_if_result, stop_after_delay, wait_fixed

from vmsnapbackup.adapters.nbdclient import NbdClient
from vmsnapbackup.adapters.nbdtls import CA_CERT
from vmsnapbackup.errors import ExportError, UsageError

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
EXPORT = "vda"

if shutil.which("qemu-storage-daemon") is None or shutil.which("openssl") is None:
    pytest.skip("qemu-storage-daemon and openssl are needed", allow_module_level=True)


# ---------------------------------------------------------------------------
# certificates


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _key_and_request(cwd: Path, name: str, subject: str) -> None:
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}-key.pem", "-out", f"{name}.csr", "-subj", subject,
             cwd=cwd)


def _make_ca(cwd: Path, name: str) -> None:
    _openssl("req", "-x509", "-new", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}-key.pem",
             "-out", f"{name}-cert.pem", "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=cwd)


def _sign(cwd: Path, name: str, ca: str, serial: int, extensions: str) -> None:
    (cwd / f"{name}.ext").write_text(extensions)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}-cert.pem",
             "-CAkey", f"{ca}-key.pem", "-set_serial", str(serial), "-days", "2",
             "-out", f"{name}-cert.pem", "-extfile", f"{name}.ext", cwd=cwd)


_SERVER_EXT = """basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost
"""
_CLIENT_EXT = """basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth
"""


@dataclass(frozen=True)
class Pki:
    """Directories in QEMU's layout: the server's, good clients', and bad ones."""

    server: Path      # ca-cert.pem, server-cert.pem, server-key.pem
    client: Path      # the right CA and a client certificate it signed
    rogue: Path       # the right CA, but a client certificate from another CA
    wrong_ca: Path    # a client certificate of the right CA, but trusting another CA


def _client_dir(path: Path, work: Path, ca: str, cert: str) -> Path:
    path.mkdir()
    shutil.copy(work / f"{ca}-cert.pem", path / "ca-cert.pem")
    shutil.copy(work / f"{cert}-cert.pem", path / "client-cert.pem")
    shutil.copy(work / f"{cert}-key.pem", path / "client-key.pem")
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    work = root / "work"
    work.mkdir(mode=0o700)
    _make_ca(work, "ca")
    _make_ca(work, "otherca")
    _key_and_request(work, "server", "/CN=localhost")
    _sign(work, "server", "ca", 1, _SERVER_EXT)
    _key_and_request(work, "client", "/CN=backup-server")
    _sign(work, "client", "ca", 2, _CLIENT_EXT)
    _key_and_request(work, "rogue", "/CN=intruder")
    _sign(work, "rogue", "otherca", 3, _CLIENT_EXT)
    server = root / "server"
    server.mkdir()
    shutil.copy(work / "ca-cert.pem", server / "ca-cert.pem")
    shutil.copy(work / "server-cert.pem", server / "server-cert.pem")
    shutil.copy(work / "server-key.pem", server / "server-key.pem")
    return Pki(server=server,
               client=_client_dir(root / "client", work, "ca", "client"),
               rogue=_client_dir(root / "rogue", work, "ca", "rogue"),
               wrong_ca=_client_dir(root / "wrong-ca", work, "otherca", "client"))


# ---------------------------------------------------------------------------
# the daemon


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _wait_until(ready: Callable[[], bool], seconds: float = 15.0) -> bool:
    @retry(retry=retry_if_result(lambda ok: not ok), stop=stop_after_delay(seconds),
           wait=wait_fixed(0.05), retry_error_callback=lambda state: False)
    def poll() -> bool:
        return ready()

    return poll()


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[Path, Path | None], Daemon]]:
    """Export an image read-only over TCP, with TLS from ``tls_dir`` when given."""
    started: list[Daemon] = []

    def start(image: Path, tls_dir: Path | None) -> Daemon:
        port = _free_port()
        log = tmp_path / f"qsd-{len(started)}.log"
        server = f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}"
        args = ["qemu-storage-daemon"]
        if tls_dir is not None:
            creds = f"tls-creds-x509,id=tls0,dir={tls_dir},endpoint=server,verify-peer=on"
            args += ["--object", creds]
            server += ",tls-creds=tls0"
        args += ["--blockdev", f"driver=file,filename={image},node-name=file0,read-only=on",
                 "--blockdev", "driver=raw,file=file0,node-name=disk0,read-only=on",
                 "--nbd-server", server,
                 "--export", f"type=nbd,id=exp0,node-name=disk0,name={EXPORT},writable=off"]
        with open(log, "wb") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        daemon = Daemon(proc, port, log)
        started.append(daemon)
        if not _wait_until(lambda: proc.poll() is not None or _listening(port)) \
                or proc.poll() is not None:
            pytest.fail(f"qemu-storage-daemon did not start: {log.read_text(errors='replace')}")
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """8 MiB of random data with zeroed stretches (so holes and data both occur)."""
    rng = random.Random(13)
    data = bytearray(rng.getrandbits(8 * 8 * MiB).to_bytes(8 * MiB, "little"))
    data[2 * MiB:3 * MiB] = bytes(MiB)
    data[5 * MiB + 4096:6 * MiB] = bytes(MiB - 4096)
    path = tmp_path / "disk.raw"
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------
# tests

#: What a client hears when the server did not accept its certificate.
_REFUSED = "did not accept our client certificate"


def test_tls_read_is_bit_exact_and_the_server_accepts_our_certificate(
        pki: Pki, serve: Callable[[Path, Path | None], Daemon], image: Path) -> None:
    daemon = serve(image, pki.server)
    want = image.read_bytes()
    with NbdClient.connect_tcp("127.0.0.1", daemon.port, EXPORT, tls_dir=pki.client,
                               timeout=20.0) as client:
        assert client.tls and client.size == len(want)
        got = bytearray(client.size)
        for offset, view in client.read_chunks([(0, client.size)], chunk_size=MiB):
            got[offset:offset + len(view)] = view
        assert hashlib.sha256(got).digest() == hashlib.sha256(want).digest()
        assert client.read(12345, 6789) == want[12345:12345 + 6789]
    # the nbds URI form (libnbd's spelling) reaches the same export
    uri = f"nbds://127.0.0.1:{daemon.port}/{EXPORT}?tls-certificates={pki.client}"
    with NbdClient.open_uri(uri, timeout=20.0) as client:
        assert client.tls
        assert client.read(7 * MiB, MiB) == want[7 * MiB:8 * MiB]


def test_a_plain_client_is_told_the_server_requires_tls(
        pki: Pki, serve: Callable[[Path, Path | None], Daemon], image: Path) -> None:
    daemon = serve(image, pki.server)
    with pytest.raises(ExportError, match="server requires TLS") as info:
        NbdClient.connect_tcp("127.0.0.1", daemon.port, EXPORT, timeout=20.0)
    assert "\n" not in str(info.value)


def test_a_client_without_a_certificate_is_refused(
        pki: Pki, serve: Callable[[Path, Path | None], Daemon], image: Path) -> None:
    daemon = serve(image, pki.server)
    # trusts the server, presents nothing: only verify-peer=on can refuse it
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(pki.client / CA_CERT))
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=20.0)
    with pytest.raises(ExportError, match=_REFUSED) as info:
        NbdClient(sock, EXPORT, timeout=20.0, tls=context, tls_hostname="127.0.0.1")
    assert "\n" not in str(info.value)


def test_a_client_certificate_from_another_ca_is_refused(
        pki: Pki, serve: Callable[[Path, Path | None], Daemon], image: Path) -> None:
    daemon = serve(image, pki.server)
    with pytest.raises(ExportError, match=_REFUSED) as info:
        NbdClient.connect_tcp("127.0.0.1", daemon.port, EXPORT, tls_dir=pki.rogue,
                              timeout=20.0)
    assert "\n" not in str(info.value)
    # and the server still serves the right client
    with NbdClient.connect_tcp("127.0.0.1", daemon.port, EXPORT, tls_dir=pki.client,
                               timeout=20.0) as client:
        assert client.read(0, 4096) == image.read_bytes()[:4096]


def test_a_server_not_signed_by_our_ca_is_not_trusted(
        pki: Pki, serve: Callable[[Path, Path | None], Daemon], image: Path) -> None:
    daemon = serve(image, pki.server)
    with pytest.raises(ExportError, match="the server's certificate is not trusted") as info:
        NbdClient.connect_tcp("127.0.0.1", daemon.port, EXPORT, tls_dir=pki.wrong_ca,
                              timeout=20.0)
    assert "\n" not in str(info.value)


def test_a_server_certificate_for_another_name_is_not_trusted(
        pki: Pki, serve: Callable[[Path, Path | None], Daemon], image: Path) -> None:
    daemon = serve(image, pki.server)
    with pytest.raises(ExportError, match="not trusted.*mismatch"):
        NbdClient.connect_tcp("127.0.0.1", daemon.port, EXPORT, tls_dir=pki.client,
                              tls_hostname="hypervisor.example", timeout=20.0)


def test_a_server_without_tls_refuses_starttls_and_we_never_fall_back(
        pki: Pki, serve: Callable[[Path, Path | None], Daemon], image: Path) -> None:
    daemon = serve(image, None)
    with pytest.raises(ExportError, match="server refused TLS .*plain text") as info:
        NbdClient.connect_tcp("127.0.0.1", daemon.port, EXPORT, tls_dir=pki.client,
                              timeout=20.0)
    assert "\n" not in str(info.value)


def test_missing_certificate_file_is_one_usage_line(pki: Pki, tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(pki.client / "ca-cert.pem", partial / "ca-cert.pem")
    shutil.copy(pki.client / "client-cert.pem", partial / "client-cert.pem")
    with pytest.raises(UsageError, match="has no client-key.pem"):
        NbdClient.connect_tcp("127.0.0.1", 9, EXPORT, tls_dir=partial)
