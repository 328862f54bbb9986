"""What a job of the configuration file is, once validated (pure values, no parsing).

:mod:`.jobconfig` turns the TOML file into these; ``run``, ``status`` and
``schedule`` only ever see them, so the checks live in one place and a job
that exists is a job that can run.  Retention is :class:`.retention.Policy`
itself (the very rules ``prune`` applies), not a copy of its fields.
"""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError
from .retention import Policy

__all__ = [
    "DEFAULT_CONFIG",
    "DEFAULT_RANDOMIZED_DELAY",
    "DEFAULT_STATE_DIR",
    "NEW_GENERATION",
    "QUIESCE",
    "Config",
    "ConfigError",
    "DomainEntry",
    "Job",
    "VerifyPolicy",
    "parse_duration",
    "select_domains",
]

DEFAULT_CONFIG = "/etc/vmsnapbackup/vmsnapbackup.toml"
DEFAULT_STATE_DIR = "/var/lib/vmsnapbackup/state"
#: ``randomized-delay`` when the job does not say (seconds).
DEFAULT_RANDOMIZED_DELAY = 600

QUIESCE = {"auto": None, "require": True, "never": False}
NEW_GENERATION = ("auto", "always")

_DURATION = re.compile(r"^\s*(\d+)\s*(s|sec|m|min|h|d|w)?\s*$")
_UNIT_SECONDS = {None: 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400,
                 "w": 604800}


class ConfigError(UsageError):
    """The configuration file is wrong; ``problems`` holds one line per mistake."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        more = f" (and {len(self.problems) - 1} more: {'; '.join(self.problems[1:])})" \
            if len(self.problems) > 1 else ""
        super().__init__(f"{self.problems[0]}{more}")


@dataclass(frozen=True)
class VerifyPolicy:
    """Verify a sample of blocks after each run, all of them every ``full_every_days``."""

    sample_percent: float | None = None
    full_every_days: int | None = None

    def sample_for(self, last_full: float | None, now: float) -> float | None:
        """The sample percent for this run: None means read every block."""
        if self.sample_percent is None:
            return None
        if self.full_every_days is not None and (
                last_full is None or now - last_full >= self.full_every_days * 86400):
            return None
        return self.sample_percent


@dataclass(frozen=True)
class Job:
    """One ``[jobs.NAME]`` table.

    ``threshold`` None lets the generation policy (core.genpolicy, weighing the
    base by ``retention``) decide when a new generation pays, as ``backup`` does
    without ``--threshold``; a fraction is the older fixed rule.
    """

    name: str
    pool: str                      # a path or a libvirt storage pool name
    uri: str
    domains: tuple[str, ...]       # names or globs; ("*",) for all
    schedule: str
    running_only: bool = False
    exclude: tuple[str, ...] = ()
    disks: tuple[str, ...] | None = None
    randomized_delay: int = DEFAULT_RANDOMIZED_DELAY
    cron: str | None = None
    rpo: int | None = None      # seconds
    quiesce: bool | None = None
    new_generation: str = "auto"
    threshold: float | None = None
    parallelism: int = 1
    retention: Policy | None = None      # None: no prune
    verify: VerifyPolicy | None = None
    #: the key file of an encrypted pool (its ``[pools]`` table's ``key-file``): the
    #: job's backups encrypt (a new pool is created encrypted) and its verify opens it
    key_file: str | None = None


@dataclass(frozen=True)
class Config:
    path: str
    jobs: dict[str, Job]
    state_dir: str = DEFAULT_STATE_DIR
    metrics: str | None = None


@dataclass(frozen=True)
class DomainEntry:
    """A domain as the host lists it: enough to select by name and state."""

    name: str
    running: bool


def parse_duration(value: Any) -> int:
    """Seconds from ``3600``, ``"90min"``, ``"26h"``, ``"2d"``; ValueError otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return value
    if not isinstance(value, str):
        raise ValueError("a duration is a number of seconds or a string like '26h'")
    total = 0
    parts = value.split()
    if not parts:
        raise ValueError("empty duration")
    for part in re.findall(r"\d+\s*[a-z]*", value):
        m = _DURATION.match(part)
        if m is None:
            raise ValueError(f"not a duration: {value!r} (use s, min, h, d, w)")
        total += int(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    if re.sub(r"\d+\s*(s|sec|min|m|h|d|w)?", "", value).strip():
        raise ValueError(f"not a duration: {value!r} (use s, min, h, d, w)")
    return total


def select_domains(job: Job, inventory: Sequence[DomainEntry]) -> tuple[list[str], list[str]]:
    """``(selected names, missing names)`` for a job against the host's domains.

    A plain name that matches no domain is *missing* (a failure of the job: the
    operator asked for it); a glob that matches nothing is not.
    """
    selected: list[str] = []
    missing: list[str] = []
    for pattern in job.domains:
        is_glob = any(c in pattern for c in "*?[")
        hits = [d for d in inventory if fnmatch.fnmatchcase(d.name, pattern)]
        if not hits and not is_glob:
            missing.append(pattern)
        for d in hits:
            if d.name in selected or any(fnmatch.fnmatchcase(d.name, x) for x in job.exclude):
                continue
            if job.running_only and not d.running:
                continue
            selected.append(d.name)
    return selected, missing
