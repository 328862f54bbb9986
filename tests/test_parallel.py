"""run_all: disk jobs side by side, progress in the caller's thread, failures stop the rest."""
from __future__ import annotations

import threading
from typing import Any, Callable, List

import pytest

from vmsnapbackup.progress import ProgressEvent
from vmsnapbackup.workflows.parallel import run_all

TIMEOUT = 10


def _alive() -> List[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("vsb-disk-")]


def test_jobs_run_side_by_side_and_results_keep_their_order() -> None:
    barrier = threading.Barrier(3, timeout=TIMEOUT)  # passes only if all three run at once

    def job(n: int) -> Callable[[Any], int]:
        def run(progress: Callable[[ProgressEvent], None]) -> int:
            progress(ProgressEvent(f"vd{n}", "read", 0, 1))
            barrier.wait()
            return n * 10
        return run

    seen: List[str] = []
    main = threading.current_thread()

    def progress(ev: ProgressEvent) -> None:
        assert threading.current_thread() is main
        seen.append(ev.disk)

    assert run_all([job(0), job(1), job(2)], progress=progress) == [0, 10, 20]
    assert sorted(seen) == ["vd0", "vd1", "vd2"]
    assert not _alive()


def test_max_parallel_jobs_run_at_once_and_no_more() -> None:
    """Two of six jobs must overlap (a barrier of two: run one after another, it
    breaks), and while they hold, a third must not start."""
    lock = threading.Lock()
    now = [0]
    peak = [0]
    pair = threading.Barrier(2, timeout=TIMEOUT)

    def make(n: int) -> Callable[[Any], int]:
        def job(progress: Any) -> int:
            with lock:
                now[0] += 1
                peak[0] = max(peak[0], now[0])
            if n < 2:
                pair.wait()  # BrokenBarrierError unless jobs 0 and 1 run side by side
            threading.Event().wait(0.05)  # room for a third job to (wrongly) start
            with lock:
                now[0] -= 1
            return n
        return job

    assert run_all([make(n) for n in range(6)], max_parallel=2) == list(range(6))
    assert peak[0] == 2


def test_the_first_failure_stops_the_others_and_is_raised() -> None:
    started = threading.Event()
    stopped: List[str] = []

    def endless(progress: Callable[[ProgressEvent], None]) -> None:
        started.set()
        try:
            while True:
                progress(ProgressEvent("vda", "read", 1, 2))
        except BaseException as exc:
            stopped.append(type(exc).__name__)
            raise

    def failing(progress: Any) -> None:
        assert started.wait(TIMEOUT)
        raise OSError("disk on fire")

    with pytest.raises(OSError, match="disk on fire"):
        run_all([endless, failing])
    assert stopped == ["_Stopped"]
    assert not _alive()


def test_an_interrupt_in_the_callers_thread_stops_and_waits_for_the_jobs() -> None:
    stopped: List[bool] = []

    def endless(progress: Callable[[ProgressEvent], None]) -> None:
        try:
            while True:
                progress(ProgressEvent("vda", "read", 1, 2))
        except BaseException:
            stopped.append(True)
            raise

    calls: List[ProgressEvent] = []

    def progress(ev: ProgressEvent) -> None:
        calls.append(ev)
        if len(calls) == 10:
            raise KeyboardInterrupt  # what a signal handler's exception looks like here

    with pytest.raises(KeyboardInterrupt):
        run_all([endless, endless], progress=progress)
    assert stopped == [True, True]
    assert not _alive()


def test_one_job_runs_in_the_calling_thread() -> None:
    main = threading.current_thread()
    assert run_all([lambda progress: threading.current_thread() is main]) == [True]
    assert run_all([]) == []
