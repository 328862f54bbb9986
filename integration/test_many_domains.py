"""Many domains in one run, on the real libvirtd + QEMU (issue 13, "many domains per run").

``backup --all --running --parallel 3`` over four running domains, one of which
has a disk no backup can take (a read-only disk: libvirt and the backup refuse
it for real), plus a shut-off domain (``--running`` leaves it out) and a running
one that ``--exclude-domain`` leaves out.  The three good ones restore bit-exact,
and the exit code and ``--json`` name the one that failed.  ``--max-rate`` is
measured on real reads: one domain through the command line, and two domains
side by side sharing one budget.
"""
from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from domains import DiskModel, DiskSpec, DomainFactory, TestDomain

from vmsnapbackup.cli import main
from vmsnapbackup.core.defaults import DEFAULT_URI
from vmsnapbackup.errors import ExitCode
from vmsnapbackup.progress import ProgressEvent
from vmsnapbackup.workflows.backupmany import (
    DomainBackup,
    DomainTarget,
    backup_many,
    select_domains,
)
from vmsnapbackup.workflows.backupoptions import BackupOptions
from vmsnapbackup.workflows.ratebudget import RateBudget

pytestmark = pytest.mark.integration

MiB = 2**20
URI = DEFAULT_URI


def _foreign_excludes(conn, ours: set[str]) -> list[str]:  # type: ignore[no-untyped-def]
    """``--exclude-domain NAME`` for every domain on the shared libvirtd that is not ours."""
    out: list[str] = []
    for d in conn.listAllDomains(0):
        if d.name() not in ours:
            out += ["--exclude-domain", d.name()]
    return out


def _on_overlay(td: TestDomain) -> list[str]:
    """Our snapshot overlays beside ``td``'s images: it runs on them while it is read."""
    from vmsnapbackup.adapters.domainxml import OVERLAY_MARKER

    return glob.glob(str(td.workdir / f"*{OVERLAY_MARKER}*"))


def _backup_until_on_overlay(pool: str, doms: list[TestDomain], options: list[str],
                             watched: TestDomain,
                             act: Callable[[subprocess.Popen[str]], object],
                             ) -> tuple[int, str, str]:
    """``backup --json`` of ``doms`` in a child process; once ``watched`` runs on our
    overlay, ``act(child)`` (a fault); ``(exit code, stdout, stderr)`` of the child."""
    from faults import until

    child = subprocess.Popen(
        [sys.executable, "-m", "vmsnapbackup", "--pool", pool, "backup",
         *(d.name for d in doms), *options, "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def watched_on_overlay() -> None:
        if child.poll() is not None:   # finished or failed before the overlay was seen
            out, err = child.communicate()
            pytest.fail(f"backup exited {child.returncode} before {watched.name}'s overlay "
                        f"was seen: {err.strip()[-2000:]} {out.strip()[-2000:]}")
        assert _on_overlay(watched)

    try:
        until(watched_on_overlay, deadline=120)
        act(child)
        out, err = child.communicate(timeout=300)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return child.returncode, out, err


def _read_only_disk(make_domain: DomainFactory) -> TestDomain:
    """A running domain whose only disk is read-only: the backup refuses it."""
    td: TestDomain = make_domain(disks=[DiskSpec("vda", "qcow2", 16 * MiB)], start=False,
                                 name_prefix="vsb-many-ro")
    xml = td.dom.XMLDesc(0)
    xml, n = re.subn(r"(<target dev='vda' bus='virtio'/>)", r"\1<readonly/>", xml)
    assert n == 1, xml
    td.dom = td.conn.defineXML(xml)
    td.start()
    return td


def _json(capsys: pytest.CaptureFixture[str]) -> dict:  # type: ignore[type-arg]
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def test_all_parallel_three_one_domain_fails_the_others_restore_exactly(
        make_domain: DomainFactory, libvirt_conn: Any, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    good = [make_domain(disks=[DiskSpec("vda", "qcow2", 32 * MiB)], name_prefix="vsb-many")
            for _ in range(3)]
    bad = _read_only_disk(make_domain)
    off = make_domain(disks=[DiskSpec("vda", "qcow2", 16 * MiB)], start=False,
                      name_prefix="vsb-many-off")
    skipped = make_domain(disks=[DiskSpec("vda", "qcow2", 16 * MiB)], name_prefix="vsb-skipme")
    models = {}
    for n, td in enumerate(good):
        model = DiskModel(td)
        model.write("vda", n * MiB, 3 * MiB + 4096 * n, 0x41 + n)
        model.write("vda", 20 * MiB, 64 * 1024, 0x61 + n)
        models[td.name] = model.snapshot()
    ours = {td.name for td in (*good, bad, off, skipped)}
    pool = tmp_path / "pool"

    rc = main(["--pool", str(pool), "backup", "--all", "--running", "--parallel", "3",
               "--exclude-domain", "vsb-skipme-*",
               *_foreign_excludes(libvirt_conn, ours), "--json"])
    doc = _json(capsys)
    assert rc == ExitCode.DOMAINS_FAILED, doc
    by_name = {d["domain"]: d for d in doc["domains"]}
    assert set(by_name) == {td.name for td in good} | {bad.name}   # not off, not skipped
    assert doc["failed"] == [bad.name] and not doc["ok"]
    assert by_name[bad.name]["exit_code"] == ExitCode.UNSUPPORTED_DISK
    assert "UnsupportedDiskError" in by_name[bad.name]["error"]
    for td in good:
        assert by_name[td.name]["ok"] and by_name[td.name]["point"] == 1, by_name[td.name]

    # every domain, the failed one too, runs on its own image again; nothing left over
    for td in (*good, bad):
        assert td.is_active()
        assert td.current_source("vda") == td.disks["vda"]
        assert not os.path.exists(f"/run/vmsnapbackup/inflight/{td.uuid}.json")
    assert not (pool / "domains").exists() or all(
        p.name != bad.uuid for p in (pool / "domains").iterdir())

    for td in good:
        out = tmp_path / f"restore-{td.name}"
        assert main(["--pool", str(pool), "restore", td.name, "--to", str(out)]) == 0
        capsys.readouterr()
        images = sorted(out.iterdir())
        assert len(images) == 1, images
        assert images[0].read_bytes() == models[td.name]["vda"], f"{td.name} differs"


def _written(make_domain: DomainFactory, size: int, data: int, prefix: str) -> TestDomain:
    td: TestDomain = make_domain(disks=[DiskSpec("vda", "qcow2", size)], name_prefix=prefix)
    td.write("vda", 0, data, 0x5A)
    return td


def test_max_rate_holds_a_backup_to_its_budget(make_domain: DomainFactory, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    rate = 8 * MiB
    td = _written(make_domain, 64 * MiB, 24 * MiB, "vsb-rate")
    pool = str(tmp_path / "pool")

    def read_rate(extra: list[str]) -> float:
        assert main(["--pool", pool, "backup", td.name, "--no-dirty-bitmaps", "--json",
                     *extra]) == 0
        disk = _json(capsys)["disks"][0]
        read = disk["blocks"]["read"] * 64 * 1024
        assert read >= 24 * MiB
        return float(read / disk["seconds"]["read"])

    free = read_rate([])
    held = read_rate(["--max-rate", "8M"])
    assert free > 2 * rate, f"unbudgeted read only {free / MiB:.1f} MiB/s: cannot tell"
    assert 0.85 * rate <= held <= 1.05 * rate, f"{held / MiB:.2f} MiB/s against 8 MiB/s"


class _Times:
    """When each disk read its first and last bytes (the observer of the run)."""

    def __init__(self) -> None:
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.bytes: dict[str, int] = {}

    def started(self, target: DomainTarget) -> None:
        pass

    def progress(self, target: DomainTarget, event: ProgressEvent) -> None:
        now = time.monotonic()
        key = f"{target.name}/{event.disk}"
        self.first.setdefault(key, now)
        self.last[key] = now
        self.bytes[key] = event.done

    def finished(self, target: DomainTarget, outcome: DomainBackup) -> None:
        pass


def test_one_budget_is_shared_by_domains_read_side_by_side(
        make_domain: DomainFactory, tmp_path: Path) -> None:
    rate = 8 * MiB
    doms = [_written(make_domain, 32 * MiB, 16 * MiB, "vsb-rate2") for _ in range(2)]
    targets, failed = select_domains({URI: []}, [d.name for d in doms], every=False)
    assert not failed
    times = _Times()
    budget = RateBudget(rate)   # one record, so one budget, for both domains
    run = backup_many(targets, str(tmp_path / "pool"),
                      BackupOptions(dirty_bitmaps=False, budget=budget),
                      parallel=2, observer=times)
    assert run.ok, run.to_dict()
    assert run.max_rate == rate and budget.taken >= 32 * MiB
    span = max(times.last.values()) - min(times.first.values())
    total = sum(times.bytes.values())
    assert total >= 32 * MiB
    measured = total / span
    assert 0.85 * rate <= measured <= 1.05 * rate, f"{measured / MiB:.2f} MiB/s shared"
    # side by side: each domain's read lasted most of the span (not one after the other)
    for key in times.first:
        assert times.last[key] - times.first[key] > 0.6 * span, (key, span)


def test_a_domain_killed_mid_read_fails_alone_and_one_repair_puts_it_back(
        make_domain: DomainFactory, tmp_path: Path) -> None:
    """A real fault the real stack reaches: QEMU of one domain dies while it is read."""
    doms = [_written(make_domain, 32 * MiB, 12 * MiB, "vsb-many-kill") for _ in range(3)]
    victim = doms[1]
    pool = str(tmp_path / "pool")
    # the guest's QEMU dies mid-backup
    rc, out, err = _backup_until_on_overlay(pool, doms, ["--parallel", "3", "--max-rate", "6M"],
                                            victim, lambda _child: victim.dom.destroy())
    assert rc == ExitCode.DOMAINS_FAILED, err
    doc = json.loads(out)
    by_name = {d["domain"]: d for d in doc["domains"]}
    assert doc["failed"] == [victim.name], err
    for d in doms:
        if d is not victim:
            assert by_name[d.name]["ok"] and d.is_active()
            assert d.current_source("vda") == d.disks["vda"]
    # the victim is left repairable (or repaired); one repair puts it back on its image
    assert by_name[victim.name]["exit_code"] in (ExitCode.REPAIR_NEEDED, ExitCode.HYPERVISOR,
                                                 ExitCode.INTERRUPTED), by_name[victim.name]
    assert main(["--pool", pool, "repair", victim.name]) == 0
    assert not victim.is_active()
    assert victim.current_source("vda") == victim.disks["vda"]
    assert not _on_overlay(victim)
    victim.start()                # and it boots from its own image again
    assert victim.is_active()


def test_several_connections_in_one_run(make_domain: DomainFactory, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Two ``-c``: each name is looked up on every connection and backed up through the
    one that has it.  The second connection is libvirt's own test driver, whose domain
    "test" has a disk of no known format: it fails there, alone."""
    td = _written(make_domain, 16 * MiB, 2 * MiB, "vsb-many-uri")
    pool = str(tmp_path / "pool")
    rc = main(["-c", URI, "-c", "test:///default", "--pool", pool, "backup", td.name, "test",
               "--json"])
    doc = _json(capsys)
    assert rc == ExitCode.DOMAINS_FAILED, doc
    by_name = {d["domain"]: d for d in doc["domains"]}
    assert by_name[td.name]["ok"] and by_name[td.name]["uri"] == URI
    assert by_name["test"]["uri"] == "test:///default" and not by_name["test"]["ok"]
    assert by_name["test"]["exit_code"] == ExitCode.UNSUPPORTED_DISK
    assert doc["failed"] == ["test"]
    # a name neither connection has is that name's failure, reported with the rest
    rc = main(["-c", URI, "-c", "test:///default", "--pool", pool, "backup", td.name,
               "no-such-domain", "--json"])
    doc = _json(capsys)
    assert rc == ExitCode.DOMAINS_FAILED
    assert doc["failed"] == ["no-such-domain"]
    assert [d["point"] for d in doc["domains"] if d["ok"]] == [2]


def test_a_signal_undoes_the_running_domain_and_starts_no_other(
        make_domain: DomainFactory, tmp_path: Path) -> None:
    """SIGTERM to a run: the domain being read unwinds through its own undo (back on its
    image, nothing to repair), the domains not started are reported so, exit 8."""
    doms = [_written(make_domain, 32 * MiB, 12 * MiB, "vsb-many-term") for _ in range(3)]
    first = doms[0]
    pool = str(tmp_path / "pool")
    rc, out, err = _backup_until_on_overlay(pool, doms, ["--parallel", "1", "--max-rate", "2M"],
                                            first, lambda child: child.send_signal(signal.SIGTERM))
    assert rc == ExitCode.INTERRUPTED, err
    doc = json.loads(out)
    assert doc["interrupted"] and not doc["ok"]
    states = [(d["domain"], d["started"], d["ok"]) for d in doc["domains"]]
    assert states == [(first.name, True, False), (doms[1].name, False, False),
                      (doms[2].name, False, False)], (states, err)
    assert "BackupInterruptedError" in doc["domains"][0]["error"]
    for d in doms:
        assert d.is_active() and d.current_source("vda") == d.disks["vda"]
        assert not _on_overlay(d)
        assert not os.path.exists(f"/run/vmsnapbackup/inflight/{d.uuid}.json")
