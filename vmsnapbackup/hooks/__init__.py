"""The libvirt qemu hook: its decisions (``logic``), its policy file (``config``),
the jobs it hands off (``jobs``), who it trusts (``trust``) and putting the shim
where libvirtd looks for it (``install``).

``hooks/qemu`` in the repository is only a POSIX sh shim that runs
:func:`~vmsnapbackup.hooks.logic.shim_main` and lets the domain go ahead when
Python or the package cannot.  Kept light on purpose: libvirtd runs the hook on
every domain start and stop.
"""
from __future__ import annotations

from .config import HookConfig, load_config
from .logic import hook_main

__all__ = ["HookConfig", "hook_main", "load_config"]
