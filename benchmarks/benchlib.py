"""Small helpers shared by the benchmarks: timing, caches, images, the machine, tables."""
from __future__ import annotations

import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

MiB = 1 << 20
GiB = 1 << 30
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def run(argv: Sequence[str], **kw: Any) -> "subprocess.CompletedProcess[str]":
    """Run a command; fail with its stderr (a benchmark step that fails is no result)."""
    proc = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): "
                           f"{proc.stderr.strip()[-2000:]}")
    return proc


def timed(argv: Sequence[str]) -> float:
    start = time.monotonic()
    run(argv)
    return time.monotonic() - start


def child(*args: str) -> Dict[str, Any]:
    """Run benchmarks/child.py in a fresh interpreter; its JSON document."""
    proc = run([sys.executable, str(HERE / "child.py"), *args])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def drop_caches() -> None:
    """Write back dirty pages, then empty the page cache: the next read comes from the disk."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


@dataclass
class Series:
    """Repeated timings of one side of one comparison."""

    label: str
    seconds: List[float] = field(default_factory=list)
    extra: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def median(self) -> float:
        return median(self.seconds)

    def spread(self) -> str:
        return f"{min(self.seconds):.2f}–{max(self.seconds):.2f}"


def random_extents(size: int, data: int, seed: int, align: int = 64 * 1024,
                   sizes: Sequence[int] = tuple(64 * 1024 << k for k in range(7))
                   ) -> List[Tuple[int, int]]:
    """Scattered data extents covering about ``data`` bytes of ``size``, the rest holes."""
    rng = random.Random(seed)
    extents: List[Tuple[int, int]] = []
    pos = 0
    fraction = data / size
    while pos < size:
        length = min(rng.choice(sizes), size - pos)
        if rng.random() < fraction:
            extents.append((pos, length))
        pos += length
    return [(o - o % align, ln) for o, ln in extents]


def write_random(client: Any, extents: Sequence[Tuple[int, int]], seed: int) -> int:
    """Write random bytes into ``extents`` through a writable NbdClient; bytes written."""
    import numpy as np

    rng = np.random.default_rng(seed)
    total = 0

    def pieces():  # type: ignore[no-untyped-def]
        nonlocal total
        for offset, length in extents:
            for pos in range(offset, offset + length, 4 * MiB):
                n = min(4 * MiB, offset + length - pos)
                total += n
                yield pos, rng.bytes(n)

    client.write_many(pieces())
    client.flush()
    return total


def machine() -> Dict[str, str]:
    """What the numbers were measured on."""
    info: Dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info["cpus"] = str(os.cpu_count())
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory"] = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    info["kernel"] = platform.release()
    try:
        info["os"] = [ln.split("=", 1)[1].strip('"') for ln in
                      Path("/etc/os-release").read_text().splitlines()
                      if ln.startswith("PRETTY_NAME=")][0]
    except (OSError, IndexError):
        pass
    info["python"] = platform.python_version()
    for tool, argv in (("qemu", ["qemu-img", "--version"]),
                       ("libvirt", ["virsh", "--version"])):
        try:
            info[tool] = run(argv).stdout.splitlines()[0].strip()
        except (RuntimeError, OSError, IndexError):
            pass
    for key, argv in (("vm", ["systemd-detect-virt", "--vm"]),
                      ("container", ["systemd-detect-virt", "--container"])):
        try:
            found = subprocess.run(argv, capture_output=True, text=True).stdout.strip()
        except OSError:
            continue
        if found and found != "none":
            info[key] = found
    return info


def filesystem_of(path: Path) -> str:
    try:
        out = run(["findmnt", "-no", "FSTYPE,SOURCE", "-T", str(path)]).stdout.split()
        return " on ".join(out)
    except (RuntimeError, OSError):
        return "?"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*r) for r in rows]
    return "\n".join(out)


def replace_block(path: Path, begin: str, end: str, body: str) -> None:
    """Put ``body`` between the marker lines of ``path`` (appended when missing)."""
    text = path.read_text() if path.exists() else ""
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + ("\n\n" if text else "") + block + "\n"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def remove_tree(path: Optional[Path]) -> None:
    if path is not None and path.exists():
        shutil.rmtree(path, ignore_errors=True)
