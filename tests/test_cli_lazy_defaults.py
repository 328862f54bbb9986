"""The command modules spell a few library defaults themselves so their parser
need not import the adapter holding them (it loads subprocess); the two copies
must stay equal, or ``--help`` would show a path the command does not use."""
from __future__ import annotations

from pathlib import Path


def test_hook_dir_default_is_the_installers() -> None:
    from vmsnapbackup.cli import hook
    from vmsnapbackup.hooks import install

    assert Path(install.DEFAULT_HOOKS_DIR) == hook.DEFAULT_HOOKS_DIR


def test_unit_dir_default_is_the_adapters() -> None:
    from vmsnapbackup.adapters import units
    from vmsnapbackup.cli import schedule

    assert schedule.DEFAULT_UNIT_DIR == units.DEFAULT_UNIT_DIR
