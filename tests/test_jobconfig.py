"""The job configuration file: every mistake is one line naming file, line and key; exit 2."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmsnapbackup.adapters.jobfiles import load_config
from vmsnapbackup.cli import main
from vmsnapbackup.core.jobconfig import (
    ConfigError,
    DomainEntry,
    Job,
    parse_config,
    parse_duration,
    select_domains,
)

GOOD = """\
state-dir = "{state}"

[pools.main]
path = "{pool}"

[jobs.nightly]
domains = ["web-*", "db1"]
exclude = ["web-test"]
running-only = true
pool = "main"
schedule = "*-*-* 02:00"
rpo = "26h"
parallelism = 2

[jobs.nightly.retention]
keep-last = 3
keep-daily = 7

[jobs.nightly.verify]
sample-percent = 5
full-every-days = 7
"""


def write(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    pool = tmp_path / "pool"
    pool.mkdir(exist_ok=True)
    path = tmp_path / "vmsnapbackup.toml"
    path.write_text(text.format(pool=pool, state=tmp_path / "state"))
    os.chmod(path, mode)
    return path


def test_good_file_parses(tmp_path: Path) -> None:
    cfg = load_config(str(write(tmp_path, GOOD)))
    job = cfg.jobs["nightly"]
    assert job.rpo == 26 * 3600 and job.parallelism == 2 and job.running_only
    assert job.retention.keep_last == 3 and job.retention.keep_daily == 7
    assert job.verify is not None and job.verify.sample_percent == 5.0


@pytest.mark.parametrize("change, expect", [
    (("keep-daily = 7", "keep-dayly = 7"), ":17: jobs.nightly.retention.keep-dayly: unknown key"),
    (("parallelism = 2", 'parallelism = "two"'), (":13: jobs.nightly.parallelism: must be a "
     "whole number, not a string")),
    (('schedule = "*-*-* 02:00"', 'schedule = "every night at 2"'),
     ":11: jobs.nightly.schedule: not a calendar expression systemd accepts"),
    (('pool = "main"', 'pool = "other"'), ":10: jobs.nightly.pool: no pool named 'other'"),
    (('rpo = "26h"', 'rpo = "soon"'), ":12: jobs.nightly.rpo: not a duration"),
])
def test_each_mistake_is_one_line_with_line_and_key(
        tmp_path: Path, change: tuple[str, str], expect: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, GOOD.replace(*change))
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert len(err.value.problems) == 1
    assert err.value.problems[0].startswith(str(path) + expect), err.value.problems
    assert main(["run", "--config", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and expect.split(": ", 1)[1].split(":")[0] in lines[0]


def test_missing_pool_directory_refused(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, GOOD.replace('path = "{pool}"', 'path = "{pool}/nope"'))
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "jobs.nightly.pool: pool directory" in err[0] \
        and "does not exist" in err[0]


def test_file_writable_by_others_refused(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, GOOD, mode=0o666)
    assert main(["run", "--config", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "writable by group or others" in err[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs a file owned by someone else than root")
def test_file_not_owned_by_root_refused(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    os.chown(path, 65534, 65534)
    with pytest.raises(ConfigError, match="not root"):
        load_config(str(path))


def test_several_mistakes_all_reported() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config('[jobs.a]\ndomains = 3\nbogus = 1\n', "f.toml")
    text = " | ".join(err.value.problems)
    assert "f.toml:2: jobs.a.domains: must be a list of names" in text
    assert "f.toml:3: jobs.a.bogus: unknown key" in text
    assert "pool is required" in text and "schedule is required" in text


JOB = 'domains="all"\npool="p"\nschedule="daily"\n'


def job_of(text: str) -> "Job":
    return parse_config('[pools.p]\npath="/x"\n[jobs.a]\n' + text, "f.toml").jobs["a"]


def test_every_retention_rule_reaches_the_prune_policy() -> None:
    job = job_of(JOB + '[jobs.a.retention]\nkeep-hourly = 24\nkeep-yearly = 5\n')
    assert job.retention is not None
    assert job.retention.counts() == {"keep_last": None, "keep_hourly": 24, "keep_daily": None,
                                      "keep_weekly": None, "keep_monthly": None,
                                      "keep_yearly": 5}
    assert job_of(JOB).retention is None          # no table: no prune


def test_empty_retention_table_is_a_mistake_not_no_prune() -> None:
    with pytest.raises(ConfigError, match=r"f\.toml:7: jobs\.a\.retention: give at least one"):
        job_of(JOB + '[jobs.a.retention]\n')


def test_threshold_is_an_optional_override() -> None:
    assert job_of(JOB).threshold is None          # the generation policy decides
    assert job_of(JOB + "threshold = 0.3\n").threshold == 0.3


def test_durations() -> None:
    assert parse_duration("26h") == 93600
    assert parse_duration("1d 2h") == 93600
    assert parse_duration(90) == 90
    assert parse_duration("15min") == 900
    for bad in ("soon", "", True, -1, "5 parsecs"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_select_domains_globs_running_exclude_missing() -> None:
    cfg = parse_config('[pools.p]\npath="/x"\n[jobs.a]\ndomains=["web-*","db1","gone"]\n'
                       'exclude=["web-test"]\nrunning-only=true\npool="p"\nschedule="daily"\n',
                       "f.toml")
    inv = [DomainEntry("web-1", True), DomainEntry("web-2", False),
           DomainEntry("web-test", True), DomainEntry("db1", True), DomainEntry("mail", True)]
    assert select_domains(cfg.jobs["a"], inv) == (["web-1", "db1"], ["gone"])
