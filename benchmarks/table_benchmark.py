"""Time the check/difference table hot paths at the size of a 1 TiB disk at 64 KiB.

Run: ``.venv/bin/python benchmarks/table_benchmark.py [--entries N] [--repeat R]``

Prints, for two 16 Mi-entry tables with 1 % and 100 % of entries changed:
compare(), apply(), the difference file write/read, and block hashing speed.
Not a test: numbers depend on the machine.  The first run of each step is
reported apart from the best of the repeats, because on a fresh VM the first
touch of new memory pages can cost more than the work itself.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Callable, List, Tuple

import numpy as np

from vmsnapbackup.core.checktable import CheckTable, hash_blocks, read_check_table, \
    write_check_table
from vmsnapbackup.core.difftable import apply, compare, read_difference_table, \
    write_difference_table

BLOCK_SIZE = 65536


def timed(fn: Callable[[], object], repeat: int) -> Tuple[float, float, object]:
    """(first run, best run, last result) in seconds."""
    times: List[float] = []
    result: object = None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times[0], min(times), result


def line(name: str, first: float, best: float, extra: str = "") -> None:
    print(f"  {name:<28} first {first * 1000:8.1f} ms   best {best * 1000:8.1f} ms  {extra}")


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=16 * 1024 * 1024)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    n, repeat = args.entries, args.repeat
    disk_size = n * BLOCK_SIZE
    rng = np.random.default_rng(2024)
    print(f"tables of {n} entries ({n * 16 / 2 ** 20:.0f} MiB each; a "
          f"{disk_size / 2 ** 40:.2f} TiB disk at {BLOCK_SIZE // 1024} KiB blocks), "
          f"numpy {np.__version__}, {os.cpu_count()} CPUs")
    table1 = CheckTable(disk_size, BLOCK_SIZE, rng.integers(0, 256, (n, 16), np.uint8))

    for fraction in (0.01, 1.0):
        values = table1.values.copy()
        changed = n if fraction >= 1.0 else int(n * fraction)
        where = (np.arange(n) if changed == n
                 else rng.choice(n, size=changed, replace=False))
        values[where, 7] ^= 0x5A  # one byte: the first uint64 half differs
        values[where[::2], 15] ^= 0xA5  # and for every other entry the second half too
        table_n = CheckTable(disk_size, BLOCK_SIZE, values)
        print(f"{fraction:.0%} of entries changed ({changed}):")
        first, best, diff = timed(lambda: compare(table1, table_n), repeat)
        assert diff.changed == changed  # type: ignore[union-attr]
        line("compare()", first, best)
        first, best, rebuilt = timed(lambda: apply(table1, diff), repeat)  # type: ignore[arg-type]
        assert rebuilt == table_n
        line("apply()", first, best)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "diff-000002.vsbd")
            first, best, _ = timed(lambda: write_difference_table(path, diff), 1)
            size = os.path.getsize(path)
            line("write_difference_table()", first, best, f"{size / 2 ** 20:.1f} MiB file")
            first, best, back = timed(lambda: read_difference_table(path, table1=table1), repeat)
            assert back == diff
            line("read_difference_table()", first, best, "(incl. table-1 digest)")
        del table_n, values, diff, rebuilt

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "table-000001.vsbt")
        print("check table file:")
        first, best, _ = timed(lambda: write_check_table(path, table1), 1)
        line("write_check_table()", first, best)
        first, best, back = timed(lambda: read_check_table(path), repeat)
        assert back == table1
        line("read_check_table()", first, best)

    # 256 MiB of data (not one cache-hot chunk), handed over in 4 MiB reads as the
    # NBD reader does, into a table as a backup builds it.
    data = memoryview(rng.integers(0, 256, 256 * 2 ** 20, np.uint8))
    target = CheckTable.empty(len(data), BLOCK_SIZE)
    step = 4 * 2 ** 20

    def hash_all() -> None:
        for offset in range(0, len(data), step):
            target.hash_into(offset, data[offset:offset + step])

    first, best, _ = timed(hash_all, repeat)
    print("hashing:")
    line("hash_into(), 256 MiB", first, best,
         f"{256 / best / 1024:.1f} GiB/s at {BLOCK_SIZE // 1024} KiB blocks, 4 MiB reads")
    first, best, _ = timed(lambda: hash_blocks(data, BLOCK_SIZE), repeat)
    line("hash_blocks(), 256 MiB", first, best, f"{256 / best / 1024:.1f} GiB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
