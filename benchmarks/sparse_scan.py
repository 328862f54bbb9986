"""How long the backup's pass takes over a huge, mostly empty disk (issue 7).

A sparse raw file of 1 TiB with 1 GiB of random data in scattered extents is
exported read-only by a private storage daemon and hashed by
``run_disk_pass(client, None, 65536, None)`` -- the backup's read pass without
writes -- in a child process (benchmarks/child.py), which also reports its
peak memory.  The check table of 1 TiB at 64 KiB has 16 Mi entries (256 MiB):
that is "the tables" of the memory target.  ``qemu-img convert`` of the same
file into a ``null-co`` target (which also skips holes) is timed as a
reference.

Run alone: ``.venv/bin/python benchmarks/sparse_scan.py [--size-gib N] [--data-mib N]``
(as root: it drops the page cache before each run).
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import GiB, MiB, Series, child, drop_caches, median, remove_tree, timed  # noqa: E402


def build_sparse(path: Path, size: int, data: int, extent: int, seed: int) -> List[Tuple[int, int]]:
    """A sparse raw file of ``size`` with ``data`` random bytes in extents of ``extent``."""
    import numpy as np

    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    count = data // extent
    slots = size // extent
    chosen = sorted(rng.sample(range(slots), count))
    extents = [(slot * extent, extent) for slot in chosen]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        for offset, length in extents:
            os.pwrite(fd, nrng.bytes(length), offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    return extents


def measure(workdir: Path, *, size: int, data: int, reps: int, cold: bool,
            extent: int = 256 * 1024, seed: int = 7) -> Dict[str, Any]:
    """Build the sparse file in ``workdir``, scan it ``reps`` times; the figures."""
    path = workdir / "sparse-1t.raw"
    extents = build_sparse(path, size, data, extent, seed)
    try:
        ours, ref = Series("run_disk_pass, hash only"), Series("qemu-img convert to null-co")
        for rep in range(reps):
            for side in (("ours", "ref") if rep % 2 == 0 else ("ref", "ours")):
                if cold:
                    drop_caches()
                if side == "ours":
                    doc = child("scan", str(path), "raw")
                    ours.seconds.append(doc["seconds"])
                    ours.extra.append(doc)
                else:
                    ref.seconds.append(timed([
                        "qemu-img", "convert", "-f", "raw", "-n", str(path),
                        "--target-image-opts", f"driver=null-co,size={size}"]))
        last = ours.extra[-1]
        return {
            "size": size, "data": sum(ln for _, ln in extents), "extents": len(extents),
            "ours": ours, "ref": ref,
            "maxrss_mib": max(d["maxrss_mib"] for d in ours.extra),
            "maxrss_before_mib": median([d["maxrss_before_mib"] for d in ours.extra]),
            "table_mib": last["table_mib"], "blocks": last["blocks"],
            "bytes_read": last["bytes_read"],
        }
    finally:
        path.unlink()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=int, default=1024)
    parser.add_argument("--data-mib", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warm", action="store_true", help="do not drop the page cache")
    parser.add_argument("--dir", default="/var/lib", help="where the sparse file goes")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="vmsnapbackup-sparse-", dir=args.dir))
    try:
        r = measure(workdir, size=args.size_gib * GiB, data=args.data_mib * MiB,
                    reps=args.reps, cold=not args.warm)
    finally:
        remove_tree(workdir)
    print(f"{r['size'] / GiB:.0f} GiB sparse raw, {r['data'] / MiB:.0f} MiB data in "
          f"{r['extents']} extents: blocks {r['blocks']}")
    for s in (r["ours"], r["ref"]):
        print(f"  {s.label:32s} median {s.median:6.2f} s ({s.spread()})")
    print(f"  peak memory {r['maxrss_mib']:.0f} MiB (interpreter + imports before the scan: "
          f"{r['maxrss_before_mib']:.0f} MiB), check table {r['table_mib']:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
