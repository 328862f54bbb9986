"""A check table's memory follows the disk's data, not its virtual size (issue 19).

A 1 TiB disk at 64 KiB has 16 Mi entries (256 MiB of values).  Built from holes
and a little data, written, read back, compared and rebuilt, its tables must
leave the process's resident set (``VmRSS``, Linux) far below one table.  The
real-stack proof with the CLI is integration/test_memory.py.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmsnapbackup.core.checktable import CheckTable, read_check_table, write_check_table
from vmsnapbackup.core.difftable import apply, compare
from vmsnapbackup.core.tablebuilder import CheckTableBuilder

TiB = 2**40
BS = 65536
MiB = 2**20
#: one full table is 256 MiB; a tenth of it is far above what the data's entries need
LIMIT_MIB = 25.6


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_a_sparse_terabyte_costs_its_data_not_its_size(tmp_path: Path) -> None:
    start = rss_mib()
    grew: dict[str, float] = {}
    b = CheckTableBuilder(TiB, BS)
    for k in range(100):   # 100 MiB of data in 1 MiB extents, holes between
        offset = (k * 10007 % (TiB // MiB)) * MiB
        b.hash_into(offset, bytes([k + 1]) * MiB)
    b.fill_zero(0, TiB // 2)        # a hole over data: the later wins
    table1 = CheckTable.empty(TiB, BS)
    table1.set(5, b"\x01" * 16)
    grew["built"] = rss_mib() - start
    write_check_table(tmp_path / "t.vsbt", table1)
    again = read_check_table(tmp_path / "t.vsbt")
    grew["written and read"] = rss_mib() - start
    assert again == table1 and again.value(5) == b"\x01" * 16
    diff = compare(table1, b.table)
    rebuilt = apply(table1, diff)
    assert rebuilt == b.table and rebuilt.body_digest() == b.table.body_digest()
    grew["compared and rebuilt"] = rss_mib() - start
    assert len(diff.indexes) == 1 + sum(1 for k in range(100)
                                        if (k * 10007 % (TiB // MiB)) * MiB >= TiB // 2) * 16
    assert max(grew.values()) < LIMIT_MIB, grew
