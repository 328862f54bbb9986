"""How fast the backup's read-and-hash loop is, next to ``qemu-img convert``.

Builds a 1 GiB qcow2 image (about half random data in scattered extents,
half holes) in a temporary directory, exports it read-only with qemu-nbd on
a unix socket, and times:

* ours: block status, then pipelined reads of the data ranges through
  :class:`vmsnapbackup.adapters.nbdclient.NbdClient`, one XXH3-128 per 64 KiB
  block (holes get the precomputed value of a zero block);
* ``qemu-img convert -O raw`` of the same image to a file on the same
  filesystem, and to a ``null-co`` target (reads only, writes discarded).

Two scenarios: a warm page cache (both sides pay only copies), and
O_DIRECT (qemu-nbd ``--cache=none --aio=native``, ``qemu-img -T none``),
which behaves more like a frozen image read from disk and shows what the
pipeline depth buys.  Each is run a few times; the best time of each is
printed with the ratio ours / qemu-img.  The check table is verified against
the converted raw file, so a fast wrong answer cannot pass.

Run: ``.venv/bin/python benchmarks/read_benchmark.py [--size-mib N] [--runs N]``
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import xxhash

from vmsnapbackup.adapters.nbdclient import NbdClient

BLOCK = 64 * 1024
MiB = 1024 * 1024


def build_image(workdir: Path, size: int, seed: int) -> Tuple[Path, int]:
    """A sparse raw file with random extents, converted to qcow2 (holes stay holes)."""
    rng = random.Random(seed)
    raw = workdir / "source.raw"
    data_bytes = 0
    with open(raw, "wb") as out:
        out.truncate(size)
        pos = 0
        sizes = [64 * 1024 * (1 << k) for k in range(7)]  # 64 KiB .. 4 MiB
        while pos < size:
            length = min(rng.choice(sizes), size - pos)
            if rng.random() < 0.5:
                out.seek(pos)
                out.write(os.urandom(length))
                data_bytes += length
            pos += length
    image = workdir / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image)],
                   check=True)
    raw.unlink()
    return image, data_bytes


def start_qemu_nbd(image: Path, sock: Path, direct: bool) -> "subprocess.Popen[bytes]":
    cache = ["--cache=none", "--aio=native"] if direct else []
    proc = subprocess.Popen(["qemu-nbd", "--format=qcow2", "--read-only", "--persistent",
                             "--shared=4", *cache, f"--socket={sock}", str(image)],
                            stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("qemu-nbd did not start")
        time.sleep(0.01)
    return proc


def stop(proc: "subprocess.Popen[bytes]") -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def hash_export(sock: Path, chunk_size: int, depth: int,
                skip_holes: bool = True) -> Tuple[List[bytes], int]:
    """The backup's loop: returns the check table and the bytes actually read."""
    zero_value = xxhash.xxh3_128(bytes(BLOCK)).digest()
    digest = xxhash.xxh3_128_digest
    with NbdClient.open_unix(str(sock), depth=depth) as client:
        size = client.size
        table = [zero_value] * (-(-size // BLOCK))
        ranges = client.data_ranges(BLOCK) if skip_holes else iter([(0, size)])
        read = 0
        for offset, view in client.read_chunks(ranges, chunk_size=chunk_size, depth=depth):
            index = offset // BLOCK
            for start in range(0, len(view), BLOCK):
                table[index] = digest(view[start:start + BLOCK])
                index += 1
            read += len(view)
    return table, read


def table_of_file(path: Path) -> List[bytes]:
    table = []
    with open(path, "rb") as f:
        while True:
            block = f.read(BLOCK)
            if not block:
                return table
            table.append(xxhash.xxh3_128_digest(block))


def best_of(runs: int, job: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        job()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=20240601)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    for tool in ("qemu-img", "qemu-nbd"):
        if shutil.which(tool) is None:
            print(f"{tool} not found", file=sys.stderr)
            return 2
    size = args.size_mib * MiB
    workdir = Path(tempfile.mkdtemp(prefix="vmsnapbackup-bench-", dir=os.environ.get("TMPDIR")))
    proc = None
    try:
        t0 = time.perf_counter()
        image, data_bytes = build_image(workdir, size, args.seed)
        print(f"image: {image} ({size // MiB} MiB virtual, {data_bytes / MiB:.0f} MiB data, "
              f"{image.stat().st_size / MiB:.0f} MiB on disk) built in "
              f"{time.perf_counter() - t0:.1f} s")
        # warm the page cache so that neither side pays for the disk
        subprocess.run(["cat", str(image)], stdout=subprocess.DEVNULL, check=True)

        target = workdir / "converted.raw"

        def converter(null: bool, direct: bool) -> Callable[[], None]:
            cache = ["-T", "none"] if direct else []

            def job() -> None:
                if null:
                    out = ["-n", "--target-image-opts", f"driver=null-co,size={size}"]
                    subprocess.run(["qemu-img", "convert", *cache, "-f", "qcow2", str(image),
                                    *out], check=True)
                    return
                if target.exists():
                    target.unlink()
                subprocess.run(["qemu-img", "convert", *cache, "-f", "qcow2", "-O", "raw",
                                str(image), str(target)], check=True)
            return job

        variants = {
            "page cache": [("1 MiB x4", MiB, 4, True), ("1 MiB x1", MiB, 1, True),
                           ("256 KiB x8", 256 * 1024, 8, True), ("4 MiB x4", 4 * MiB, 4, True),
                           ("1 MiB x4, holes read too", MiB, 4, False)],
            "O_DIRECT": [("1 MiB x4", MiB, 4, True), ("1 MiB x1", MiB, 1, True),
                         ("256 KiB x8", 256 * 1024, 8, True)],
        }
        tables: Dict[str, Tuple[List[bytes], int]] = {}
        summary = []
        for scenario, runs in variants.items():
            direct = scenario == "O_DIRECT"
            sock = workdir / f"nbd-{len(summary)}.sock"
            proc = start_qemu_nbd(image, sock, direct)
            results: Dict[str, Tuple[float, int]] = {}
            try:
                for label, chunk, depth, skip in runs:
                    def job(chunk: int = chunk, depth: int = depth, skip: bool = skip,
                            key: str = f"{scenario}: {label}") -> None:
                        tables[key] = hash_export(sock, chunk, depth, skip)
                    seconds = best_of(args.runs, job)
                    results["ours " + label] = (seconds, tables[f"{scenario}: {label}"][1])
            finally:
                stop(proc)
            proc = None
            file_s = best_of(args.runs, converter(False, direct))
            null_s = best_of(args.runs, converter(True, direct))
            results["qemu-img convert -O raw file"] = (file_s, data_bytes)
            results["qemu-img convert null-co"] = (null_s, data_bytes)
            print(f"-- {scenario} (qemu-nbd{' --cache=none --aio=native' if direct else ''}"
                  f"; qemu-img{' -T none' if direct else ''}), best of {args.runs}")
            for label, (seconds, read) in results.items():
                print(f"  {label:32s} {seconds:7.3f} s {read / MiB / seconds:7.0f} MiB/s  "
                      f"ratio to file {seconds / file_s:5.2f}  to null-co {seconds / null_s:5.2f}")
            ours = results["ours 1 MiB x4"][0]
            summary.append(f"RESULT {scenario}: ours (1 MiB x4) {ours:.3f} s, qemu-img convert "
                           f"-O raw {file_s:.3f} s, ratio {ours / file_s:.2f}; null-co target "
                           f"{null_s:.3f} s, ratio {ours / null_s:.2f}")

        expected = table_of_file(target)
        for label, (table, _) in tables.items():
            if table != expected:
                print(f"MISMATCH: {label} produced a different check table", file=sys.stderr)
                return 1
        print(f"all check tables verified against the converted image ({len(expected)} blocks)")
        for line in summary:
            print(line)
        return 0
    finally:
        if proc is not None:
            stop(proc)
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
