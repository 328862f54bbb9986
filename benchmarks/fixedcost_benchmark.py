"""Where a backup of a small domain spends its time outside the disk pass (issues 16, 20).

One throwaway domain (1 GiB qcow2, ``--data-mib`` of random data, running unless
``--shutoff``), a pool next to it.  After one unmeasured full backup, ``--reps``
backups N (``vmsnapbackup backup DOMAIN --json``, the CLI as a user runs it, page cache
dropped before each) are timed; the library's own INFO records give the phase
split (:mod:`clitimeline`), and one extra run under
``strace -f -c`` counts the fsyncs and processes started.  Prints a table; writes no
doc.  ``--tree NAME=DIR`` (repeatable) times the package of other checkouts (``git
archive COMMIT vmsnapbackup | tar -x -C DIR``) on the same domain, the trees
alternating in a rotating order (A B, B A, ...).  Run as root under the integration lock:
``flock /tmp/vsb-integration.lock .venv/bin/python benchmarks/fixedcost_benchmark.py``.
"""
from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "integration"))

from backup_benchmark import (  # noqa: E402
    change_blocks,
    claim_dir,
    fill_image,
    log,
    remove_domain_robustly,
)
from benchlib import ROOT, GiB, MiB, drop_caches, median, random_extents, remove_tree  # noqa: E402
from clitimeline import backup, python_of_checkout  # noqa: E402

PYTHON = python_of_checkout(ROOT)


def _cli(argv: List[str], pool: Path) -> None:
    env = dict(os.environ, VMSNAPBACKUP_POOL=str(pool))
    subprocess.run(argv, check=True, capture_output=True, env=env)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--data-mib", type=int, default=64)
    parser.add_argument("--shutoff", action="store_true")
    parser.add_argument("--no-strace", action="store_true")
    parser.add_argument("--profile", help="one more run under cProfile, its stats here")
    parser.add_argument("--dir", default="/var/lib/vmsnapbackup-bench-fixed")
    parser.add_argument("--seed", type=int, default=20240601)
    parser.add_argument("--tree", action="append", default=[], metavar="NAME=DIR",
                        help="also time the vmsnapbackup package found in DIR")
    args = parser.parse_args(argv)
    trees = [("this", str(ROOT))] + [tuple(t.split("=", 1)) for t in args.tree]
    import libvirt
    from domains import DiskSpec, DomainFactory

    size = GiB
    conn = libvirt.open("qemu:///system")
    factory = DomainFactory(conn)
    work: Optional[Path] = None
    dom = None
    rng = random.Random(args.seed)
    try:
        work = claim_dir(Path(args.dir))
        os.chdir(work)      # so that PYTHONPATH, not the current directory, picks the tree
        pool = work / "pool"
        dom = factory(disks=[DiskSpec("vda", "qcow2", size)], start=False, name_prefix="vsb-fix")
        fill_image(dom.disks["vda"], random_extents(size, args.data_mib * MiB, args.seed),
                   args.seed)
        if not args.shutoff:
            dom.start()
        backup(PYTHON, dom.name, pool, work, "--new-generation", offline=args.shutoff)
        walls: Dict[str, List[float]] = {name: [] for name, _ in trees}
        splits: Dict[str, List[Dict[str, Optional[float]]]] = {name: [] for name, _ in trees}
        for rep in range(args.reps):
            shift = rep % len(trees)
            for name, tree in trees[shift:] + trees[:shift]:
                if not args.shutoff:
                    change_blocks(dom, size, 0.01, rng)
                drop_caches()
                wall, split, _doc = backup(PYTHON, dom.name, pool, work, offline=args.shutoff,
                                           env={"PYTHONPATH": tree})
                walls[name].append(wall)
                splits[name].append(split)
                log(f"backup N {rep + 1} ({name}): {wall:.3f} s {split}")
        for name, _tree in trees:
            print(f"[{name}] backup N of a {'shut-off' if args.shutoff else 'running'} 1 GiB "
                  f"domain ({args.data_mib} MiB data), median of {args.reps}: "
                  f"{median(walls[name]):.3f} s (runs {[round(w, 3) for w in walls[name]]})")
            for step in splits[name][0]:
                values = [v for v in (s[step] for s in splits[name]) if v is not None]
                print(f"  {step:45s} {median(values):.3f}" if values else f"  {step:45s} ?")
        if args.profile:
            if not args.shutoff:
                change_blocks(dom, size, 0.01, rng)
            drop_caches()
            _cli([PYTHON, "-m", "cProfile", "-o", args.profile, "-m", "vmsnapbackup",
                  "backup", dom.name], pool)
        if not args.no_strace:
            if not args.shutoff:
                change_blocks(dom, size, 0.01, rng)
            drop_caches()
            out = work / "strace.txt"
            _cli(["strace", "-f", "-c", "-o", str(out), "-e",
                  "trace=fsync,fdatasync,execve,clone,clone3,connect,rename,renameat2",
                  PYTHON, "-m", "vmsnapbackup", "backup", dom.name], pool)
            print(out.read_text())
        return 0
    finally:
        factory.domains.clear()
        if dom is not None:
            remove_domain_robustly("qemu:///system", dom)
        remove_tree(work)
        conn.close()


if __name__ == "__main__":
    sys.exit(main())
