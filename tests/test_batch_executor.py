"""The shared executor of runs over many domains: isolation, at most N at once, orderly stop.

Synchronised with events and counters, never with sleeps: what is checked is
who ran, in which order and how many at once, not how long anything took.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from vmsnapbackup.errors import ExitCode, LockedError
from vmsnapbackup.workflows.batch import run_isolated

WAIT = 30.0


def test_every_item_runs_and_results_keep_the_order() -> None:
    batch = run_isolated(list(range(7)), lambda n: n * n, parallel=3)
    assert [o.value for o in batch.outcomes] == [n * n for n in range(7)]
    assert batch.ok and not batch.interrupted


def test_a_failure_is_that_items_outcome_and_the_others_go_on() -> None:
    def work(n: int) -> int:
        if n == 1:
            raise LockedError("held by pid 1")
        if n == 2:
            raise KeyError("a bug")
        return n

    batch = run_isolated([0, 1, 2, 3], work, parallel=2)
    ok = [o.ok for o in batch.outcomes]
    assert ok == [True, False, False, True]
    assert batch.outcomes[1].exit_code == ExitCode.LOCKED
    assert batch.outcomes[1].error_text == "LockedError: held by pid 1"
    assert batch.outcomes[2].exit_code == ExitCode.ERROR
    assert batch.outcomes[2].error_text.startswith("internal error: KeyError")
    assert not batch.ok and not batch.interrupted


@pytest.mark.parametrize("parallel", [1, 2, 3])
def test_never_more_than_parallel_at_once_and_all_of_them_when_it_can(parallel: int) -> None:
    lock = threading.Lock()
    running = 0
    peak = 0
    full = threading.Barrier(parallel, timeout=WAIT)

    def work(n: int) -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        if n < parallel:
            full.wait()   # the first N only finish once N run side by side
        with lock:
            running -= 1

    batch = run_isolated(list(range(2 * parallel + 1)), work, parallel=parallel)
    assert batch.ok
    assert peak == parallel


def test_a_signal_starts_no_further_item_and_waits_for_the_started_ones() -> None:
    finished = threading.Event()
    stop = threading.Event()

    def work(n: int) -> int:
        if n == 0:
            os.kill(os.getpid(), signal.SIGTERM)   # as a service manager stopping us
            assert stop.wait(WAIT), "the executor did not set stop"
            # still busy undoing after the stop: an executor that did not wait for
            # started work (a join cut short by the signal) would return meanwhile
            time.sleep(0.3)
            finished.set()
        return n

    batch = run_isolated([0, 1, 2], work, parallel=1, stop=stop)
    assert finished.is_set(), "returned while a started item still ran"
    assert batch.interrupted and not batch.ok
    first, *rest = batch.outcomes
    assert first.ok and first.value == 0          # the started one ended on its own terms
    assert [o.started for o in rest] == [False, False]
    assert all(o.exit_code == ExitCode.INTERRUPTED for o in rest)
    assert rest[0].error_text == "not started: the run was interrupted"


def test_parallel_must_be_positive() -> None:
    with pytest.raises(ValueError):
        run_isolated([1], lambda n: n, parallel=0)
