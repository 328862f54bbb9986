"""Run the vmsnapbackup CLI with a deliberately broken write order (for the crash tests).

``core.atomic`` is made to publish files without fsyncing their data first
(the rename reaches the disk, the data may not): the classic bug the power-loss
tests must catch.  Directory fsyncs are kept, so only the data order is wrong.
Usage: ``python brokenorder.py [CLI ARGS...]``.
"""
from __future__ import annotations

import os
import stat
import sys
from typing import Any


class _NoFileFsync:
    """``os`` as atomic.py sees it, except that fsync of a regular file does nothing."""

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    @staticmethod
    def fsync(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return
        os.fsync(fd)


def main() -> int:
    from vmsnapbackup.core import atomic

    setattr(atomic, "os", _NoFileFsync())  # noqa: B010 (the module global atomic.py reads)
    from vmsnapbackup.cli import main as cli_main

    return int(cli_main(sys.argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
