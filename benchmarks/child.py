"""One measured operation in a process of its own, for benchmarks/backup_benchmark.py.

Why a child process: its peak resident memory (``ru_maxrss``) is then the
operation's alone, not the benchmark's, and no state (page cache of Python
objects, libvirt connections, imported modules) carries over from one
measurement to the next.

Usage (prints one JSON document on stdout)::

    child.py [--proposed LIST] backup  DOMAIN POOL [--new-generation]
    child.py [--proposed LIST] restore DOMAIN POOL POINT OUTDIR
    child.py [--proposed LIST] scan    IMAGE FORMAT [--block-size N]

``--proposed`` applies, to this process only, storage daemon settings that
docs/benchmarks.md proposes for vmsnapbackup/adapters/storagedaemon.py, so
their effect is measured on the real workflow before they land (a
comma-separated subset of :data:`PROPOSALS`).

Each document holds ``seconds`` (the operation itself, measured here, without
interpreter start-up and imports), ``maxrss_mib`` (peak resident set of this
process), ``phases`` (backup: seconds between the library's own log events,
i.e. where the time went) and the operation's result.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
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


#: Storage daemon settings measured before they land (see docs/benchmarks.md):
#: ``malloc``: QEMU allocates a bounce buffer per NBD request, and glibc serves
#: every one of >= 128 KiB with a fresh mmap (page faults and zeroing, twice per
#: MiB moved); ``direct``: read-only images are read with O_DIRECT and native AIO
#: (no page-cache copy, many requests in flight, no eviction of the host's cache);
#: ``noflush``: a volume being filled ignores flushes (its qcow2 metadata updates
#: flush the file on every cluster allocation); it is made durable by the fsync
#: of the rename that seals it; ``rawcheck``: a restore to a raw file checks it
#: by reading the file itself (diskpass.RawImageSource) instead of an export.
PROPOSALS = ("malloc", "direct", "noflush", "rawcheck")
DAEMON_MALLOC = "glibc.malloc.mmap_threshold=4194304:glibc.malloc.trim_threshold=67108864"


def apply_proposals(names: List[str]) -> None:
    """Wrap the storage daemon's QMP calls of this process to add the proposed options."""
    unknown = set(names) - set(PROPOSALS)
    if unknown:
        raise SystemExit(f"unknown proposal(s): {', '.join(sorted(unknown))}")
    if "malloc" in names:
        current = os.environ.get("GLIBC_TUNABLES")
        os.environ["GLIBC_TUNABLES"] = f"{current}:{DAEMON_MALLOC}" if current else DAEMON_MALLOC
    if "rawcheck" in names:
        _raw_restore_check()
    if not {"direct", "noflush"} & set(names):
        return
    from vmsnapbackup.adapters import storagedaemon as sd
    from vmsnapbackup.errors import ExportError

    original = sd.StorageDaemon._cmd
    writable_files: set = set()

    def _cmd(self: Any, command: str, **arguments: Any) -> Any:
        if command != "blockdev-add":
            return original(self, command, **arguments)
        read_only = arguments.get("read-only", False)
        extra: Dict[str, Any] = {}
        if "cache" in arguments:  # the tree does it itself now
            return original(self, command, **arguments)
        if arguments.get("driver") in ("file", "host_device"):
            if read_only and "direct" in names:
                extra = {"cache": {"direct": True}, "aio": "native"}
            elif not read_only and "noflush" in names:
                extra = {"cache": {"no-flush": True}}
                writable_files.add(arguments.get("node-name"))
        elif not read_only and "noflush" in names and arguments.get("file") in writable_files:
            extra = {"cache": {"no-flush": True}}
        if not extra:
            return original(self, command, **arguments)
        try:
            return original(self, command, **arguments, **extra)
        except ExportError:
            if "aio" not in extra:
                raise
            return original(self, command, **arguments)  # no O_DIRECT on this filesystem

    sd.StorageDaemon._cmd = _cmd  # type: ignore[method-assign]


def _raw_restore_check() -> None:
    from vmsnapbackup.workflows import pointread
    from vmsnapbackup.workflows import restore as restore_module
    from vmsnapbackup.workflows.diskpass import RawImageSource, run_disk_pass

    original = restore_module.hash_image

    def hash_image(daemon: Any, path: Any, fmt: str, expected: Any, **kw: Any) -> Any:
        if fmt != "raw":
            return original(daemon, path, fmt, expected, **kw)
        with RawImageSource.open(path) as source:
            bad = pointread._size_mismatch(expected, source.size)
            if bad is not None:
                return bad
            table, _ = run_disk_pass(source, None, expected.block_size, None,
                                     disk=kw.get("disk", ""),
                                     progress=pointread.with_phase(kw.get("progress"),
                                                                   kw.get("phase", "check")))
        return pointread.compare_tables(expected, table)

    restore_module.hash_image = hash_image  # type: ignore[assignment]


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
    result = backup(args.domain, args.pool, new_generation=args.new_generation)
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
    parser.add_argument("--proposed", default="",
                        help=f"comma-separated subset of {','.join(PROPOSALS)}")
    sub = parser.add_subparsers(dest="op", required=True)
    b = sub.add_parser("backup")
    b.add_argument("domain")
    b.add_argument("pool")
    b.add_argument("--new-generation", action="store_true")
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
    apply_proposals([n for n in args.proposed.split(",") if n])
    doc = {"backup": _backup, "restore": _restore, "scan": _scan}[args.op](args)
    json.dump(doc, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
