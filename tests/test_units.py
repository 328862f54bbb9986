"""Unit files and cron lines of a job; systemd's own parser (systemd-analyze) judges them."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from vmsnapbackup.adapters.units import install_units, verify_units
from vmsnapbackup.core.jobconfig import Job
from vmsnapbackup.core.units import cron_line, cron_time, unit_files
from vmsnapbackup.errors import UsageError

needs_systemd = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze not installed")
CMD = [sys.executable, "-m", "vmsnapbackup"]


def job(**kw: object) -> Job:
    args: dict[str, object] = {"name": "nightly", "pool": "/srv/pool", "uri": "qemu:///system", "domains": ("*",),
                      "schedule": "Mon..Fri *-*-* 02:30"}
    args.update(kw)
    return Job(**args)  # type: ignore[arg-type]


def test_timer_carries_schedule_persistent_and_delay() -> None:
    files = unit_files(job(randomized_delay=900), CMD, "/etc/vmsnapbackup/vmsnapbackup.toml")
    timer = files.files["vmsnapbackup-nightly.timer"]
    assert "OnCalendar=Mon..Fri *-*-* 02:30" in timer
    assert "Persistent=true" in timer and "RandomizedDelaySec=900" in timer
    service = files.files["vmsnapbackup-nightly.service"]
    assert "--config /etc/vmsnapbackup/vmsnapbackup.toml run nightly" in service
    assert "NoNewPrivileges=yes" in service and "PrivateDevices" not in service


@needs_systemd
def test_generated_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    paths = install_units(unit_files(job(), CMD, "/etc/x.toml"), str(tmp_path))
    verify_units(paths)


@needs_systemd
def test_verify_rejects_a_broken_unit(tmp_path: Path) -> None:
    files = unit_files(job(), CMD, "/etc/x.toml")
    files.files["vmsnapbackup-nightly.timer"] = files.files[
        "vmsnapbackup-nightly.timer"].replace("Persistent=true", "Persistent=maybe")
    with pytest.raises(UsageError, match="systemd-analyze verify"):
        verify_units(install_units(files, str(tmp_path)))


@pytest.mark.parametrize("schedule, cron", [
    ("daily", "0 0 * * *"), ("*-*-* 02:30", "30 2 * * *"),
    ("Mon..Fri *-*-* 02:30", "30 2 * * 1-5"), ("Sat,Sun 4:05", "5 4 * * 6,0"),
])
def test_cron_translation(schedule: str, cron: str) -> None:
    assert cron_time(job(schedule=schedule)) == cron


def test_cron_refuses_what_it_cannot_translate_unless_given() -> None:
    with pytest.raises(UsageError, match="no plain cron form"):
        cron_time(job(schedule="*-*-1/2 02:00"))
    line = cron_line(job(schedule="*-*-1/2 02:00", cron="0 2 */2 * *"), CMD, "/etc/x.toml")
    assert line.startswith("0 2 */2 * * root ") and line.endswith("run nightly")
