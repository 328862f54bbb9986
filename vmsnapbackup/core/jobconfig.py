"""The job configuration file (``/etc/vmsnapbackup/vmsnapbackup.toml``): parsing and validation.

A scheduled backup runs with nobody watching, so a mistake in its
configuration must be found when the file is read, not at 02:00 half-way
through the job list.  Everything is checked up front and every mistake is
reported as one line naming the file, the line where it can be found and the
key (``vmsnapbackup.toml:12: jobs.nightly.retention.keep-dayly: unknown key``).
What a valid file becomes is :mod:`.jobmodel` (re-exported here).

This module is pure: the checks that need the host (does the pool exist, does
systemd accept the calendar expression) are passed in as callables by
:mod:`vmsnapbackup.adapters.jobfiles`.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

import tomllib

from .defaults import DEFAULT_URI
from .jobmodel import (
    DEFAULT_CONFIG,
    DEFAULT_RANDOMIZED_DELAY,
    DEFAULT_STATE_DIR,
    NEW_GENERATION,
    QUIESCE,
    Config,
    ConfigError,
    DomainEntry,
    Job,
    VerifyPolicy,
    parse_duration,
    select_domains,
)
from .retention import RULES, Policy

__all__ = [
    "DEFAULT_CONFIG",
    "DEFAULT_STATE_DIR",
    "Config",
    "ConfigError",
    "DomainEntry",
    "Job",
    "VerifyPolicy",
    "parse_config",
    "parse_duration",
    "select_domains",
    "Settings",
    "parse_settings",
]

#: Checks that need the host: each returns None when fine, else why not.
CalendarCheck = Callable[[str], Optional[str]]
PoolCheck = Callable[[str, str], Optional[str]]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

_TOP_KEYS = {"state-dir", "metrics", "pools", "hosts", "jobs"}
_POOL_KEYS = {"path", "libvirt-pool", "key-file"}
_HOST_KEYS = {"uri"}
_JOB_KEYS = {"domains", "running-only", "exclude", "disks", "pool", "host", "schedule",
             "randomized-delay", "cron", "rpo", "quiesce", "new-generation", "threshold",
             "parallelism", "retention", "verify"}
_RETENTION_KEYS = tuple(f"keep-{r}" for r in RULES)
_VERIFY_KEYS = {"sample-percent", "full-every-days"}


class _Checker:
    """Walks the parsed document, collecting one line per mistake."""

    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()
        self.problems: list[str] = []

    def line_of(self, table: Sequence[str], key: str | None) -> int | None:
        """The 1-based line of ``key`` in ``[table]`` (or of the table header), if found."""
        current: tuple[str, ...] = ()
        header_line: int | None = None
        want = tuple(table)
        for n, raw in enumerate(self.lines, 1):
            line = raw.strip()
            m = re.match(r"^\[\s*([^\[\]]+?)\s*\]", line)
            if m:
                current = tuple(p.strip().strip('"\'') for p in m.group(1).split("."))
                if current == want and header_line is None:
                    header_line = n
                continue
            if key is not None and current == want and re.match(
                    rf"^[\"']?{re.escape(key)}[\"']?\s*=", line):
                return n
        if key is not None and len(want) > 0:
            parent = self.line_of(want[:-1], want[-1])
            if parent is not None:
                return parent
        return header_line

    def add(self, table: Sequence[str], key: str | None, message: str) -> None:
        where = self.line_of(table, key)
        dotted = ".".join([*table, key] if key else table) or "(top level)"
        loc = f"{self.path}:{where}" if where else self.path
        self.problems.append(f"{loc}: {dotted}: {message}")

    def table(self, doc: Mapping[str, Any], table: Sequence[str], key: str
              ) -> dict[str, Any]:
        value = doc.get(key, {})
        if not isinstance(value, dict):
            self.add(table, key, f"must be a table, not {_kind(value)}")
            return {}
        return value

    def unknown(self, doc: Mapping[str, Any], table: Sequence[str], known: set[str]) -> None:
        for key in doc:
            if key not in known:
                self.add(table, key, f"unknown key (known: {', '.join(sorted(known))})")

    def typed(self, doc: Mapping[str, Any], table: Sequence[str], key: str,
              kinds: tuple[type, ...], what: str) -> Any:
        value = doc.get(key)
        if value is None:
            return None
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            self.add(table, key, f"must be {what}, not {_kind(value)}")
            return None
        return value

    def count(self, doc: Mapping[str, Any], table: Sequence[str], key: str, minimum: int
              ) -> int | None:
        value = self.typed(doc, table, key, (int,), "a whole number")
        if value is not None and value < minimum:
            self.add(table, key, f"must be {minimum} or more, not {value}")
            return None
        return value  # type: ignore[no-any-return]

    def names(self, doc: Mapping[str, Any], table: Sequence[str], key: str
              ) -> tuple[str, ...] | None:
        value = doc.get(key)
        if value is None:
            return None
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.add(table, key, f"must be a list of names, not {_kind(value)}")
            return None
        return tuple(value)

    def duration(self, doc: Mapping[str, Any], table: Sequence[str], key: str) -> int | None:
        if key not in doc:
            return None
        try:
            return parse_duration(doc[key])
        except ValueError as exc:
            self.add(table, key, str(exc))
            return None


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)


def parse_config(text: str, path: str, *, check_calendar: CalendarCheck | None = None,
                 check_pool: PoolCheck | None = None) -> Config:
    """Parse and validate the whole file; ConfigError lists every mistake found."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    c = _Checker(path, text)
    c.unknown(doc, (), _TOP_KEYS)
    state_dir = c.typed(doc, (), "state-dir", (str,), "a directory path") or DEFAULT_STATE_DIR
    metrics = c.typed(doc, (), "metrics", (str,), "a file path")
    pools: dict[str, str] = {}
    pool_keys: dict[str, str] = {}
    for name, spec in c.table(doc, (), "pools").items():
        t = ("pools", name)
        if not isinstance(spec, dict):
            c.add(("pools",), name, f"must be a table, not {_kind(spec)}")
            continue
        c.unknown(spec, t, _POOL_KEYS)
        where = [k for k in ("path", "libvirt-pool") if k in spec]
        if len(where) != 1:
            c.add(("pools",), name, "give exactly one of path or libvirt-pool")
            continue
        value = c.typed(spec, t, where[0], (str,), "a string")
        if value:
            if where[0] == "path" and not value.startswith("/"):
                c.add(t, "path", f"must be an absolute path, not {value!r}")
                continue
            pools[name] = value
        key_file = c.typed(spec, t, "key-file", (str,), "a file path")
        if key_file is not None and not key_file.startswith("/"):
            c.add(t, "key-file", f"must be an absolute path, not {key_file!r}")
        elif key_file is not None:
            pool_keys[name] = key_file     # an encrypted pool (FORMAT §15.2)
    hosts: dict[str, str] = {}
    for name, spec in c.table(doc, (), "hosts").items():
        if not isinstance(spec, dict):
            c.add(("hosts",), name, f"must be a table, not {_kind(spec)}")
            continue
        c.unknown(spec, ("hosts", name), _HOST_KEYS)
        uri = c.typed(spec, ("hosts", name), "uri", (str,), "a libvirt URI")
        if uri is None or "://" not in uri:
            c.add(("hosts", name), "uri", f"a libvirt URI like {DEFAULT_URI} is required")
            continue
        hosts[name] = uri
    jobs: dict[str, Job] = {}
    job_docs = c.table(doc, (), "jobs")
    if not job_docs and not c.problems:
        c.add((), "jobs", "no jobs defined (add a [jobs.NAME] table)")
    for name, spec in job_docs.items():
        job = _job(c, name, spec, pools, hosts, check_calendar, pool_keys)
        if job is not None:
            jobs[name] = job
    if check_pool is not None and not c.problems:
        for name, job in jobs.items():
            why = check_pool(job.pool, job.uri)
            if why is not None:
                c.add(("jobs", name), "pool", why)
    if c.problems:
        raise ConfigError(c.problems)
    return Config(path=path, jobs=jobs, state_dir=state_dir, metrics=metrics)


@dataclass(frozen=True)
class Settings:
    """The file's top-level keys a standalone command needs (where to record, what to
    publish), without its jobs."""

    state_dir: str = DEFAULT_STATE_DIR
    metrics: str | None = None


def parse_settings(text: str, path: str) -> Settings:
    """``state-dir`` and ``metrics`` only; ConfigError if they (or the TOML) are wrong."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    c = _Checker(path, text)
    state_dir = c.typed(doc, (), "state-dir", (str,), "a directory path") or DEFAULT_STATE_DIR
    metrics = c.typed(doc, (), "metrics", (str,), "a file path")
    if c.problems:
        raise ConfigError(c.problems)
    return Settings(state_dir, metrics)


def _job(c: _Checker, name: str, spec: Any, pools: Mapping[str, str],
         hosts: Mapping[str, str], check_calendar: CalendarCheck | None,
         pool_keys: Mapping[str, str]) -> Job | None:
    t = ("jobs", name)
    before = len(c.problems)
    if not isinstance(spec, dict):
        c.add(("jobs",), name, f"must be a table, not {_kind(spec)}")
        return None
    if not _NAME.match(name):
        c.add(("jobs",), name, "a job name is letters, digits, '.', '_' and '-' (it names a "
              "systemd unit)")
    c.unknown(spec, t, _JOB_KEYS)
    domains = c.names(spec, t, "domains")
    if domains is None and "domains" not in spec:
        c.add(t, None, "domains is required (names, globs, or \"all\")")
    elif domains == ("all",):
        domains = ("*",)
    exclude = c.names(spec, t, "exclude") or ()
    disks = c.names(spec, t, "disks")
    pool_name = c.typed(spec, t, "pool", (str,), "the name of a [pools] table")
    pool = pools.get(pool_name or "")
    if pool_name is None and "pool" not in spec:
        c.add(t, None, "pool is required")
    elif pool_name is not None and pool is None:
        c.add(t, "pool", f"no pool named {pool_name!r} in [pools]")
    host_name = c.typed(spec, t, "host", (str,), "the name of a [hosts] table")
    uri = DEFAULT_URI
    if host_name is not None:
        if host_name not in hosts:
            c.add(t, "host", f"no host named {host_name!r} in [hosts]")
        uri = hosts.get(host_name, DEFAULT_URI)
    schedule = c.typed(spec, t, "schedule", (str,), "a systemd calendar expression")
    if schedule is None and "schedule" not in spec:
        c.add(t, None, "schedule is required (systemd calendar syntax, e.g. \"daily\")")
    elif schedule is not None:
        why = "empty or more than one line" if not schedule.strip() or "\n" in schedule \
            else check_calendar(schedule) if check_calendar else None
        if why:
            c.add(t, "schedule", f"not a calendar expression systemd accepts: {why}")
    quiesce_word = c.typed(spec, t, "quiesce", (str,), "auto, require or never") or "auto"
    if quiesce_word not in QUIESCE:
        c.add(t, "quiesce", f"must be auto, require or never, not {quiesce_word!r}")
    new_gen = c.typed(spec, t, "new-generation", (str,), "auto or always") or "auto"
    if new_gen not in NEW_GENERATION:
        c.add(t, "new-generation", f"must be auto or always, not {new_gen!r}")
    threshold = c.typed(spec, t, "threshold", (int, float), "a fraction")
    if threshold is not None and not 0 < threshold <= 1:
        c.add(t, "threshold", f"must be above 0 and at most 1, not {threshold}")
    parallelism = c.count(spec, t, "parallelism", 1)
    running_only = c.typed(spec, t, "running-only", (bool,), "true or false")
    cron = c.typed(spec, t, "cron", (str,), "a cron time (five fields)")
    if cron is not None and len(cron.split()) != 5:
        c.add(t, "cron", f"must be five cron fields like \"0 2 * * *\", not {cron!r}")
    delay = c.duration(spec, t, "randomized-delay")
    rpo = c.duration(spec, t, "rpo")
    if rpo == 0:
        c.add(t, "rpo", "must be more than 0")
    retention = _retention(c, t, spec)
    verify = _verify(c, t, spec)
    if len(c.problems) > before or domains is None or pool is None or schedule is None:
        return None
    return Job(
        name=name, pool=pool, uri=uri, domains=domains, schedule=schedule,
        running_only=bool(running_only), exclude=exclude, disks=disks,
        randomized_delay=DEFAULT_RANDOMIZED_DELAY if delay is None else delay, cron=cron,
        rpo=rpo, quiesce=QUIESCE[quiesce_word], new_generation=new_gen,
        threshold=None if threshold is None else float(threshold),
        parallelism=parallelism or 1, retention=retention, verify=verify,
        key_file=pool_keys.get(pool_name or ""))


def _retention(c: _Checker, job_table: tuple[str, ...], spec: dict[str, Any]
               ) -> Policy | None:
    """The job's prune policy; None when it has no retention table (no prune)."""
    if "retention" not in spec:
        return None
    t = (*job_table, "retention")
    doc = c.table(spec, job_table, "retention")
    c.unknown(doc, t, set(_RETENTION_KEYS))
    counts = {key.replace("-", "_"): c.count(doc, t, key, 0) for key in _RETENTION_KEYS}
    if all(v is None for v in counts.values()):
        c.add(t, None, f"give at least one of {', '.join(_RETENTION_KEYS)} (or leave the "
              "table out: no prune)")
        return None
    return Policy(**counts)


def _verify(c: _Checker, job_table: tuple[str, ...], spec: dict[str, Any]
            ) -> VerifyPolicy | None:
    if "verify" not in spec:
        return None
    t = (*job_table, "verify")
    doc = c.table(spec, job_table, "verify")
    c.unknown(doc, t, _VERIFY_KEYS)
    sample = c.typed(doc, t, "sample-percent", (int, float), "a percentage")
    if sample is not None and not 0 < sample <= 100:
        c.add(t, "sample-percent", f"must be above 0 and at most 100, not {sample}")
    full = c.count(doc, t, "full-every-days", 1)
    return VerifyPolicy(None if sample is None or sample >= 100 else float(sample), full)
