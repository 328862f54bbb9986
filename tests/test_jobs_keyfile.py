"""An encrypted pool in the job configuration (FORMAT.md §15.2): ``key-file`` in a
``[pools.NAME]`` table makes every job on that pool back up encrypted and verify
with the key; a relative path is one line at load time."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from vmsnapbackup.core.jobconfig import ConfigError, DomainEntry, parse_config
from vmsnapbackup.workflows import run as run_mod

CONFIG = """\
state-dir = "{state}"
[pools.secret]
path = "/pool/enc"
key-file = "{key}"
[pools.plain]
path = "/pool/plain"
[jobs.enc]
domains = ["a"]
pool = "secret"
schedule = "daily"
[jobs.enc.verify]
sample-percent = 10
[jobs.clear]
domains = ["a"]
pool = "plain"
schedule = "daily"
"""


def _config(tmp_path: Path, key: str = "/root/pool.key") -> Any:
    return parse_config(CONFIG.format(state=tmp_path / "state", key=key), "c.toml")


def test_the_pool_key_file_reaches_its_jobs_only(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    assert cfg.jobs["enc"].key_file == "/root/pool.key"
    assert cfg.jobs["clear"].key_file is None


def test_a_relative_key_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        _config(tmp_path, "pool.key")
    assert err.value.problems == [
        "c.toml:4: pools.secret.key-file: must be an absolute path, not 'pool.key'"]


def test_run_backs_up_encrypted_and_verifies_with_the_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def backup(domain: str, pool: str, **kw: Any) -> Any:
        seen.setdefault("backup", []).append((pool, kw["options"]))
        return SimpleNamespace(point=1, generation=1, consistency="crash", disks=[],
                               bytes_written=0, bytes_read=0,
                               skipped=[], new_generation=True)

    def verify(pool: str, **kw: Any) -> Any:
        seen.setdefault("verify", []).append((pool, kw.get("key_file")))
        return SimpleNamespace(ok=True, counts=lambda: {"good": 1})

    monkeypatch.setattr(run_mod, "backup", backup)
    monkeypatch.setattr(run_mod, "verify", verify)
    monkeypatch.setattr(run_mod, "list_domains",
                        lambda uri: [DomainEntry("a", True)])
    monkeypatch.setattr(run_mod, "list_points", lambda pool, **kw: [])
    cfg = _config(tmp_path)
    for job in cfg.jobs.values():
        assert run_mod.run_job(job).ok
    (enc_pool, enc), (plain_pool, plain) = seen["backup"]
    assert enc_pool == "/pool/enc" and enc.encrypt and enc.key_file == "/root/pool.key"
    assert plain_pool == "/pool/plain" and not plain.encrypt and plain.key_file is None
    assert seen["verify"] == [("/pool/enc", "/root/pool.key")]
