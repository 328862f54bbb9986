"""``vmsnapbackup backup`` next to ``virsh backup-begin`` push mode (issue 20).

One throwaway running domain (1 GiB qcow2, cache='none' where the filesystem
allows, 512 MiB random data in scattered extents), in one run, page cache dropped
before every timed command, the two sides alternating:

- full: ``vmsnapbackup backup --new-generation`` (the CLI, as a user runs it)
  against ``virsh backup-begin`` push into a fresh qcow2 file, waited for, then
  fsync'd;
- incremental: 1 % of the 64 KiB blocks changed by guest writes before each
  side; ours uses its generation's dirty bitmap, theirs ``<incremental>`` from
  the checkpoint its previous run created.

Phases: libvirt's job statistics (``virsh domjobinfo --completed``) for theirs,
the backup result's seconds (``--json``) for ours.  Prints a table; writes no doc.
Run as root under the integration lock: ``benchmarks/push_benchmark.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "integration"))

from backup_benchmark import (  # noqa: E402
    alternate,
    change_blocks,
    claim_dir,
    fill_image,
    log,
    remove_domain_robustly,
)
from benchlib import ROOT, GiB, drop_caches, median, random_extents, remove_tree  # noqa: E402

CLI = ROOT / ".venv" / "bin" / "vmsnapbackup"


def _virsh(*args: str) -> str:
    proc = subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True,
                          text=True, check=True)
    return proc.stdout


def ours(dom: str, pool: Path, new_generation: bool) -> Tuple[float, Dict[str, Any]]:
    argv = [str(CLI), "backup", dom, "--json"] + (["--new-generation"] if new_generation else [])
    env = dict(os.environ, VMSNAPBACKUP_POOL=str(pool))
    t0 = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, check=True, env=env)
    wall = time.monotonic() - t0
    return wall, json.loads(proc.stdout)


def theirs(dom: str, work: Path, n: int, since: Optional[str]) -> Tuple[float, Dict[str, str]]:
    """One push backup; creates checkpoint ``push{n}``; returns wall time and job stats."""
    target = work / f"push{n}.qcow2"
    inc = f"<incremental>{since}</incremental>" if since else ""
    (work / "b.xml").write_text(
        f"<domainbackup mode='push'>{inc}<disks><disk name='vda' type='file'>"
        f"<target file='{target}'/><driver type='qcow2'/></disk></disks></domainbackup>")
    (work / "c.xml").write_text(
        f"<domaincheckpoint><name>push{n}</name><disks><disk name='vda' checkpoint='bitmap'/>"
        "</disks></domaincheckpoint>")
    t0 = time.monotonic()
    _virsh("backup-begin", dom, str(work / "b.xml"), str(work / "c.xml"))
    deadline = t0 + 300
    while True:  # the job is asynchronous: poll until libvirt has a completed record
        first = (_virsh("domjobinfo", dom).splitlines() or ["None"])[0]
        if first.split(":", 1)[-1].strip() == "None":
            break
        if time.monotonic() > deadline:
            raise RuntimeError("push backup did not finish in 300 s")
        time.sleep(0.005)
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    wall = time.monotonic() - t0
    stats = dict(line.split(":", 1) for line in _virsh("domjobinfo", dom, "--completed")
                 .splitlines() if ":" in line)
    target.unlink()
    return wall, {k.strip(): v.strip() for k, v in stats.items()}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", default="/var/lib/vmsnapbackup-bench-push")
    parser.add_argument("--seed", type=int, default=20240601)
    args = parser.parse_args(argv)
    import libvirt
    from domains import DiskSpec, DomainFactory

    size, data = GiB, GiB // 2
    conn = libvirt.open("qemu:///system")
    factory = DomainFactory(conn)
    work: Optional[Path] = None
    dom = None
    rng = random.Random(args.seed)
    rows: Dict[str, Dict[str, List[Any]]] = {k: {"ours": [], "theirs": []}
                                             for k in ("full", "incremental")}
    try:
        work = claim_dir(Path(args.dir))
        pool = work / "pool"
        dom = factory(disks=[DiskSpec("vda", "qcow2", size)], start=False,
                      name_prefix="vsb-push")
        fill_image(dom.disks["vda"], random_extents(size, data, args.seed), args.seed)
        dom.start()
        n = 0
        last: Optional[str] = None
        for kind in ("full", "incremental"):
            for rep in range(args.reps):
                for side in alternate(rep, "ours", "theirs"):
                    if kind == "incremental":
                        change_blocks(dom, size, 0.01, rng)
                    drop_caches()
                    if side == "ours":
                        wall, doc = ours(dom.name, pool, kind == "full")
                        rows[kind]["ours"].append((wall, doc))
                    else:
                        n += 1
                        wall, st = theirs(dom.name, work, n, last if kind == "incremental"
                                          else None)
                        last = f"push{n}"
                        rows[kind]["theirs"].append((wall, st))
                log(f"{kind} {rep + 1}: ours {rows[kind]['ours'][-1][0]:.2f} s, "
                    f"push {rows[kind]['theirs'][-1][0]:.2f} s")
        for kind, r in rows.items():
            o = median([w for w, _ in r["ours"]])
            t = median([w for w, _ in r["theirs"]])
            inproc = median([d["seconds"]["total"] for _, d in r["ours"]])
            read = median([sum(k["seconds"].get("read", 0.0) for k in d["disks"])
                           for _, d in r["ours"]])
            commit = median([d["seconds"]["commit"] for _, d in r["ours"]])
            job = median([float(st["Time elapsed"].split()[0]) / 1000 for _, st in r["theirs"]])
            print(f"{kind}: ours {o:.3f} s, push {t:.3f} s, ratio {o / t:.2f}x "
                  f"(runs: ours {[round(w, 2) for w, _ in r['ours']]}, "
                  f"push {[round(w, 2) for w, _ in r['theirs']]})")
            print(f"  ours: process start/imports/exit {o - inproc:.3f} s, backup() {inproc:.3f}"
                  f" s of which disk pass {read:.3f} s, commit {commit:.3f} s, rest (lock, "
                  f"journal, snapshot, daemon, seal) {inproc - read - commit:.3f} s")
            print(f"  push: libvirt job {job:.3f} s, virsh/polling/fsync {t - job:.3f} s; "
                  f"last job: {r['theirs'][-1][1].get('File processed')}")
        return 0
    finally:
        factory.domains.clear()
        if dom is not None:
            remove_domain_robustly("qemu:///system", dom)
        remove_tree(work)
        conn.close()


if __name__ == "__main__":
    sys.exit(main())
