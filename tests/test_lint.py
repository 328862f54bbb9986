"""No unused imports, undefined names or dead variables in the package (pyflakes).

The package ``__init__`` is left out: its public names come from a star import and a
lazy ``__getattr__`` (tests/test_public_api.py checks those resolve).
"""
from __future__ import annotations

from pathlib import Path

import pytest

pyflakes_api = pytest.importorskip("pyflakes.api")
from pyflakes.reporter import Reporter  # noqa: E402

PACKAGE = Path(__file__).resolve().parent.parent / "vmsnapbackup"


class _Collect(Reporter):
    def __init__(self) -> None:
        self.messages: list = []

    def unexpectedError(self, filename, msg):  # noqa: N802 (pyflakes' API)
        self.messages.append(f"{filename}: {msg}")

    def syntaxError(self, filename, msg, lineno, offset, text):  # noqa: N802
        self.messages.append(f"{filename}:{lineno}: {msg}")

    def flake(self, message):
        self.messages.append(str(message))


def test_package_is_pyflakes_clean():
    report = _Collect()
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "__init__.py":
            continue
        pyflakes_api.checkPath(str(path), report)
    assert report.messages == []
