"""Issue 18 item 3: vmsnapbackup beside virtnbdbackup on the same running domain.

virtnbdbackup refuses to run beside a checkpoint it did not make ("Foreign
checkpoint found").  With ``vmsnapbackup checkpoints off DOMAIN`` our backups leave
no checkpoint (and the command removes the ones we made), so both tools back the
same running domain up, in either order."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from domains import DiskSpec, DomainFactory

from vmsnapbackup.cli import main
from vmsnapbackup.core.defaults import DEFAULT_URI

pytestmark = pytest.mark.integration

VIRTNBDBACKUP = shutil.which("virtnbdbackup")
if VIRTNBDBACKUP is None:
    pytest.skip("virtnbdbackup is not installed (scripts/setup.sh installs the Debian "
                "package)", allow_module_level=True)


def _checkpoints(td) -> list[str]:  # type: ignore[no-untyped-def]
    return sorted(cp.getName() for cp in td.dom.listAllCheckpoints(0))


def _virtnbdbackup(td, level: str, out: Path) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    assert VIRTNBDBACKUP is not None
    return subprocess.run([VIRTNBDBACKUP, "-U", DEFAULT_URI, "-d", td.name, "-l", level,
                           "-o", str(out)], capture_output=True, text=True, timeout=300,
                          check=False)


def test_virtnbdbackup_runs_after_a_checkpoint_free_backup(
        make_domain: DomainFactory, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    td = make_domain(disks=[DiskSpec("vda", "qcow2", 64 * 2**20)])
    td.write("vda", 2**20, 2**20, 0x11)
    pool = str(tmp_path / "pool")
    vnb = tmp_path / "vnb"
    try:
        # a backup as by default: its new generation leaves a checkpoint of ours
        assert main(["--pool", pool, "backup", td.name]) == 0
        assert any(n.startswith("vmsnapbackup-") for n in _checkpoints(td))

        # off for this domain: ours removed at once, the setting kept in the domain
        assert main(["checkpoints", "off", td.name]) == 0
        assert _checkpoints(td) == []
        assert "urn:vmsnapbackup:domain:1" in td.dom.XMLDesc(0)
        capsys.readouterr()

        td.write("vda", 4 * 2**20, 2**20, 0x22)
        assert main(["--pool", pool, "backup", td.name]) == 0
        assert _checkpoints(td) == []          # checkpoint-free, by the domain's setting

        first = _virtnbdbackup(td, "full", vnb)
        assert first.returncode == 0, first.stderr[-2000:]
        theirs = _checkpoints(td)
        assert theirs and not any(n.startswith("vmsnapbackup-") for n in theirs)

        # and the other way round: our backup beside their checkpoint leaves it alone
        td.write("vda", 8 * 2**20, 2**20, 0x33)
        assert main(["--pool", pool, "backup", td.name]) == 0
        assert _checkpoints(td) == theirs
        second = _virtnbdbackup(td, "inc", vnb)
        assert second.returncode == 0, second.stderr[-2000:]

        # 'show' reports both sides; 'remove' never touches theirs
        capsys.readouterr()
        assert main(["checkpoints", "remove", td.name]) == 0
        out = capsys.readouterr().out
        assert "off" in out and theirs[0] in out
        assert set(theirs) <= set(_checkpoints(td))
    finally:
        for cp in reversed(td.dom.listAllCheckpoints(0)):
            cp.delete(0)


def test_no_dirty_bitmaps_also_removes_ours(make_domain: DomainFactory, tmp_path: Path) -> None:
    td = make_domain(disks=[DiskSpec("vda", "qcow2", 32 * 2**20)])
    pool = str(tmp_path / "pool")
    assert main(["--pool", pool, "backup", td.name]) == 0
    assert any(n.startswith("vmsnapbackup-") for n in _checkpoints(td))
    assert main(["--pool", pool, "backup", td.name, "--no-dirty-bitmaps"]) == 0
    assert _checkpoints(td) == []
