"""``vmsnapbackup`` run as a user runs it, with the time of each of its steps.

The command runs in a fresh interpreter exactly as the console script does
(``from vmsnapbackup.cli import main``), with one addition: a logging handler on
the ``vmsnapbackup`` logger that notes the wall-clock time of every INFO record
(the library writes them anyway) into a file.  No debug logging, whose QMP dumps
would cost time of their own.  The phases are the seconds between the first
record that marks the end of each step: what a backup spends outside its disk
pass, split (issues 16, 20).  Bytecode is written and used as in an installed
package, whatever ``PYTHONDONTWRITEBYTECODE`` says.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

#: (phase, substring of the INFO record that ends it).
BACKUP_MARKS = (
    ("start-up: interpreter, imports, connect, lock", "backup point"),
    ("journal, checkpoint, snapshot", "snapshot in"),
    ("storage daemon, exports", "exported"),
    ("disk pass (read, hash, write)", "blocks ("),
    ("commit back", "back on its original images"),
    ("tables, manifest (seal)", "sealed"),
)
#: For a shut-off domain: no snapshot, no commit.
OFFLINE_MARKS = (
    ("start-up: interpreter, imports, connect, lock", "backup point"),
    ("journal", "backup point"),
    ("storage daemon, exports", "exported"),
    ("disk pass (read, hash, write)", "blocks ("),
    ("commit back", "blocks ("),
    ("tables, manifest (seal)", "sealed"),
)

_WRAPPER = """
import logging, os, sys, time
class _Marks(logging.Handler):
    def __init__(self, path):
        super().__init__(logging.INFO)
        self.f = open(path, "w")
    def emit(self, record):
        self.f.write(f"{time.time():.6f} {record.getMessage()[:200]!r}\\n")
        self.f.flush()
logging.getLogger("vmsnapbackup").addHandler(_Marks(os.environ["VSB_BENCH_MARKS"]))
logging.getLogger("vmsnapbackup").setLevel(logging.INFO)
from vmsnapbackup.cli import main
sys.exit(main())
"""


def run_cli(cli_python: str, argv: Sequence[str], marks: Path,
            env: Optional[Dict[str, str]] = None) -> Tuple[float, float, float, str]:
    """(wall seconds, start, end, stdout) of ``vmsnapbackup ARGV``; marks go to ``marks``."""
    full = dict(os.environ, **(env or {}), VSB_BENCH_MARKS=str(marks))
    # an installed package has its bytecode; without it every start compiles every
    # module it imports (measured: 1.6-2.7 s instead of 0.9 s for a backup's start-up)
    full.pop("PYTHONDONTWRITEBYTECODE", None)
    t0 = time.time()
    proc = subprocess.run([cli_python, "-c", _WRAPPER, *argv], capture_output=True, text=True,
                          env=full)
    t1 = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"vmsnapbackup {' '.join(argv)} failed ({proc.returncode}): "
                           f"{proc.stderr.strip()[-2000:]}")
    return t1 - t0, t0, t1, proc.stdout


def _records(marks: Path) -> List[Tuple[float, str]]:
    out = []
    for line in marks.read_text().splitlines():
        stamp, _, message = line.partition(" ")
        out.append((float(stamp), message))
    return out


def phases(marks: Path, t0: float, t1: float,
           table: Sequence[Tuple[str, str]] = BACKUP_MARKS) -> Dict[str, Optional[float]]:
    """Seconds of each step; a step whose mark is missing is None (never a wrong number)."""
    recs = _records(marks)
    out: Dict[str, Optional[float]] = {}
    prev: Optional[float] = t0
    for name, needle in table:
        found = None
        if prev is not None:
            hits = [t for t, m in recs if t >= prev and needle in m]
            found = hits[0] if hits else None
        out[name] = None if found is None or prev is None else round(found - prev, 3)
        prev = found
    out["after the seal: checkpoints, exit"] = None if prev is None else round(t1 - prev, 3)
    return out


def backup(cli_python: str, domain: str, pool: Path, work: Path, *flags: str,
           offline: bool = False, env: Optional[Dict[str, str]] = None,
           ) -> Tuple[float, Dict[str, Optional[float]], Dict[str, Any]]:
    """One ``vmsnapbackup backup DOMAIN --json``: wall seconds, phases, its JSON document."""
    marks = work / "marks.txt"
    wall, t0, t1, out = run_cli(cli_python, ["backup", domain, "--json", *flags], marks,
                                env={"VMSNAPBACKUP_POOL": str(pool), **(env or {})})
    split = phases(marks, t0, t1, OFFLINE_MARKS if offline else BACKUP_MARKS)
    marks.unlink()
    doc: Dict[str, Any] = json.loads(out)
    return wall, split, doc


def python_of_checkout(root: Path) -> str:
    return str(root / ".venv" / "bin" / "python") if (root / ".venv").exists() else sys.executable
