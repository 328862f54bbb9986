"""What every command shares: global options, output (text or ``--json``),
progress display, and turning errors into one line on stderr."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, TextIO

from ..errors import ExitCode, VmSnapBackupError
from ..progress import ProgressEvent

DEFAULT_URI = "qemu:///system"
DEFAULT_POOL = "/var/lib/vmsnapbackup"

log = logging.getLogger("vmsnapbackup.cli")


def add_global_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c", "--connect", dest="uri", metavar="URI",
        default=os.environ.get("LIBVIRT_DEFAULT_URI", DEFAULT_URI),
        help=f"libvirt connection URI (default: $LIBVIRT_DEFAULT_URI or {DEFAULT_URI})",
    )
    parser.add_argument(
        "--pool", metavar="PATH|NAME",
        default=os.environ.get("VMSNAPBACKUP_POOL", DEFAULT_POOL),
        help="backup pool: a directory, or the name of a libvirt dir/netfs storage pool "
        f"(default: $VMSNAPBACKUP_POOL or {DEFAULT_POOL})",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    parser.add_argument("--debug", action="store_true", help="log everything, tracebacks too")


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON document for scripts")


def setup_logging(verbose: bool, debug: bool) -> None:
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(
        level=level, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if debug
        else "vmsnapbackup: %(message)s",
    )
    if not debug:
        # our own progress lines are INFO; keep them even when not verbose
        logging.getLogger("vmsnapbackup.progress").setLevel(logging.INFO)


@dataclass
class Context:
    """The parsed global options, as plain values (never handed to the library)."""

    uri: str
    pool: str
    json: bool = False
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Context":
        return cls(uri=args.uri, pool=args.pool, json=bool(getattr(args, "json", False)))

    def emit(self, document: Dict[str, Any], text: str) -> None:
        """Print the result: the JSON document with --json, else the text."""
        if self.json:
            json.dump(document, self.out, indent=2, sort_keys=True, default=str)
            self.out.write("\n")
        else:
            self.out.write(text if text.endswith("\n") or not text else text + "\n")
        self.out.flush()

    def fail(self, exc: VmSnapBackupError) -> None:
        self.fail_message(str(exc), exc.exit_code, kind=type(exc).__name__)

    def fail_message(self, message: str, code: ExitCode, kind: str = "error") -> None:
        line = " ".join(message.split())  # one line, whatever the message held
        if self.json:
            json.dump({"error": {"kind": kind, "message": line, "exit_code": int(code)}},
                      self.out, sort_keys=True)
            self.out.write("\n")
            self.out.flush()
        print(f"vmsnapbackup: error: {line}", file=self.err)

    def progress(self) -> "ProgressDisplay":
        return ProgressDisplay(self.err, bar=self.err.isatty() and not self.json)


class ProgressDisplay:
    """A bar per disk on a terminal; a log line every few seconds otherwise."""

    LOG_EVERY = 5.0
    DRAW_EVERY = 0.1   # a terminal redraw per chunk would cost more than the chunk

    def __init__(self, stream: TextIO, bar: bool) -> None:
        self._stream = stream
        self._bar = bar
        self._started: Dict[str, float] = {}
        self._last_log: Dict[str, float] = {}
        self._log = logging.getLogger("vmsnapbackup.progress")

    def __call__(self, ev: ProgressEvent) -> None:
        now = time.monotonic()
        key = f"{ev.disk}:{ev.phase}"
        start = self._started.setdefault(key, now)
        elapsed = max(now - start, 1e-6)
        rate = ev.done / elapsed / 2**20
        pct = 100.0 * ev.done / ev.total if ev.total else 100.0
        if self._bar:
            if not ev.finished and now - self._last_log.get(key, 0.0) < self.DRAW_EVERY:
                return
            self._last_log[key] = now
            width = 30
            filled = int(width * pct / 100)
            self._stream.write(
                f"\r{ev.disk:>6} {ev.phase:<8} [{'#' * filled}{'.' * (width - filled)}] "
                f"{pct:5.1f}% {_size(ev.done)}/{_size(ev.total)} {rate:7.1f} MiB/s"
            )
            if ev.finished:
                self._stream.write("\n")
            self._stream.flush()
        elif ev.finished or now - self._last_log.get(key, start) >= self.LOG_EVERY:
            self._last_log[key] = now
            self._log.info("%s %s %.1f%% (%s of %s, %.1f MiB/s)%s", ev.disk, ev.phase, pct,
                           _size(ev.done), _size(ev.total), rate, " done" if ev.finished else "")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


size_text = _size
