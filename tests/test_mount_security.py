"""Unit tests of the TCP export policy (issue 12): TLS, or --insecure on loopback only."""
from __future__ import annotations

from pathlib import Path

import pytest

from vmsnapbackup.errors import UsageError
from vmsnapbackup.workflows.access import TLS_SERVER_FILES, check_tcp_security


def tls_dir(tmp_path: Path, files: tuple[str, ...] = TLS_SERVER_FILES) -> str:
    for f in files:
        (tmp_path / f).write_text("x")
    return str(tmp_path)


@pytest.mark.parametrize("bind", ["127.0.0.1", "127.0.0.5", "::1", "localhost"])
def test_insecure_on_loopback_is_allowed(bind: str) -> None:
    assert check_tcp_security(bind, None, True) is None


@pytest.mark.parametrize("bind", ["0.0.0.0", "::", "192.168.1.4", "example.org"])
def test_insecure_off_loopback_is_refused(bind: str) -> None:
    with pytest.raises(UsageError, match="not a loopback"):
        check_tcp_security(bind, None, True)


@pytest.mark.parametrize("bind", ["127.0.0.1", "0.0.0.0"])
def test_tcp_without_tls_or_insecure_is_refused(bind: str) -> None:
    with pytest.raises(UsageError, match="without authentication"):
        check_tcp_security(bind, None, False)


def test_tls_dir_is_checked_and_made_absolute(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    d = tls_dir(tmp_path)
    monkeypatch.chdir(tmp_path.parent)
    assert check_tcp_security("0.0.0.0", tmp_path.name, False) == d


def test_tls_dir_missing_a_file_is_refused(tmp_path: Path) -> None:
    d = tls_dir(tmp_path, ("ca-cert.pem", "server-cert.pem"))
    with pytest.raises(UsageError, match=r"server-key\.pem"):
        check_tcp_security("0.0.0.0", d, False)


def test_tls_and_insecure_together_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not both"):
        check_tcp_security("127.0.0.1", tls_dir(tmp_path), True)
