"""Many domains' work at once, each isolated from the others: the one parallel executor.

Used by every run over several domains (``backup --all``, the jobs of
``run``).  What it guarantees, and why:

* **isolation**: one domain's failure (any exception, a bug included) is that
  domain's outcome and never stops the others; a nightly run that stops at
  the first broken VM leaves every VM after it unprotected.  Each domain's
  work undoes itself on failure (the backup commits back and cleans up, or
  says that ``repair`` must run), so nothing here needs to undo anything;
* **at most N at once** (``parallel``), in the order given, results in that
  order;
* **an orderly stop**: the first SIGINT/SIGTERM/SIGHUP starts no further
  domain and sets ``stop``, which the domains' work watches (the backup sees
  it at its next progress event and unwinds through its own undo); the
  executor then waits for every started domain to end, so the process never
  exits with a half-done backup it could still have undone.  A domain not
  started is reported as such.

The domains run in threads: a backup waits on libvirt, QEMU and the disks,
not on the CPU, and signals can only be handled in the main thread, which is
the one waiting here.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

from ..errors import BackupInterruptedError, ExitCode, VmSnapBackupError
from .interrupt import interruptible

__all__ = ["Batch", "Outcome", "run_isolated"]

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Outcome(Generic[R]):
    """What became of one item: its value, or the error that ended it, or not started."""

    value: R | None = None
    error: BaseException | None = None
    started: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.started and self.error is None

    @property
    def error_text(self) -> str | None:
        """One line: the error's kind and message (None when it went well)."""
        if self.error is None:
            return None if self.started else "not started: the run was interrupted"
        kind = type(self.error).__name__
        message = " ".join(str(self.error).split())
        if not isinstance(self.error, VmSnapBackupError):
            return f"internal error: {kind}: {message}"
        return f"{kind}: {message}"

    @property
    def exit_code(self) -> int:
        """The exit code this item alone would have had (0 when it went well)."""
        if self.ok:
            return int(ExitCode.OK)
        if isinstance(self.error, VmSnapBackupError):
            return int(self.error.exit_code)
        return int(ExitCode.INTERRUPTED if self.error is None else ExitCode.ERROR)


@dataclass
class Batch(Generic[R]):
    outcomes: list[Outcome[R]]
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not self.interrupted and all(o.ok for o in self.outcomes)


def run_isolated(items: Sequence[T], work: Callable[[T], R], *, parallel: int,
                 name: str = "vsb-domain", stop: threading.Event | None = None,
                 what: str = "run") -> Batch[R]:
    """Run ``work(item)`` for every item, at most ``parallel`` at once (module docstring).

    ``stop`` is set when the run is interrupted (pass your own to let the work
    watch it); ``what`` names the run in the interrupt's log lines.
    """
    if parallel < 1:
        raise ValueError("parallel must be at least 1")
    stop = threading.Event() if stop is None else stop
    outcomes: list[Outcome[R]] = [Outcome() for _ in items]
    lock = threading.Lock()
    following = iter(range(len(items)))

    def next_index() -> int | None:
        with lock:
            if stop.is_set():
                return None
            index = next(following, None)
            if index is not None:
                outcomes[index].started = True
            return index

    count = min(parallel, len(items))
    running = [count]                 # workers not yet ended
    ended = threading.Condition()

    def worker() -> None:
        try:
            while (index := next_index()) is not None:
                outcome = outcomes[index]
                started = time.monotonic()
                try:
                    outcome.value = work(items[index])
                except Exception as exc:  # isolation: this item's outcome, nobody else's
                    outcome.error = exc
                    if not isinstance(exc, VmSnapBackupError):
                        log.error("%s: item %d failed unexpectedly", what, index, exc_info=exc)
                finally:
                    outcome.seconds = time.monotonic() - started
        finally:
            with ended:
                running[0] -= 1
                ended.notify_all()

    def wait_all() -> None:
        # Not Thread.join: a join cut short by a signal handler's exception leaves
        # the thread marked as ended (Python 3.11), so a second join would not wait.
        with ended:
            while running[0]:
                ended.wait()

    threads = [threading.Thread(target=worker, name=f"{name}-{n}", daemon=True)
               for n in range(count)]
    interrupted = False
    with interruptible(what):
        try:
            for thread in threads:
                thread.start()
            wait_all()
        except (BackupInterruptedError, KeyboardInterrupt) as exc:
            interrupted = True
            stop.set()
            log.warning("%s: %s; no further domain starts, waiting for the started ones "
                        "to finish or undo their work", what, exc or "interrupted")
            with ended:   # workers never started will not end: count them out
                running[0] -= sum(1 for t in threads if t.ident is None)
            wait_all()
    for thread in threads:
        if thread.ident is not None:
            thread.join()
    return Batch(outcomes, interrupted or stop.is_set())
