"""What every command shares: global options, output (text or ``--json``),
progress display, and turning errors into one line on stderr.

Kept cheap to import (standard library, :mod:`vmsnapbackup.errors`,
:mod:`vmsnapbackup.progress`, :mod:`vmsnapbackup.core.defaults`): every command
module imports it while the parser is built, also for ``--help``.
"""
from __future__ import annotations

import argparse
import collections
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, List, Optional, TextIO, Tuple

from ..core.defaults import DEFAULT_POOL, DEFAULT_URI, POOL_ENV, URI_ENV
from ..errors import ExitCode, NotFoundError, UsageError, VmSnapBackupError

if TYPE_CHECKING:
    from ..progress import ProgressEvent

__all__ = [
    "Context",
    "ProgressDisplay",
    "add_global_options",
    "add_json_option",
    "check_pool_path",
    "setup_logging",
    "size_text",
]

log = logging.getLogger("vmsnapbackup.cli")

#: The logger progress lines go to when stderr is not a terminal.
PROGRESS_LOGGER = "vmsnapbackup.progress"


def add_global_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c", "--connect", dest="uri", metavar="URI", action=_ConnectAction,
        default=os.environ.get(URI_ENV, DEFAULT_URI),
        help=f"libvirt connection URI (default: ${URI_ENV} or {DEFAULT_URI}); "
        "backup takes several",
    )
    parser.add_argument(
        "--pool", metavar="PATH|NAME",
        default=os.environ.get(POOL_ENV, DEFAULT_POOL),
        help="backup pool: a directory, or the name of a libvirt dir/netfs storage pool "
        f"(default: ${POOL_ENV} or {DEFAULT_POOL})",
    )
    talk = parser.add_mutually_exclusive_group()
    talk.add_argument("-q", "--quiet", action="store_true",
                      help="print only warnings and errors: no progress, no summary "
                      "(--json documents and the output of 'list' are still printed)")
    talk.add_argument("-v", "--verbose", action="store_true", help="log more")
    parser.add_argument("--debug", action="store_true", help="log everything, tracebacks too")


class _ConnectAction(argparse.Action):
    """``-c URI``: the last one is ``uri``; every one given is kept in ``uris`` (backup
    takes several; any other command refuses more than one, see :attr:`Context.uri`)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: Optional[str] = None) -> None:
        setattr(namespace, self.dest, values)
        uris = list(getattr(namespace, "uris", None) or [])
        namespace.uris = [*uris, values]


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON document for scripts")


def add_data_path_options(parser: argparse.ArgumentParser, what: str) -> None:
    """``--tls-dir [DIR]`` and ``--nbd-ports`` of a command whose blocks cross between the
    backup server and a remote hypervisor (qemu+ssh); ``what`` says which blocks."""
    parser.add_argument("--tls-dir", nargs="?", const="", metavar="DIR",
                        help=f"remote hypervisor (qemu+ssh): {what} over NBD with TLS and "
                        "client certificates from DIR (QEMU's file names; default "
                        "/etc/pki/qemu) instead of through the ssh connection")
    parser.add_argument("--nbd-ports", metavar="FIRST-LAST",
                        help="with --tls-dir: the TCP ports the hypervisor may serve on "
                        "(default 10809-10872)")


def setup_logging(verbose: bool, debug: bool, quiet: bool = False) -> None:
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(
        level=level, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if debug
        else "vmsnapbackup: %(message)s",
    )
    if not debug:
        # our own progress lines are INFO; keep them even when not verbose, unless quiet
        logging.getLogger(PROGRESS_LOGGER).setLevel(logging.WARNING if quiet else logging.INFO)


def check_pool_path(spec: str) -> None:
    """Refuse a ``--pool`` path with a file where a directory must be, whatever the depth.

    ``/file`` and ``/file/sub`` are the same mistake and get the same error (and exit
    code), instead of one failing when the pool is opened and the other when its
    directories are created.  A spec without a ``/`` names a libvirt storage pool and
    is left to the library.
    """
    if "/" not in spec and not spec.startswith((".", "~")):
        return
    path = Path(os.path.abspath(os.path.expanduser(spec)))
    for p in (path, *path.parents):
        if os.path.lexists(p):
            if not p.is_dir():
                where = "" if p == path else f" (in pool path {path})"
                raise NotFoundError(f"not a vmsnapbackup pool: {p} is not a directory{where}")
            return


class Context:
    """The parsed global options, as plain values (never handed to the library).

    A plain class, not a dataclass: the dataclass machinery would cost every
    start-up, ``--help`` included, more than the rest of this module.
    """

    def __init__(self, uri: str, pool: str, json: bool = False, quiet: bool = False,
                 out: Optional[TextIO] = None, err: Optional[TextIO] = None,
                 uris: Optional[List[str]] = None) -> None:
        self._uri = uri
        #: Every ``-c`` given, in order (``[uri]`` when none or one was).
        self.uris: List[str] = list(dict.fromkeys(uris)) if uris else [uri]
        self.pool = pool
        self.json = json
        self.quiet = quiet
        self.out: TextIO = sys.stdout if out is None else out
        self.err: TextIO = sys.stderr if err is None else err
        self._displays: List[ProgressDisplay] = []

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Context":
        return cls(uri=args.uri, pool=args.pool, json=bool(getattr(args, "json", False)),
                   quiet=bool(getattr(args, "quiet", False)),
                   uris=getattr(args, "uris", None))

    @property
    def uri(self) -> str:
        """The one libvirt connection of a command that takes one."""
        if len(self.uris) > 1:
            raise UsageError(f"this command takes one -c URI, not {len(self.uris)} "
                             "(only backup takes several)")
        return self._uri

    def emit(self, document: Dict[str, Any], text: str, *, data: bool = False) -> None:
        """Print the result: the JSON document with --json, else the text.

        ``data=True`` marks text that is what the user asked to see (a listing, a
        damage report): it is printed even with --quiet, which only silences
        summaries of work done.
        """
        if self.json:
            import json

            json.dump(document, self.out, indent=2, sort_keys=True, default=str)
            self.out.write("\n")
        elif self.quiet and not data:
            return
        else:
            self.out.write(text if text.endswith("\n") or not text else text + "\n")
        self.out.flush()

    def fail(self, exc: VmSnapBackupError) -> None:
        self.fail_message(str(exc), exc.exit_code, kind=type(exc).__name__)

    def fail_message(self, message: str, code: ExitCode, kind: str = "error") -> None:
        line = " ".join(message.split())  # one line, whatever the message held
        if self.json:
            import json

            json.dump({"error": {"kind": kind, "message": line, "exit_code": int(code)}},
                      self.out, sort_keys=True)
            self.out.write("\n")
            self.out.flush()
        print(f"vmsnapbackup: error: {line}", file=self.err)

    def progress(self) -> Optional["ProgressDisplay"]:
        """A progress callback for the library, or None with --json or --quiet."""
        if self.json or self.quiet:
            return None
        display = ProgressDisplay(self.err, bar=self.err.isatty())
        self._displays.append(display)
        return display

    def close(self) -> None:
        """Stop every progress display (its ticker thread, its half-drawn line)."""
        for display in self._displays:
            display.close()
        self._displays.clear()


class _Task:
    """One disk's phase as the display knows it, with a short history for the rate."""

    WINDOW = 5.0   # seconds of history the rate is measured over

    def __init__(self, disk: str, phase: str, now: float) -> None:
        self.disk = disk
        self.phase = phase
        self.start = now
        self.done = 0
        self.total = 0
        self.samples: Deque[Tuple[float, int]] = collections.deque([(now, 0)])

    def update(self, done: int, total: int, now: float) -> None:
        self.done, self.total = done, total
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[0][0] > self.WINDOW:
            self.samples.popleft()

    def rate(self, now: float) -> float:
        """Bytes per second over the last few seconds; falls while nothing arrives."""
        t0, d0 = self.samples[0]
        return max(self.done - d0, 0) / max(now - t0, 1e-6)

    def eta(self, now: float) -> Optional[float]:
        rate = self.rate(now)
        if rate <= 0:
            return None
        return max(self.total - self.done, 0) / rate

    def percent(self) -> float:
        return 100.0 * self.done / self.total if self.total else 100.0


class ProgressDisplay:
    """A status line on a terminal, redrawn at least every second; log lines otherwise.

    The library calls it from the caller's thread; on a terminal a ticker thread
    also redraws the line every :attr:`TICK` seconds, so the elapsed rate and the
    ETA keep moving while a slow chunk or a wait holds the events back.  One lock
    keeps the two from writing over each other.
    """

    LOG_EVERY = 5.0
    DRAW_EVERY = 0.1   # a terminal redraw per chunk would cost more than the chunk
    TICK = 0.5

    def __init__(self, stream: TextIO, bar: bool,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._stream = stream
        self._bar = bar
        self._clock = clock
        self._lock = threading.Lock()
        self._tasks: Dict[str, _Task] = {}
        self._last_log: Dict[str, float] = {}
        self._drawn_at = float("-inf")
        self._line_open = False
        self._stop = threading.Event()
        self._ticker: Optional[threading.Thread] = None
        self._log = logging.getLogger(PROGRESS_LOGGER)

    def __call__(self, ev: "ProgressEvent") -> None:
        now = self._clock()
        key = f"{ev.disk}:{ev.phase}"
        with self._lock:
            task = self._tasks.get(key)
            if task is None:
                task = self._tasks[key] = _Task(ev.disk, ev.phase, now)
            task.update(ev.done, ev.total, now)
            if self._bar:
                self._on_terminal(key, task, ev.finished, now)
            else:
                self._as_log_line(key, task, ev.finished, now)

    def redraw(self) -> None:
        """Draw the status line now (what the ticker does every :attr:`TICK` seconds)."""
        with self._lock:
            if self._tasks:
                self._draw(self._clock())

    def close(self) -> None:
        self._stop.set()
        ticker = self._ticker
        if ticker is not None and ticker is not threading.current_thread():
            ticker.join()
        self._ticker = None
        with self._lock:
            if self._line_open:
                self._stream.write("\n")
                self._stream.flush()
                self._line_open = False

    # terminal -------------------------------------------------------------------------

    def _on_terminal(self, key: str, task: _Task, finished: bool, now: float) -> None:
        if finished:
            del self._tasks[key]
            elapsed = max(now - task.start, 1e-6)
            self._write(f"{task.disk:>6} {task.phase:<8} 100.0% {_size(task.total)} in "
                        f"{elapsed:.1f} s ({_size(task.done / elapsed)}/s)", end=True)
            if self._tasks:
                self._draw(now)
            return
        if self._ticker is None:
            self._ticker = threading.Thread(target=self._tick, name="vsb-progress", daemon=True)
            self._ticker.start()
        if now - self._drawn_at >= self.DRAW_EVERY:
            self._draw(now)

    def _tick(self) -> None:
        while not self._stop.wait(self.TICK):
            with self._lock:
                if not self._tasks:  # all finished: a later event starts a new ticker
                    self._ticker = None
                    return
                self._draw(self._clock())

    def _draw(self, now: float) -> None:
        self._drawn_at = now
        tasks = list(self._tasks.values())
        if len(tasks) == 1:
            t = tasks[0]
            width = 20
            filled = int(width * t.percent() / 100)
            head = (f"{t.disk:>6} {t.phase:<8} [{'#' * filled}{'.' * (width - filled)}] "
                    f"{t.percent():5.1f}% {_size(t.done)}/{_size(t.total)}")
        else:
            head = "  ".join(f"{t.disk} {t.phase} {t.percent():.0f}%" for t in tasks)
        rate = sum(t.rate(now) for t in tasks)
        etas = [t.eta(now) for t in tasks]
        eta = "--:--" if any(e is None for e in etas) else _clock_text(
            max(e for e in etas if e is not None))
        self._write(f"{head} {_size(rate)}/s ETA {eta}", end=False)

    def _write(self, line: str, end: bool) -> None:
        import shutil

        columns = shutil.get_terminal_size((100, 24)).columns
        self._stream.write("\r" + line[: max(columns - 1, 20)] + "\x1b[K" + ("\n" if end else ""))
        self._stream.flush()
        self._line_open = not end

    # not a terminal ---------------------------------------------------------------------

    def _as_log_line(self, key: str, task: _Task, finished: bool, now: float) -> None:
        if not finished and now - self._last_log.get(key, task.start) < self.LOG_EVERY:
            return
        self._last_log[key] = now
        rate = task.done / max(now - task.start, 1e-6) / 2**20
        self._log.info("%s %s %.1f%% (%s of %s, %.1f MiB/s)%s", task.disk, task.phase,
                       task.percent(), _size(task.done), _size(task.total), rate,
                       " done" if finished else "")
        if finished:
            del self._tasks[key]


def _clock_text(seconds: float) -> str:
    s = int(seconds + 0.5)
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


size_text = _size
