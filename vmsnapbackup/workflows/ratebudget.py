"""A bandwidth budget for a run's disk passes: one token bucket shared by all of them.

Why one bucket for the whole run (``--max-rate``): what an operator budgets is
what the backup pulls from the hypervisors' disks and network, whatever the
number of domains and disks read at once.  So every pass of the run takes its
bytes from the same bucket before it asks for them; ten disks read side by
side get the rate between them, not ten times it.

The bucket is a *reservation* bucket: a pass takes the bytes of the chunk it
is about to request, which may leave the bucket in debt; it then waits until
the debt is paid back at ``rate``.  Waiters therefore queue in the order they
asked, and the long-run rate is ``rate`` however many threads take from it.
``burst`` (a tenth of a second of the rate by default) only bounds how far
ahead of the rate a pass may run after an idle time.

The budget is handed down explicitly, never kept in the process: the command
line makes one for the run, it travels in the run's
:class:`~.backupoptions.BackupOptions` through each domain's backup to every
disk pass, so two runs in one process (a library user's threads) each keep
their own budget.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from typing import Callable

from ..errors import UsageError

__all__ = ["RateBudget", "parse_rate", "throttled"]

#: The lowest budget accepted: below this a 1 MiB chunk would wait for many seconds.
MIN_RATE = 64 * 1024

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_rate(text: str) -> int:
    """``100M``, ``100MiB/s``, ``1.5G``, ``65536`` -> bytes per second (binary units)."""
    t = text.strip().lower()
    for tail in ("/s", "ps"):
        t = t.removesuffix(tail)
    t = t.removesuffix("ib").removesuffix("b").strip()
    unit = t[-1:] if t[-1:] in _UNITS else ""
    try:
        value = float(t[: len(t) - len(unit)])
    except ValueError:
        raise UsageError(f"not a rate: {text!r} (e.g. 100M for 100 MiB/s)") from None
    rate = int(value * _UNITS[unit])
    if rate < MIN_RATE:
        raise UsageError(f"rate {text!r} is below the lowest budget, 64K (64 KiB/s)")
    return rate


class RateBudget:
    """At most ``rate`` bytes per second on average, over every thread that takes from it."""

    def __init__(self, rate: float, *, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if rate <= 0:
            raise UsageError("a rate budget must be positive")
        self.rate = float(rate)
        self.burst = self.rate / 10 if burst is None else float(burst)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = self.burst
        self._last = clock()
        self.taken = 0           # bytes taken so far (for the run's report)
        self.waited = 0.0        # seconds spent waiting for the budget

    def take(self, n: int) -> float:
        """Reserve ``n`` bytes; wait until the reservation is covered.  Returns the wait."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            self.taken += n
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
            self.waited += wait
        if wait > 0:
            self._sleep(wait)
        return wait


def throttled(pieces: Iterable[tuple[int, int]],
              budget: RateBudget | None) -> Iterator[tuple[int, int]]:
    """``(offset, length)`` pieces, each let through once ``budget`` covers its length."""
    if budget is None:
        yield from pieces
        return
    for offset, length in pieces:
        budget.take(length)
        yield offset, length

