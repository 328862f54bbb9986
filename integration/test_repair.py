"""Repair on the real stack: the states a killed backup leaves, built for real, undone.

Each test builds a leftover state the way a dying backup leaves it (a snapshot on
our overlay, a journal written with the core API, a storage daemon whose owner was
SIGKILLed, partial files), runs ``repair`` and checks that the domain is back on
its original images with the guest's writes in them and nothing of ours left.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
import tenacity
from domains import DiskSpec, DomainFactory, TestDomain

from vmsnapbackup.adapters.domainxml import find_disk, overlay_path, parse_disks
from vmsnapbackup.adapters.hypervisor import Hypervisor, connect
from vmsnapbackup.adapters.storagedaemon import stop_leftover_daemon
from vmsnapbackup.cli import main
from vmsnapbackup.core import inflight
from vmsnapbackup.core.journal import JournalDaemon, JournalDisk, JournalEntry
from vmsnapbackup.core.manifest import utc_now
from vmsnapbackup.core.pool import DomainStore, Pool
from vmsnapbackup.errors import ExitCode, HypervisorError, LockedError
from vmsnapbackup.workflows.backup import backup
from vmsnapbackup.workflows.repair import (
    CANCEL_JOB,
    CLEAR_INFLIGHT,
    CLEAR_JOURNAL,
    COMMIT,
    DELETE_OVERLAY,
    OFFLINE_COMMIT,
    REFUSE,
    REMOVE_FILE,
    REMOVE_GENERATION,
    STOP_DAEMON,
    needs_repair,
    repair,
)

pytestmark = pytest.mark.integration

MiB = 2**20
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def hv() -> Iterator[Hypervisor]:
    with connect() as hyp:
        yield hyp


@pytest.fixture
def pool_dir(tmp_path: Path) -> Path:
    Pool.create(tmp_path / "pool")
    return tmp_path / "pool"


class Leftovers:
    """Runtime state a test may leave if it fails half-way: removed at teardown."""

    def __init__(self) -> None:
        self.uuids: list[str] = []
        self.daemons: list[dict[str, Any]] = []
        self.procs: list[subprocess.Popen[str]] = []
        self.stores: list[DomainStore] = []

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
        for store in self.stores:  # a daemon a failed test never got to repair
            entry = store.journal.read()
            if entry is not None and entry.daemon is not None:
                self.daemons.append({"pid": entry.daemon.pid,
                                     "runtime_dir": entry.daemon.runtime_dir})
        for d in self.daemons:
            stop_leftover_daemon(d.get("pid"), d["runtime_dir"])
        for uuid in self.uuids:
            inflight.clear(uuid)


@pytest.fixture
def leftovers() -> Iterator[Leftovers]:
    lo = Leftovers()
    try:
        yield lo
    finally:
        lo.close()


def top_images(td: TestDomain, inactive: bool = False) -> dict[str, str]:
    xml = td.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0)
    return {d.target: d.source or "" for d in parse_disks(xml)}


def originals(td: TestDomain) -> dict[str, str]:
    return {t: str(p) for t, p in td.disks.items()}


def our_files(td: TestDomain) -> list[str]:
    return sorted(p.name for p in td.workdir.iterdir() if ".vmsnapbackup-" in p.name)


def wait_gone(pid: int) -> None:
    tenacity.Retrying(retry=tenacity.retry_if_result(bool), stop=tenacity.stop_after_delay(15),
                      wait=tenacity.wait_exponential(multiplier=0.01, max=0.2),
                      reraise=True)(lambda: _alive(pid))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False


# A backup that dies: takes the lock, writes the journal, registers its in-flight
# record, starts the storage daemon on the frozen images, starts a generation and
# its partial volumes, then waits to be SIGKILLed.
_DYING_BACKUP = textwrap.dedent("""
    import json, os, sys, time
    from vmsnapbackup.adapters.storagedaemon import StorageDaemon
    from vmsnapbackup.core import inflight
    from vmsnapbackup.core.journal import JournalDaemon, JournalEntry
    from vmsnapbackup.core.pool import Pool, partial_name
    a = json.loads(sys.argv[1])
    store = Pool.open(a["pool"]).domain(a["uuid"])
    store.lock("backup").acquire()
    n = store.allocate_point()
    g = store.allocate_generation(list(a["disks"]))
    entry = JournalEntry.from_dict(dict(a["journal"], pid=os.getpid(), point=n, generation=g,
                                        new_generation=True), "<test>")
    store.journal.write(entry)
    inflight.register(inflight.InflightRecord.now(a["uuid"], a["name"], "backup", a["pool"],
                                                  [d["frozen"] for d in a["disks"].values()]))
    qsd = StorageDaemon(tag="%s-%d" % (a["name"], n), handle_signals=False).start()
    store.journal.update(daemon=JournalDaemon(qsd.pid, qsd.runtime_dir))
    for t, d in a["disks"].items():
        qsd.export_image(d["frozen"], d["format"], name="src-" + t)
    files = [store.relpath(store.generation_dir(g))]
    for t in a["disks"]:
        files.append(store.relpath(store.base_volume_path(g, t, "qcow2")) + ".partial")
    store.journal.add_files(files)
    for rel in files[1:]:
        (store.path / rel).write_bytes(b"half a volume")
    (store.path / (".domain.json.tmp-%d-dead" % os.getpid())).write_bytes(b"{")
    print(json.dumps({"pid": qsd.pid, "runtime_dir": qsd.runtime_dir, "point": n,
                      "generation": g}), flush=True)
    time.sleep(3600)
""")


def start_dying_backup(lo: Leftovers, pool: Path, td: TestDomain,
                       disks: dict[str, dict[str, str]]) -> dict[str, Any]:
    entry = JournalEntry(
        operation="backup", pid=1, host=socket.gethostname(), started=utc_now(), step="read",
        disks={t: JournalDisk(source=d["frozen"], overlay=d["overlay"], frozen=d["frozen"])
               for t, d in disks.items()})
    args = {"pool": str(pool), "uuid": td.uuid, "name": td.name, "disks": disks,
            "journal": entry.to_dict()}
    lo.uuids.append(td.uuid)
    proc = subprocess.Popen([sys.executable, "-c", _DYING_BACKUP, json.dumps(args)],
                            stdout=subprocess.PIPE, text=True, cwd=str(REPO))
    lo.procs.append(proc)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, "the dying backup did not get ready"
    info = json.loads(line)
    lo.daemons.append(info)
    return info


def test_repair_after_a_killed_backup_of_a_running_domain(
        hv: Hypervisor, running_domain: TestDomain, pool_dir: Path, leftovers: Leftovers,
        capsys: pytest.CaptureFixture) -> None:
    td = running_domain
    dom = hv.find_domain(td.name)
    store = Pool.open(pool_dir).domain(td.uuid, td.name, create=True)
    td.write("vda", 0, 64 * 1024, 0x11)
    disks, _ = hv.backup_disks(dom)
    snap = hv.snapshot(dom, disks, lambda d: overlay_path(d, "p1-dead01"))
    # the guest goes on writing, into the overlays
    td.write("vda", 1 * MiB, 128 * 1024, 0xAA)
    td.write("vdb", 0, 4096, 0xBB)
    td.write("vdb", 32 * MiB, 12 * 1024, 0xCC)  # vdb's odd tail
    info = start_dying_backup(leftovers, pool_dir, td, {
        t: {"overlay": snap.overlays[t], "frozen": snap.frozen[t].path,
            "format": snap.frozen[t].format or "raw"} for t in snap.overlays})
    leftovers.procs[-1].send_signal(signal.SIGKILL)
    leftovers.procs[-1].wait(timeout=30)
    wait_gone(info["pid"])  # PDEATHSIG: the daemon died with its owner ...
    assert os.path.isdir(info["runtime_dir"])  # ... and left its runtime dir
    gen_dir = store.generation_dir(info["generation"])
    assert gen_dir.is_dir() and store.journal.exists()
    stale = inflight.read(td.uuid)
    assert stale is not None and not inflight.is_live(stale)

    reason = needs_repair(store, hv, dom)
    assert reason is not None and "left a journal" in reason and "p1-dead01" in reason

    before = (top_images(td), our_files(td), sorted(p.name for p in store.path.rglob("*")))
    dry = repair(pool_dir, domain=td.name, dry_run=True)
    assert dry.dry_run and not dry.nothing_to_do
    planned = [(a.action, a.target) for a in dry.actions]
    assert planned[0] == (STOP_DAEMON, info["runtime_dir"])
    assert (COMMIT, "vda") in planned and (COMMIT, "vdb") in planned
    assert (REMOVE_GENERATION, store.relpath(gen_dir)) in planned
    assert planned[-2:] == [(CLEAR_JOURNAL, "journal.json"), (CLEAR_INFLIGHT, td.uuid)]
    assert (top_images(td), our_files(td),
            sorted(p.name for p in store.path.rglob("*"))) == before
    assert os.path.isdir(info["runtime_dir"]) and inflight.read(td.uuid) == stale

    report = repair(pool_dir, domain=td.name)
    assert report.exit_code == ExitCode.OK
    done = [(a.action, a.target) for a in report.actions]
    assert done == planned
    assert all(a.detail.endswith("]") for a in report.actions)  # each says what happened
    assert top_images(td) == originals(td)
    assert top_images(td, inactive=True) == originals(td)
    assert all(find_disk(td.live_xml(), t).backing_chain == () for t in td.disks)
    assert our_files(td) == []
    assert not os.path.exists(info["runtime_dir"])
    assert not gen_dir.exists() and not store.journal.exists()
    assert not [p for p in store.path.iterdir() if p.name.startswith(".")]
    assert inflight.read(td.uuid) is None
    assert needs_repair(store, hv, dom) is None

    # idempotent: a second repair finds nothing, and says so (CLI, JSON)
    capsys.readouterr()
    assert main(["--pool", str(pool_dir), "repair", td.name, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["nothing_to_do"] is True and doc["actions"] == []
    assert main(["--pool", str(pool_dir), "repair", td.name]) == 0
    assert "nothing to repair" in capsys.readouterr().out

    td.shutoff()
    vda, vdb = td.read_image("vda"), td.read_image("vdb")
    assert vda[:64 * 1024] == b"\x11" * (64 * 1024)
    assert vda[MiB:MiB + 128 * 1024] == b"\xaa" * (128 * 1024)
    assert vdb[:4096] == b"\xbb" * 4096
    assert vdb[32 * MiB:] == b"\xcc" * (12 * 1024)


_KILLED_IN_READ = textwrap.dedent("""
    import json, sys, time
    from vmsnapbackup.workflows.backup import backup
    def stall(event):
        print("reading", flush=True)
        time.sleep(3600)
    backup(sys.argv[1], sys.argv[2], progress=stall)
""")


def test_repair_after_the_real_backup_was_killed_while_reading(
        hv: Hypervisor, running_domain: TestDomain, pool_dir: Path, leftovers: Leftovers) -> None:
    """The real workflow, SIGKILLed mid-read; repair, then a backup works again and the
    sealed point of before is untouched."""
    td = running_domain
    td.write("vda", 0, 64 * 1024, 0x21)
    first = backup(td.name, pool_dir)
    store = Pool.open(pool_dir).domain(td.uuid)
    sealed = {p: (store.path / p).stat().st_size for d in store.read_manifest(first.point).disks
              for p in (d.volume, d.base, d.table)}
    leftovers.uuids.append(td.uuid)
    leftovers.stores.append(store)
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_IN_READ, td.name, str(pool_dir)],
                            stdout=subprocess.PIPE, text=True, cwd=str(REPO))
    leftovers.procs.append(proc)
    assert proc.stdout is not None and proc.stdout.readline() == "reading\n"
    td.write("vda", 2 * MiB, 64 * 1024, 0x22)  # lands in the overlay
    entry = store.journal.read()
    assert entry is not None and entry.daemon is not None and entry.disks["vda"].overlay
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    wait_gone(entry.daemon.pid)
    dom = hv.find_domain(td.name)
    assert all(".vmsnapbackup-" in s for s in top_images(td).values())
    assert needs_repair(store, hv, dom) is not None

    report = repair(pool_dir, domain=td.uuid)
    kinds = [a.action for a in report.actions]
    assert kinds.count(COMMIT) == 2 and REMOVE_FILE in kinds and kinds[-1] == CLEAR_INFLIGHT
    assert top_images(td) == originals(td) and our_files(td) == []
    assert store.journal.read() is None and inflight.read(td.uuid) is None
    assert {p: (store.path / p).stat().st_size for p in sealed} == sealed
    assert [p.number for p in store.points()] == [first.point]
    assert not [lo for lo in store.leftovers()]
    assert repair(pool_dir, domain=td.name).nothing_to_do

    second = backup(td.name, pool_dir)  # no "run repair" any more
    assert second.point > first.point
    td.shutoff()
    assert td.read_image("vda")[2 * MiB:2 * MiB + 64 * 1024] == b"\x22" * (64 * 1024)


def test_offline_merge_of_a_domain_that_died_on_our_overlay(
        hv: Hypervisor, running_domain: TestDomain, pool_dir: Path) -> None:
    """Shut off during the backup: the definition names our overlay.  No journal, no part
    in the pool (as after a lost pool): the live XML is enough."""
    td = running_domain
    dom = hv.find_domain(td.name)
    td.write("vda", 0, 64 * 1024, 0x31)
    disks, _ = hv.backup_disks(dom)
    snap = hv.snapshot(dom, disks, lambda d: overlay_path(d, "p7-offln1"))
    td.write("vda", 3 * MiB, 64 * 1024, 0x32)
    td.write("vdb", 4096, 8192, 0x33)
    dom.virdomain.destroy()
    assert top_images(td, inactive=True) == snap.overlays  # libvirt kept the overlay
    metadata_before = dom.virdomain.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                                   "https://vmsnapbackup.invalid/integration-fixture", 0)

    dry = repair(pool_dir, domain=td.name, dry_run=True)
    assert [(a.action, a.target) for a in dry.actions] == [(OFFLINE_COMMIT, "vda"),
                                                           (OFFLINE_COMMIT, "vdb")]
    assert top_images(td, inactive=True) == snap.overlays

    report = repair(pool_dir, domain=td.name)
    assert [a.action for a in report.actions] == [OFFLINE_COMMIT, OFFLINE_COMMIT]
    assert top_images(td, inactive=True) == originals(td)
    xml_disks = {d.target: d for d in hv.disks(dom, inactive=True)}
    assert (xml_disks["vda"].format, xml_disks["vdb"].format) == ("qcow2", "raw")
    assert all(d.backing_chain == () for d in xml_disks.values())
    assert our_files(td) == []
    assert dom.virdomain.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                        "https://vmsnapbackup.invalid/integration-fixture", 0) == metadata_before
    assert repair(pool_dir, domain=td.name).nothing_to_do

    vda, vdb = td.read_image("vda"), td.read_image("vdb")
    assert vda[:64 * 1024] == b"\x31" * (64 * 1024)
    assert vda[3 * MiB:3 * MiB + 64 * 1024] == b"\x32" * (64 * 1024)
    assert vdb[4096:4096 + 8192] == b"\x33" * 8192
    td.start()
    assert top_images(td) == originals(td)
    td.write("vda", 5 * MiB, 4096, 0x34)  # the guest runs on the original image again
    td.shutoff()
    assert td.read_image("vda")[3 * MiB:3 * MiB + 64 * 1024] == b"\x32" * (64 * 1024)


def test_foreign_image_on_top_of_ours_is_refused_and_nothing_changes(
        hv: Hypervisor, make_domain: DomainFactory, pool_dir: Path, leftovers: Leftovers,
        capsys: pytest.CaptureFixture) -> None:
    td = make_domain(disks=[DiskSpec("vda", "qcow2", 16 * MiB)], start=True)
    dom = hv.find_domain(td.name)
    store = Pool.open(pool_dir).domain(td.uuid, td.name, create=True)
    disks, _ = hv.backup_disks(dom)
    snap = hv.snapshot(dom, disks, lambda d: overlay_path(d, "p2-under1"))
    store.journal.write(JournalEntry(
        operation="backup", pid=999999, host=socket.gethostname(), started=utc_now(),
        step="read", point=2, generation=1,
        disks={"vda": JournalDisk(source=str(td.disks["vda"]), overlay=snap.overlays["vda"],
                                  frozen=str(td.disks["vda"]))}))
    foreign = td.workdir / "vda.admin-snap.qcow2"
    subprocess.run(["virsh", "-q", "-c", "qemu:///system", "snapshot-create-as", td.name,
                    "--disk-only", "--no-metadata", "--diskspec", f"vda,file={foreign}"],
                   check=True, capture_output=True)
    assert top_images(td)["vda"] == str(foreign)
    live_before, files_before = td.live_xml(), our_files(td)

    capsys.readouterr()
    rc = main(["--pool", str(pool_dir), "repair", td.name])
    out = capsys.readouterr().out
    assert rc == ExitCode.REPAIR_NEEDED
    assert "refused, nothing changed" in out
    assert (f"top image {foreign} of vda is not a vmsnapbackup overlay; not touching it"
            in out)
    assert td.live_xml() == live_before and our_files(td) == files_before
    assert store.journal.exists() and foreign.exists()
    assert inflight.read(td.uuid) is None  # nothing was registered either
    report = repair(pool_dir, domain=td.name)
    assert [(a.action, a.target) for a in report.actions] == [(REFUSE, "vda")]


def test_live_daemon_is_stopped_before_the_commit_it_would_block(
        hv: Hypervisor, make_domain: DomainFactory, pool_dir: Path, leftovers: Leftovers) -> None:
    """A storage daemon still exporting the frozen image holds its lock: the commit only
    works because repair stops the daemon (by PID, checked against its runtime dir) first."""
    td = make_domain(disks=[DiskSpec("vda", "qcow2", 16 * MiB)], start=True)
    dom = hv.find_domain(td.name)
    store = Pool.open(pool_dir).domain(td.uuid, td.name, create=True)
    disks, _ = hv.backup_disks(dom)
    snap = hv.snapshot(dom, disks, lambda d: overlay_path(d, "p4-qsdup1"))
    td.write("vda", 0, 4096, 0x41)
    runtime_dir = Path(tempfile.mkdtemp(prefix=f"qsd-{td.name}-4-"))
    frozen = snap.frozen["vda"].path
    qsd = subprocess.Popen(
        ["qemu-storage-daemon",
         "--blockdev", f"driver=file,node-name=f0,filename={frozen},read-only=on",
         "--blockdev", "driver=qcow2,node-name=q0,file=f0,read-only=on",
         "--nbd-server", f"addr.type=unix,addr.path={runtime_dir}/nbd.sock",
         "--export", "type=nbd,id=e0,node-name=q0,name=src-vda",
         "--pidfile", f"{runtime_dir}/qsd.pid"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    leftovers.procs.append(qsd)  # type: ignore[arg-type]
    leftovers.daemons.append({"pid": qsd.pid, "runtime_dir": str(runtime_dir)})
    tenacity.Retrying(retry=tenacity.retry_if_result(lambda ok: not ok),
                      stop=tenacity.stop_after_delay(15),
                      wait=tenacity.wait_exponential(multiplier=0.01, max=0.2))(
        lambda: (runtime_dir / "nbd.sock").exists())
    with pytest.raises(HypervisorError, match="lock"):
        hv.commit(dom, "vda", snap.overlays["vda"], timeout=30)  # the daemon's lock blocks it
    store.journal.write(JournalEntry(
        operation="backup", pid=999999, host=socket.gethostname(), started=utc_now(),
        step="read", point=4, daemon=JournalDaemon(qsd.pid, str(runtime_dir)),
        disks={"vda": JournalDisk(source=frozen, overlay=snap.overlays["vda"], frozen=frozen)}))

    report = repair(pool_dir, domain=td.name)
    assert [a.action for a in report.actions] == [STOP_DAEMON, COMMIT, CLEAR_JOURNAL]
    assert "[stopped]" in report.actions[0].detail
    qsd.wait(timeout=15)
    assert not runtime_dir.exists()
    assert top_images(td) == originals(td) and our_files(td) == []
    td.shutoff()
    assert td.read_image("vda")[:4096] == b"\x41" * 4096


def job_ready(info: dict[str, int]) -> bool:
    """A block job libvirt reports as ready to pivot (cur == end)."""
    return bool(info) and info["cur"] == info["end"]


def test_commit_job_left_ready_is_cancelled_and_redone(
        hv: Hypervisor, make_domain: DomainFactory, pool_dir: Path) -> None:
    td = make_domain(disks=[DiskSpec("vda", "qcow2", 16 * MiB)], start=True)
    dom = hv.find_domain(td.name)
    disks, _ = hv.backup_disks(dom)
    hv.snapshot(dom, disks, lambda d: overlay_path(d, "p5-job001"))
    td.write("vda", 1 * MiB, 64 * 1024, 0x51)
    dom.virdomain.blockCommit("vda", None, None, 0, libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE
                    | libvirt.VIR_DOMAIN_BLOCK_COMMIT_SHALLOW)
    tenacity.Retrying(retry=tenacity.retry_if_result(lambda ok: not ok),
                      stop=tenacity.stop_after_delay(30),
                      wait=tenacity.wait_exponential(multiplier=0.01, max=0.2))(
        lambda: job_ready(dom.virdomain.blockJobInfo("vda", 0)))

    report = repair(pool_dir, domain=td.name)
    assert [a.action for a in report.actions] == [CANCEL_JOB, COMMIT]
    assert dom.virdomain.blockJobInfo("vda", 0) == {}
    assert top_images(td) == originals(td) and our_files(td) == []
    td.shutoff()
    assert td.read_image("vda")[MiB:MiB + 64 * 1024] == b"\x51" * (64 * 1024)


def test_repair_refuses_while_a_live_process_holds_the_lock(
        hv: Hypervisor, make_domain: DomainFactory, pool_dir: Path) -> None:
    td = make_domain(disks=[DiskSpec("vda", "qcow2", 16 * MiB)], start=False)
    store = Pool.open(pool_dir).domain(td.uuid, td.name, create=True)
    with store.lock("backup"):
        with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
            repair(pool_dir, domain=td.name)
        with pytest.raises(LockedError):
            repair(pool_dir, domain=td.name, dry_run=True)


def test_all_finds_domains_by_journal_and_by_overlay(
        hv: Hypervisor, make_domain: DomainFactory, pool_dir: Path) -> None:
    on_overlay = make_domain(disks=[DiskSpec("vda", "qcow2", 16 * MiB)], start=True)
    with_journal = make_domain(disks=[DiskSpec("vda", "qcow2", 16 * MiB)], start=False)
    clean = make_domain(disks=[DiskSpec("vda", "qcow2", 16 * MiB)], start=False)
    dom = hv.find_domain(on_overlay.name)
    disks, _ = hv.backup_disks(dom)
    hv.snapshot(dom, disks, lambda d: overlay_path(d, "p9-all001"))
    store = Pool.open(pool_dir).domain(with_journal.uuid, with_journal.name, create=True)
    store.journal.write(JournalEntry(
        operation="backup", pid=999999, host=socket.gethostname(), started=utc_now(),
        step="start", point=1, disks={"vda": JournalDisk(source=str(with_journal.disks["vda"]))}))
    Pool.open(pool_dir).domain(clean.uuid, clean.name, create=True)

    # a dry run only: --all also sees domains of other test runs on this libvirtd
    report = repair(pool_dir, all_domains=True, dry_run=True)
    by_name = {d.domain: d for d in report.domains}
    assert [a.action for a in by_name[on_overlay.name].actions] == [COMMIT]
    assert [a.action for a in by_name[with_journal.name].actions] == [CLEAR_JOURNAL]
    assert clean.name not in by_name
    assert store.journal.exists() and ".vmsnapbackup-" in top_images(on_overlay)["vda"]


def test_unused_overlay_is_deleted_unless_another_domain_uses_it(
        hv: Hypervisor, make_domain: DomainFactory, pool_dir: Path) -> None:
    """The snapshot died after creating the overlay: nobody runs on it, so it goes; but
    not while any domain's definition names it."""
    td = make_domain(disks=[DiskSpec("vda", "qcow2", 16 * MiB)], start=False)
    store = Pool.open(pool_dir).domain(td.uuid, td.name, create=True)
    ovl = td.workdir / "vda.vmsnapbackup-p6-unused1.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(td.disks["vda"]),
                    "-F", "qcow2", str(ovl)], check=True)
    store.journal.write(JournalEntry(
        operation="backup", pid=999999, host=socket.gethostname(), started=utc_now(),
        step="snapshot", point=6,
        disks={"vda": JournalDisk(source=str(td.disks["vda"]), overlay=str(ovl),
                                  frozen=str(td.disks["vda"]))}))
    other = make_domain(disks=[DiskSpec("vda", "qcow2", 16 * MiB)], start=False)
    own_xml = other.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    hv.conn.defineXML(own_xml.replace(str(other.disks["vda"]), str(ovl)))
    try:
        report = repair(pool_dir, domain=td.name)
        assert [(a.action, a.target) for a in report.actions] == [(REFUSE, str(ovl))]
        assert other.name in report.actions[0].detail
        assert ovl.exists() and store.journal.exists()
    finally:
        hv.conn.defineXML(own_xml)
    report = repair(pool_dir, domain=td.name)
    assert [(a.action, a.target) for a in report.actions] == [(DELETE_OVERLAY, str(ovl)),
                                                              (CLEAR_JOURNAL, "journal.json")]
    assert not ovl.exists() and not store.journal.exists()
    assert repair(pool_dir, domain=td.name).nothing_to_do
