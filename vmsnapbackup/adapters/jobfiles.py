"""Read the job configuration file from the host, refusing one others could have changed.

The file decides which commands root runs every night, so it is trusted only
if root owns it and neither group nor others may write it (as sudo treats
sudoers).  The host checks the pure validator cannot make itself (does the
pool exist, does systemd accept the calendar) are handed to it from here.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from ..core.jobconfig import Config, ConfigError, Settings, parse_config, parse_settings
from ..errors import VmSnapBackupError
from .storagepool import looks_like_path, resolve_pool
from .units import check_calendar

__all__ = ["load_config", "load_settings"]


def _check_pool(spec: str, uri: str) -> str | None:
    if looks_like_path(spec):
        return None if Path(spec).is_dir() else f"pool directory {spec} does not exist"
    try:
        resolve_pool(spec, uri)
    except VmSnapBackupError as exc:
        return str(exc)
    return None


def _read_trusted(path: str, check_owner: bool) -> str:
    """The file's text, opened without following a link; ConfigError if others could
    have changed it (not root's, or writable by group or others) or it is not UTF-8."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the configuration: {exc.strerror}"]) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if check_owner and st.st_uid != 0:
            raise ConfigError([f"{path}: refused: owned by uid {st.st_uid}, not root"])
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ConfigError([(f"{path}: refused: writable by group or others "
                               f"(mode {stat.S_IMODE(st.st_mode):04o}; chmod go-w {path})")])
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None


def load_config(path: str, *, check_owner: bool = True) -> Config:
    """Parse ``path``; ConfigError (exit 2) for an unsafe or wrong file."""
    text = _read_trusted(path, check_owner)
    return parse_config(text, path, check_calendar=check_calendar, check_pool=_check_pool)


def load_settings(path: str, *, check_owner: bool = True) -> Settings | None:
    """The file's ``state-dir`` and ``metrics`` for a standalone command; None when
    the file does not exist.  Jobs are not checked (the command runs none of them):
    a host whose jobs are broken still gets its backups' metrics.  The same trust
    rules as :func:`load_config` apply: the metrics path is written as root."""
    if not os.path.lexists(path):
        return None
    return parse_settings(_read_trusted(path, check_owner), path)
