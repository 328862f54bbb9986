"""A/B of the disk pass between two code trees, on large contiguous extents, cold (issue 16).

The machine the benchmarks run on is shared, so one run of one version says
little.  This builds one qcow2 image (``--size-gib``, ``--data-gib`` of random data
in ``--extent-kib`` extents spread evenly, the rest holes: 4 MiB for large
contiguous extents, 64 KiB for the scattered reads a dirty bitmap gives), then times, for each code
tree given with ``--tree NAME=PATH`` (a checkout whose ``vmsnapbackup`` package is
imported through PYTHONPATH, e.g. ``git archive <commit> vmsnapbackup | tar -x -C
DIR``), in turn and in an order that rotates every repetition, with the page cache
dropped before each run:

* ``hash``: the frozen image exported read-only (O_DIRECT, native AIO, as a
  backup does) and ``run_disk_pass`` hashing it (backup N's full read);
* ``copy``: the same into a new qcow2 volume created and exported by the same
  storage daemon, flushed and closed (fdatasync) -- a full backup's pass.

and, with ``--baseline``, ``qemu-img convert`` to null-co / to qcow2 with
writeback (the lines of ``benchmarks/run``).  Prints the medians and the
ratio of each tree to the first.  No libvirt, no domain: it needs root only
for ``drop_caches``.  ``python benchmarks/datapath_ab.py --tree old=/tmp/old
--tree new=. --reps 5``
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from benchlib import ROOT, GiB, drop_caches, median, remove_tree, timed  # noqa: E402


def contiguous_extents(size: int, data: int, extent: int) -> List[Tuple[int, int]]:
    """``data`` bytes in extents of ``extent`` bytes, spread evenly with holes between."""
    count = max(1, data // extent)
    stride = size // count
    return [(i * stride, extent) for i in range(count)]


def build(workdir: Path, size: int, data: int, extent: int, seed: int) -> Path:
    sys.path.insert(0, str(ROOT))
    from backup_benchmark import fill_image

    image = workdir / "frozen.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(size)],
                   check=True)
    fill_image(image, contiguous_extents(size, data, extent), seed)
    return image


def child(op: str, image: str, outdir: str) -> Dict[str, Any]:
    """One timed pass with whatever ``vmsnapbackup`` PYTHONPATH gives (run in a child)."""
    import vmsnapbackup
    from vmsnapbackup.adapters.nbdclient import NbdClient
    from vmsnapbackup.adapters.storagedaemon import StorageDaemon
    from vmsnapbackup.workflows.diskpass import run_disk_pass

    with StorageDaemon(tag="bench-ab") as daemon:
        src = daemon.export_image(image, "qcow2", name="src", direct=True)
        out = None
        if op == "copy":
            out = daemon.create_writable(str(Path(outdir) / "volume.qcow2"),
                                         size=_virtual_size(image), fmt="qcow2", name="dst")
        start = time.monotonic()
        with NbdClient.open_unix(src.socket_path, src.name) as s:
            if out is None:
                _table, stats = run_disk_pass(s, None, 65536, None)
            else:
                with NbdClient.open_unix(out.socket_path, out.name) as d:
                    _table, stats = run_disk_pass(s, d, 65536, None)
                    d.flush()
        passed = time.monotonic()
        if out is not None:
            daemon.remove_export(out, force=True)   # closes the volume: fdatasync
        end = time.monotonic()
        daemon.remove_export(src, force=True)
    return {"seconds": end - start, "pass": passed - start, "read": stats.read,
            "code": vmsnapbackup.__file__}


def _virtual_size(image: str) -> int:
    info = subprocess.run(["qemu-img", "info", "--output=json", image], check=True,
                          capture_output=True, text=True).stdout
    return int(json.loads(info)["virtual-size"])


def run_child(tree: Path, op: str, image: Path, outdir: Path) -> Dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    proc = subprocess.run([sys.executable, __file__, "--child", op, str(image), str(outdir)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{tree} {op}: {proc.stderr[-2000:]}")
    doc: Dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    if not doc["code"].startswith(str(tree.resolve())):
        raise RuntimeError(f"{tree}: imported {doc['code']} instead")
    return doc


def main(argv: Optional[List[str]] = None) -> int:
    if argv is None and sys.argv[1:2] == ["--child"]:
        print(json.dumps(child(*sys.argv[2:5])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", required=True, help="NAME=PATH")
    parser.add_argument("--ops", default="hash,copy")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--size-gib", type=float, default=4)
    parser.add_argument("--data-gib", type=float, default=2)
    parser.add_argument("--extent-kib", type=int, default=4096)
    parser.add_argument("--baseline", action="store_true")
    parser.add_argument("--dir", default="/var/lib")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    trees = [(n, Path(p).resolve()) for n, p in (t.split("=", 1) for t in args.tree)]
    size, data = int(args.size_gib * GiB), int(args.data_gib * GiB)
    work = Path(tempfile.mkdtemp(prefix="vmsnapbackup-ab-", dir=args.dir))
    try:
        image = build(work, size, data, args.extent_kib * 1024, args.seed)
        results: Dict[str, Dict[str, List[float]]] = {}
        for op in args.ops.split(","):
            sides = [n for n, _ in trees] + (["qemu-img"] if args.baseline else [])
            times: Dict[str, List[float]] = {n: [] for n in sides}
            passes: Dict[str, List[float]] = {}
            for rep in range(args.reps):
                order = sides[rep % len(sides):] + sides[:rep % len(sides)]
                for name in order:
                    out = work / "out"
                    out.mkdir()
                    drop_caches()
                    if name == "qemu-img":
                        times[name].append(timed(_baseline(op, image, out, size)))
                    else:
                        doc = run_child(dict(trees)[name], op, image, out)
                        times[name].append(doc["seconds"])
                        passes.setdefault(name, []).append(doc["pass"])
                    remove_tree(out)
                print(f"{op} {rep + 1}: " + ", ".join(f"{n} {times[n][-1]:.2f}" for n in order),
                      flush=True)
            results[op] = times
            for name, values in passes.items():
                print(f"{op} {name}: pass and flush without the close, median "
                      f"{median(values):.3f} s")
        first = trees[0][0]
        for op, times in results.items():
            base = median(times[first])
            for name, values in times.items():
                print(f"{op:5s} {name:10s} median {median(values):.3f} s "
                      f"({min(values):.2f}-{max(values):.2f}) ratio to {first} "
                      f"{median(values) / base:.2f}; runs {[round(v, 2) for v in values]}")
        return 0
    finally:
        remove_tree(work)


def _baseline(op: str, image: Path, out: Path, size: int) -> List[str]:
    if op == "hash":
        return ["qemu-img", "convert", "-f", "qcow2", "-n", str(image),
                "--target-image-opts", f"driver=null-co,size={size}"]
    return ["qemu-img", "convert", "-t", "writeback", "-f", "qcow2", "-O", "qcow2",
            str(image), str(out / "convert.qcow2")]


if __name__ == "__main__":
    sys.exit(main())
