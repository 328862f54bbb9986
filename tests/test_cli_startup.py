"""What the command line costs before it does anything: ``--help``, a parse
error and the parser of every command load neither numpy nor libvirt-python nor
xxhash nor QEMU's client (the handler imports its workflow when it runs).

Checked through ``sys.modules`` in a fresh interpreter, never by timing.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List

import poolfake
import pytest

from vmsnapbackup.cli import _command_names
from vmsnapbackup.core import defaults
from vmsnapbackup.core.pool import Pool

#: Modules the start-up path must not load.
HEAVY = ("numpy", "libvirt", "xxhash", "qemu", "subprocess", "vmsnapbackup.workflows",
         "vmsnapbackup.adapters")

def _heavy_after(code: str) -> List[str]:
    probe = (f"import sys\n{code}\n"
             f"print(__import__('json').dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True)
    loaded: List[str] = json.loads(proc.stdout.strip().splitlines()[-1])
    return loaded


def _run_main(*argv: str) -> str:
    return ("from vmsnapbackup.cli import main\n"
            f"rc = main({list(argv)!r})\n"
            "assert rc in (0, 2), rc")


@pytest.mark.parametrize("name", sorted(_command_names()))
def test_command_module_is_cheap_to_import(name: str) -> None:
    assert _heavy_after(f"import vmsnapbackup.cli.{name}") == []


@pytest.mark.parametrize("argv", [["backup", "--help"], ["list", "--help"],
                                  ["verify", "--help"], ["prune", "--help"],
                                  ["repair", "--help"], ["backup"]])
def test_a_command_parses_without_loading_the_others(argv: List[str]) -> None:
    assert _heavy_after(_run_main(*argv)) == []


def test_top_level_help_loads_nothing_heavy() -> None:
    assert _heavy_after(_run_main("--help")) == []


def test_the_backup_defaults_in_the_help_are_the_librarys() -> None:
    """The parser shows core.defaults' numbers without importing the workflow;
    they must be the values the library really uses."""
    from vmsnapbackup.core.tablefile import DEFAULT_BLOCK_SIZE
    from vmsnapbackup.workflows.backup import DEFAULT_THRESHOLD

    assert defaults.DEFAULT_THRESHOLD == DEFAULT_THRESHOLD
    assert defaults.DEFAULT_BLOCK_SIZE == DEFAULT_BLOCK_SIZE


#: What ``list`` of a directory pool needs no more than ``--help`` does: manifests are
#: JSON (their checksum is XXH3, so xxhash stays allowed), no table, no hypervisor.
LIST_HEAVY = ("numpy", "libvirt", "qemu", "asyncio", "subprocess", "cryptography",
              "vmsnapbackup.core.checktable", "vmsnapbackup.core.poolkey")


def test_list_of_a_pool_loads_neither_tables_nor_the_hypervisor(tmp_path: Path) -> None:
    """``list`` runs against a pool with a domain and two points (issue 16: it
    starts in under 0.1 s, so it must not pay for numpy or libvirt-python)."""
    pool = Pool.create(tmp_path / "pool")
    store = pool.domain("3f2a4b6c-1d2e-4f30-8a9b-0c1d2e3f4a5b", name="web1", create=True)
    for n in (1, 2):
        poolfake.fake_backup(store, _put, new_generation=(n == 1))
    probe = ("import sys\nfrom vmsnapbackup.cli import main\n"
             f"rc = main(['--pool', {str(pool.root)!r}, 'list'])\n"
             "assert rc == 0, rc\n"
             f"print(__import__('json').dumps([m for m in {LIST_HEAVY!r} if m in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True)
    assert "web1" in proc.stdout
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def _put(p: Path, size: int) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(os.urandom(size))
    os.chmod(p, 0o600)
