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
the library's own log records for ours (clitimeline.py).  Prints the table and
writes it into docs/benchmarks.md (``--no-doc``: print only).
Run as root under the integration lock: ``benchmarks/push_benchmark.py``.
"""
from __future__ import annotations

import argparse
import datetime
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
from benchlib import (  # noqa: E402
    ROOT,
    GiB,
    drop_caches,
    machine,
    markdown_table,
    median,
    random_extents,
    remove_tree,
    replace_block,
)
from clitimeline import backup, python_of_checkout  # noqa: E402

PYTHON = python_of_checkout(ROOT)
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- results push: begin -->", "<!-- results push: end -->"
GOALS = {"full": 1.1, "incremental": 4.0}


def _virsh(*args: str) -> str:
    proc = subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True,
                          text=True, check=True)
    return proc.stdout


def ours(dom: str, pool: Path, work: Path,
         new_generation: bool) -> Tuple[float, Dict[str, Any]]:
    """``vmsnapbackup backup DOMAIN --json``: wall time; its phases and JSON document."""
    wall, split, doc = backup(PYTHON, dom, pool, work,
                              *(["--new-generation"] if new_generation else []))
    return wall, {"phases": split, "doc": doc}


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


def _med(values: List[Optional[float]]) -> str:
    known = [v for v in values if v is not None]
    return f"{median(known):.3f}" if known else "?"


def report(rows: Dict[str, Dict[str, List[Any]]], reps: int) -> str:
    """The two lines against ``virsh backup-begin`` and both tools' phases (markdown)."""
    lines = []
    for kind, r in rows.items():
        o = [w for w, _ in r["ours"]]
        t = [w for w, _ in r["theirs"]]
        ratio = median(o) / median(t)
        lines.append([kind, f"{median(t):.3f} ({min(t):.2f}-{max(t):.2f})",
                      f"{median(o):.3f} ({min(o):.2f}-{max(o):.2f})", f"**{ratio:.2f}**",
                      f"≤ {GOALS[kind]}", "yes" if ratio <= GOALS[kind] else "no"])
    head = ["", "`virsh backup-begin` push (median s, min-max)",
            "`vmsnapbackup backup` (median s, min-max)", "ratio", "goal", "met"]
    phase_rows = []
    names = list(rows["full"]["ours"][0][1]["phases"])
    for name in names:
        phase_rows.append([f"ours: {name}"] + [
            _med([info["phases"][name] for _, info in rows[k]["ours"]]) for k in rows])
    for label, get in (
            ("theirs: libvirt job (`domjobinfo --completed`, Time elapsed)",
             lambda st, w: float(st["Time elapsed"].split()[0]) / 1000),
            ("theirs: `virsh` start, polling, fsync of the target",
             lambda st, w: w - float(st["Time elapsed"].split()[0]) / 1000)):
        phase_rows.append([label] + [_med([get(st, w) for w, st in rows[k]["theirs"]])
                                     for k in rows])
    phase_rows.append(["theirs: bytes the job wrote (last run)"] + [
        str(rows[k]["theirs"][-1][1].get("File processed", "?")) for k in rows])
    m = machine()
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return "\n\n".join([
        f"Measured {when} by `benchmarks/push_benchmark.py` (median of {reps}) on: "
        + ", ".join(f"{k} {v}" for k, v in m.items()) + ". One running domain, 1 GiB qcow2, "
        "512 MiB random data in scattered extents, page cache dropped before every timed "
        "command, the two tools alternating; before each incremental, guest writes change "
        "1 % of the 64 KiB blocks.",
        markdown_table(head, lines),
        markdown_table(["phase (median s)", *list(rows)], phase_rows)])


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", default="/var/lib/vmsnapbackup-bench-push")
    parser.add_argument("--seed", type=int, default=20240601)
    parser.add_argument("--no-doc", action="store_true",
                        help=f"print only; do not write into {DOC.relative_to(ROOT)}")
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
                        wall, info = ours(dom.name, pool, work, kind == "full")
                        rows[kind]["ours"].append((wall, info))
                    else:
                        n += 1
                        wall, st = theirs(dom.name, work, n, last if kind == "incremental"
                                          else None)
                        last = f"push{n}"
                        rows[kind]["theirs"].append((wall, st))
                log(f"{kind} {rep + 1}: ours {rows[kind]['ours'][-1][0]:.2f} s, "
                    f"push {rows[kind]['theirs'][-1][0]:.2f} s")
        md = report(rows, args.reps)
        print(md)
        if not args.no_doc:
            replace_block(DOC, BEGIN, END, md)
            print(f"written into {DOC}")
        return 0
    finally:
        factory.domains.clear()
        if dom is not None:
            remove_domain_robustly("qemu:///system", dom)
        remove_tree(work)
        conn.close()


if __name__ == "__main__":
    sys.exit(main())
