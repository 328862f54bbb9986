"""The backup next to plain QEMU tools, on one running domain, in one run (issue 7).

Builds a throwaway running domain (integration/domains.py) whose 4 GiB qcow2
disk holds ~2 GiB of random data in scattered extents and holes, a pool next
to it on the same filesystem, and measures, median of ``--reps`` (>= 3):

1. a full backup (new generation) against ``qemu-img convert -O qcow2`` of the
   same image into the same directory;
2. backup N after 1 % of the blocks changed (scattered 4 KiB - 1 MiB guest
   writes), reading all allocated data (``--no-dirty-bitmaps``), against
   reading the image's allocated data once (``qemu-img convert`` into a
   ``null-co`` target);
   and the same with the generation's dirty bitmap (the default), which reads
   only the blocks written since the generation's first point;
3. restore of point N against ``qemu-img convert -O raw`` of its point volume;
4. peak memory of the backup process, the time the domain ran on the overlay
   and the time of the commit;
5. the pass over a 1 TiB sparse disk with 1 GiB allocated (sparse_scan.py).

Each side of each comparison runs in turn (the order alternates between
repetitions) with the page cache dropped before every run, so both read from
the disk.  Every backup and restore runs in a child process (child.py) that
reports its own time and peak memory.  The results are printed and written
into docs/benchmarks.md with the machine they were measured on.

Nothing is patched or tuned for the benchmark: the children call the library
as users do, so the figures are those of the code in the tree.

Run as root: ``benchmarks/run`` (``--help`` for the options; ``--only restore``
measures one line, making the points it needs without measuring them).
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "integration"))

from benchlib import (  # noqa: E402
    GiB, ROOT, Series, child, drop_caches, filesystem_of, machine, markdown_table,
    median, random_extents, remove_tree, replace_block, text_table, timed, write_random,
)
import sparse_scan  # noqa: E402

BLOCK = 64 * 1024
DOC = ROOT / "docs" / "benchmarks.md"
#: Created by us in the bench directory: only a directory holding it is ever removed.
MARKER = ".vmsnapbackup-benchmark"

TARGETS = {"full": 1.1, "incremental": 1.2, "bitmap": 1.2, "restore": 1.2, "memory_mib": 200.0}
#: The comparisons with qemu-img, in the order they run (each needs the points before it).
COMPARISONS = ("full", "incremental", "bitmap", "restore")
#: What ``--only`` may name.
LINES = COMPARISONS + ("sparse",)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- set-up ------------------------------------------------------------------------

def claim_dir(path: Path) -> Path:
    """A fresh bench directory; a leftover of a killed run (it has our marker) is removed."""
    if path.exists():
        if not (path / MARKER).exists():
            raise SystemExit(f"{path} exists and is not a benchmark directory; remove it or "
                             "choose another with --dir")
        remove_tree(path)
    path.mkdir(mode=0o755, parents=True)
    (path / MARKER).write_text(f"pid {os.getpid()}\n")
    return path


def fill_image(image: Path, extents: Sequence[Tuple[int, int]], seed: int) -> int:
    """Random data into the (shut-off) domain's qcow2 through a writable export."""
    from vmsnapbackup.adapters.nbdclient import NbdClient
    from vmsnapbackup.adapters.storagedaemon import StorageDaemon

    with StorageDaemon(tag="bench-fill") as daemon:
        export = daemon.open_writable(str(image), "qcow2", name="fill")
        with NbdClient.open_unix(export.socket_path, export.name) as client:
            written = write_random(client, extents, seed)
        daemon.remove_export(export)
    return written


def change_blocks(dom: Any, size: int, fraction: float, rng: random.Random) -> Tuple[int, int]:
    """Guest writes of 4 KiB - 1 MiB at scattered places until ``fraction`` of the blocks
    changed; returns (writes, blocks touched)."""
    want = math.ceil(size // BLOCK * fraction)
    touched: set = set()
    writes = 0
    while len(touched) < want:
        length = 4096 * max(1, round(2 ** rng.uniform(0, 8)))
        offset = rng.randrange(0, (size - length) // 4096) * 4096
        dom.write("vda", offset, length, rng.randrange(1, 256))
        touched.update(range(offset // BLOCK, (offset + length - 1) // BLOCK + 1))
        writes += 1
    return writes, len(touched)


# -- the measurements --------------------------------------------------------------

def alternate(rep: int, a: str, b: str) -> Tuple[str, str]:
    return (a, b) if rep % 2 == 0 else (b, a)


def measure_full(dom: Any, image: Path, pool: Path, work: Path, reps: int,
                 cold: bool) -> Tuple[Series, Series]:
    ours, ref = Series("backup (new generation)"), Series("qemu-img convert -O qcow2")
    out = work / "convert.qcow2"
    for rep in range(reps):
        for side in alternate(rep, "ours", "ref"):
            if cold:
                drop_caches()
            if side == "ours":
                doc = child("backup", dom.name, str(pool), "--new-generation")
                ours.seconds.append(doc["seconds"])
                ours.extra.append(doc)
            else:
                ref.seconds.append(timed(["qemu-img", "convert", "-U", "-t", "writeback",
                                          "-f", "qcow2", "-O", "qcow2", str(image), str(out)]))
                out.unlink()
        log(f"full backup {rep + 1}/{reps}: ours {ours.seconds[-1]:.2f} s, "
            f"qemu-img {ref.seconds[-1]:.2f} s")
    return ours, ref


def measure_incremental(dom: Any, image: Path, size: int, pool: Path, reps: int, cold: bool,
                        rng: random.Random, fraction: float,
                        bitmaps: bool = False) -> Tuple[Series, Series]:
    if bitmaps:
        ours = Series(f"backup N after {fraction:.0%} changed, dirty bitmap")
    else:
        ours = Series(f"backup N after {fraction:.0%} changed, full read")
    ref = Series("qemu-img convert to null-co")
    flags = [] if bitmaps else ["--no-dirty-bitmaps"]
    for rep in range(reps):
        t0 = time.monotonic()
        writes, blocks = change_blocks(dom, size, fraction, rng)
        log(f"changed {blocks} blocks with {writes} guest writes in "
            f"{time.monotonic() - t0:.1f} s")
        for side in alternate(rep, "ours", "ref"):
            if cold:
                drop_caches()
            if side == "ours":
                doc = child("backup", dom.name, str(pool), *flags)
                ours.seconds.append(doc["seconds"])
                ours.extra.append(doc)
            else:
                ref.seconds.append(timed(["qemu-img", "convert", "-U", "-f", "qcow2", "-n",
                                          str(image), "--target-image-opts",
                                          f"driver=null-co,size={size}"]))
        log(f"{ours.label} {rep + 1}/{reps}: ours {ours.seconds[-1]:.2f} s, "
            f"qemu-img {ref.seconds[-1]:.2f} s")
    return ours, ref


def measure_restore(dom: Any, pool: Path, work: Path, point: int, volume: Path, reps: int,
                    cold: bool) -> Tuple[Series, Series]:
    ours = Series(f"restore point {point} (raw, checked)")
    ref = Series("qemu-img convert -O raw")
    out = work / "convert.raw"
    for rep in range(reps):
        outdir = work / f"restore-{rep}"
        for side in alternate(rep, "ours", "ref"):
            if cold:
                drop_caches()
            if side == "ours":
                doc = child("restore", dom.name, str(pool), str(point), str(outdir))
                ours.seconds.append(doc["seconds"])
                ours.extra.append(doc)
                remove_tree(outdir)
            else:
                ref.seconds.append(timed(["qemu-img", "convert", "-t", "writeback", "-f",
                                          "qcow2", "-O", "raw", str(volume), str(out)]))
                out.unlink()
        log(f"restore {rep + 1}/{reps}: ours {ours.seconds[-1]:.2f} s, "
            f"qemu-img {ref.seconds[-1]:.2f} s")
    return ours, ref


def point_volume(pool: Path, uuid: str, point: int) -> Path:
    from vmsnapbackup.core.pool import Pool

    store = Pool.open(pool).domain(uuid)
    manifest = store.read_manifest(point)
    return store.resolve(manifest.disks[0].volume)


# -- the report --------------------------------------------------------------------

def mbps(nbytes: int, seconds: float) -> str:
    return f"{nbytes / 1e6 / seconds:.0f}" if seconds > 0 else "-"


def verdict(value: float, target: float) -> str:
    return "yes" if value <= target else "**no**"


def phase_rows(series: Series) -> List[List[str]]:
    names = list(series.extra[0]["phases"])
    rows = []
    for name in names:
        values = [d["phases"].get(name) for d in series.extra]
        if any(v is None for v in values):
            rows.append([name, "?"])
        else:
            rows.append([name, f"{median(values):.2f}"])
    return rows


def _median_of(series: Series, get: Any) -> float:
    return median([get(d) for d in series.extra])


def report(r: Dict[str, Any]) -> Tuple[str, str]:
    """(text for the terminal, markdown for docs/benchmarks.md); only the lines measured."""
    data = r["data_bytes"]
    rows = []
    for key in COMPARISONS:
        if key not in r:
            continue
        ours, ref = r[key]
        ratio = ours.median / ref.median
        rows.append([ours.label, f"{ours.median:.2f} ({ours.spread()})", mbps(data, ours.median),
                     ref.label, f"{ref.median:.2f} ({ref.spread()})", mbps(data, ref.median),
                     f"{ratio:.2f}", f"≤ {TARGETS[key]}", verdict(ratio, TARGETS[key])])
    header = ["ours", "s (min–max)", "MB/s", "baseline", "s (min–max)", "MB/s", "ratio",
              "target", "met"]

    backup_lines = [(key, r[key][0]) for key in ("full", "incremental", "bitmap") if key in r]
    other = []
    if backup_lines:
        peak = max(d["maxrss_mib"] for _, series in backup_lines for d in series.extra)
        other.append(["peak memory of a backup process (max of all backups)", f"{peak:.0f} MiB",
                      f"≤ {TARGETS['memory_mib']:.0f} MiB + tables",
                      verdict(peak, TARGETS["memory_mib"])])
    for key, series in backup_lines:
        name = {"full": "full backup", "incremental": "backup N",
                "bitmap": "backup N, dirty bitmap"}[key]
        overlay = _median_of(series, lambda d: d["result"]["seconds"].get("on_overlay",
                                                                           float("nan")))
        commit = _median_of(series, lambda d: d["result"]["disks"][0]["seconds"]["commit"])
        other.append([f"{name}: time on the overlay / commit (median)",
                      f"{overlay:.2f} s / {commit:.2f} s", "", ""])
    for key, series in backup_lines:
        if key == "full":
            continue
        read = _median_of(series, lambda d: d["result"]["disks"][0]["blocks"]["read"])
        kept = _median_of(series, lambda d: d["result"]["disks"][0]["blocks"].get("unchanged", 0))
        total = series.extra[0]["result"]["disks"][0]["blocks"]["total"]
        other.append([f"{ {'incremental': 'backup N', 'bitmap': 'backup N, dirty bitmap'}[key]}: "
                      "blocks read / taken from table 1 unread (median)",
                      f"{read:.0f} / {kept:.0f} of {total}", "", ""])
    if "restore" in r:
        ours = r["restore"][0]
        split = [_median_of(ours, lambda d, k=k: d["result"]["disks"][0][k])
                 for k in ("write_seconds", "sync_seconds", "check_seconds")]
        other.append(["restore: read, hash and write / fsync / compare with table N (median)",
                      " / ".join(f"{v:.2f} s" for v in split), "", ""])
        cpu = [_median_of(ours, lambda d, k=k: d["cpu"][f"{k}_user"] + d["cpu"][f"{k}_sys"])
               for k in ("self", "children")]
        other.append(["restore: CPU s of the restore process / storage daemon (median)",
                      f"{cpu[0]:.2f} / {cpu[1]:.2f}", "", ""])
        other.append(["restore: peak memory of the restore process (max)",
                      f"{max(d['maxrss_mib'] for d in ours.extra):.0f} MiB", "", ""])
    sp = r.get("sparse")
    if sp:
        other += [
            [f"pass over a {sp['size'] / GiB / 1024:.0f} TiB sparse raw disk, "
             f"{sp['data'] / GiB:.0f} GiB in {sp['extents']} extents (median)",
             f"{sp['ours'].median:.2f} s ({sp['ours'].spread()})", "seconds, not minutes",
             verdict(sp["ours"].median, 60.0)],
            ["  for reference: qemu-img convert of it to null-co (median)",
             f"{sp['ref'].median:.2f} s", "", ""],
            ["  peak memory of that pass / of which check table",
             f"{sp['maxrss_mib']:.0f} MiB / {sp['table_mib']:.0f} MiB",
             f"≤ {TARGETS['memory_mib']:.0f} MiB + tables",
             verdict(sp["maxrss_mib"] - sp["table_mib"] - sp["table_mib"] / 16,
                     TARGETS["memory_mib"])],
        ]
    other_header = ["figure", "value", "target", "met"]

    tables = [text_table, markdown_table]
    parts: List[List[str]] = [[], []]
    for out, table in zip(parts, tables):
        if rows:
            out.append(table(header, rows))
        if other:
            out.append(table(other_header, other))
    if backup_lines:
        columns = [phase_rows(series) for _, series in backup_lines]
        phase_table = [[name] + [col[i][1] for col in columns]
                       for i, (name, _) in enumerate(columns[0])]
        for label, key in (("CPU s: backup process (user+sys)", "self"),
                           ("CPU s: storage daemon, qemu-img (user+sys)", "children")):
            phase_table.append([label] + [
                f"{_median_of(series, lambda d: d['cpu'][f'{key}_user'] + d['cpu'][f'{key}_sys']):.2f}"
                for _, series in backup_lines])
        phase_header = ["phase of a backup (median s)"] + [
            {"full": "full", "incremental": "backup N", "bitmap": "backup N, bitmap"}[key]
            for key, _ in backup_lines]
        for out, table in zip(parts, tables):
            out.append(table(phase_header, phase_table))

    m = r["machine"]
    setup = (f"{r['size'] / GiB:.0f} GiB qcow2 disk, {data / GiB:.2f} GiB random data in "
             f"{r['extents']} extents, median of {r['reps']} runs, page cache "
             f"{'dropped before every run (cold)' if r['cold'] else 'kept (warm)'}; "
             f"pool and images on {r['filesystem']}")
    text = "\n\n".join([setup] + parts[0])
    md = "\n\n".join([
        f"Measured {r['date']} by `benchmarks/run` ({r['wall']:.0f} s in all) on: "
        + ", ".join(f"{k} {v}" for k, v in m.items()) + ".",
        setup + ".",
    ] + parts[1])
    return text, md


# -- main --------------------------------------------------------------------------

def remove_domain_robustly(uri: str, dom: Any) -> None:
    """Remove the bench domain even when libvirtd restarted under us (new connection)."""
    import libvirt
    import tenacity

    from domains import remove_domain

    def attempt() -> None:
        conn = libvirt.open(uri)
        try:
            problems = remove_domain(conn, dom.name, dom.uuid, dom.workdir)
        finally:
            conn.close()
        if problems:
            raise RuntimeError("; ".join(problems))

    tenacity.Retrying(stop=tenacity.stop_after_delay(60), reraise=True,
                      wait=tenacity.wait_exponential(multiplier=0.2, max=5),
                      retry=tenacity.retry_if_exception_type((libvirt.libvirtError,
                                                              RuntimeError)))(attempt)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="runs per measurement (>= 3)")
    parser.add_argument("--size-gib", type=float, default=4.0)
    parser.add_argument("--data-gib", type=float, default=2.0)
    parser.add_argument("--change", type=float, default=0.01,
                        help="fraction of blocks changed before each backup N")
    parser.add_argument("--dir", default="/var/lib/vmsnapbackup-bench",
                        help="pool and scratch files (removed at the end)")
    parser.add_argument("--warm", action="store_true",
                        help="keep the page cache between runs instead of dropping it")
    parser.add_argument("--only", default=",".join(LINES),
                        help=f"comma-separated lines to measure (of {','.join(LINES)}); the "
                             "points a line needs are still made, unmeasured.  A run of "
                             "some lines only is never written into the docs")
    parser.add_argument("--no-sparse", action="store_true", help="skip the 1 TiB sparse pass")
    parser.add_argument("--no-doc", action="store_true",
                        help=f"do not write the results into {DOC.relative_to(ROOT)}")
    parser.add_argument("--seed", type=int, default=20240601)
    parser.add_argument("--uri", default="qemu:///system")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("benchmarks/run needs root (libvirt domains, drop_caches)", file=sys.stderr)
        return 2
    if args.reps < 3 and not args.no_doc:
        print("fewer than 3 runs: use --no-doc (the documented figures are medians of >= 3)",
              file=sys.stderr)
        return 2
    lines = [n for n in args.only.split(",") if n]
    unknown = sorted(set(lines) - set(LINES))
    if unknown or not lines:
        print(f"--only takes some of {','.join(LINES)}, not {args.only!r}", file=sys.stderr)
        return 2
    if args.no_sparse and "sparse" in lines:
        lines.remove("sparse")
    partial = set(lines) != set(LINES)

    import libvirt

    from domains import DiskSpec, DomainFactory

    started = time.monotonic()
    size = int(args.size_gib * GiB) // BLOCK * BLOCK
    cold = not args.warm
    rng = random.Random(args.seed)
    conn = libvirt.open(args.uri)
    factory = DomainFactory(conn)
    work: Optional[Path] = None
    dom = None
    try:
        work = claim_dir(Path(args.dir))
        pool = work / "pool"
        dom = factory(disks=[DiskSpec("vda", "qcow2", size)], start=False,
                      name_prefix="vsb-bench")
        image = dom.disks["vda"]
        extents = random_extents(size, int(args.data_gib * GiB), args.seed)
        t0 = time.monotonic()
        data = fill_image(image, extents, args.seed)
        log(f"domain {dom.name}: {size / GiB:.1f} GiB qcow2 with {data / GiB:.2f} GiB random "
            f"data in {len(extents)} extents ({time.monotonic() - t0:.1f} s)")
        dom.start()

        results: Dict[str, Any] = {
            "size": size, "data_bytes": data, "extents": len(extents), "reps": args.reps,
            "cold": cold, "filesystem": filesystem_of(work), "machine": machine(),
        }
        wanted = set(lines)
        if "full" in wanted:
            results["full"] = measure_full(dom, image, pool, work, args.reps, cold)
        elif wanted & {"incremental", "bitmap", "restore"}:
            log("full backup (not measured) ...")
            child("backup", dom.name, str(pool), "--new-generation")
        last = None
        # the bitmap line first: a backup with --no-dirty-bitmaps deletes our checkpoints
        # (so that other libvirt backup tools can run beside us), and with them the bitmap
        for key in ("bitmap", "incremental"):
            if key in wanted:
                results[key] = measure_incremental(dom, image, size, pool, args.reps, cold,
                                                   rng, args.change, bitmaps=key == "bitmap")
                last = results[key][0].extra[-1]["result"]["point"]
        if last is None and "restore" in wanted:
            log("backup N (not measured) ...")
            change_blocks(dom, size, args.change, rng)
            last = child("backup", dom.name, str(pool))["result"]["point"]
        if "restore" in wanted:
            volume = point_volume(pool, dom.uuid, last)
            results["restore"] = measure_restore(dom, pool, work, last, volume, args.reps,
                                                 cold)
        remove_domain_robustly(args.uri, dom)  # not needed any more: free memory and disk
        remove_tree(pool)
        if "sparse" in wanted:
            log("1 TiB sparse pass ...")
            results["sparse"] = sparse_scan.measure(work, size=1024 * GiB, data=GiB,
                                                    reps=args.reps, cold=cold)
        results["wall"] = time.monotonic() - started
        results["date"] = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        text, md = report(results)
        print()
        print(text)
        if args.no_doc:
            pass
        elif partial:
            print(f"\nsome lines only (--only, --no-sparse): not written into {DOC}")
        else:
            replace_block(DOC, "<!-- results tree: begin -->", "<!-- results tree: end -->", md)
            print(f"\nwritten into {DOC}")
        return 0
    finally:
        factory.domains.clear()  # removed below, with a fresh connection if need be
        if dom is not None:
            remove_domain_robustly(args.uri, dom)
        remove_tree(work)
        try:
            conn.close()
        except libvirt.libvirtError:
            pass


if __name__ == "__main__":
    sys.exit(main())
