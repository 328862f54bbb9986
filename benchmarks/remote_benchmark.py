"""Remote full backup (qemu+ssh, through ssh forwarding and through NBD over TLS) against
the local full backup of the same disk, in one run (issue 13; docs/benchmarks.md).

127.0.0.1 stands in for the hypervisor behind a private sshd (integration/sshd.py), so
the network is loopback: what is measured is the cost of the remote data path itself
(ssh's encryption and single stream, or TLS), not a link's bandwidth.  Each backup is a
fresh CLI process (``python -m vmsnapbackup``) into a pool of its own, with the page
cache dropped before it; the goal is a remote full backup within 1.5x of the local one.

    sudo .venv/bin/python benchmarks/remote_benchmark.py [--size-gib 2 --data-gib 1] [--no-doc]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "integration"))

from backup_benchmark import fill_image, remove_domain_robustly  # noqa: E402
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

from vmsnapbackup.core.defaults import DEFAULT_URI  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
BEGIN = "<!-- remote-benchmark:begin -->"
END = "<!-- remote-benchmark:end -->"
GOAL = 1.5


def log(message: str) -> None:
    print(f"[remote-bench] {message}", file=sys.stderr, flush=True)


def backup_seconds(pool: Path, name: str, extra: List[str]) -> Dict[str, Any]:
    drop_caches()
    start = time.monotonic()
    proc = run([sys.executable, "-m", "vmsnapbackup", *extra[:2], "--pool", str(pool),
                "backup", name, "--new-generation", *extra[2:], "--json"])
    seconds = time.monotonic() - start
    doc = json.loads(proc.stdout)
    return {"seconds": seconds, "bytes": sum(d["bytes_written"] for d in doc["disks"])}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gib", type=float, default=2.0)
    p.add_argument("--data-gib", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--no-doc", action="store_true", help="print only")
    args = p.parse_args(argv)

    import libvirt
    from domains import DiskSpec, DomainFactory
    from sshd import running_sshd
    from test_mount_tls import make_certs

    size = int(args.size_gib * GiB) // 65536 * 65536
    conn = libvirt.open(DEFAULT_URI)
    factory = DomainFactory(conn)
    work = Path(tempfile.mkdtemp(prefix="vsb-remote-bench-"))
    dom = None
    try:
        dom = factory(disks=[DiskSpec("vda", "qcow2", size)], start=False,
                      name_prefix="vsb-rbench")
        data = fill_image(dom.disks["vda"], random_extents(size, int(args.data_gib * GiB),
                                                           args.seed), args.seed)
        dom.start()
        log(f"domain {dom.name}: {size / GiB:.1f} GiB qcow2, {data / GiB:.2f} GiB data")
        tls = work / "pki"
        make_certs(tls)
        results: Dict[str, Dict[str, Any]] = {}
        with running_sshd(work / "sshd") as sshd:
            modes = {"local": [], "ssh forwarding": ["-c", sshd.uri()],
                     "NBD over TLS": ["-c", sshd.uri(), "--tls-dir", str(tls)]}
            for label, extra in modes.items():
                results[label] = backup_seconds(work / label.replace(" ", "-"), dom.name,
                                                extra)
                log(f"{label}: {results[label]['seconds']:.2f} s")
        local = results["local"]["seconds"]
        rows = [[label, f"{r['seconds']:.2f} s",
                 f"{r['bytes'] / (1 << 20) / r['seconds']:.0f} MiB/s",
                 f"{r['seconds'] / local:.2f}x",
                 "—" if label == "local" else
                 ("within goal" if r["seconds"] / local <= GOAL else "MISSES goal")]
                for label, r in results.items()]
        m = machine()
        body = (f"Full backup of one {size / GiB:.0f} GiB qcow2 disk holding "
                f"{data / GiB:.2f} GiB of random data (running idle domain), one run each, "
                f"page cache dropped before each, hypervisor = 127.0.0.1 behind a private "
                f"sshd (loopback: the cost of the data path, not of a link); goal: remote "
                f"within {GOAL}x of local. Machine: {m.get('cpu', '?')}, "
                f"{m.get('cpus', '?')} CPUs. `benchmarks/remote_benchmark.py`, "
                f"{time.strftime('%Y-%m-%d')}.\n\n"
                + markdown_table(["data path", "time", "throughput", "vs local", "goal"],
                                 rows))
        print(body)
        if not args.no_doc:
            replace_block(DOC, BEGIN, END, "## Remote hypervisors (issue 13)\n\n" + body)
        return 0
    finally:
        if dom is not None:
            remove_domain_robustly(DEFAULT_URI, dom)
        conn.close()
        remove_tree(work)


if __name__ == "__main__":
    sys.exit(main())
