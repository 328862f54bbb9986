"""Repair planning without libvirt: facts in, actions out (and the pool half on real files)."""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from vmsnapbackup.adapters.domainxml import Disk, ImageRef, parse_disks
from vmsnapbackup.adapters.offline import disk_back_on_image
from vmsnapbackup.core import manifest as mf
from vmsnapbackup.core.journal import JournalDaemon, JournalDisk, JournalEntry
from vmsnapbackup.core.pool import DomainStore, Leftover, Pool
from vmsnapbackup.errors import ExitCode, RepairNeededError, UsageError
from vmsnapbackup.workflows import repairexec, repairfacts
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
    SKIP,
    STOP_DAEMON,
    DomainFacts,
    DomainRepair,
    PoolFacts,
    RepairAction,
    RepairReport,
    plan,
    plan_pool,
)

HOST = "hostA"
UUID = "3f2a4b6c-1d2e-4f30-8a9b-0c1d2e3f4a5b"
IMG = "/img/web1.qcow2"
OVL = "/img/web1.vmsnapbackup-p3-abc123.qcow2"
RAW = "/img/data.img"
OVL_B = "/img/data.vmsnapbackup-p3-abc123.qcow2"
FOREIGN = "/img/web1.mysnap.qcow2"
RUNDIR = "/run/vmsnapbackup/qsd-web1-3-abcdefgh"
D = "ab" * 16


def disk(target: str, source: str, fmt: str = "qcow2",
         chain: Sequence[tuple[str, str]] = ()) -> Disk:
    return Disk(target=target, device="disk", type="file", source=source, format=fmt,
                backing_chain=tuple(ImageRef(p, f) for p, f in chain))


def journal(step: str = "read", disks: dict[str, JournalDisk] | None = None,
            daemon: JournalDaemon | None = None, files: Sequence[str] = (),
            host: str = HOST, point: int = 3, generation: int | None = 1) -> JournalEntry:
    if disks is None:
        disks = {"vda": JournalDisk(source=IMG, overlay=OVL, frozen=IMG)}
    return JournalEntry(operation="backup", pid=4242, host=host,
                        started="2026-11-25T13:00:00.000Z", step=step, point=point,
                        generation=generation, disks=disks, daemon=daemon, files=tuple(files))


def facts(**kw) -> DomainFacts:  # type: ignore[no-untyped-def]
    base = {"name": "web1", "uuid": UUID, "host": HOST, "defined": True, "active": True}
    base.update(kw)
    return DomainFacts(**base)  # type: ignore[arg-type]


def kinds(actions: list[RepairAction]) -> list[tuple[str, str]]:
    return [(a.action, a.target) for a in actions]


# --- the hypervisor side -------------------------------------------------------------------

def test_killed_backup_of_running_domain_full_plan_in_order() -> None:
    """Daemon first (the commit needs the frozen image's lock), journal last."""
    entry = journal(daemon=JournalDaemon(5678, RUNDIR),
                    files=["generations/000001/vda/point-000003.qcow2.partial"])
    pool = PoolFacts(
        leftovers=(Leftover(Path(".domain.json.tmp-1-ab"), "temp", "temp file"),),
        journal_files=frozenset(["generations/000001/vda/point-000003.qcow2.partial"]),
        sealed_generations=frozenset([1]))
    f = facts(journal=entry, disks=(disk("vda", OVL, chain=[(IMG, "qcow2")]),),
              existing=frozenset([OVL, IMG, RUNDIR]), daemon_alive=False, pool=pool,
              stale_inflight="stale in-flight record: backup by dead pid 4242")
    actions = plan(f)
    assert kinds(actions) == [
        (STOP_DAEMON, RUNDIR),
        (COMMIT, "vda"),
        (REMOVE_FILE, ".domain.json.tmp-1-ab"),
        (REMOVE_FILE, "generations/000001/vda/point-000003.qcow2.partial"),
        (CLEAR_JOURNAL, "journal.json"),
        (CLEAR_INFLIGHT, UUID),
    ]
    commit = actions[1]
    assert commit.path == OVL and commit.image == ImageRef(IMG, "qcow2") and commit.disk == "vda"
    assert actions[0].pid == 5678 and actions[0].path == RUNDIR
    assert "pid 5678" in actions[0].line()
    assert all(a.changes for a in actions)


def test_daemon_gone_and_runtime_dir_gone_is_not_an_action() -> None:
    f = facts(journal=journal(daemon=JournalDaemon(5678, RUNDIR), disks={}), existing=frozenset())
    assert kinds(plan(f)) == [(CLEAR_JOURNAL, "journal.json")]
    alive = plan(facts(journal=journal(daemon=JournalDaemon(5678, RUNDIR), disks={}),
                       daemon_alive=True))
    assert kinds(alive)[0] == (STOP_DAEMON, RUNDIR)


def test_overlays_found_from_the_live_xml_without_a_journal() -> None:
    """The pool (and its journal) may be lost: the marker in the live XML is enough."""
    f = facts(disks=(disk("vda", OVL, chain=[(IMG, "qcow2")]),
                     disk("vdb", OVL_B, chain=[(RAW, "raw")]),
                     disk("vdc", "/img/other.qcow2")))
    actions = plan(f)
    assert kinds(actions) == [(COMMIT, "vda"), (COMMIT, "vdb")]
    assert actions[1].image == ImageRef(RAW, "raw")


def test_nothing_left_means_an_empty_plan() -> None:
    assert plan(facts(disks=(disk("vda", IMG),))) == []
    assert plan(facts(disks=(disk("vda", IMG),), pool=PoolFacts())) == []


def test_commit_job_left_running_is_cancelled_then_redone() -> None:
    f = facts(disks=(disk("vda", OVL, chain=[(IMG, "qcow2")]),), jobs={"vda": "active-commit"})
    assert kinds(plan(f)) == [(CANCEL_JOB, "vda"), (COMMIT, "vda")]


def test_someone_elses_block_job_is_refused() -> None:
    f = facts(disks=(disk("vda", OVL, chain=[(IMG, "qcow2")]),), jobs={"vda": "copy"})
    actions = plan(f)
    assert kinds(actions) == [(REFUSE, "vda")]
    assert "copy block job" in actions[0].detail


def test_foreign_top_over_our_overlay_is_refused_and_explained() -> None:
    f = facts(journal=journal(),
              disks=(disk("vda", FOREIGN, chain=[(OVL, "qcow2"), (IMG, "qcow2")]),),
              existing=frozenset([OVL, IMG, FOREIGN]))
    actions = plan(f)
    refused = [a for a in actions if a.action == REFUSE]
    assert [a.target for a in refused] == ["vda"]
    assert refused[0].detail.startswith(
        f"top image {FOREIGN} of vda is not a vmsnapbackup overlay; not touching it")
    assert OVL in refused[0].detail
    # nothing deletes our overlay: it is in the chain
    assert DELETE_OVERLAY not in [a.action for a in actions]


def test_foreign_top_without_ours_is_only_noted() -> None:
    """The journal planned an overlay that never came; someone else snapshotted since."""
    f = facts(journal=journal(), disks=(disk("vda", FOREIGN, chain=[(IMG, "qcow2")]),),
              existing=frozenset([IMG, FOREIGN]))
    actions = plan(f)
    assert kinds(actions) == [(SKIP, "vda"), (CLEAR_JOURNAL, "journal.json")]
    assert "is not a vmsnapbackup overlay; not touching it" in actions[0].detail


def test_back_on_original_is_silent() -> None:
    f = facts(journal=journal(), disks=(disk("vda", IMG),), existing=frozenset([IMG]))
    assert kinds(plan(f)) == [(CLEAR_JOURNAL, "journal.json")]


def test_unused_overlay_of_the_journal_is_deleted_only_if_nobody_uses_it() -> None:
    f = facts(journal=journal(), disks=(disk("vda", IMG),), existing=frozenset([IMG, OVL]))
    actions = plan(f)
    assert kinds(actions) == [(DELETE_OVERLAY, OVL), (CLEAR_JOURNAL, "journal.json")]
    used = plan(facts(journal=journal(), disks=(disk("vda", IMG),),
                      existing=frozenset([IMG, OVL]), users={OVL: ("other-vm",)}))
    assert kinds(used)[0] == (REFUSE, OVL) and "other-vm" in used[0].detail
    # a "recorded overlay" without our marker (a damaged journal) is never deleted
    odd = journal(disks={"vda": JournalDisk(source=IMG, overlay="/img/precious.qcow2",
                                            frozen=IMG)})
    refused = plan(facts(journal=odd, disks=(disk("vda", IMG),),
                         existing=frozenset([IMG, "/img/precious.qcow2"])))
    assert kinds(refused)[0] == (REFUSE, "/img/precious.qcow2")


def test_stale_overlay_below_a_fresh_commit_also_goes() -> None:
    """Running on another overlay of ours than the journal's: commit it; the journal's one,
    unused, is deleted."""
    other = "/img/web1.vmsnapbackup-p2-fff000.qcow2"
    f = facts(journal=journal(), disks=(disk("vda", other, chain=[(IMG, "qcow2")]),),
              existing=frozenset([IMG, OVL, other]))
    assert kinds(plan(f)) == [(COMMIT, "vda"), (DELETE_OVERLAY, OVL),
                              (CLEAR_JOURNAL, "journal.json")]


def test_shut_off_domain_on_our_overlay_is_merged_offline() -> None:
    f = facts(active=False, journal=journal(),
              disks=(disk("vda", OVL, chain=[(IMG, "qcow2")]),),
              existing=frozenset([IMG, OVL]), backing={OVL: ImageRef(IMG, "qcow2")})
    actions = plan(f)
    assert kinds(actions) == [(OFFLINE_COMMIT, "vda"), (CLEAR_JOURNAL, "journal.json")]
    assert actions[0].image == ImageRef(IMG, "qcow2") and actions[0].path == OVL


@pytest.mark.parametrize("backing,existing,why", [
    (None, {IMG, OVL}, "records no backing image"),
    (ImageRef(IMG, None), {IMG, OVL}, "does not record the format"),
    (ImageRef("/img/elsewhere.qcow2", "qcow2"), {IMG, OVL, "/img/elsewhere.qcow2"},
     "not by the frozen image"),
    (ImageRef(IMG, "qcow2"), {OVL}, "is missing"),
    (ImageRef(IMG, "qcow2"), {IMG}, "which does not exist"),
])
def test_offline_merge_refusals(backing: ImageRef | None, existing: set, why: str) -> None:
    f = facts(active=False, journal=journal(), disks=(disk("vda", OVL),),
              existing=frozenset(existing), backing={OVL: backing})
    actions = plan(f)
    assert [a.action for a in actions if a.action == REFUSE] == [REFUSE]
    assert why in next(a for a in actions if a.action == REFUSE).detail


def test_running_domain_whose_definition_still_names_our_overlay_is_refused() -> None:
    f = facts(disks=(disk("vda", IMG),), config=(disk("vda", OVL),),
              existing=frozenset([IMG, OVL]))
    actions = plan(f)
    assert kinds(actions) == [(REFUSE, "vda")]
    assert "definition" in actions[0].detail
    # on the same overlay in both: the live commit (with pivot) fixes both
    same = facts(disks=(disk("vda", OVL, chain=[(IMG, "qcow2")]),),
                 config=(disk("vda", OVL, chain=[(IMG, "qcow2")]),))
    assert kinds(plan(same)) == [(COMMIT, "vda")]


def test_undefined_domain_keeps_its_overlay() -> None:
    f = facts(defined=False, active=False, journal=journal(), existing=frozenset([OVL, IMG]))
    actions = plan(f)
    assert kinds(actions)[0] == (REFUSE, OVL)
    assert "not defined" in actions[0].detail
    gone = facts(defined=False, active=False, journal=journal(), existing=frozenset([IMG]))
    assert kinds(plan(gone)) == [(CLEAR_JOURNAL, "journal.json")]


def test_runtime_dir_that_is_not_ours_is_refused() -> None:
    actions = plan(facts(journal=journal(daemon=JournalDaemon(5, "/var/lib/libvirt")),
                         daemon_alive=True))
    assert kinds(actions) == [(REFUSE, "/var/lib/libvirt")]


def test_journal_of_another_host_or_unreadable_is_refused() -> None:
    other = plan(facts(journal=journal(host="hostB", daemon=JournalDaemon(5, RUNDIR)),
                       daemon_alive=True, disks=(disk("vda", OVL, chain=[(IMG, "qcow2")]),)))
    assert kinds(other) == [(REFUSE, "journal.json")] and "hostB" in other[0].detail
    bad = plan(facts(journal_error="journal.json: bad checksum"))
    assert kinds(bad) == [(REFUSE, "journal.json")] and "bad checksum" in bad[0].detail


# --- the pool side -------------------------------------------------------------------------

P3 = "generations/000001/vda/point-000003.qcow2"
DIFF3 = "generations/000001/vda/diff-000003.vsbd"
BASE1 = "generations/000001/vda/base.qcow2"
TABLE1 = "generations/000001/vda/table-000001.vsbt"


def test_pool_plan_never_removes_what_a_sealed_point_needs() -> None:
    entry = journal(files=[P3 + ".partial", DIFF3, "points/000003.json", BASE1, TABLE1,
                           "generations/000001/vda/point-000002.qcow2", "elsewhere/file"])
    pool = PoolFacts(
        journal_files=frozenset(entry.files),
        referenced=frozenset([BASE1, TABLE1]),
        manifest_points=frozenset([1]), sealed_generations=frozenset([1]))
    actions = plan_pool(entry, pool)
    removed = sorted(a.target for a in actions if a.action == REMOVE_FILE)
    assert removed == [DIFF3, P3 + ".partial"]
    skipped = {a.target for a in actions if a.action == SKIP}
    assert skipped == {"points/000003.json", BASE1, TABLE1,
                       "generations/000001/vda/point-000002.qcow2", "elsewhere/file"}


def test_pool_plan_keeps_the_files_of_a_point_sealed_before_the_crash() -> None:
    entry = journal(files=[P3 + ".partial", DIFF3, "points/000003.json"])
    pool = PoolFacts(journal_files=frozenset([DIFF3, "points/000003.json"]),
                     referenced=frozenset([P3, DIFF3, BASE1, TABLE1]),
                     manifest_points=frozenset([1, 3]), sealed_generations=frozenset([1]))
    assert [a.action for a in plan_pool(entry, pool)] == [SKIP, SKIP]


def test_pool_plan_removes_an_unsealed_new_generation_whole() -> None:
    entry = journal(generation=2, files=["generations/000002",
                                         "generations/000002/vda/base.qcow2.partial",
                                         "generations/000002/vda/table-000003.vsbt"])
    pool = PoolFacts(
        leftovers=(Leftover(Path("generations/000002"), "generation", "no sealed point"),
                   Leftover(Path("generations/000001/vda/.x.tmp-1-aa"), "temp", "temp")),
        journal_files=frozenset(entry.files), directories=frozenset(["generations/000002"]),
        referenced=frozenset([BASE1, TABLE1]), manifest_points=frozenset([1]),
        sealed_generations=frozenset([1]))
    actions = plan_pool(entry, pool)
    assert kinds(actions) == [(REMOVE_FILE, "generations/000001/vda/.x.tmp-1-aa"),
                              (REMOVE_GENERATION, "generations/000002")]


def test_pool_plan_with_damaged_manifests_only_removes_what_cannot_be_referenced() -> None:
    entry = journal(generation=2, point=3,
                    files=["generations/000002", "generations/000002/vda/base.qcow2",
                           "generations/000002/vda/base.qcow2.partial",
                           "generations/000002/vda/table-000003.vsbt"])
    pool = PoolFacts(journal_files=frozenset(entry.files),
                     directories=frozenset(["generations/000002"]),
                     manifest_points=frozenset([1, 2]), sealed_generations=None)
    actions = plan_pool(entry, pool)
    assert sorted(a.target for a in actions if a.action == REMOVE_FILE) == [
        "generations/000002/vda/base.qcow2.partial", "generations/000002/vda/table-000003.vsbt"]
    assert {a.target for a in actions if a.action == SKIP} == {
        "generations/000002", "generations/000002/vda/base.qcow2"}


def test_leftover_that_a_manifest_names_is_never_planned() -> None:
    pool = PoolFacts(leftovers=(Leftover(Path(P3), "orphan", "point 3 has no manifest"),),
                     referenced=frozenset([P3]))
    assert plan_pool(None, pool) == []


# --- reports -------------------------------------------------------------------------------

def test_report_lines_json_and_exit_codes() -> None:
    done = DomainRepair("web1", UUID, [RepairAction(COMMIT, "vda", "commit x [done]")])
    idle = DomainRepair("db", "u2")
    refused = DomainRepair("old", "u3", [RepairAction(REFUSE, "vda", "top image ...")])
    r = RepairReport("/pool", False, [done, idle])
    assert r.exit_code == ExitCode.OK and not r.nothing_to_do
    assert r.lines() == [f"domain web1 ({UUID}): repaired:", "  commit vda: commit x [done]",
                         "domain db (u2): nothing to repair"]
    doc = json.loads(json.dumps(r.to_dict()))
    assert doc["actions"] == [{"action": "commit", "target": "vda", "detail": "commit x [done]",
                               "domain": "web1"}]
    assert doc["domains"][1]["nothing_to_do"] is True
    assert RepairReport("/pool", False, [done, refused]).exit_code == ExitCode.REPAIR_NEEDED
    assert "refused, nothing changed" in RepairReport("/p", False, [refused]).lines()[0]
    failed = DomainRepair("x", "u4", error="locked", error_code=ExitCode.LOCKED)
    assert RepairReport("/pool", False, [refused, failed]).exit_code == ExitCode.LOCKED
    assert RepairReport("/pool", True, []).lines() == ["nothing to repair"]
    assert RepairReport("/pool", True, [done]).lines()[-1] == "(dry run: nothing was changed)"
    assert RepairReport("/pool", True, [done]).lines()[0].endswith("would do:")


def test_only_notes_is_nothing_to_do() -> None:
    d = DomainRepair("web1", UUID, [RepairAction(SKIP, "vda", "not touching it")])
    assert d.nothing_to_do and d.lines()[0].endswith("nothing to repair")


# --- the pool half on real files, built with the core API -------------------------------------

def put(p: Path, data: bytes = b"x") -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def sealed_first_point(store: DomainStore) -> int:
    with store.lock("backup"):
        n = store.allocate_point()
        g = store.allocate_generation(["vda"])
        put(store.base_volume_path(g, "vda", "qcow2"))
        put(store.table_path(g, "vda", n))
        store.write_generation(mf.GenerationRecord(
            generation=g, first_point=n, created=mf.utc_now(), block_size=65536,
            disks={"vda": mf.GenerationDisk(1 << 20, "qcow2", "base.qcow2",
                                            f"table-{n:06d}.vsbt", D)}))
        base = store.relpath(store.base_volume_path(g, "vda", "qcow2"))
        store.write_manifest(mf.PointManifest(
            point=n, generation=g, domain=mf.DomainInfo(name="web1", uuid=store.uuid,
                                                         xml="<domain/>"),
            started=mf.utc_now(), snapshot_at=mf.utc_now(), finished=mf.utc_now(),
            consistency="crash-consistent",
            disks=(mf.PointDisk(
                target="vda", source=IMG, format="qcow2", virtual_size=1 << 20,
                block_size=65536, volume=base, volume_format="qcow2", base=base,
                base_format="qcow2", table=store.relpath(store.table_path(g, "vda", n)),
                table1_digest=D, difference=None, difference_digest=None, table_digest=D,
                blocks=mf.BlockCounts(16, 16, 0, 1, 0), bytes_written=65536),)))
    return n


def test_pool_facts_and_removal_on_a_real_pool(tmp_path: Path) -> None:
    """A sealed point 1, then a backup killed while writing point 2 into a new generation
    and a point volume of generation 1: repair's plan removes exactly the dead one's files."""
    pool = Pool.create(tmp_path / "pool")
    store = pool.domain(UUID, "web1", create=True)
    sealed_first_point(store)
    keep = {p for p in tmp_path.rglob("*")}
    with store.lock("backup"):
        n = store.allocate_point()
        g = store.allocate_generation(["vda"])
        gdir = store.relpath(store.generation_dir(g))
        partial = store.relpath(store.base_volume_path(g, "vda", "qcow2")) + ".partial"
        entry = journal(point=n, generation=g, files=[gdir, partial, "points/000002.json"],
                        disks={})
        store.journal.write(entry)
        put(store.path / partial)
        put(store.point_volume_path(1, "vda", n))            # an orphan of the dead point
        put(store.generation_dir(1) / "vda" / ".base.qcow2.tmp-9-aa")  # a temp file
        put(store.generation_dir(g) / "vda" / "notes.txt")   # a stranger's file
    f = repairfacts._pool_facts(store, entry)
    assert f.sealed_generations == frozenset([1])
    assert f.journal_files == frozenset([gdir, partial]) and f.directories == frozenset([gdir])
    actions = plan_pool(entry, f)
    assert kinds(actions) == [
        (REMOVE_FILE, "generations/000001/vda/.base.qcow2.tmp-9-aa"),
        (REMOVE_FILE, "generations/000001/vda/point-000002.qcow2"),
        (REMOVE_GENERATION, gdir),
    ]
    with store.lock("repair"):
        done = [repairexec.execute(None, None, store, a) for a in actions]  # type: ignore[arg-type]
    assert "kept foreign files" in done[-1].detail and "notes.txt" in done[-1].detail
    left = {p for p in tmp_path.rglob("*")}
    # everything of the sealed point is there; of the dead one only the stranger's file
    assert keep <= left
    assert left - keep == {store.generation_dir(g), store.generation_dir(g) / "vda",
                           store.generation_dir(g) / "vda" / "notes.txt",
                           store.journal_path}
    assert [p.number for p in store.points()] == [1]


def test_remove_tree_of_ours_removes_only_pool_names(tmp_path: Path) -> None:
    g = tmp_path / "000004"
    for name in ("generation.json", "vda/base.raw", "vda/base.qcow2.partial",
                 "vda/table-000007.vsbt", "vda/.x.tmp-1-aa", "vdb/diff-000008.vsbd"):
        put(g / name)
    assert repairexec.remove_tree_of_ours(g) == []
    assert not g.exists()
    put(g / "vda" / "base.raw")
    put(g / "vda" / "mine.iso")
    assert repairexec.remove_tree_of_ours(g) == [str(g / "vda" / "mine.iso")]
    assert sorted(p.name for p in g.rglob("*")) == ["mine.iso", "vda"]


# --- the offline redefine (pure XML) -----------------------------------------------------------

DOMAIN_XML = f"""<domain type='kvm'>
  <name>web1</name>
  <metadata><app:info xmlns:app="https://example.invalid/app" owner="ops"/></metadata>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='{OVL}'><seclabel model='dac' relabel='no'/></source>
      <backingStore type='file'><format type='raw'/><source file='{RAW}'/></backingStore>
      <target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/img/other.qcow2'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
  </devices>
</domain>"""


def test_disk_back_on_image_changes_only_that_disk() -> None:
    out = disk_back_on_image(DOMAIN_XML, "vda", OVL, ImageRef(RAW, "raw"))
    disks = {d.target: d for d in parse_disks(out)}
    assert disks["vda"].source == RAW and disks["vda"].format == "raw"
    assert disks["vda"].backing_chain == ()
    assert disks["vdb"] == parse_disks(DOMAIN_XML)[1]
    assert "cache=\"none\"" in out and "seclabel" in out and "slot=\"0x02\"" in out
    assert "app:info" in out and "https://example.invalid/app" in out  # prefix kept
    block = disk_back_on_image(DOMAIN_XML, "vda", OVL, ImageRef("/dev/vg/web1", "raw"),
                               block_device=True)
    d = parse_disks(block)[0]
    assert (d.type, d.source) == ("block", "/dev/vg/web1")


def test_disk_back_on_image_refuses_what_is_not_our_overlay_on_top() -> None:
    with pytest.raises(RepairNeededError, match="not on our overlay"):
        disk_back_on_image(DOMAIN_XML, "vdb", "/img/other.vmsnapbackup-x.qcow2",
                           ImageRef(RAW, "raw"))
    with pytest.raises(UsageError, match="not a vmsnapbackup overlay"):
        disk_back_on_image(DOMAIN_XML, "vdb", "/img/other.qcow2", ImageRef(RAW, "raw"))
    with pytest.raises(RepairNeededError, match="not in the domain"):
        disk_back_on_image(DOMAIN_XML, "vdz", OVL, ImageRef(RAW, "raw"))


# --- checkpoints (dirty bitmaps) ----------------------------------------------------------

CP_OLD, CP_NEW = "vmsnapbackup-p1-00aa00aa", "vmsnapbackup-p3-11bb11bb"


def test_offline_merge_deletes_every_checkpoint_of_ours_first() -> None:
    """qemu-img commit does not carry dirty bitmaps: none of ours may be trusted after it."""
    from vmsnapbackup.workflows.repair import DELETE_CHECKPOINT
    f = facts(active=False, journal=journal(),
              disks=(disk("vda", OVL, chain=[(IMG, "qcow2")]),),
              existing=frozenset([IMG, OVL]), backing={OVL: ImageRef(IMG, "qcow2")},
              checkpoints=(CP_OLD, CP_NEW), pool=PoolFacts(
                  generation_checkpoints=frozenset([CP_OLD])))
    assert kinds(plan(f)) == [(DELETE_CHECKPOINT, CP_OLD), (DELETE_CHECKPOINT, CP_NEW),
                              (OFFLINE_COMMIT, "vda"), (CLEAR_JOURNAL, "journal.json")]


def test_checkpoint_of_an_unsealed_generation_is_deleted_and_a_sealed_one_kept() -> None:
    from vmsnapbackup.workflows.repair import DELETE_CHECKPOINT
    entry = dataclasses.replace(journal(), checkpoint=CP_NEW)
    base = {"journal": entry, "disks": (disk("vda", OVL, chain=[(IMG, "qcow2")]),),
                "existing": frozenset([IMG, OVL]), "checkpoints": (CP_OLD, CP_NEW)}
    unsealed = facts(pool=PoolFacts(generation_checkpoints=frozenset([CP_OLD])), **base)
    assert kinds(plan(unsealed)) == [(COMMIT, "vda"), (DELETE_CHECKPOINT, CP_NEW),
                                     (CLEAR_JOURNAL, "journal.json")]
    sealed = facts(pool=PoolFacts(generation_checkpoints=frozenset([CP_NEW])), **base)
    assert kinds(plan(sealed)) == [(COMMIT, "vda"), (CLEAR_JOURNAL, "journal.json")]
    gone = facts(pool=PoolFacts(), **{**base, "checkpoints": (CP_OLD,)})
    assert kinds(plan(gone)) == [(COMMIT, "vda"), (CLEAR_JOURNAL, "journal.json")]
