"""The pool side of a backup, played with the core API: no hypervisor, no QEMU.

Pool, prune and repair tests need pools holding points of several
generations; this writes them in FORMAT §10's order, as the backup would.
``put`` writes each volume or table file, so a test chooses their contents.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

from vmsnapbackup.core import manifest as mf
from vmsnapbackup.core.pool import DomainStore

#: A digest that is well formed and matches nothing.
D = "ab" * 16

Put = Callable[..., object]


def point_manifest(store: DomainStore, point: int, generation: int, first_point: int, *,
                   targets: Sequence[str] = ("vda",), when: Optional[str] = None,
                   seconds: Optional[Mapping[str, float]] = None) -> mf.PointManifest:
    """The manifest of ``point`` (the generation's first when ``point == first_point``)."""
    first = point == first_point
    when = when or mf.utc_now()
    disks = []
    for t in targets:
        base = store.relpath(store.base_volume_path(generation, t, "qcow2"))
        disks.append(mf.PointDisk(
            target=t, source=f"/img/{t}.qcow2", format="qcow2", virtual_size=1 << 20,
            block_size=65536,
            volume=base if first else store.relpath(store.point_volume_path(generation, t, point)),
            volume_format="qcow2", base=base, base_format="qcow2",
            table=store.relpath(store.table_path(generation, t, first_point)), table1_digest=D,
            difference=None if first else store.relpath(store.difference_path(generation, t, point)),
            difference_digest=None if first else D, table_digest=D,
            blocks=mf.BlockCounts(16, 16, 0, 1, 0), bytes_written=65536,
            seconds=dict(seconds or {})))
    return mf.PointManifest(
        point=point, generation=generation,
        domain=mf.DomainInfo(name="web1", uuid=store.uuid, xml="<domain/>"),
        started=when, snapshot_at=when, finished=when,
        consistency="crash-consistent", disks=tuple(disks))


def fake_backup(store: DomainStore, put: Put, *, new_generation: bool = False,
                targets: Sequence[str] = ("vda",), when: Optional[str] = None,
                sizes: Mapping[str, int] = {},
                seconds: Optional[Mapping[str, float]] = None) -> int:
    """One point, with the lock held: files first, the manifest last (FORMAT §10).

    ``put(path, size)`` writes a file; ``sizes`` gives the size per kind
    (``base``, ``table``, ``volume``, ``difference``; default 1 byte).
    """
    def write(path, kind: str) -> None:  # type: ignore[no-untyped-def]
        put(path, sizes.get(kind, 1))

    with store.lock("backup"):
        n = store.allocate_point()
        g = store.current_generation()
        created = when or mf.utc_now()
        if g is None or new_generation:
            g = store.allocate_generation(targets)
            for t in targets:
                write(store.base_volume_path(g, t, "qcow2"), "base")
                write(store.table_path(g, t, n), "table")
            store.write_generation(mf.GenerationRecord(
                generation=g, first_point=n, created=created, block_size=65536,
                disks={t: mf.GenerationDisk(1 << 20, "qcow2", "base.qcow2",
                                            f"table-{n:06d}.vsbt", D) for t in targets}))
            first = n
        else:
            first = store.read_generation(g).first_point
            for t in targets:
                write(store.point_volume_path(g, t, n), "volume")
                write(store.difference_path(g, t, n), "difference")
        store.write_manifest(point_manifest(store, n, g, first, targets=targets, when=when,
                                            seconds=seconds))
    return n
