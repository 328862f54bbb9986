"""What the command line costs before it does anything: ``--help``, a parse
error and the parser of every command load neither numpy nor libvirt-python nor
xxhash nor QEMU's client (the handler imports its workflow when it runs).

Checked through ``sys.modules`` in a fresh interpreter, never by timing.
"""
from __future__ import annotations

import json
import subprocess
import sys
from typing import List

import pytest

from vmsnapbackup.cli import _command_names
from vmsnapbackup.core import defaults

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
