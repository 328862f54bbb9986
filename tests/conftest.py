"""Unit tests: shared helpers (poolfake.py) are imported from this directory."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def run_base() -> Iterator[str]:
    """A runtime base for storage daemons that must be empty again at the end:
    every runtime directory a daemon made is gone once its test is over."""
    base = tempfile.mkdtemp(prefix="vsbu-")
    try:
        yield base
    finally:
        leftovers = os.listdir(base)
        for name in leftovers:
            path = os.path.join(base, name)
            for f in os.listdir(path):
                os.unlink(os.path.join(path, f))
            os.rmdir(path)
        os.rmdir(base)
        assert leftovers == [], f"runtime dirs left behind: {leftovers}"
