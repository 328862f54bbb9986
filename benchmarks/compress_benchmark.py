"""Compressed pools next to ``qemu-img convert -c``, one run (issue 14).

Builds a throwaway running domain (integration/domains.py) whose qcow2 disk holds
a realistic mix in scattered extents: half text-like data (log lines of words,
numbers and times, which zstd shrinks a few times) and half random data (which it
cannot shrink), the rest holes.  Then, with the page cache dropped before each:

* a full backup into a plain pool (``vmsnapbackup backup``, as users run it);
* a full backup into a compressed pool (``--compress zstd``);
* ``qemu-img convert -c -O qcow2 -o compression_type=zstd`` of the same image;
* ``qemu-img convert -O qcow2`` of the same image.

Each line gives the time and the stored size (the volume file's allocated bytes).
Encrypted pools are not built yet, so there is no LUKS line.  One run, figures
never asserted; the results are printed as a Markdown table for
docs/benchmarks.md.  Run as root: ``.venv/bin/python benchmarks/compress_benchmark.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "integration"))

from backup_benchmark import claim_dir, remove_domain_robustly  # noqa: E402
from benchlib import (  # noqa: E402
    ROOT,
    GiB,
    drop_caches,
    machine,
    markdown_table,
    random_extents,
    remove_tree,
    run,
)

MiB = 1024 * 1024
CLI = ROOT / ".venv" / "bin" / "vmsnapbackup"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def text_like(rng: random.Random, size: int) -> bytes:
    """Log-like lines: a vocabulary of words, numbers and times -- what zstd meets on a
    real disk's text (logs, configuration, source), not a repeated pattern."""
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 10)))
             for _ in range(3000)]
    lines: List[str] = []
    total = 0
    while total < size:
        line = (f"2026-12-03T{rng.randrange(24):02d}:{rng.randrange(60):02d}:"
                f"{rng.randrange(60):02d}.{rng.randrange(1000):03d} "
                f"{rng.choice(('INFO', 'WARN', 'DEBUG', 'ERROR'))} "
                f"{' '.join(rng.choice(words) for _ in range(rng.randint(4, 14)))} "
                f"id={rng.randrange(10**9)}\n")
        lines.append(line)
        total += len(line)
    return "".join(lines).encode()[:size]


def fill_mixed(image: Path, extents: Sequence[Tuple[int, int]], seed: int) -> Tuple[int, int]:
    """Every other extent text-like, the others random; (text bytes, random bytes)."""
    from vmsnapbackup.adapters.nbdclient import NbdClient
    from vmsnapbackup.adapters.storagedaemon import StorageDaemon

    rng = random.Random(seed)
    text = text_like(rng, 16 * MiB)
    counts = [0, 0]

    def pieces():  # type: ignore[no-untyped-def]
        for i, (offset, length) in enumerate(extents):
            for pos in range(offset, offset + length, 4 * MiB):
                n = min(4 * MiB, offset + length - pos)
                if i % 2 == 0:
                    start = rng.randrange(len(text) - n)
                    counts[0] += n
                    yield pos, text[start:start + n]
                else:
                    counts[1] += n
                    yield pos, os.urandom(n)

    with StorageDaemon(tag="bench-fill") as daemon:
        export = daemon.open_writable(str(image), "qcow2", name="fill")
        assert export.socket_path is not None
        with NbdClient.open_unix(export.socket_path, export.name) as client:
            client.write_many(pieces())
            client.flush()
        daemon.remove_export(export)
    return counts[0], counts[1]


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def timed_backup(name: str, pool: Path, *flags: str) -> Tuple[float, int]:
    drop_caches()
    t0 = time.monotonic()
    out = run([str(CLI), "--pool", str(pool), "backup", name, "--json", *flags])
    seconds = time.monotonic() - t0
    doc = json.loads(out.stdout)
    stored = sum(allocated(p) for p in pool.rglob("base.qcow2"))
    assert doc["point"] == 1, doc
    return seconds, stored


def timed_convert(image: Path, out: Path, *options: str) -> Tuple[float, int]:
    drop_caches()
    t0 = time.monotonic()
    run(["qemu-img", "convert", "-U", "-t", "writeback", "-f", "qcow2", "-O", "qcow2",
         *options, str(image), str(out)])
    seconds = time.monotonic() - t0
    size = allocated(out)
    out.unlink()
    return seconds, size


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--data-gib", type=float, default=1.0)
    parser.add_argument("--dir", default="/var/lib/vmsnapbackup-bench-compress")
    parser.add_argument("--seed", type=int, default=20261203)
    parser.add_argument("--uri", default="qemu:///system")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (libvirt domains, drop_caches)", file=sys.stderr)
        return 2
    import libvirt
    from domains import DiskSpec, DomainFactory

    size = int(args.size_gib * GiB) // MiB * MiB
    conn = libvirt.open(args.uri)
    factory = DomainFactory(conn)
    work: Optional[Path] = None
    dom: Any = None
    try:
        work = claim_dir(Path(args.dir))
        dom = factory(disks=[DiskSpec("vda", "qcow2", size)], start=False,
                      name_prefix="vsb-bench")
        image = dom.disks["vda"]
        extents = random_extents(size, int(args.data_gib * GiB), args.seed)
        text, rand = fill_mixed(image, extents, args.seed)
        log(f"{size / GiB:.1f} GiB disk: {text / MiB:.0f} MiB text-like, "
            f"{rand / MiB:.0f} MiB random, in {len(extents)} extents")
        dom.start()
        rows = []
        plain_s, plain_b = timed_backup(dom.name, work / "plain")
        log(f"backup plain {plain_s:.2f} s {plain_b / MiB:.0f} MiB")
        zstd_s, zstd_b = timed_backup(dom.name, work / "zstd", "--compress", "zstd")
        log(f"backup zstd {zstd_s:.2f} s {zstd_b / MiB:.0f} MiB")
        conv_c = timed_convert(image, work / "c.qcow2", "-c", "-o", "compression_type=zstd")
        log(f"convert -c {conv_c[0]:.2f} s {conv_c[1] / MiB:.0f} MiB")
        conv = timed_convert(image, work / "p.qcow2")
        log(f"convert {conv[0]:.2f} s {conv[1] / MiB:.0f} MiB")

        def row(what: str, s: float, b: int) -> List[str]:
            return [what, f"{s:.2f}", f"{s / plain_s:.2f}", f"{b / MiB:.0f}",
                    f"{b / plain_b:.2f}"]

        rows = [row("backup, plain pool", plain_s, plain_b),
                row("backup, `--compress zstd`", zstd_s, zstd_b),
                row("`qemu-img convert -c -o compression_type=zstd`", *conv_c),
                row("`qemu-img convert -O qcow2`", *conv),
                ["backup, `--encrypt` (LUKS)", "not built", "", "", ""]]
        print()
        print(f"{size / GiB:.0f} GiB disk, {text / MiB:.0f} MiB text-like + "
              f"{rand / MiB:.0f} MiB random data, {len(extents)} extents; one run, page "
              f"cache dropped before each; {machine().get('cpu', '')}")
        print(markdown_table(["", "seconds", "time / plain backup", "stored MiB",
                              "size / plain backup"], rows))
        return 0
    finally:
        factory.domains.clear()
        if dom is not None:
            remove_domain_robustly(args.uri, dom)
        remove_tree(work)
        conn.close()


if __name__ == "__main__":
    sys.exit(main())
