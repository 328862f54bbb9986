"""The text of the systemd service and timer (or the cron line) that run a job.

A timer rather than cron where systemd runs: ``Persistent=true`` catches up a
run missed while the host was off, ``RandomizedDelaySec`` keeps every host of
a cluster from hitting shared backup storage at the same second, and the
service can be sandboxed.  The sandbox keeps only what a backup needs:
talking to libvirtd over its socket, starting qemu-storage-daemon, reading
disk images and writing the pool, the state directory and the metrics file.
"""
from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import UsageError
from .jobconfig import Job

__all__ = [
    "UnitFiles",
    "cron_line",
    "cron_time",
    "service_text",
    "timer_text",
    "unit_files",
    "unit_name",
]

UNIT_PREFIX = "vmsnapbackup-"

#: systemd sandboxing that leaves libvirt/QEMU access alone.  Deliberately not
#: used: PrivateDevices (NBD and FUSE devices, /dev/kvm for qemu-storage-daemon),
#: PrivateTmp/PrivateNetwork (remote libvirt URIs, sockets other tools share),
#: ProtectHome/ProtectSystem=strict (disk images and pools may live anywhere:
#: ReadWritePaths cannot name them all), RestrictNamespaces (mount helpers).
HARDENING = (
    "NoNewPrivileges=yes",
    "ProtectSystem=full",
    "ProtectKernelTunables=yes",
    "ProtectKernelModules=yes",
    "ProtectKernelLogs=yes",
    "ProtectControlGroups=yes",
    "ProtectClock=yes",
    "ProtectHostname=yes",
    "RestrictRealtime=yes",
    "RestrictSUIDSGID=yes",
    "LockPersonality=yes",
    "SystemCallArchitectures=native",
    "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
    "UMask=0077",
)


@dataclass(frozen=True)
class UnitFiles:
    """File name -> text for one job."""

    job: str
    files: dict[str, str]


def unit_name(job: str, kind: str) -> str:
    return f"{UNIT_PREFIX}{job}.{kind}"


def _quote(arg: str) -> str:
    """Quote one ExecStart argument for systemd (which also expands % and $)."""
    escaped = arg.replace("%", "%%").replace("$", "$$")
    if re.fullmatch(r"[A-Za-z0-9_@%+=:,./-]+", escaped):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def service_text(job: Job, command: Sequence[str], config_path: str) -> str:
    """The oneshot service that runs ``command --config PATH run JOB``."""
    argv = [*command, "--config", config_path, "run", job.name]
    return "\n".join([
        "[Unit]",
        f"Description=vmsnapbackup job {job.name}: back up, prune and verify",
        "Documentation=man:vmsnapbackup(1)",
        "After=network-online.target libvirtd.service virtqemud.service",
        "",
        "[Service]",
        "Type=oneshot",
        "ExecStart=" + " ".join(_quote(a) for a in argv),
        "Nice=10",
        "IOSchedulingClass=best-effort",
        "IOSchedulingPriority=7",
        *HARDENING,
        "",
    ])


def timer_text(job: Job) -> str:
    return "\n".join([
        "[Unit]",
        f"Description=vmsnapbackup job {job.name} on schedule {job.schedule}",
        "",
        "[Timer]",
        f"OnCalendar={job.schedule}",
        "Persistent=true",
        f"RandomizedDelaySec={job.randomized_delay}",
        f"Unit={unit_name(job.name, 'service')}",
        "",
        "[Install]",
        "WantedBy=timers.target",
        "",
    ])


def unit_files(job: Job, command: Sequence[str], config_path: str) -> UnitFiles:
    return UnitFiles(job.name, {
        unit_name(job.name, "service"): service_text(job, command, config_path),
        unit_name(job.name, "timer"): timer_text(job),
    })


_SHORTHANDS = {
    "minutely": "* * * * *", "hourly": "0 * * * *", "daily": "0 0 * * *",
    "weekly": "0 0 * * 1", "monthly": "0 0 1 * *", "yearly": "0 0 1 1 *",
    "annually": "0 0 1 1 *",
}
_DOW = {"mon": "1", "tue": "2", "wed": "3", "thu": "4", "fri": "5", "sat": "6", "sun": "0"}


def cron_time(job: Job) -> str:
    """The five cron fields for the job: its ``cron`` key, or its schedule translated.

    Only the common calendar forms translate (``daily``, ``*-*-* 02:30``,
    ``Mon..Fri *-*-* 02:30``); for anything else the job must say ``cron`` itself
    rather than get a line that runs at other times than the timer would.
    """
    if job.cron is not None:
        return job.cron
    translated = _translate(job.schedule.strip())
    if translated is None:
        raise UsageError(f"job {job.name}: schedule {job.schedule!r} has no plain cron form; "
                         "set cron = \"MIN HOUR DOM MON DOW\" in the job")
    return translated


def _translate(expr: str) -> str | None:
    lowered = expr.lower()
    if lowered in _SHORTHANDS:
        return _SHORTHANDS[lowered]
    m = re.fullmatch(r"(?:([A-Za-z.,]+)\s+)?(?:\*-\*-\*\s+)?(\d{1,2}|\*):(\d{1,2})(?::00)?",
                     expr)
    if m is None:
        return None
    days, hour, minute = m.groups()
    dow = "*"
    if days:
        out = []
        for part in days.lower().split(","):
            if ".." in part:
                a, b = part.split("..", 1)
                if a[:3] not in _DOW or b[:3] not in _DOW:
                    return None
                out.append(f"{_DOW[a[:3]]}-{_DOW[b[:3]]}")
            elif part[:3] in _DOW:
                out.append(_DOW[part[:3]])
            else:
                return None
        dow = ",".join(out)
    if (hour != "*" and int(hour) > 23) or int(minute) > 59:
        return None
    return f"{int(minute)} {hour if hour == '*' else int(hour)} * * {dow}"


def cron_line(job: Job, command: Sequence[str], config_path: str,
              user: str | None = "root") -> str:
    """One /etc/cron.d line (with a user field) for hosts without systemd."""
    argv = [*command, "--config", config_path, "run", job.name]
    who = f" {user}" if user else ""
    return f"{cron_time(job)}{who} {' '.join(shlex.quote(a) for a in argv)}"
