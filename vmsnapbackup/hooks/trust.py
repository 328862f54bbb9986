"""Only root may decide what the hook runs as root (sshd's StrictModes, for our files).

libvirtd runs the hook as root, and the hook runs ``command=`` from its policy
file and the interpreter ``hook install`` recorded.  Whoever can change one of
those files, or rename anything on the way to it, runs code as root.  So a
path is trusted only when every component, from ``/`` down, both as written
and with symlinks resolved, is owned by root and not writable by group or
others.  A root-owned directory with the sticky bit (``/tmp``) is accepted:
others may add entries to it but cannot rename or replace root's.
"""
from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import UsageError

__all__ = ["TRUSTED_UID", "UntrustedPathError", "check_trusted", "path_problem", "tree_problem"]

#: The only owner we accept (a module constant so a test can point it elsewhere).
TRUSTED_UID = 0

#: Directories of a package tree not worth walking (bytecode caches are rewritten by Python).
_SKIP_DIRS = frozenset({"__pycache__"})


class UntrustedPathError(UsageError):
    """A file the hook would act on as root can be changed by someone other than root."""


def _prefixes(path: str) -> Iterator[str]:
    """``/``, ``/a``, ``/a/b``, ... of an absolute path, as written."""
    parts = Path(path).parts
    for i in range(1, len(parts) + 1):
        yield str(Path(*parts[:i]))


def _entry_problem(path: str, st: os.stat_result, uid: int) -> str | None:
    if st.st_uid != uid:
        return f"{path} is owned by uid {st.st_uid}, not root"
    if stat.S_ISLNK(st.st_mode):
        return None  # a symlink's own mode means nothing; its target is walked too
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        if stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX:
            return None
        who = "others" if st.st_mode & stat.S_IWOTH else "its group"
        return f"{path} is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def path_problem(path: os.PathLike[str] | str, uid: int | None = None) -> str | None:
    """Why ``path`` cannot be trusted, or None.  Walks it as written and resolved."""
    owner = TRUSTED_UID if uid is None else uid
    written = os.path.abspath(os.fspath(path))
    seen: list[str] = []
    for form in (written, os.path.realpath(written)):
        for prefix in _prefixes(form):
            if prefix in seen:
                continue
            seen.append(prefix)
            try:
                st = os.lstat(prefix)
            except OSError as err:
                return f"cannot check {prefix}: {err.strerror}"
            problem = _entry_problem(prefix, st, owner)
            if problem:
                return problem
    return None


def tree_problem(root: os.PathLike[str] | str, uid: int | None = None) -> str | None:
    """Like :func:`path_problem` for ``root``, then for everything below it."""
    owner = TRUSTED_UID if uid is None else uid
    problem = path_problem(root, owner)
    if problem:
        return problem
    errors: list[OSError] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=errors.append):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        for name in (*dirnames, *filenames):
            entry = os.path.join(dirpath, name)
            try:
                st = os.lstat(entry)
            except OSError as err:
                return f"cannot check {entry}: {err.strerror}"
            problem = _entry_problem(entry, st, owner)
            if problem:
                return problem
    if errors:
        return f"cannot check {errors[0].filename}: {errors[0].strerror}"
    return None


def check_trusted(paths: Iterable[os.PathLike[str] | str], what: str) -> None:
    """Raise :class:`UntrustedPathError` naming the first untrusted path."""
    for path in paths:
        problem = path_problem(path)
        if problem:
            raise UntrustedPathError(f"refusing {what} {os.fspath(path)}: {problem}")
