"""Repair looks again when the domain moves under it (an injected race).

A backup SIGKILLed during libvirt's snapshot call leaves that call running in
libvirtd: the domain goes onto its overlay just after repair looked.  The real
daemon cannot be made to lose that race on cue, so the facts and the execution
are injected here; the soak (integration/soak.py) meets it for real.
"""
from __future__ import annotations

from typing import Any

import pytest

from vmsnapbackup.adapters.domainxml import Disk, ImageRef
from vmsnapbackup.core.journal import JournalDisk, JournalEntry
from vmsnapbackup.errors import RepairNeededError
from vmsnapbackup.workflows import repairdomain as repair_mod
from vmsnapbackup.workflows.repairfacts import DomainFacts
from vmsnapbackup.workflows.repairplan import DELETE_OVERLAY, RepairAction, plan


def _wire(monkeypatch: pytest.MonkeyPatch, outcomes: list[Any]) -> list[str]:
    looks: list[str] = []

    def gather(*_a: Any, **_k: Any) -> str:
        looks.append("look")
        return f"facts-{len(looks)}"

    def plan(facts: str) -> list[RepairAction]:
        return [RepairAction(DELETE_OVERLAY, "vda.ov", f"delete ({facts})", disk="vda",
                             path="/x/vda.vmsnapbackup-p1-aaaaaa.qcow2")]

    def carry_out(*_a: Any, **_k: Any) -> list[RepairAction]:
        outcome = outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return list(outcome)

    monkeypatch.setattr(repair_mod, "gather", gather)
    monkeypatch.setattr(repair_mod, "plan", plan)
    monkeypatch.setattr(repair_mod, "carry_out", carry_out)
    return looks


def test_a_domain_that_moved_is_looked_at_again(monkeypatch: pytest.MonkeyPatch) -> None:
    done = RepairAction(DELETE_OVERLAY, "vda.ov", "commit and pivot [done]")
    looks = _wire(monkeypatch, [RepairNeededError("overlay is in use by domain d"), [done]])
    result = repair_mod.repair_domain(object(), object(), None, "/pool", "d", "u",  # type: ignore[arg-type]
                                      dry_run=False)
    assert looks == ["look", "look"]
    assert result.actions == [done]


def test_a_state_that_never_settles_still_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(repair_mod, "_SETTLE_SECONDS", 0.5)
    looks = _wire(monkeypatch, [RepairNeededError("in use")] * 100)
    with pytest.raises(RepairNeededError, match="in use"):
        repair_mod.repair_domain(object(), object(), None, "/pool", "d", "u",  # type: ignore[arg-type]
                                 dry_run=False)
    assert 1 < len(looks) < 100


def test_a_refusal_is_believed_only_once_it_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The definition already names the overlay, the running domain not yet: libvirt is
    still finishing the dead backup's snapshot.  Repair looks again instead of refusing."""
    from vmsnapbackup.workflows.repairplan import REFUSE

    plans = [[RepairAction(REFUSE, "vda", "definition and running domain disagree",
                           transient=True)],
             [RepairAction(DELETE_OVERLAY, "vda.ov", "commit and pivot", disk="vda",
                           path="/x/vda.vmsnapbackup-p1-aaaaaa.qcow2")]]
    done = RepairAction(DELETE_OVERLAY, "vda.ov", "commit and pivot [done]")
    looks = _wire(monkeypatch, [[done]])
    monkeypatch.setattr(repair_mod, "plan", lambda facts: plans.pop(0))
    result = repair_mod.repair_domain(object(), object(), None, "/pool", "d", "u",  # type: ignore[arg-type]
                                      dry_run=False)
    assert looks == ["look", "look"] and result.actions == [done]


def test_a_lasting_transient_refusal_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    from vmsnapbackup.workflows.repairplan import REFUSE

    monkeypatch.setattr(repair_mod, "_REFUSAL_SETTLE_SECONDS", 0.3)
    looks = _wire(monkeypatch, [])
    monkeypatch.setattr(repair_mod, "plan", lambda facts: [RepairAction(
        REFUSE, "vda", "definition and running domain disagree", transient=True)])
    result = repair_mod.repair_domain(object(), object(), None, "/pool", "d", "u",  # type: ignore[arg-type]
                                      dry_run=False)
    assert [a.action for a in result.actions] == [REFUSE] and len(looks) >= 2
    # a dry run reports at once
    looks.clear()
    result = repair_mod.repair_domain(object(), object(), None, "/pool", "d", "u",  # type: ignore[arg-type]
                                      dry_run=True)
    assert len(looks) == 1 and [a.action for a in result.actions] == [REFUSE]


@pytest.mark.parametrize("also_transient", [False, True])
def test_a_refusal_that_cannot_pass_is_reported_at_once(
        monkeypatch: pytest.MonkeyPatch, also_transient: bool) -> None:
    """A foreign image on top of ours does not go away by itself: no wait (the real
    settle time stays in force, so a wait would show as a second look)."""
    from vmsnapbackup.workflows.repairplan import REFUSE

    refusals = [RepairAction(REFUSE, "vda", "a foreign image on top")]
    if also_transient:
        refusals.append(RepairAction(REFUSE, "vdb", "definition and running domain disagree",
                                     transient=True))
    looks = _wire(monkeypatch, [])
    monkeypatch.setattr(repair_mod, "plan", lambda facts: list(refusals))
    result = repair_mod.repair_domain(object(), object(), None, "/pool", "d", "u",  # type: ignore[arg-type]
                                      dry_run=False)
    assert looks == ["look"] and result.actions == refusals


# -- which refusals the plan marks transient ------------------------------------------------

IMG = "/img/web1.qcow2"
OVL = "/img/web1.vmsnapbackup-p1-abc123.qcow2"
FOREIGN = "/img/web1.snap-by-someone.qcow2"


def _facts(**kw: Any) -> DomainFacts:
    base: dict[str, Any] = {"name": "web1", "uuid": "u-1", "host": "h", "defined": True,
                            "active": True}
    base.update(kw)
    return DomainFacts(**base)


def _disk(target: str, source: str, chain: tuple[str, ...] = ()) -> Disk:
    return Disk(target=target, device="disk", type="file", source=source, format="qcow2",
                backing_chain=tuple(ImageRef(p, "qcow2") for p in chain))


def _journal() -> JournalEntry:
    return JournalEntry(operation="backup", pid=4242, host="h",
                        started="2026-11-25T13:00:00.000Z", step="read", point=1,
                        generation=1,
                        disks={"vda": JournalDisk(source=IMG, overlay=OVL, frozen=IMG)})


def test_a_definition_ahead_of_the_running_domain_is_a_transient_refusal() -> None:
    """The soak's case: killed inside the snapshot call, the definition names the overlay
    and the running domain does not yet."""
    refused = plan(_facts(disks=(_disk("vda", IMG),), config=(_disk("vda", OVL),),
                          existing=frozenset([IMG, OVL])))
    assert [(a.action, a.transient) for a in refused] == [("refuse", True)]


def test_an_overlay_in_use_is_transient_only_when_this_domain_uses_it() -> None:
    def refused(users: tuple[str, ...]) -> list[RepairAction]:
        return [a for a in plan(_facts(journal=_journal(), disks=(_disk("vda", IMG),),
                                       existing=frozenset([IMG, OVL]), users={OVL: users}))
                if a.action == "refuse"]

    assert [a.transient for a in refused(("web1",))] == [True]
    assert [a.transient for a in refused(("other-vm",))] == [False]


def test_lasting_refusals_are_not_transient() -> None:
    foreign_top = plan(_facts(journal=_journal(),
                              disks=(_disk("vda", FOREIGN, chain=(OVL, IMG)),),
                              existing=frozenset([OVL, IMG, FOREIGN])))
    foreign_job = plan(_facts(disks=(_disk("vda", OVL, chain=(IMG,)),), jobs={"vda": "copy"}))
    unreadable = plan(_facts(journal_error="journal.json: bad checksum"))
    refusals = [a for a in foreign_top + foreign_job + unreadable if a.action == "refuse"]
    assert len(refusals) == 3 and not any(a.transient for a in refusals)
