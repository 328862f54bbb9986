"""Several disk passes at once: one thread per disk, everything else in the caller's thread.

Why: a domain's disks are independent, and one disk's pass leaves the machine
partly idle (it waits on the storage daemon, then on the disk).  Measured on
two 4 GiB disks with 2 GiB of data each (docs/benchmarks.md): hashing both
took 13 % less time side by side than one after the other, copying both 20 %
less.

What stays in the calling thread, on purpose:

* every storage daemon call -- its QMP client belongs to the thread that
  started it -- so jobs only hold NBD connections of their own;
* every progress event: the threads hand them over and the caller's callback
  runs here, so UI code needs no locking;
* signals: a signal handler raises in this thread while it waits; the jobs
  are then told to stop (their next progress event raises inside them, which
  unwinds the pass and its writer thread) and are waited for before the
  exception goes on, so no thread still uses a connection the caller is about
  to close.

The first failure of a job stops the others the same way, and is what
:func:`run_all` raises once every job has ended.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from typing import Any, Callable, TypeVar

from ..progress import ProgressCallback, ProgressEvent

__all__ = ["DEFAULT_MAX_PARALLEL", "Job", "run_all"]

log = logging.getLogger(__name__)

T = TypeVar("T")
#: A job: does one disk's work, reporting through the progress callback it is given.
Job = Callable[[ProgressCallback], T]

#: More passes at once than this only compete for the same storage daemon and disk.
DEFAULT_MAX_PARALLEL = 4


class _Stopped(Exception):
    """Raised inside a job (from its progress callback) when the run is being stopped."""


_PROGRESS, _DONE, _FAILED = "progress", "done", "failed"


def run_all(jobs: Sequence[Job[Any]], *, progress: ProgressCallback | None = None,
            max_parallel: int = DEFAULT_MAX_PARALLEL, name: str = "vsb-disk") -> list[Any]:
    """Run ``jobs`` at most ``max_parallel`` at a time; their results in the jobs' order.

    One job runs directly in this thread (no thread to gain anything from).
    """
    if max_parallel < 1:
        raise ValueError("max_parallel must be at least 1")
    if len(jobs) <= 1 or max_parallel == 1:
        return [job(_direct(progress)) for job in jobs]

    events: queue.Queue[tuple[str, int, Any]] = queue.Queue()
    stop = threading.Event()
    results: list[Any] = [None] * len(jobs)
    pending = list(range(len(jobs)))
    threads: list[threading.Thread] = []
    running = 0
    first_error: BaseException | None = None

    def relay(event: ProgressEvent) -> None:
        if stop.is_set():
            raise _Stopped()
        events.put((_PROGRESS, -1, event))

    def body(index: int) -> None:
        try:
            value = jobs[index](relay)
        except _Stopped:
            events.put((_FAILED, index, None))
        except BaseException as exc:
            events.put((_FAILED, index, exc))
        else:
            events.put((_DONE, index, value))

    def start_next() -> None:
        nonlocal running
        index = pending.pop(0)
        thread = threading.Thread(target=body, args=(index,), name=f"{name}-{index}",
                                  daemon=True)
        threads.append(thread)
        thread.start()
        running += 1

    try:
        while pending and running < max_parallel:
            start_next()
        while running:
            kind, index, payload = events.get()
            if kind == _PROGRESS:
                if progress is not None and not stop.is_set():
                    progress(payload)
                continue
            running -= 1
            if kind == _DONE:
                results[index] = payload
            elif first_error is None and payload is not None:
                first_error = payload
                stop.set()
                pending.clear()
            if pending and not stop.is_set():
                start_next()
    finally:
        if running:  # we are unwinding (a signal, or the caller's callback raised)
            stop.set()
            for thread in threads:
                thread.join()
    if first_error is not None:
        raise first_error
    return results


def _direct(progress: ProgressCallback | None) -> ProgressCallback:
    def call(event: ProgressEvent) -> None:
        if progress is not None:
            progress(event)
    return call
