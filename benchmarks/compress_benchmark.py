"""Compressed and encrypted pools next to ``qemu-img convert -c``, one command (issue 14).

Builds a throwaway running domain (integration/domains.py) whose qcow2 disk holds
a realistic mix in scattered extents: half text-like data (log lines of words,
numbers and times, which zstd shrinks about 2x) and half random data (which it
cannot shrink), the rest holes.  Then, with the page cache dropped before each:

* a full backup into a plain pool (``vmsnapbackup backup``, as users run it);
* a full backup into a compressed pool (``--compress zstd``), with the default
  64 KiB blocks and with ``--block-size 256K`` (larger compressed clusters);
* a full backup into an encrypted pool (``--encrypt --key-file``, LUKS);
* ``qemu-img convert -c -O qcow2 -o compression_type=zstd`` of the same image;
* ``qemu-img convert -O qcow2`` of the same image.

Each line gives the backup's total time, its disk pass ("read", the data path
alone), and the stored size (the volume file's allocated bytes).  ``--reps 2``
(the default) runs every line twice, the second time in reverse order (A B B A),
each into a fresh pool, and reports the mean with the spread.  Figures are never
asserted.  Also measured: what one open of a LUKS volume costs (``qemu-io`` reading a
sector with the key: QEMU runs the key slot's PBKDF, sized by the volume's iter-time).

Run as root, on a quiet machine, under the integration lock on a shared one::

    flock /tmp/vsb-integration.lock .venv/bin/python benchmarks/compress_benchmark.py --write-doc

``--write-doc`` replaces the marked block in docs/benchmarks.md with the table.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

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
    replace_block,
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


#: the lines of the table: key, label, backup flags (None: a qemu-img convert line)
BACKUPS: List[Tuple[str, str, List[str]]] = [
    ("plain", "backup, plain pool", []),
    ("zstd", "backup, `--compress zstd`", ["--compress", "zstd"]),
    ("zstd256", "backup, `--compress zstd --block-size 256K`",
     ["--compress", "zstd", "--block-size", str(256 * 1024)]),
    ("luks", "backup, `--encrypt --key-file` (LUKS)", ["--encrypt", "--key-file", "KEY"]),
]
CONVERTS: List[Tuple[str, str, List[str]]] = [
    ("convert-c", "`qemu-img convert -c -o compression_type=zstd`",
     ["-c", "-o", "compression_type=zstd"]),
    ("convert", "`qemu-img convert -O qcow2`", []),
]
DOC = HERE.parent / "docs" / "benchmarks.md"
BEGIN, END = "<!-- compress-benchmark:begin -->", "<!-- compress-benchmark:end -->"


def timed_backup(name: str, pool: Path, flags: Sequence[str]) -> Tuple[float, float, int]:
    """(total seconds, disk pass seconds, stored bytes) of one full backup into a new pool."""
    drop_caches()
    t0 = time.monotonic()
    out = run([str(CLI), "--pool", str(pool), "backup", name, "--json", *flags])
    seconds = time.monotonic() - t0
    doc = json.loads(out.stdout)
    assert doc["point"] == 1, doc
    passes = sum(float(d["seconds"]["read"]) for d in doc["disks"])
    stored = sum(allocated(p) for p in pool.rglob("base.qcow2"))
    return seconds, passes, stored


def timed_convert(image: Path, out: Path, options: Sequence[str]) -> Tuple[float, float, int]:
    drop_caches()
    t0 = time.monotonic()
    run(["qemu-img", "convert", "-U", "-t", "writeback", "-f", "qcow2", "-O", "qcow2",
         *options, str(image), str(out)])
    seconds = time.monotonic() - t0
    size = allocated(out)
    out.unlink()
    return seconds, seconds, size


def luks_open_seconds(pool: Path, key: Path) -> float:
    """One open of the pool's LUKS base volume with the key, reading a sector (``qemu-io``:
    ``qemu-img info`` opens without I/O and so skips the key slot's PBKDF)."""
    volume = next(pool.rglob("base.qcow2"))
    t0 = time.monotonic()
    run(["qemu-io", "-r", "--object", f"secret,id=k,format=raw,file={key}", "--image-opts",
         f"driver=qcow2,file.driver=file,file.filename={volume},encrypt.key-secret=k",
         "-c", "read 0 512"])
    return time.monotonic() - t0


def spread(values: Sequence[float]) -> str:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return f"{mean:.2f}"
    return f"{mean:.2f} ±{(max(values) - min(values)) / 2:.2f}"


def measure(dom_name: str, image: Path, work: Path, key: Path, reps: int,
            ) -> Tuple[Dict[str, List[Tuple[float, float, int]]], List[float]]:
    """Every line ``reps`` times, odd repetitions in reverse order (A B B A)."""
    results: Dict[str, List[Tuple[float, float, int]]] = {}
    opens: List[float] = []
    order = [k for k, _, _ in BACKUPS] + [k for k, _, _ in CONVERTS]
    flags = {k: [str(key) if f == "KEY" else f for f in fl] for k, _, fl in BACKUPS}
    options = {k: o for k, _, o in CONVERTS}
    for rep in range(reps):
        for k in (order if rep % 2 == 0 else order[::-1]):
            if k in flags:
                pool = work / f"{k}-{rep}"
                got = timed_backup(dom_name, pool, flags[k])
                if k == "luks":
                    opens.append(luks_open_seconds(pool, key))
                remove_tree(pool)
            else:
                got = timed_convert(image, work / f"{k}.qcow2", options[k])
            results.setdefault(k, []).append(got)
            log(f"rep {rep} {k}: {got[0]:.2f} s (pass {got[1]:.2f} s), {got[2] / MiB:.0f} MiB")
    return results, opens


def table(results: Dict[str, List[Tuple[float, float, int]]]) -> str:
    plain = results["plain"]
    plain_s = sum(r[0] for r in plain) / len(plain)
    plain_p = sum(r[1] for r in plain) / len(plain)
    plain_b = plain[0][2]
    rows = []
    for k, label, _ in BACKUPS + CONVERTS:
        rs = results[k]
        total = [r[0] for r in rs]
        passes = [r[1] for r in rs]
        size = rs[0][2]
        is_backup = k in {b[0] for b in BACKUPS}
        rows.append([label, spread(total), f"{sum(total) / len(total) / plain_s:.2f}",
                     spread(passes) if is_backup else "",
                     f"{sum(passes) / len(passes) / plain_p:.2f}" if is_backup else "",
                     f"{size / MiB:.0f}", f"{size / plain_b:.2f}"])
    return markdown_table(["", "seconds", "time / plain backup", "disk pass s",
                           "pass / plain pass", "stored MiB", "size / plain"], rows)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--data-gib", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=2,
                        help="repetitions of every line, alternating the order (default 2)")
    parser.add_argument("--dir", default="/var/lib/vmsnapbackup-bench-compress")
    parser.add_argument("--seed", type=int, default=20261203)
    parser.add_argument("--uri", default="qemu:///system")
    parser.add_argument("--write-doc", action="store_true",
                        help=f"replace the marked block of {DOC.name} with the result")
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
        key = work / "pool.key"
        key.write_text(os.urandom(32).hex() + "\n")
        key.chmod(0o600)
        dom = factory(disks=[DiskSpec("vda", "qcow2", size)], start=False,
                      name_prefix="vsb-bench")
        image = dom.disks["vda"]
        extents = random_extents(size, int(args.data_gib * GiB), args.seed)
        text, rand = fill_mixed(image, extents, args.seed)
        log(f"{size / GiB:.1f} GiB disk: {text / MiB:.0f} MiB text-like, "
            f"{rand / MiB:.0f} MiB random, in {len(extents)} extents")
        dom.start()
        results, opens = measure(dom.name, image, work, key, max(1, args.reps))
        info = machine()
        body = "\n".join([
            f"{size / GiB:.0f} GiB disk, {text / MiB:.0f} MiB text-like + {rand / MiB:.0f} MiB "
            f"random data in {len(extents)} extents; {max(1, args.reps)} run(s) per line "
            f"(alternating order, mean ±half the spread), page cache dropped before each; "
            f"{info.get('cpu', '')}, {info.get('cpus', '')} CPUs, {info.get('qemu', '')}; "
            f"`benchmarks/compress_benchmark.py`, {time.strftime('%Y-%m-%d')}.",
            "",
            table(results),
            "",
            f"One open of a LUKS volume with its key (`qemu-io -r -c 'read 0 512'`): "
            f"{spread(opens)} s.",
        ])
        print()
        print(body)
        if args.write_doc:
            replace_block(DOC, BEGIN, END, body)
            log(f"wrote {DOC}")
        return 0
    finally:
        factory.domains.clear()
        if dom is not None:
            remove_domain_robustly(args.uri, dom)
        remove_tree(work)
        conn.close()


if __name__ == "__main__":
    sys.exit(main())
