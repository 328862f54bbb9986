"""Repair looks again when the domain moves under it (an injected race).

A backup SIGKILLed during libvirt's snapshot call leaves that call running in
libvirtd: the domain goes onto its overlay just after repair looked.  The real
daemon cannot be made to lose that race on cue, so the facts and the execution
are injected here; the soak (integration/soak.py) meets it for real.
"""
from __future__ import annotations

from typing import Any

import pytest

from vmsnapbackup.errors import RepairNeededError
from vmsnapbackup.workflows import repair as repair_mod
from vmsnapbackup.workflows.repairplan import DELETE_OVERLAY, RepairAction


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
    result = repair_mod._repair_facts(object(), object(), None, "/pool", "d", "u",  # type: ignore[arg-type]
                                      dry_run=False)
    assert looks == ["look", "look"]
    assert result.actions == [done]


def test_a_state_that_never_settles_still_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(repair_mod, "_SETTLE_SECONDS", 0.5)
    looks = _wire(monkeypatch, [RepairNeededError("in use")] * 100)
    with pytest.raises(RepairNeededError, match="in use"):
        repair_mod._repair_facts(object(), object(), None, "/pool", "d", "u",  # type: ignore[arg-type]
                                 dry_run=False)
    assert 1 < len(looks) < 100


def test_a_refusal_is_believed_only_once_it_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The definition already names the overlay, the running domain not yet: libvirt is
    still finishing the dead backup's snapshot.  Repair looks again instead of refusing."""
    from vmsnapbackup.workflows.repairplan import REFUSE

    plans = [[RepairAction(REFUSE, "vda", "definition and running domain disagree")],
             [RepairAction(DELETE_OVERLAY, "vda.ov", "commit and pivot", disk="vda",
                           path="/x/vda.vmsnapbackup-p1-aaaaaa.qcow2")]]
    done = RepairAction(DELETE_OVERLAY, "vda.ov", "commit and pivot [done]")
    looks = _wire(monkeypatch, [[done]])
    monkeypatch.setattr(repair_mod, "plan", lambda facts: plans.pop(0))
    result = repair_mod._repair_facts(object(), object(), None, "/pool", "d", "u",  # type: ignore[arg-type]
                                      dry_run=False)
    assert looks == ["look", "look"] and result.actions == [done]


def test_a_lasting_refusal_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    from vmsnapbackup.workflows.repairplan import REFUSE

    monkeypatch.setattr(repair_mod, "_REFUSAL_SETTLE_SECONDS", 0.3)
    looks = _wire(monkeypatch, [])
    monkeypatch.setattr(repair_mod, "plan",
                        lambda facts: [RepairAction(REFUSE, "vda", "a foreign image on top")])
    result = repair_mod._repair_facts(object(), object(), None, "/pool", "d", "u",  # type: ignore[arg-type]
                                      dry_run=False)
    assert [a.action for a in result.actions] == [REFUSE] and len(looks) >= 2
    # a dry run reports at once
    looks.clear()
    result = repair_mod._repair_facts(object(), object(), None, "/pool", "d", "u",  # type: ignore[arg-type]
                                      dry_run=True)
    assert len(looks) == 1 and [a.action for a in result.actions] == [REFUSE]
