"""``mount --port`` on the real stack: TLS with verified client certificates, or plain
NBD only when asked (``--insecure``) and only on loopback (issue 12, authenticated
exports).  The certificates are made here with the openssl CLI."""
from __future__ import annotations

import os
import shutil
import socket as socketlib
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_access import Points, points  # noqa: F401  (fixture)

from vmsnapbackup.cli import main
from vmsnapbackup.errors import UsageError
from vmsnapbackup.workflows.access import mount_point

pytestmark = pytest.mark.integration


def _openssl(*argv: str, cwd: Path) -> None:
    subprocess.run(["openssl", *argv], check=True, capture_output=True, cwd=cwd)


def make_certs(d: Path) -> tuple[Path, Path, Path]:
    """A CA, a server directory (QEMU's names) and two client directories: one with a
    client certificate the CA signed, one with the CA certificate only."""
    d.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=vsb test CA", "-keyout", "ca-key.pem", "-out", "ca-cert.pem",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    for who, ext in (("server", "serverAuth"), ("client", "clientAuth")):
        (d / f"{who}.ext").write_text(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            f"extendedKeyUsage={ext}\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
                 "-keyout", f"{who}-key.pem", "-out", f"{who}.csr", cwd=d)
        _openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca-cert.pem",
                 "-CAkey", "ca-key.pem", "-CAcreateserial", "-days", "2",
                 "-extfile", f"{who}.ext", "-out", f"{who}-cert.pem", cwd=d)
    server, client, nocert = d / "server", d / "client", d / "nocert"
    for sub, files in ((server, ("ca-cert.pem", "server-cert.pem", "server-key.pem")),
                       (client, ("ca-cert.pem", "client-cert.pem", "client-key.pem")),
                       (nocert, ("ca-cert.pem",))):
        sub.mkdir()
        for f in files:
            (sub / f).write_bytes((d / f).read_bytes())
    for sub in (client, nocert):         # user nobody must be able to read its own client files
        os.chmod(d, 0o755)
        sub.chmod(0o755)
        for f in sub.iterdir():
            f.chmod(0o644)
    return server, client, nocert


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory user nobody can reach (pytest's tmp_path is root's 0700)."""
    d = Path(tempfile.mkdtemp(prefix="vsb-tls-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


def free_port() -> int:
    with socketlib.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def qemu_img_read(port: int, export: str, out: Path, tls: Path | None,
                  user: str | None = None) -> subprocess.CompletedProcess[bytes]:
    argv = ["qemu-img", "convert", "-O", "raw"]
    opts = f"driver=nbd,host=127.0.0.1,port={port},export={export}"
    if tls is not None:
        argv += ["--object", f"tls-creds-x509,id=tls0,dir={tls},endpoint=client"]
        opts += ",tls-creds=tls0"
    argv += ["--image-opts", opts, str(out)]
    if user is not None:
        argv = ["runuser", "-u", user, "--", *argv]
    return subprocess.run(argv, capture_output=True, timeout=60)


def test_tls_mount_needs_a_client_certificate(points: Points,  # noqa: F811
                                              public_dir: Path) -> None:
    server, client, nocert = make_certs(public_dir / "pki")
    out = public_dir / "out"
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    port = free_port()
    with mount_point(points.dom.name, points.pool, 1, "vda", port=port,
                     tls_dir=str(server)) as m:
        assert m.uri == f"nbds://127.0.0.1:{port}/vda" and m.tls_dir == str(server)
        # plain NBD from user nobody: the server wants TLS
        r = qemu_img_read(port, "vda", out / "plain.raw", None, user="nobody")
        assert r.returncode != 0 and b"TLS" in r.stderr, r
        # TLS without a client certificate, from user nobody: refused (verify-peer)
        r = qemu_img_read(port, "vda", out / "nocert.raw", nocert, user="nobody")
        assert r.returncode != 0 and not (out / "nocert.raw").exists(), r
        # a client with a certificate the CA signed reads the point bit-exact
        r = qemu_img_read(port, "vda", out / "good.raw", client)
        assert r.returncode == 0, r.stderr
        assert (out / "good.raw").read_bytes() == points.expected[1]["vda"]
    with socketlib.socket() as c:
        assert c.connect_ex(("127.0.0.1", port)) != 0, "the port is still served"


def test_insecure_is_loopback_only(points: Points, tmp_path: Path) -> None:  # noqa: F811
    port = free_port()
    with mount_point(points.dom.name, points.pool, 1, "vda", port=port, insecure=True) as m:
        assert m.uri == f"nbd://127.0.0.1:{port}/vda"
        r = qemu_img_read(port, "vda", tmp_path / "ins.raw", None)
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "ins.raw").read_bytes() == points.expected[1]["vda"]
    for kwargs in ({}, {"bind": "0.0.0.0", "insecure": True}, {"bind": "0.0.0.0"}):
        with pytest.raises(UsageError), \
                mount_point(points.dom.name, points.pool, 1, "vda", port=port, **kwargs):
            pass


def test_cli_refuses_a_network_bind_without_tls(points: Points,  # noqa: F811
                                                capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--pool", str(points.pool), "mount", points.dom.name, "--point", "1",
               "--disk", "vda", "--port", str(free_port()), "--bind", "0.0.0.0"])
    err = capsys.readouterr().err
    assert rc == UsageError.exit_code
    assert len(err.strip().splitlines()) == 1 and "--tls-dir" in err
