"""The backup's generation decision fed from manifests (workflows.generation): the cost
policy by default, the older fraction rule when a threshold is given, the force flag."""
from __future__ import annotations

from vmsnapbackup.core.manifest import (
    BlockCounts,
    DomainInfo,
    GenerationDisk,
    GenerationRecord,
    PointDisk,
    PointManifest,
)
from vmsnapbackup.core.retention import Policy
from vmsnapbackup.workflows.generation import (
    CurrentGeneration,
    generation_costs,
    new_generation_reason,
)

BS = 65536
TOTAL = 4096          # 256 MiB virtual
DATA = 1024           # 64 MiB of data
FIRST = 3


def _point(n: int, changed: int) -> PointManifest:
    base = n == FIRST
    d = PointDisk(
        target="vda", source="/x.qcow2", format="qcow2", virtual_size=TOTAL * BS,
        block_size=BS, volume="g/vda/base.qcow2" if base else f"g/vda/{n}.qcow2",
        volume_format="qcow2", base="g/vda/base.qcow2", base_format="qcow2",
        table="g/vda/t.vsbt", table1_digest="0" * 32,
        difference=None if base else "d", difference_digest=None if base else "0" * 32,
        table_digest="0" * 32,
        blocks=BlockCounts(total=TOTAL, read=DATA, holes=TOTAL - DATA,
                           changed=DATA if base else changed, zero=0),
        bytes_written=(DATA if base else changed) * BS)
    ts = f"2026-01-{n:02d}T00:00:00Z"
    return PointManifest(point=n, generation=1, domain=DomainInfo("d", "u", "<domain/>"),
                         started=ts, snapshot_at=ts, finished=ts,
                         consistency="crash-consistent", disks=(d,))


def _current(changes: list[int], *, keep_first: bool = True) -> CurrentGeneration:
    rec = GenerationRecord(generation=1, first_point=FIRST, created="2026-01-03T00:00:00Z",
                           block_size=BS, disks={"vda": GenerationDisk(
                               TOTAL * BS, "qcow2", "base.qcow2", "t.vsbt", "0" * 32)})
    pts = [_point(FIRST, 0)] + [_point(FIRST + i + 1, c) for i, c in enumerate(changes)]
    if not keep_first:
        pts = pts[1:]
    return CurrentGeneration(1, rec, sealed=pts, base_files_bytes=DATA * BS)


def _reason(cur: CurrentGeneration, **kw: object) -> str | None:
    args: dict[str, object] = dict(force=False, targets={"vda"}, block_size=BS,
                                   threshold=None, sizes={"vda": TOTAL * BS})
    args.update(kw)
    return new_generation_reason(cur, **args)  # type: ignore[arg-type]


def test_costs_come_from_the_manifests() -> None:
    c = generation_costs(_current([10, 20, 30]))
    assert c.base_bytes == DATA * BS
    assert [(p.index, p.stored_bytes) for p in c.points] == [(1, 10 * BS), (2, 20 * BS),
                                                              (3, 30 * BS)]
    assert c.data_bytes == DATA * BS          # data, not the virtual size
    assert c.interval_days == 1.0
    assert c.changed_fraction == 30 / TOTAL


def test_pruned_first_point_uses_the_base_files() -> None:
    c = generation_costs(_current([10, 20], keep_first=False))
    assert c.base_bytes == DATA * BS


def test_small_points_continue() -> None:
    assert _reason(_current([10, 20, 30])) is None


def test_growing_points_start_a_new_generation_under_the_policy() -> None:
    # ~20 blocks more per backup: after about sqrt(2 * 1024 / 20) = 10 points the next
    # point costs more than the average of base and points so far
    changes = [20 * (i + 1) for i in range(12)]
    reason = _reason(_current(changes))
    assert reason is not None and "average" in reason
    # the same points, well under half of the virtual disk: the old rule goes on
    assert _reason(_current(changes), threshold=0.5) is None


def test_heavy_base_retention_keeps_the_generation_longer() -> None:
    changes = [20 * (i + 1) for i in range(12)]
    long_kept = Policy(keep_daily=7, keep_weekly=4, keep_monthly=6)
    assert _reason(_current(changes), retention=long_kept) is None


def test_cap_at_half_of_the_data_not_the_virtual_disk() -> None:
    reason = _reason(_current([500, 600]))
    assert reason is not None and "of the data" in reason


def test_explicit_threshold_is_the_old_rule() -> None:
    assert _reason(_current([10]), threshold=0.001) is not None
    assert _reason(_current([10]), threshold=0.5) is None


def test_force_and_base_only() -> None:
    assert _reason(_current([]), force=True) == "asked for"
    assert _reason(_current([])) is None
    assert _reason(_current([]), threshold=0.0001) is None


def test_floor_a_nearly_empty_disk_keeps_its_generation() -> None:
    # 2 blocks of data: a point of 2 blocks is over half of it, but a new base would
    # save nothing worth a full read and a new table 1 (under 1 % of the virtual disk)
    cur = _current([1, 2])
    small = [p for p in cur.sealed]
    data2 = [PointManifest(**{**m.__dict__, "disks": (PointDisk(**{
        **m.disks[0].__dict__, "blocks": BlockCounts(TOTAL, 2, TOTAL - 2, 2, 0)}),)})
        for m in small]
    cur2 = CurrentGeneration(1, cur.record, sealed=data2)
    assert generation_costs(cur2).data_bytes == 2 * BS
    assert _reason(cur2) is None
