"""One measured operation in a process of its own, for benchmarks/backup_benchmark.py.

Why a child process: its peak resident memory (``ru_maxrss``) is then the
operation's alone, not the benchmark's, and no state (page cache of Python
objects, libvirt connections, imported modules) carries over from one
measurement to the next.

Usage (prints one JSON document on stdout)::

    child.py backup  DOMAIN POOL [--new-generation] [--no-dirty-bitmaps]
    child.py restore DOMAIN POOL POINT OUTDIR
    child.py scan    IMAGE FORMAT [--block-size N]

It calls the library as a user's program would: nothing in it is patched or
tuned for the benchmark, so what is measured is the code users run.

Each document holds ``seconds`` (the operation itself, measured here, without
interpreter start-up and imports), ``maxrss_mib`` (peak resident set of this
process), ``phases`` (backup: seconds between the library's own log events,
i.e. where the time went) and the operation's result.
"""
from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from typing import Any, Dict, List, Optional, Tuple


class _Timeline(logging.Handler):
    """Keeps (time, logger, message) of every log record: the backup's phases."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.events: List[Tuple[float, str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append((time.monotonic(), record.name, record.getMessage()))

    def first(self, needle: str, after: float = 0.0) -> Optional[float]:
        for t, _name, message in self.events:
            if t >= after and needle in message:
                return t
        return None


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cpu() -> Dict[str, float]:
    """CPU seconds so far: this process, and its ended children (storage daemon, qemu-img)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"self_user": me.ru_utime, "self_sys": me.ru_stime,
            "children_user": kids.ru_utime, "children_sys": kids.ru_stime}


def _cpu_used(before: Dict[str, float]) -> Dict[str, float]:
    after = _cpu()
    return {k: round(after[k] - before[k], 3) for k in after}


def _phases(timeline: _Timeline, start: float, end: float) -> Dict[str, Optional[float]]:
    """Seconds of each step of a backup, from the log events the library writes anyway.

    A missing event (wording changed) gives None for the phases around it
    rather than a wrong number.
    """
    marks = [
        ("lock, journal, snapshot", timeline.first("snapshot in", start)
         or timeline.first("reading directly", start)),
        ("storage daemon, exports", timeline.first("exported", start)),
        ("disk pass (read, hash, write)", _last(timeline, " read ", "blocks (")),
        ("commit back", timeline.first("back on its original images", start)),
        ("tables, manifest (seal)", timeline.first("sealed", start)),
    ]
    out: Dict[str, Optional[float]] = {}
    previous: Optional[float] = start
    for name, t in marks:
        out[name] = None if t is None or previous is None else round(t - previous, 3)
        previous = t
    out["after seal"] = None if previous is None else round(end - previous, 3)
    return out


def _last(timeline: _Timeline, *needles: str) -> Optional[float]:
    found = None
    for t, _name, message in timeline.events:
        if all(n in message for n in needles):
            found = t
    return found


def _backup(args: argparse.Namespace) -> Dict[str, Any]:
    from vmsnapbackup.workflows.backup import backup

    timeline = _Timeline()
    root = logging.getLogger("vmsnapbackup")
    root.addHandler(timeline)
    root.setLevel(logging.DEBUG)
    cpu = _cpu()
    start = time.monotonic()
    result = backup(args.domain, args.pool, new_generation=args.new_generation,
                    dirty_bitmaps=args.dirty_bitmaps)
    end = time.monotonic()
    return {"seconds": end - start, "maxrss_mib": _maxrss_mib(), "cpu": _cpu_used(cpu),
            "phases": _phases(timeline, start, end), "result": result.to_dict()}


def _restore(args: argparse.Namespace) -> Dict[str, Any]:
    from vmsnapbackup.workflows.restore import restore

    cpu = _cpu()
    start = time.monotonic()
    result = restore(args.domain, args.pool, point=args.point, to=args.outdir, fmt="raw")
    end = time.monotonic()
    return {"seconds": end - start, "maxrss_mib": _maxrss_mib(), "cpu": _cpu_used(cpu),
            "result": result.to_dict()}


def _scan(args: argparse.Namespace) -> Dict[str, Any]:
    """Hash a whole image through a read-only export: the backup's pass without writes."""
    from vmsnapbackup.adapters.nbdclient import NbdClient
    from vmsnapbackup.adapters.storagedaemon import StorageDaemon
    from vmsnapbackup.workflows.diskpass import run_disk_pass

    rss_before = _maxrss_mib()
    with StorageDaemon(tag="bench-scan") as daemon:
        export = daemon.export_image(args.image, args.format, name="scan")
        with NbdClient.open_unix(export.socket_path, export.name) as client:
            start = time.monotonic()
            table, stats = run_disk_pass(client, None, args.block_size, None)
            end = time.monotonic()
        daemon.remove_export(export)
    return {"seconds": end - start, "maxrss_mib": _maxrss_mib(),
            "maxrss_before_mib": rss_before,
            "table_mib": table.count * 16 / 2**20,
            "blocks": {"total": stats.total, "read": stats.read, "holes": stats.holes},
            "bytes_read": stats.bytes_read}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="op", required=True)
    b = sub.add_parser("backup")
    b.add_argument("domain")
    b.add_argument("pool")
    b.add_argument("--new-generation", action="store_true")
    b.add_argument("--no-dirty-bitmaps", dest="dirty_bitmaps", action="store_false")
    r = sub.add_parser("restore")
    r.add_argument("domain")
    r.add_argument("pool")
    r.add_argument("point", type=int)
    r.add_argument("outdir")
    s = sub.add_parser("scan")
    s.add_argument("image")
    s.add_argument("format")
    s.add_argument("--block-size", type=int, default=65536)
    args = parser.parse_args(argv)
    doc = {"backup": _backup, "restore": _restore, "scan": _scan}[args.op](args)
    json.dump(doc, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
