"""What a run over many domains shows: a line per domain while it runs, a table at the end.

On a terminal each domain has its own bar line (waiting, reading with its
rate, done or FAILED), redrawn in place by one ticker thread so the lines keep
moving while a domain waits; otherwise (a log, a pipe) each domain gets a log
line when it starts, every few seconds while it reads, and when it ends.  The
domains' threads call in concurrently; one lock orders the output.

Imported only when such a run starts (not a command module: its name starts
with ``_``).
"""
from __future__ import annotations

import collections
import logging
import shutil
import threading
import time
from typing import TYPE_CHECKING, Callable, Deque, Dict, List, Optional, TextIO, Tuple

from .common import PROGRESS_LOGGER, size_text

if TYPE_CHECKING:
    from ..progress import ProgressEvent
    from ..workflows.backupmany import DomainBackup, DomainTarget, ManyBackups

__all__ = ["ManyDisplay", "summary_text"]


class _Domain:
    WINDOW = 5.0

    def __init__(self, label: str) -> None:
        self.label = label
        self.state = "waiting"
        self.start = 0.0
        self.disks: Dict[str, Tuple[int, int]] = {}
        self.samples: Deque[Tuple[float, int]] = collections.deque()
        self.note = ""

    @property
    def done(self) -> int:
        return sum(d for d, _ in self.disks.values())

    @property
    def total(self) -> int:
        return sum(t for _, t in self.disks.values())

    def sample(self, now: float) -> None:
        self.samples.append((now, self.done))
        while len(self.samples) > 2 and now - self.samples[0][0] > self.WINDOW:
            self.samples.popleft()

    def rate(self, now: float) -> float:
        if not self.samples:
            return 0.0
        t0, d0 = self.samples[0]
        return max(self.done - d0, 0) / max(now - t0, 1e-6)

    def percent(self) -> float:
        return 100.0 * self.done / self.total if self.total else 0.0


class ManyDisplay:
    """The observer of :func:`vmsnapbackup.workflows.backupmany.backup_many` for a person."""

    LOG_EVERY = 5.0
    TICK = 0.5

    def __init__(self, stream: TextIO, bar: bool, labels: List[str],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._stream = stream
        self._bar = bar
        self._clock = clock
        self._lock = threading.Lock()
        self._domains = {label: _Domain(label) for label in labels}
        self._drawn = 0
        self._last_log: Dict[str, float] = {}
        self._stop = threading.Event()
        self._ticker: Optional[threading.Thread] = None
        self._log = logging.getLogger(PROGRESS_LOGGER)

    # the observer -------------------------------------------------------------------

    def started(self, target: "DomainTarget") -> None:
        with self._lock:
            d = self._domain(target.label)
            d.state, d.start = "running", self._clock()
            d.sample(d.start)
            if self._bar:
                self._start_ticker()
                self._draw()
            else:
                self._log.info("%s: backup started", d.label)

    def progress(self, target: "DomainTarget", event: "ProgressEvent") -> None:
        now = self._clock()
        with self._lock:
            d = self._domain(target.label)
            d.disks[event.disk] = (event.done, event.total)
            d.sample(now)
            if self._bar or now - self._last_log.get(d.label, d.start) < self.LOG_EVERY:
                return
            self._last_log[d.label] = now
            self._log.info("%s: %.1f%% (%s of %s, %s/s)", d.label, d.percent(),
                           size_text(d.done), size_text(d.total), size_text(d.rate(now)))

    def finished(self, target: "DomainTarget", outcome: "DomainBackup") -> None:
        with self._lock:
            d = self._domain(target.label)
            d.state = "ok" if outcome.ok else "FAILED"
            d.note = (f"point {outcome.result.point}" if outcome.result is not None
                      else outcome.error or "")
            if self._bar:
                self._draw()
            elif outcome.ok:
                self._log.info("%s: done, %s in %.1f s", d.label, d.note, outcome.seconds)
            else:
                self._log.info("%s: FAILED after %.1f s: %s", d.label, outcome.seconds, d.note)

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None and self._ticker is not threading.current_thread():
            self._ticker.join()
        self._ticker = None
        with self._lock:
            if self._bar and self._drawn:
                self._draw()

    # terminal -----------------------------------------------------------------------

    def _domain(self, label: str) -> _Domain:
        return self._domains.setdefault(label, _Domain(label))

    def _start_ticker(self) -> None:
        if self._ticker is None and not self._stop.is_set():
            self._ticker = threading.Thread(target=self._tick, name="vsb-many-progress",
                                            daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(self.TICK):
            with self._lock:
                self._draw()

    def _draw(self) -> None:
        now = self._clock()
        width = max(shutil.get_terminal_size((100, 24)).columns - 1, 20)
        name_width = min(max(len(d.label) for d in self._domains.values()), 30)
        lines = [self._line(d, now, name_width)[:width] for d in self._domains.values()]
        up = f"\x1b[{self._drawn}A" if self._drawn else ""
        self._stream.write(up + "".join(f"\r{line}\x1b[K\n" for line in lines))
        self._stream.flush()
        self._drawn = len(lines)

    @staticmethod
    def _line(d: _Domain, now: float, name_width: int) -> str:
        head = f"{d.label[:name_width]:<{name_width}} "
        if d.state == "waiting":
            return head + "waiting"
        if d.state != "running":
            return head + f"{d.state:<6} {d.note}"
        filled = int(20 * d.percent() / 100)
        return (head + f"[{'#' * filled}{'.' * (20 - filled)}] {d.percent():5.1f}% "
                f"{size_text(d.done)}/{size_text(d.total)} {size_text(d.rate(now))}/s "
                f"{now - d.start:.0f} s")


def summary_text(run: "ManyBackups") -> str:
    """The table at the end: one row per domain, then one line for the run."""
    rows = [("DOMAIN", "RESULT", "POINT", "WRITTEN", "TIME", "DETAIL")]
    for d in run.domains:
        r = d.result
        rows.append((d.target.label, "ok" if d.ok else "FAILED",
                     str(r.point) if r else "-",
                     size_text(sum(x.bytes_written for x in r.disks)) if r else "-",
                     f"{d.seconds:.1f} s",
                     ("new generation" if r and r.new_generation else "") if d.ok
                     else d.error or ""))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[5]
             for row in rows]
    good = sum(1 for d in run.domains if d.ok)
    tail = f"{good} of {len(run.domains)} domains backed up in {run.seconds:.1f} s"
    if run.failed:
        tail += f"; failed: {', '.join(d.target.label for d in run.failed)}"
    if run.interrupted:
        tail += " (interrupted: domains not started were left out)"
    return "\n".join([line.rstrip() for line in lines] + [tail])
