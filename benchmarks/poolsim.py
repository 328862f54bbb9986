"""Replay a year of daily backups and compare what each way of storing them keeps on disk.

Run: ``.venv/bin/python benchmarks/poolsim.py`` (about a minute on 2 cores; ``--help``).

Why a simulator: the pool's growth is a question of which blocks change when and which
points retention keeps, not of I/O speed, so it can be answered in seconds for a year
of backups, and for any change pattern, without a VM.  The model and the figures it
prints are in docs/generations.md.

What is simulated, one backup a day, then a prune with the product's own retention
(:func:`vmsnapbackup.core.retention.decide`, ``keep-daily 7, keep-weekly 4,
keep-monthly 6`` unless told otherwise):

* a disk whose data occupies ``--data-gib`` of a virtual disk ``--virtual-factor``
  times larger (the rest is never written, like the issue's 64 MiB of data on a
  256 MiB disk); every day a fraction of the data's 64 KiB blocks is rewritten with
  new content, either uniformly at random or in a hot spot;
* **ours, old rule**: a generation ends when its newest point differs from table 1 in
  more than half of the *virtual* disk's blocks (the rule before issue 19);
* **ours, policy**: :func:`vmsnapbackup.core.genpolicy.decide` before every backup,
  fed only what the backup can read in the pool;
* **incremental chain** (virtnbdbackup style): a full backup on the first backup of
  each month, then an incremental holding the blocks the dirty bitmap saw written that
  day; a chain's files are kept from its full to its newest point retention still
  keeps (an incremental needs every one before it);
* **dedup store** (Proxmox Backup style): fixed 4 MiB chunks addressed by content;
  the store holds every distinct chunk of the snapshots retention keeps;
* **lower bound** of our method: for the points retention keeps that day, the least any
  choice of generation starts could store (every generation holds one base of the data,
  every later point at least the blocks changed between its generation's first kept
  point and itself), found by dynamic programming over the kept points.

Sizes are data only: no compression for anyone (the dedup store compresses chunks,
qcow2 volumes can be compressed too), and our check/difference tables are counted,
qcow2 and chunk-index metadata are not (well under 1 % here).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmsnapbackup.core.genpolicy import GenerationCosts, PointCost, decide
from vmsnapbackup.core.retention import Policy
from vmsnapbackup.core.retention import decide as retention_decide

KiB = 1 << 10
GiB = 1 << 30
TABLE_ENTRY = 16          # FORMAT §5: one XXH3-128 value per block
DIFF_ENTRY = 24           # FORMAT §6: block index + value per changed block

Changes = Callable[[int], np.ndarray]


@dataclass(frozen=True)
class Disk:
    data_blocks: int
    virtual_blocks: int
    block_size: int

    @property
    def data_bytes(self) -> int:
        return self.data_blocks * self.block_size


def change_pattern(kind: str, rate: float, disk: Disk, seed: int) -> Changes:
    """The blocks a day rewrites (distinct indexes into the data), for day d >= 1.

    ``random``: ``rate`` of the data's blocks, uniformly.  ``hotspot``: 90 % of them in
    one contiguous tenth of the data (a database, a log directory), 10 % anywhere.
    """
    rng = np.random.default_rng(seed)
    n = disk.data_blocks
    per_day = max(1, round(rate * n))
    if kind == "random":
        return lambda day: rng.choice(n, per_day, replace=False)
    if kind == "hotspot":
        hot_len = max(1, n // 10)
        hot_start = int(rng.integers(0, n - hot_len + 1))
        hot = min(hot_len, round(per_day * 0.9))

        def hotspot(day: int) -> np.ndarray:
            a = hot_start + rng.choice(hot_len, hot, replace=False)
            b = rng.choice(n, per_day - hot, replace=False)
            return np.unique(np.concatenate([a, b]))
        return hotspot
    raise SystemExit(f"unknown pattern {kind!r} (random, hotspot)")


@dataclass
class Generation:
    start: int                       # day of its first point (the base)
    base_bytes: int
    points: dict[int, int] = field(default_factory=dict)   # day -> stored bytes (later points)
    newest_changed: int = 0                                 # blocks.changed of the newest point


class OurPool:
    """Our pool: generations of one base and points holding every block changed since it."""

    def __init__(self, disk: Disk, should_start: Callable[[OurPool, int], bool]) -> None:
        self.disk, self.should_start = disk, should_start
        self.gens: list[Generation] = []
        self.generations_started = 0

    def backup(self, day: int, last_change: np.ndarray) -> None:
        bs = self.disk.block_size
        if not self.gens or self.should_start(self, day):
            table1 = self.disk.virtual_blocks * TABLE_ENTRY
            self.gens.append(Generation(day, self.disk.data_bytes + table1))
            self.generations_started += 1
            return
        g = self.gens[-1]
        changed = int(np.count_nonzero(last_change > g.start))
        size = changed * (bs + DIFF_ENTRY)
        g.points[day] = size
        g.newest_changed = changed

    def keep(self, kept: set[int]) -> None:
        for g in self.gens:
            g.points = {d: s for d, s in g.points.items() if d in kept}
        current = self.gens[-1] if self.gens else None
        # a generation goes with its last point; its first point is its base
        self.gens = [g for g in self.gens
                     if g is current or g.points or g.start in kept]

    def stored(self) -> int:
        return sum(g.base_bytes + sum(g.points.values()) for g in self.gens)


class Chain:
    """virtnbdbackup: full + incrementals; a chain stays while any point of it is kept."""

    def __init__(self, disk: Disk, new_chain: Callable[[int], bool]) -> None:
        self.disk, self.new_chain = disk, new_chain
        self.chains: list[list[tuple[int, int]]] = []        # [(day, bytes)], full first

    def backup(self, day: int, changed_today: int) -> None:
        if not self.chains or self.new_chain(day):
            self.chains.append([(day, self.disk.data_bytes)])
        else:
            self.chains[-1].append((day, changed_today * self.disk.block_size))

    def keep(self, kept: set[int]) -> None:
        out = []
        for i, chain in enumerate(self.chains):
            last = max((j for j, (d, _) in enumerate(chain) if d in kept), default=-1)
            if i == len(self.chains) - 1:
                out.append(chain)            # the chain the next incremental extends
            elif last >= 0:
                out.append(chain[:last + 1])
        self.chains = out

    def stored(self) -> int:
        return sum(b for chain in self.chains for _, b in chain)


class DedupStore:
    """Proxmox Backup: fixed-size chunks by content; distinct chunks of kept snapshots."""

    def __init__(self, disk: Disk, chunk_size: int) -> None:
        self.per_chunk = max(1, chunk_size // disk.block_size)
        self.chunk_size = chunk_size
        n_chunks = -(-disk.data_blocks // self.per_chunk)
        self.version = np.arange(n_chunks, dtype=np.int64)     # content id of each chunk
        self.next_id = n_chunks
        self.snapshots: dict[int, np.ndarray] = {}

    def backup(self, day: int, changed: np.ndarray) -> None:
        touched = np.unique(changed // self.per_chunk)
        self.version[touched] = np.arange(self.next_id, self.next_id + len(touched))
        self.next_id += len(touched)
        self.snapshots[day] = self.version.copy()

    def keep(self, kept: set[int]) -> None:
        self.snapshots = {d: s for d, s in self.snapshots.items() if d in kept}

    def stored(self) -> int:
        if not self.snapshots:
            return 0
        ids = np.unique(np.concatenate(list(self.snapshots.values())))
        return len(ids) * self.chunk_size


def lower_bound(kept: Sequence[int], changes: dict[int, np.ndarray], disk: Disk) -> int:
    """The least our method can store for these kept points, whatever the generations.

    Kept points sorted q1 < … < qm are split into runs of consecutive points, one run per
    generation: the run costs one base (the data) plus, for each later point, the blocks
    changed between the run's first point and it (a generation that started earlier
    only adds).  Tables are left out, so this is below any real pool.
    """
    q = sorted(kept)
    m = len(q)
    bs = disk.block_size
    union = np.zeros((m, m), dtype=np.int64)      # union[i][j]: blocks changed in (q_i, q_j]
    seen = np.zeros(disk.data_blocks, dtype=bool)
    for i in range(m):
        seen[:] = False
        count = 0
        j = i + 1
        for day in range(q[i] + 1, q[-1] + 1):
            idx = changes[day]
            count += int(np.count_nonzero(~seen[idx]))
            seen[idx] = True
            while j < m and q[j] == day:
                union[i][j] = count
                j += 1
    best = [0] + [1 << 62] * m                    # best[j]: first j points stored
    for j in range(1, m + 1):
        for i in range(j):                         # points i..j-1 form one generation
            run = disk.data_bytes + sum(int(union[i][k]) * bs for k in range(i + 1, j))
            best[j] = min(best[j], best[i] + run)
    return best[m]


def old_rule(threshold: float) -> Callable[[OurPool, int], bool]:
    """Before issue 19: the newest point changed more than a fraction of the VIRTUAL disk."""
    def rule(pool: OurPool, day: int) -> bool:
        g = pool.gens[-1]
        return g.newest_changed / pool.disk.virtual_blocks > threshold
    return rule


def policy_rule(retention: Policy) -> Callable[[OurPool, int], bool]:
    """The product's policy, fed only what the pool still holds after the last prune."""
    def rule(pool: OurPool, day: int) -> bool:
        g = pool.gens[-1]
        costs = GenerationCosts(
            base_bytes=g.base_bytes, data_bytes=pool.disk.data_bytes,
            points=[PointCost(d - g.start, b) for d, b in g.points.items()])
        return decide(costs, retention).start
    return rule


def every(days: int) -> Callable[[OurPool, int], bool]:
    """A new generation every ``days`` days (for comparison, not a product rule)."""
    return lambda pool, day: day - pool.gens[-1].start >= days


@dataclass
class Result:
    name: str
    rows: list[dict[str, float]]
    generations: int


def simulate(pattern: str, rate: float, days: int, disk: Disk, retention: Policy,
             chunk_size: int, seed: int, start: _dt.date, bound: bool,
             extra: dict[str, Callable[[OurPool, int], bool]]) -> Result:
    """One year (``days`` backups) under one change pattern; sizes in units of the data."""
    changes_of = change_pattern(pattern, rate, disk, seed)
    last_change = np.zeros(disk.data_blocks, dtype=np.int32)   # day of each block's last write
    ours = {"old rule": OurPool(disk, old_rule(0.5)), "policy": OurPool(disk, policy_rule(retention))}
    for name, rule in extra.items():
        ours[name] = OurPool(disk, rule)
    chain = Chain(disk, lambda d: (start + _dt.timedelta(days=d)).day == 1)
    dedup = DedupStore(disk, chunk_size)
    kept: list[int] = []
    changes: dict[int, np.ndarray] = {}
    rows: list[dict[str, float]] = []
    for day in range(days):
        if day > 0:
            idx = changes_of(day)
            changes[day] = idx
            last_change[idx] = day
        else:
            idx = np.arange(0)
        for pool in ours.values():
            pool.backup(day, last_change)
        chain.backup(day, len(idx))
        dedup.backup(day, idx)
        kept.append(day)
        when = [(d, _dt.datetime.combine(start + _dt.timedelta(days=d), _dt.time(1)))
                for d in kept]
        kept = [d.number for d in retention_decide(when, retention) if d.keep]
        keep = set(kept)
        for pool in ours.values():
            pool.keep(keep)
        chain.keep(keep)
        dedup.keep(keep)
        for d in list(changes):
            if d <= min(kept):
                del changes[d]
        data = disk.data_bytes
        row = {"day": day + 1, "points": len(kept), "chain": chain.stored() / data,
               "dedup": dedup.stored() / data}
        for name, pool in ours.items():
            row[name] = pool.stored() / data
        if bound:
            row["bound"] = lower_bound(kept, changes, disk) / data
        rows.append(row)
    gens = ours["policy"].generations_started
    return Result(f"{pattern} {rate * 100:g} %/day", rows, gens)


def table(res: Result, step: int, columns: Sequence[str], horizon: int) -> Iterator[str]:
    yield f"### {res.name} (policy started {res.generations} generations)"
    yield ""
    yield "| day | kept points | " + " | ".join(columns) + " |"
    yield "|---:|---:|" + "---:|" * len(columns)
    for row in res.rows:
        if row["day"] % step == 0 or row["day"] in (1, len(res.rows)):
            yield (f"| {row['day']:.0f} | {row['points']:.0f} | "
                   + " | ".join(f"{row[c]:.2f}" for c in columns) + " |")
    yield ""
    peak = {c: max(r[c] for r in res.rows) for c in columns}
    yield "peak (× data): " + ", ".join(f"{c} {peak[c]:.2f}" for c in columns)
    ours = [c for c in columns if c not in ("chain", "dedup")]
    for c in ours:
        name = "lower bound of our method" if c == "bound" else c
        vs_dedup = max(res.rows, key=lambda r: r[c] / r["dedup"])
        vs_chain = max(res.rows, key=lambda r: r[c] / r["chain"])
        over = [r["day"] for r in res.rows if r[c] > r["chain"] * (1 + 1e-9)]
        yield (f"- {name}: max ratio to dedup {vs_dedup[c] / vs_dedup['dedup']:.2f} "
               f"(day {vs_dedup['day']:.0f}), to chain {vs_chain[c] / vs_chain['chain']:.2f} "
               f"(day {vs_chain['day']:.0f}: {vs_chain[c]:.2f} vs {vs_chain['chain']:.2f}); "
               f"above the chain on {len(over)} days"
               + (f", the last day {max(over):.0f}" if over else ""))
        if "bound" in columns and c != "bound":
            # the days some choice of generations could have met the chain
            open_days = [r for r in res.rows if r["bound"] <= r["chain"] * (1 + 1e-9)]
            late = [r for r in open_days if r[c] > r["chain"] * (1 + 1e-9)]
            worst = max((r[c] / r["chain"] for r in late), default=1.0)
            yield (f"  - on the {len(open_days)} days the bound is within the chain: above it "
                   f"on {len(late)}, by up to {worst:.2f}x")
        if c != "bound":
            steady = [r for r in res.rows if r["day"] > horizon]
            late = [r for r in steady if r[c] > r["chain"] * (1 + 1e-9)]
            worst = max((r[c] / r["chain"] for r in late), default=1.0)
            yield (f"  - after day {horizon} (retention's window full): above the chain on "
                   f"{len(late)} of {len(steady)} days, by up to {worst:.2f}x")
    yield ""


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--days", type=int, default=365)
    p.add_argument("--data-gib", type=float, default=16.0, help="data on the disk (16)")
    p.add_argument("--virtual-factor", type=float, default=4.0,
                   help="virtual size / data size (4, as in issue 19's measurement)")
    p.add_argument("--block-kib", type=int, default=64)
    p.add_argument("--chunk-kib", type=int, default=4096, help="dedup chunk size (4096)")
    p.add_argument("--rates", default="1,5", help="percent of the data changed per day")
    p.add_argument("--patterns", default="random,hotspot")
    p.add_argument("--keep-daily", type=int, default=7)
    p.add_argument("--keep-weekly", type=int, default=4)
    p.add_argument("--keep-monthly", type=int, default=6)
    p.add_argument("--keep-last", type=int, default=None)
    p.add_argument("--start", default="2026-01-01", help="date of the first backup")
    p.add_argument("--seed", type=int, default=19)
    p.add_argument("--step", type=int, default=30, help="print every Nth day")
    p.add_argument("--no-bound", action="store_true", help="skip the lower bound (faster)")
    p.add_argument("--every", default="", help="also fixed generation lengths, e.g. 14,30")
    p.add_argument("--json", action="store_true", help="every day's row as JSON")
    a = p.parse_args(argv)
    bs = a.block_kib * KiB
    data_blocks = int(a.data_gib * GiB) // bs
    disk = Disk(data_blocks, int(data_blocks * a.virtual_factor), bs)
    retention = Policy(a.keep_last, a.keep_daily, a.keep_weekly, a.keep_monthly)
    extra = {f"every {n}": every(int(n)) for n in a.every.split(",") if n}
    start = _dt.date.fromisoformat(a.start)
    results = []
    for pattern in a.patterns.split(","):
        for rate in a.rates.split(","):
            results.append(simulate(pattern, float(rate) / 100, a.days, disk, retention,
                                    a.chunk_kib * KiB, a.seed, start, not a.no_bound, extra))
    if a.json:
        json.dump([{"name": r.name, "rows": r.rows} for r in results], sys.stdout)
        return 0
    columns = ["old rule", "policy", *extra, "chain", "dedup"] + ([] if a.no_bound else ["bound"])
    print(f"data {a.data_gib:g} GiB in {bs // KiB} KiB blocks, virtual {a.virtual_factor:g}× "
          f"the data, {a.days} daily backups from {start}, retention {retention.to_dict()}, "
          f"dedup chunks {a.chunk_kib} KiB; sizes in units of the data\n")
    horizon = max(a.keep_last or 0, a.keep_daily or 0, 7 * (a.keep_weekly or 0),
                  31 * (a.keep_monthly or 0))
    for res in results:
        for line in table(res, a.step, columns, horizon):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
