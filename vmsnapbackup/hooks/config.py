"""The hook's optional policy file, ``/etc/vmsnapbackup/hooks.conf`` (INI).

::

    [DEFAULT]
    pool = /var/lib/vmsnapbackup          # pool for repairs and backups the hook starts
    # command = /usr/local/bin/vmsnapbackup   # the CLI the hook runs (default: beside the
    #                                          # interpreter that runs the hook)
    # job_log = /var/log/vmsnapbackup-hook-jobs.log   # output of the jobs the hook starts

    [domain:web1]
    backup_on_shutdown = yes              # offline backup once web1 has shut down
    # pool = /srv/backup                  # this domain's pool

The hook must decide without libvirt and without a pool, so everything it
needs beyond the in-flight records is here.  A missing file means defaults;
a broken one is a :class:`~vmsnapbackup.errors.UsageError` naming it (the hook
then logs it and goes on with defaults: a typo must never stop a domain).

Its ``command=`` runs as root, so the file is read only when root alone can
change it and every directory above it (:mod:`.trust`); otherwise loading
raises :class:`~vmsnapbackup.hooks.trust.UntrustedPathError` and the hook uses
the defaults, running nothing the file names.
"""
from __future__ import annotations

import configparser
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError
from .trust import UntrustedPathError, path_problem

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_POOL",
    "DomainPolicy",
    "HookConfig",
    "config_path",
    "default_command",
    "load_config",
]

DEFAULT_CONFIG_PATH = Path("/etc/vmsnapbackup/hooks.conf")
#: Overrides the config path (tests).
CONFIG_ENV = "VMSNAPBACKUP_HOOKS_CONF"
#: Same default as the CLI's ``--pool``.
DEFAULT_POOL = "/var/lib/vmsnapbackup"

_DOMAIN_PREFIX = "domain:"
_KNOWN_KEYS = {"pool", "command", "job_log", "backup_on_shutdown"}


@dataclass(frozen=True)
class DomainPolicy:
    """What the hook does for one domain beyond its safety checks."""

    pool: str
    backup_on_shutdown: bool = False


@dataclass(frozen=True)
class HookConfig:
    """The parsed file; ``command`` empty means :func:`default_command`."""

    default: DomainPolicy = DomainPolicy(pool=DEFAULT_POOL)
    command: tuple[str, ...] = ()
    job_log: str | None = None
    domains: dict[str, DomainPolicy] = field(default_factory=dict)
    path: str | None = None

    @property
    def pool(self) -> str:
        return self.default.pool

    def policy(self, name: str) -> DomainPolicy:
        """The ``[domain:NAME]`` section, else ``[DEFAULT]`` (whose keys every section inherits)."""
        return self.domains.get(name, self.default)

    def cli(self) -> tuple[str, ...]:
        """The argv prefix that runs the vmsnapbackup CLI."""
        return self.command or default_command()


def config_path() -> Path:
    override = os.environ.get(CONFIG_ENV)
    return Path(override) if override else DEFAULT_CONFIG_PATH


def default_command() -> tuple[str, ...]:
    """The CLI of the installation the hook runs from.

    The console script sits beside the interpreter in a venv or a system
    install; without it (a source checkout) the interpreter runs the package.
    """
    script = Path(sys.executable).with_name("vmsnapbackup")
    if os.access(script, os.X_OK):
        return (str(script),)
    return (sys.executable, "-m", "vmsnapbackup")


def _policy(parser: configparser.ConfigParser, section: str, path: Path) -> DomainPolicy:
    values = parser[section]
    try:
        backup = values.getboolean("backup_on_shutdown", fallback=False)
    except ValueError as err:
        raise UsageError(f"{path}: [{section}] backup_on_shutdown: {err}") from None
    pool = (values.get("pool") or "").strip()
    if not pool:
        raise UsageError(f"{path}: [{section}] pool is empty")
    return DomainPolicy(pool=pool, backup_on_shutdown=bool(backup))


def load_config(path: os.PathLike | None = None) -> HookConfig:  # type: ignore[type-arg]
    """Read the policy file (defaults when it does not exist)."""
    p = Path(path) if path is not None else config_path()
    parser = configparser.ConfigParser(defaults={"pool": DEFAULT_POOL}, interpolation=None)
    if not os.path.lexists(p):
        return HookConfig()
    # checked before opening: nothing an untrusted user planted (a FIFO, a symlink
    # to a device) is even opened
    problem = path_problem(p)
    if problem:
        raise UntrustedPathError(f"{p}: hook configuration not trusted ({problem}); "
                                 "it must be owned by root and writable by root alone")
    if not p.is_file():
        raise UsageError(f"{p}: hook configuration is not a regular file")
    try:
        with open(p, encoding="utf-8") as f:
            parser.read_file(f)
    except (OSError, UnicodeDecodeError, configparser.Error) as err:
        reason = " ".join(str(err).split())
        raise UsageError(f"{p}: cannot read hook configuration: {reason}") from None

    def check_keys(section: str) -> None:
        unknown = set(parser[section].keys()) - _KNOWN_KEYS
        if unknown:
            raise UsageError(f"{p}: [{section}]: unknown key(s) {', '.join(sorted(unknown))}")

    check_keys("DEFAULT")
    default = parser["DEFAULT"]
    command_text = default.get("command", "").strip()
    try:
        command = tuple(shlex.split(command_text))
    except ValueError as err:
        raise UsageError(f"{p}: [DEFAULT] command: {err}") from None
    domains: dict[str, DomainPolicy] = {}
    for section in parser.sections():
        if not section.startswith(_DOMAIN_PREFIX) or not section[len(_DOMAIN_PREFIX):].strip():
            raise UsageError(f"{p}: unknown section [{section}] (expected [domain:NAME])")
        check_keys(section)
        name = section[len(_DOMAIN_PREFIX):].strip()
        domains[name] = _policy(parser, section, p)
    return HookConfig(
        default=_policy(parser, "DEFAULT", p),
        command=command,
        job_log=default.get("job_log") or None,
        domains=domains,
        path=str(p),
    )
