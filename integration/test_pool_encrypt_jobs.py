"""``run`` into an encrypted pool on the real stack (FORMAT.md §15.2, docs/JOBS.md): a
``[pools.NAME]`` table with ``key-file`` makes the job's first backup create the pool
encrypted and every later one continue it; verify and prune run with it, and the
points restore bit-exact with the key.  The same key-file on a plain pool is
refused for that domain (one line in the run's report), the pool left as it was.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from domains import DiskModel, TestDomain

from vmsnapbackup.cli import main
from vmsnapbackup.core.pool import Pool
from vmsnapbackup.workflows.restore import restore

pytestmark = pytest.mark.integration

MiB = 2**20


def _run(capsys: pytest.CaptureFixture[str], cfg: Path) -> tuple[int, dict]:  # type: ignore[type-arg]
    code = main(["run", "--config", str(cfg), "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_run_backs_up_into_an_encrypted_pool(running_domain: TestDomain, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    dom = running_domain
    key = tmp_path / "pool.key"
    key.write_bytes(b"Zt3qv8Yb0Lk2Wm9Xp4Rn7Cd1Hs6Gf5Ja3Ue8Ti0Oy2=\n")
    key.chmod(0o600)
    pool, plain = tmp_path / "pool", tmp_path / "plain"
    pool.mkdir()
    Pool.create(plain)
    cfg = tmp_path / "vmsnapbackup.toml"
    cfg.write_text(f"""
state-dir = "{tmp_path / 'state'}"
[pools.enc]
path = "{pool}"
key-file = "{key}"
[pools.wrong]
path = "{plain}"
key-file = "{key}"
[jobs.nightly]
domains = ["{dom.name}"]
pool = "enc"
schedule = "daily"
[jobs.nightly.retention]
keep-last = 1
[jobs.nightly.verify]
sample-percent = 50
[jobs.misfit]
domains = ["{dom.name}"]
pool = "wrong"
schedule = "daily"
""")
    os.chmod(cfg, 0o600)
    model = DiskModel(dom)
    model.write("vda", 3 * MiB, 1 * MiB, 0x61)
    code, doc = _run(capsys, cfg)
    jobs = {j["job"]: j for j in doc["jobs"]}
    assert code == 1 and jobs["nightly"]["ok"] and not jobs["misfit"]["ok"]
    (d,) = jobs["nightly"]["domains"]
    assert d["backup"]["detail"]["point"] == 1 and d["verify"]["ok"]
    (m,) = jobs["misfit"]["domains"]
    assert "not encrypted" in m["backup"]["error"] and "\n" not in m["backup"]["error"]
    assert list(Pool.open(plain).domains()) == []

    model.write("vdb", 1 * MiB, 64 * 1024, 0x62)
    expected = model.snapshot()
    code, doc = _run(capsys, cfg)
    (d,) = next(j for j in doc["jobs"] if j["job"] == "nightly")["domains"]
    assert d["backup"]["detail"]["point"] == 2 and d["prune"]["detail"]["removed"] == [1]
    assert d["verify"]["ok"]

    header = json.loads((pool / "vmsnapbackup-pool.json").read_bytes())
    assert header["encryption"]["volumes"] == "qcow2-luks-aes-256-xts"
    result = restore(dom.name, pool, point=2, to=tmp_path / "out", key_file=str(key))
    assert result.ok
    for disk in result.disks:
        assert Path(disk.path).read_bytes() == expected[disk.target], disk.target
