"""run_all: disk jobs side by side, progress in the caller's thread, failures stop the rest."""
from __future__ import annotations

import threading

import pytest

from vmsnapbackup.progress import ProgressEvent
from vmsnapbackup.workflows.parallel import run_all

TIMEOUT = 10


def _alive():
    return [t for t in threading.enumerate() if t.name.startswith("vsb-disk-")]


def test_jobs_run_side_by_side_and_results_keep_their_order():
    barrier = threading.Barrier(3, timeout=TIMEOUT)  # passes only if all three run at once

    def job(n):
        def run(progress):
            progress(ProgressEvent(f"vd{n}", "read", 0, 1))
            barrier.wait()
            return n * 10
        return run

    seen = []
    main = threading.current_thread()

    def progress(ev):
        assert threading.current_thread() is main
        seen.append(ev.disk)

    assert run_all([job(0), job(1), job(2)], progress=progress) == [0, 10, 20]
    assert sorted(seen) == ["vd0", "vd1", "vd2"]
    assert not _alive()


def test_at_most_max_parallel_at_once():
    lock = threading.Lock()
    now = [0]
    peak = [0]

    def job(progress):
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        threading.Event().wait(0.02)
        with lock:
            now[0] -= 1
        return True

    assert run_all([job] * 6, max_parallel=2) == [True] * 6
    assert peak[0] <= 2


def test_the_first_failure_stops_the_others_and_is_raised():
    started = threading.Event()
    stopped = []

    def endless(progress):
        started.set()
        try:
            while True:
                progress(ProgressEvent("vda", "read", 1, 2))
        except BaseException as exc:
            stopped.append(type(exc).__name__)
            raise

    def failing(progress):
        assert started.wait(TIMEOUT)
        raise OSError("disk on fire")

    with pytest.raises(OSError, match="disk on fire"):
        run_all([endless, failing])
    assert stopped == ["_Stopped"]
    assert not _alive()


def test_an_interrupt_in_the_callers_thread_stops_and_waits_for_the_jobs():
    stopped = []

    def endless(progress):
        try:
            while True:
                progress(ProgressEvent("vda", "read", 1, 2))
        except BaseException:
            stopped.append(True)
            raise

    calls = []

    def progress(ev):
        calls.append(ev)
        if len(calls) == 10:
            raise KeyboardInterrupt  # what a signal handler's exception looks like here

    with pytest.raises(KeyboardInterrupt):
        run_all([endless, endless], progress=progress)
    assert stopped == [True, True]
    assert not _alive()


def test_one_job_runs_in_the_calling_thread():
    main = threading.current_thread()
    assert run_all([lambda progress: threading.current_thread() is main]) == [True]
    assert run_all([]) == []
