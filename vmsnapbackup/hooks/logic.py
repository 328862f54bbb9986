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
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, NoReturn

from ..core import inflight
from ..core.inflight import InflightRecord
from ..errors import ExitCode, VmSnapBackupError
from .config import HookConfig, load_config
from .jobs import JOB_UMASK, SYSLOG_SOCKET, command_problem, setup_hook_logging, spawn_detached
from .refusal import (
    DomainInfo,
    HookCall,
    describe,
    is_domain,
    migrate_refusal,
    parse_domain,
    start_refusal,
)
from .trust import UntrustedPathError

__all__ = [
    "DEADLINE_SECONDS",
    "REFUSE_EXIT",
    "SYSLOG_SOCKET",
    "DomainInfo",
    "HookCall",
    "Spawn",
    "backup_argv",
    "hook_main",
    "migrate_refusal",
    "parse_domain",
    "repair_argv",
    "setup_hook_logging",
    "shim_main",
    "spawn_detached",
    "start_refusal",
]

log = logging.getLogger(__name__)

#: Runs an argv detached from the hook; the seam tests replace.
Spawn = Callable[[Sequence[str]], None]

#: The whole hook run's time budget.  libvirtd waits for the hook holding the domain's
#: job, so a hung NFS ``realpath`` or a blocked ``flock`` must not hang it: past this,
#: the hook gives up with the safe answer (refuse a start, allow everything else).
DEADLINE_SECONDS = 10.0

#: How :func:`shim_main` tells the sh shim "refuse": every other status of the
#: interpreter (a crash, a broken install) lets the domain go ahead.
REFUSE_EXIT = 100

#: ``release`` reasons (libvirt >= 10.5 passes one as EXTRA) after which an offline backup
#: would be wrong: the domain now runs elsewhere, or never ran.
_NO_BACKUP_AFTER = frozenset({"migrated", "failed"})

#: Ops whose domain may be running on an overlay a dead backup left behind.
_RUNNING_OPS = frozenset({"started", "reconnect"})


def repair_argv(config: HookConfig, pool: str, name: str) -> list[str]:
    """``--pool=`` and ``--`` so a pool or domain named like an option (``--all``) stays data."""
    return [*config.cli(), f"--pool={pool}", "repair", "--", name]


def backup_argv(config: HookConfig, pool: str, name: str) -> list[str]:
    return [*config.cli(), f"--pool={pool}", "backup", "--", name]


def _job_log(config: HookConfig) -> Path:
    if config.job_log:
        return Path(config.job_log)
    return inflight.runtime_root() / "hook-jobs.log"


def _read_stdin(stdin: IO | None) -> str:  # type: ignore[type-arg]
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
    return str(data)


def _live_and_stale(
    records: Sequence[InflightRecord],
) -> tuple[list[InflightRecord], list[InflightRecord]]:
    live: list[InflightRecord] = []
    stale: list[InflightRecord] = []
    for record in records:
        (live if inflight.is_live(record) else stale).append(record)
    return live, stale


@dataclass(frozen=True)
class _Decision:
    code: int
    refusal: str | None = None  # for libvirt's error message (stderr)


_ALLOW = _Decision(int(ExitCode.OK))


def _decide(call: HookCall, xml: str, config_loader: Callable[[], HookConfig],
            spawn: Spawn | None, gave_up: threading.Event) -> _Decision:
    if call.op not in ("prepare", "start", "migrate", "release") and call.op not in _RUNNING_OPS:
        return _ALLOW
    info = parse_domain(xml, call.domain)
    live, stale = _live_and_stale(inflight.records())

    if call.op in ("prepare", "start", "migrate"):
        refusal = (migrate_refusal if call.op == "migrate" else start_refusal)(info, live)
        if refusal is None:
            return _ALLOW
        log.info("refused %s of %s: %s", call.op, info.name, refusal)
        return _Decision(int(ExitCode.ERROR), refusal)

    config = _load(config_loader)

    def run(argv: Sequence[str]) -> None:
        if config is None:
            log.warning("not starting %s: the hook configuration is not trusted", " ".join(argv))
        elif config.command and command_problem(config.command[0]):
            log.warning("not starting %s: command= is not trusted (%s)", " ".join(argv),
                        command_problem(config.command[0]))
        elif gave_up.is_set():
            log.warning("not starting %s: the hook had already given up", " ".join(argv))
        elif spawn is not None:
            spawn(argv)
        else:
            spawn_detached(argv, _job_log(config))

    policy_of = (config or HookConfig()).policy
    mine_live = [r for r in live if is_domain(r, info)]
    mine_stale = [r for r in stale if is_domain(r, info)]

    if call.op in _RUNNING_OPS:
        overlays = info.overlay_disks
        if not overlays or mine_live:
            return _ALLOW
        pool = mine_stale[0].pool if mine_stale else policy_of(info.name).pool
        argv = repair_argv(config or HookConfig(), pool, info.name)
        log.warning("domain %s %s on overlay(s) %s left by an interrupted backup: starting %s",
                    info.name, call.op, ", ".join(d.source or "" for d in overlays), " ".join(argv))
        run(argv)
        return _ALLOW

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
    policy = policy_of(info.name)
    if policy.backup_on_shutdown:
        if mine_live:
            log.info("not starting the shutdown backup of %s: %s", info.name,
                     describe(mine_live[0]))
        elif call.extra in _NO_BACKUP_AFTER:
            log.info("not starting the shutdown backup of %s after release reason %r",
                     info.name, call.extra)
        else:
            argv = backup_argv(config or HookConfig(), policy.pool, info.name)
            log.info("domain %s shut down: starting %s", info.name, " ".join(argv))
            run(argv)
    return _ALLOW


def _load(config_loader: Callable[[], HookConfig]) -> HookConfig | None:
    """The policy; defaults when it is broken (a typo must not stop repairs), None when
    it is not trusted (then nothing it could have influenced is run)."""
    try:
        return config_loader()
    except UntrustedPathError as err:
        log.warning("%s; starting no jobs", err)
        return None
    except VmSnapBackupError as err:
        log.warning("%s; using defaults", err)
        return HookConfig()


def _out_of_time(call: HookCall, deadline: float) -> _Decision:
    """The safe answer when the hook could not decide in time: a start or an incoming
    migration might meet an offline backup reading the disks, so it is refused (the
    message says why; retrying works once the host answers); anything else is
    informational and goes ahead."""
    if call.op in ("prepare", "start", "migrate"):
        why = (f"could not check within {deadline:g} s whether a backup holds domain "
               f"{call.domain} (a hung file system?); refusing the {call.op} to keep its disks "
               "safe; try again")
        log.warning("gave up on %s of %s after %g s: refused", call.op, call.domain, deadline)
        return _Decision(int(ExitCode.ERROR), why)
    log.warning("gave up on %s of %s after %g s: letting it go ahead", call.op, call.domain,
                deadline)
    return _ALLOW


def hook_main(
    argv: Sequence[str],
    stdin: IO | None = None,  # type: ignore[type-arg]
    *,
    spawn: Spawn | None = None,
    config_loader: Callable[[], HookConfig] = load_config,
    stderr: IO[str] | None = None,
    setup_logging: bool = False,
    deadline: float = DEADLINE_SECONDS,
) -> int:
    """Run the hook for libvirt's ``argv`` (without the program name); return the exit code.

    ``spawn`` starts a detached job (default: :func:`spawn_detached` with the
    job log); ``setup_logging`` sends the log to syslog (the shim sets it).
    The work runs in a daemon thread the caller waits for at most ``deadline``
    seconds (a thread stuck in a system call cannot be interrupted, only left
    behind); then the safe decision is returned.  Never raises.
    """
    began = time.monotonic()
    err_stream = stderr if stderr is not None else sys.stderr
    call = HookCall.from_argv(argv)
    gave_up = threading.Event()
    result: list[_Decision] = []

    def work() -> None:
        try:
            result.append(_decide(call, _read_stdin(stdin), config_loader, spawn, gave_up))
        except Exception:  # our bug must never stop a domain
            log.exception("internal error in the %s hook of %s (ignored)", call.op, call.domain)
            result.append(_ALLOW)

    try:
        if setup_logging:
            setup_hook_logging()
        worker = threading.Thread(target=work, name="vmsnapbackup-hook", daemon=True)
        worker.start()
        worker.join(deadline)
        if result:
            decision = result[0]
        else:
            gave_up.set()
            decision = _out_of_time(call, deadline)
        if decision.refusal:
            err_stream.write(f"vmsnapbackup: {decision.refusal}\n")
            err_stream.flush()
    except Exception:
        log.exception("internal error in the %s hook of %s (ignored)", call.op, call.domain)
        decision = _ALLOW
    log.debug("hook %s %s %s %s -> %d in %.1f ms", call.domain, call.op, call.subop, call.extra,
              decision.code, (time.monotonic() - began) * 1000)
    return decision.code


def shim_main(argv: Sequence[str]) -> NoReturn:
    """The installed sh shim's entry: run the hook, then leave at once.

    Exits :data:`REFUSE_EXIT` for a refusal (the shim turns it into libvirt's
    1) and 0 otherwise, so that only a deliberate decision can stop a domain.
    ``os._exit``: a worker left behind in a hung system call must not keep
    the process (and libvirt's pipes) alive.
    """
    os.umask(JOB_UMASK)
    code = hook_main(argv, sys.stdin.buffer, setup_logging=True)
    for handler in logging.getLogger("vmsnapbackup").handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(REFUSE_EXIT if code == int(ExitCode.ERROR) else 0)
