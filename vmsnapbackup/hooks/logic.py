"""What the libvirt qemu hook decides (``qemu.d/vmsnapbackup DOMAIN OP SUBOP EXTRA``).

libvirt runs the hook synchronously, holding the domain's job, with the domain
XML on stdin; a hook that calls back into libvirt deadlocks it (DESIGN §4).
So this module reads only the XML it is given and the host's in-flight records
(FORMAT §11), decides within milliseconds, and hands anything slow (a repair,
a backup) to a detached process that talks to libvirt later, on its own.

Decisions:

* ``prepare``/``start`` (and so a restore from a saved state): refused (exit 1,
  message on stderr, which libvirt puts into its error) while a live offline
  operation reads the domain's images, or any live operation holds one of them.
* ``migrate`` (incoming migration, on the destination host): refused while a
  live operation of ours holds the domain here.
* ``started``/``reconnect``: the domain runs on one of our overlays and no live
  operation explains it: a backup died mid-way.  Start ``repair`` detached.
* ``release``: remove the domain's stale record (its process is gone; never a live
  one), unless the domain still stands on our overlays: the record names the pool
  its repair needs; with ``backup_on_shutdown`` start an offline backup, detached.

Our own bugs never stop a domain: any internal error is logged and the hook
exits 0.  Only the deliberate refusals exit 1.  The hook prints nothing on
stdout: libvirt reads stdout of ``migrate``/``restore`` hooks as a replacement
XML, and empty output means "unchanged".
"""
from __future__ import annotations

import logging
import logging.handlers
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, FrozenSet, List, Optional, Sequence, Tuple, Union

from ..adapters.domainxml import Disk, is_our_overlay, parse_disks
from ..core import inflight
from ..core.inflight import InflightRecord
from ..errors import ExitCode, VmSnapBackupError
from .config import HookConfig, load_config

__all__ = [
    "Spawn",
    "HookCall",
    "DomainInfo",
    "hook_main",
    "parse_domain",
    "start_refusal",
    "migrate_refusal",
    "repair_argv",
    "backup_argv",
    "spawn_detached",
    "setup_hook_logging",
    "SYSLOG_SOCKET",
]

log = logging.getLogger(__name__)

#: Runs an argv detached from the hook; the seam tests replace.
Spawn = Callable[[Sequence[str]], None]

SYSLOG_SOCKET = "/dev/log"

#: ``release`` reasons (libvirt >= 10.5 passes one as EXTRA) after which an offline backup
#: would be wrong: the domain now runs elsewhere, or never ran.
_NO_BACKUP_AFTER = frozenset({"migrated", "failed"})

#: Ops whose domain may be running on an overlay a dead backup left behind.
_RUNNING_OPS = frozenset({"started", "reconnect"})


@dataclass(frozen=True)
class HookCall:
    """libvirt's four arguments."""

    domain: str
    op: str
    subop: str = "-"
    extra: str = "-"

    @classmethod
    def from_argv(cls, argv: Sequence[str]) -> "HookCall":
        args = list(argv) + ["-"] * (4 - len(argv))
        return cls(*args[:4])


@dataclass(frozen=True)
class DomainInfo:
    """What the hook knows about the domain: only what its XML says."""

    name: str
    uuid: Optional[str]
    disks: Tuple[Disk, ...]

    @property
    def images(self) -> FrozenSet[str]:
        """Every local image of every disk (top and known backing chain), in both their
        written and resolved form, so a symlinked path still matches a record."""
        paths = set()
        for disk in self.disks:
            if disk.type not in ("file", "block") or not disk.source:
                continue
            for image in (disk.top, *disk.backing_chain):
                if image.path:
                    paths.update(_path_forms(image.path))
        return frozenset(paths)

    @property
    def overlay_disks(self) -> List[Disk]:
        """Disks whose guest-writable image is one of our overlays."""
        return [d for d in self.disks if d.type == "file" and is_our_overlay(d.source)]


def _path_forms(path: str) -> Tuple[str, ...]:
    norm = os.path.normpath(path)
    try:
        real = os.path.realpath(norm)
    except OSError:
        return (norm,)
    return (norm, real) if real != norm else (norm,)


def parse_domain(xml: str, fallback_name: str) -> DomainInfo:
    """The domain's name, uuid and disks from the XML on stdin (pure)."""
    root = ET.fromstring(xml)
    name = (root.findtext("name") or "").strip() or fallback_name
    uuid = (root.findtext("uuid") or "").strip().lower() or None
    return DomainInfo(name=name, uuid=uuid, disks=tuple(parse_disks(xml)))


def _is_domain(record: InflightRecord, info: DomainInfo) -> bool:
    if info.uuid is not None:
        return record.uuid.lower() == info.uuid
    return record.name == info.name


def _shared_images(record: InflightRecord, info: DomainInfo) -> List[str]:
    mine = info.images
    return sorted(p for p in record.images if mine.intersection(_path_forms(p)))


def _describe(record: InflightRecord) -> str:
    kind = "offline " if record.offline else ""
    return f"{kind}{record.operation} of {record.name} (pid {record.pid}, since {record.since})"


def start_refusal(info: DomainInfo, live: Sequence[InflightRecord]) -> Optional[str]:
    """Why the domain must not start now, or None.

    An offline operation reads the images directly, with no snapshot between it
    and the guest: a guest writing them at the same time would make the copy
    inconsistent (or the operation would write under a running guest).
    """
    for record in live:
        if record.offline and _is_domain(record, info):
            return (f"domain {info.name} cannot start: an {_describe(record)} is reading its disks; "
                    "wait for it to finish (or stop that process)")
    for record in live:
        shared = _shared_images(record, info)
        if shared:
            return (f"domain {info.name} cannot start: its image(s) {', '.join(shared)} are in use "
                    f"by the {_describe(record)}; wait for it to finish (or stop that process)")
    return None


def migrate_refusal(info: DomainInfo, live: Sequence[InflightRecord]) -> Optional[str]:
    """Why the domain must not migrate in, or None: our operation holds it on this host."""
    for record in live:
        if _is_domain(record, info):
            return (f"domain {info.name} cannot migrate: a {_describe(record)} is working on it; "
                    "wait for it to finish")
    return None


def repair_argv(config: HookConfig, pool: str, name: str) -> List[str]:
    return [*config.cli(), "--pool", pool, "repair", name]


def backup_argv(config: HookConfig, pool: str, name: str) -> List[str]:
    return [*config.cli(), "--pool", pool, "backup", name]


def _job_log(config: HookConfig) -> Path:
    if config.job_log:
        return Path(config.job_log)
    return inflight.runtime_root() / "hook-jobs.log"


def spawn_detached(argv: Sequence[str], log_path: Optional[Path] = None) -> None:
    """Start ``argv`` in its own session and return at once.

    Its output goes to ``log_path`` (appended), never to the hook's pipes:
    libvirt waits for EOF on those, so an inherited pipe would block it for as
    long as the job runs.  The hook exits right away, so the job is adopted by
    init and nobody waits for it.
    """
    out: Union[int, IO[bytes]] = subprocess.DEVNULL
    handle = None
    if log_path is not None:
        try:
            log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            handle = os.fdopen(fd, "ab")
            handle.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(argv)}\n".encode())
            handle.flush()
            out = handle
        except OSError as err:
            log.warning("cannot open job log %s (%s); job output is discarded", log_path, err)
    try:
        subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            start_new_session=True, close_fds=True, cwd="/",
        )
    finally:
        if handle is not None:
            handle.close()


def setup_hook_logging(syslog_socket: str = SYSLOG_SOCKET) -> logging.Handler:
    """Send the package's log to syslog (daemon facility), or to stderr without one.

    On stderr only warnings and worse: libvirt puts a failing hook's whole
    stderr into its error message, and shows nothing of a successful one.
    """
    handler: logging.Handler
    try:
        if not os.path.exists(syslog_socket):
            raise OSError(f"{syslog_socket} does not exist")
        handler = logging.handlers.SysLogHandler(
            address=syslog_socket, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        handler.setFormatter(logging.Formatter("vmsnapbackup-hook[%(process)d]: %(message)s"))
        handler.setLevel(logging.INFO)
    except OSError:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("vmsnapbackup hook: %(levelname)s: %(message)s"))
        handler.setLevel(logging.WARNING)
    logger = logging.getLogger("vmsnapbackup")
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    return handler


def _read_stdin(stdin: Optional[IO]) -> str:  # type: ignore[type-arg]
    """The domain XML; read to EOF so libvirt's writer never meets a closed pipe."""
    if stdin is None:
        return ""
    try:
        if stdin.isatty():
            return ""  # run by hand: there is no XML to wait for
    except (AttributeError, ValueError):
        pass
    data = stdin.read()
    if isinstance(data, bytes):
        return data.decode("utf-8", "replace")
    return data


def _live_and_stale(records: Sequence[InflightRecord]) -> Tuple[List[InflightRecord], List[InflightRecord]]:
    live, stale = [], []
    for record in records:
        (live if inflight.is_live(record) else stale).append(record)
    return live, stale


def _decide(call: HookCall, xml: str, config_loader: Callable[[], HookConfig],
            spawn: Optional[Spawn], stderr: IO[str]) -> int:
    if call.op not in ("prepare", "start", "migrate", "release") and call.op not in _RUNNING_OPS:
        return int(ExitCode.OK)
    info = parse_domain(xml, call.domain)
    live, stale = _live_and_stale(inflight.records())

    if call.op in ("prepare", "start", "migrate"):
        refusal = (migrate_refusal if call.op == "migrate" else start_refusal)(info, live)
        if refusal is None:
            return int(ExitCode.OK)
        log.info("refused %s of %s: %s", call.op, info.name, refusal)
        stderr.write(f"vmsnapbackup: {refusal}\n")
        stderr.flush()
        return int(ExitCode.ERROR)

    config = _load(config_loader)
    run = spawn if spawn is not None else (lambda argv: spawn_detached(argv, _job_log(config)))
    mine_live = [r for r in live if _is_domain(r, info)]
    mine_stale = [r for r in stale if _is_domain(r, info)]

    if call.op in _RUNNING_OPS:
        overlays = info.overlay_disks
        if not overlays or mine_live:
            return int(ExitCode.OK)
        pool = mine_stale[0].pool if mine_stale else config.policy(info.name).pool
        argv = repair_argv(config, pool, info.name)
        log.warning("domain %s %s on overlay(s) %s left by an interrupted backup: starting %s",
                    info.name, call.op, ", ".join(d.source or "" for d in overlays), " ".join(argv))
        run(argv)
        return int(ExitCode.OK)

    # release: a dead operation's record goes, unless the domain still stands on our
    # overlays: then the record is the only note of which pool holds the dead backup's
    # journal, and the repair handed off at the next start needs it (repair clears it)
    if info.overlay_disks and mine_stale:
        log.info("keeping the stale in-flight record of %s: it still stands on overlay(s) "
                 "of the interrupted %s", info.name, mine_stale[0].operation)
    else:
        for record in mine_stale:
            if inflight.clear(record.uuid, pid=record.pid):
                log.info("removed stale in-flight record of %s (%s by dead pid %d)",
                         info.name, record.operation, record.pid)
    policy = config.policy(info.name)
    if policy.backup_on_shutdown:
        if mine_live:
            log.info("not starting the shutdown backup of %s: %s", info.name, _describe(mine_live[0]))
        elif call.extra in _NO_BACKUP_AFTER:
            log.info("not starting the shutdown backup of %s after release reason %r",
                     info.name, call.extra)
        else:
            argv = backup_argv(config, policy.pool, info.name)
            log.info("domain %s shut down: starting %s", info.name, " ".join(argv))
            run(argv)
    return int(ExitCode.OK)


def _load(config_loader: Callable[[], HookConfig]) -> HookConfig:
    try:
        return config_loader()
    except VmSnapBackupError as err:
        log.warning("%s; using defaults", err)
        return HookConfig()


def hook_main(
    argv: Sequence[str],
    stdin: Optional[IO] = None,  # type: ignore[type-arg]
    *,
    spawn: Optional[Spawn] = None,
    config_loader: Callable[[], HookConfig] = load_config,
    stderr: Optional[IO[str]] = None,
    setup_logging: bool = False,
) -> int:
    """Run the hook for libvirt's ``argv`` (without the program name); return the exit code.

    ``spawn`` starts a detached job (default: :func:`spawn_detached` with the
    job log); ``setup_logging`` sends the log to syslog (the shim sets it).
    Never raises.
    """
    began = time.monotonic()
    err_stream = stderr if stderr is not None else sys.stderr
    call = HookCall.from_argv(argv)
    try:
        if setup_logging:
            setup_hook_logging()
        xml = _read_stdin(stdin)
        code = _decide(call, xml, config_loader, spawn, err_stream)
    except Exception:  # our bug must never stop a domain
        log.exception("internal error in the %s hook of %s (ignored)", call.op, call.domain)
        code = int(ExitCode.OK)
    log.debug("hook %s %s %s %s -> %d in %.1f ms", call.domain, call.op, call.subop, call.extra,
              code, (time.monotonic() - began) * 1000)
    return code
