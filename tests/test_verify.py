"""The pure parts of verify: the sample, block runs, comparing tables (full and
sampled), naming mismatches, and the report's verdict and text."""
from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmsnapbackup.core.checktable import CheckTable
from vmsnapbackup.errors import UsageError
from vmsnapbackup.workflows.pointread import (
    BlockMismatch,
    block_runs,
    compare_sampled,
    compare_tables,
    sample_indexes,
)
from vmsnapbackup.workflows.verify import (
    DAMAGED,
    GOOD,
    INCOMPATIBLE,
    DiskCheck,
    DomainCheck,
    PointCheck,
    Problem,
    VerifyReport,
    format_point,
    format_report,
)

BS = 4096


def table_of(data: bytes) -> CheckTable:
    t = CheckTable.empty(len(data), BS)
    t.hash_into(0, data)
    return t


# --- sample -------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(count=st.integers(0, 5000), percent=st.floats(0.01, 100), seed=st.integers(0, 2**32))
def test_sample_is_sorted_unique_in_range_and_sized(count: int, percent: float,
                                                    seed: int) -> None:
    idx = sample_indexes(count, percent, random.Random(seed))
    assert idx.size == (0 if count == 0 else max(1, min(count, round(count * percent / 100))))
    assert np.all(np.diff(idx) > 0)
    assert idx.size == 0 or (idx[0] >= 0 and idx[-1] < count)


def test_sample_is_reproducible_and_varies() -> None:
    a = sample_indexes(10000, 1, random.Random(5))
    b = sample_indexes(10000, 1, random.Random(5))
    c = sample_indexes(10000, 1, random.Random(6))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(sample_indexes(7, 100), np.arange(7))


@pytest.mark.parametrize("percent", [0, -1, 100.5])
def test_sample_refuses_bad_percent(percent: float) -> None:
    with pytest.raises(UsageError):
        sample_indexes(10, percent)


@given(st.sets(st.integers(0, 300)), st.integers(0, 9))
def test_block_runs_cover_exactly(indexes: set, max_count: int) -> None:
    runs = list(block_runs(sorted(indexes), max_count))
    covered = [i for first, n in runs for i in range(first, first + n)]
    assert covered == sorted(indexes)
    if max_count > 0:
        assert all(n <= max_count for _, n in runs)
    else:  # maximal runs: two runs never touch
        assert all(a + n < b for (a, n), (b, _) in zip(runs, runs[1:]))


# --- comparing ----------------------------------------------------------------------------

def test_compare_tables_names_every_differing_block() -> None:
    data = bytearray(20 * BS + 300)
    good = table_of(bytes(data))
    data[17 * BS] = 1
    data[18 * BS + 5] = 2
    data[-1] = 3  # the short last block
    bad = compare_tables(good, table_of(bytes(data)))
    assert not bad.ok and bad.indexes == (17, 18, 20)
    assert (bad.count, bad.checked, bad.total) == (3, 21, 21)
    assert bad.offsets(2) == [(17, 17 * BS), (18, 18 * BS)]
    assert bad.describe() == (f"3 of 21 blocks differ: 17 (offset {17 * BS}), "
                              f"18 (offset {18 * BS}), 20 (offset {20 * BS})")
    assert bad.describe(limit=1).endswith(", and 2 more")
    assert compare_tables(good, good.copy()).ok


def test_compare_tables_size_differs() -> None:
    a = table_of(bytes(4 * BS))
    b = table_of(bytes(5 * BS))
    bad = compare_tables(a, b)
    assert not bad.ok and bad.indexes == () and "bytes" in bad.describe()
    with pytest.raises(UsageError):
        compare_tables(a, CheckTable.empty(4 * BS, 2 * BS))


def test_compare_sampled_only_judges_the_sample() -> None:
    data = bytearray(10 * BS)
    expected = table_of(bytes(data))
    data[2 * BS] = 1
    data[7 * BS] = 1
    actual = table_of(bytes(data))
    idx = np.array([1, 2, 3, 8])
    bad = compare_sampled(expected, idx, actual.values[idx])
    assert bad.indexes == (2,) and bad.checked == 4 and bad.total == 10
    assert bad.describe().startswith("1 of 4 sampled of 10 blocks differ: 2 (offset 8192)")
    assert compare_sampled(expected, np.array([0, 9]), actual.values[[0, 9]]).ok
    with pytest.raises(UsageError):
        compare_sampled(expected, idx, actual.values[:2])


def test_mismatch_to_dict_caps_block_list() -> None:
    m = BlockMismatch(BS, 5000, 5000, tuple(range(2000)))
    d = m.to_dict()
    assert d["differ"] == 2000 and len(d["blocks"]) == 1000 and d["blocks"][:2] == [0, 1]


# --- report -------------------------------------------------------------------------------

def point(n: int, *disks: DiskCheck, reason=None, status=GOOD) -> PointCheck:  # type: ignore[no-untyped-def]
    p = PointCheck(n, 1 if reason is None else None,
                   None if reason else f"2026-11-25T13:0{n}:00.000Z",
                   status=status, reason=reason, disks=list(disks))
    p.settle()
    return p


def disk(target: str, *problems: Problem) -> DiskCheck:
    return DiskCheck(target, total=1024, checked=1024, problems=list(problems))


def test_point_lines() -> None:
    good = point(3, disk("vda"))
    assert format_point(good) == "point 3 (gen 1, 2026-11-25T13:03:00.000Z): good"
    vol = Problem("point volume", "x", BlockMismatch(BS, 1024, 1024, (17, 18)))
    bad = point(3, disk("vda", vol), disk("vdb"))
    assert bad.status == DAMAGED
    assert format_point(bad) == ("point 3 (gen 1, 2026-11-25T13:03:00.000Z): damaged: "
                                 "vda blocks 17, 18 (2 of 1024)")
    base = Problem("base volume", "x", BlockMismatch(BS, 1024, 10, tuple(range(9))))
    line = format_point(point(4, disk("vdb", base)))
    assert line.endswith("vdb blocks 0, 1, 2, 3, 4, 5, 6, 7, ... "
                         "(9 of 10 sampled; base volume damaged)")
    table = Problem("table 1", "/p/table-000001.vsbt: check table: checksum mismatch")
    assert format_point(point(5, disk("vda", table))).endswith(
        "damaged: vda: table 1 damaged: /p/table-000001.vsbt: check table: checksum mismatch")
    manifest = point(6, reason="checksum mismatch", status=DAMAGED)
    assert format_point(manifest) == "point 6 (gen ?): damaged: manifest: checksum mismatch"


def test_report_verdict_counts_and_text() -> None:
    vol = Problem("point volume", "x", BlockMismatch(BS, 1024, 1024, (5,)))
    dom = DomainCheck("u-1", "web1", points=[point(1, disk("vda")),
                                             point(2, disk("vda", vol))])
    other = DomainCheck("u-2", "db", points=[
        point(4, reason="format version 2 is newer", status=INCOMPATIBLE)])
    report = VerifyReport("/pool", None, [dom, other], seconds=1.25)
    assert not report.ok and report.incompatible
    assert report.counts() == {GOOD: 1, DAMAGED: 1, INCOMPATIBLE: 1}
    lines = format_report(report).splitlines()
    assert lines[0] == "domain web1 (u-1):"
    assert lines[2] == ("  point 2 (gen 1, 2026-11-25T13:02:00.000Z): damaged: "
                        "vda blocks 5 (1 of 1024)")
    assert lines[-1] == ("DAMAGE FOUND: 1 good, 1 damaged, 1 incompatible "
                         "(every block read, 1.2 s)")
    doc = report.to_dict()
    assert doc["ok"] is False and doc["domains"][0]["points"][1]["status"] == DAMAGED
    assert doc["domains"][0]["points"][1]["disks"][0]["problems"][0]["mismatch"]["blocks"] == [5]


def test_report_ok_and_domain_level_problems() -> None:
    dom = DomainCheck("u-1", "web1", points=[point(1, disk("vda"))])
    report = VerifyReport("/pool", 5.0, [dom])
    assert report.ok and not report.incompatible
    assert format_report(report).splitlines()[-1].startswith(
        "ok: 1 good, 0 damaged (5% of stored blocks sampled")
    dom.problems.append("generation 1: /p/generation.json: checksum mismatch")
    assert not report.ok
    assert "  generation 1: /p/generation.json: checksum mismatch" in format_report(report)
    empty = VerifyReport("/pool", None, [DomainCheck("u-3", "new")])
    assert empty.ok and "  no points" in format_report(empty)
