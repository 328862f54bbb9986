"""What ``verify`` found: per disk, point and domain, and its text form.

Kept apart from the checking (:mod:`.verify`) so the report -- what the CLI
prints and ``--json`` emits -- has one definition that the tests can build by hand.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .blockcompare import BlockMismatch
from .verifysample import SampleTally

__all__ = ["BASE", "DAMAGED", "DIFFERENCE", "GOOD", "INCOMPATIBLE", "TABLE1", "VOLUME",
           "DiskCheck", "DomainCheck", "PointCheck", "Problem", "VerifyReport",
           "format_point", "format_report"]

GOOD = "good"
DAMAGED = "damaged"
INCOMPATIBLE = "incompatible"

#: Block indexes named in a text line; the rest are counted.
TEXT_BLOCKS = 8

# What can be wrong with one part of a point.
TABLE1 = "table 1"
DIFFERENCE = "difference table"
BASE = "base volume"
VOLUME = "point volume"

@dataclass(frozen=True)
class Problem:
    """One thing wrong: which part (``kind``), in words, and the blocks if it is data."""

    kind: str
    message: str
    mismatch: BlockMismatch | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message,
                "mismatch": self.mismatch.to_dict() if self.mismatch else None}


@dataclass
class DiskCheck:
    target: str
    total: int = 0
    checked: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """``vda blocks 17, 18 (2 of 1024)`` for data, ``vda: table 1 damaged: ...`` else."""
        parts = []
        for p in self.problems:
            m = p.mismatch
            if m is not None and m.size_note is None and m.indexes:
                named = ", ".join(str(i) for i in m.indexes[:TEXT_BLOCKS])
                more = ", ..." if m.count > TEXT_BLOCKS else ""
                of = f"{m.checked} sampled" if m.checked != m.total else f"{m.total}"
                where = "" if p.kind == VOLUME else f"; {p.kind} damaged"
                parts.append(f"{self.target} blocks {named}{more} ({m.count} of {of}{where})")
            else:
                parts.append(f"{self.target}: {p.kind} damaged: {p.message}")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "ok": self.ok, "blocks": self.total,
                "checked": self.checked, "problems": [p.to_dict() for p in self.problems]}


@dataclass
class PointCheck:
    number: int
    generation: int | None
    taken: str | None
    status: str = GOOD
    reason: str | None = None  # a manifest that cannot be read
    disks: list[DiskCheck] = field(default_factory=list)

    def settle(self) -> None:
        if self.status == GOOD and any(not d.ok for d in self.disks):
            self.status = DAMAGED

    def to_dict(self) -> dict[str, Any]:
        return {"point": self.number, "generation": self.generation, "taken": self.taken,
                "status": self.status, "reason": self.reason,
                "disks": [d.to_dict() for d in self.disks]}


@dataclass
class DomainCheck:
    uuid: str
    name: str
    points: list[PointCheck] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # records outside any point

    @property
    def damaged(self) -> bool:
        return bool(self.problems) or any(p.status == DAMAGED for p in self.points)

    def to_dict(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "name": self.name, "ok": not self.damaged,
                "problems": list(self.problems), "points": [p.to_dict() for p in self.points]}


@dataclass
class VerifyReport:
    pool: str
    sample: float | None
    domains: list[DomainCheck] = field(default_factory=list)
    seconds: float = 0.0
    seed: int | None = None
    tally: SampleTally = field(default_factory=SampleTally)

    def sample_dict(self) -> dict[str, Any] | None:
        if self.sample is None:
            return None
        t = self.tally
        return {"percent": self.sample, "seed": self.seed, "stored_blocks": t.stored,
                "sampled_blocks": t.sampled, "chance_one_damaged_block": t.chance(1),
                "chance_ten_damaged_blocks": t.chance(10)}

    @property
    def ok(self) -> bool:
        """No damage found (incompatible points are not damage; see :attr:`incompatible`)."""
        return not any(d.damaged for d in self.domains)

    @property
    def incompatible(self) -> bool:
        return any(p.status == INCOMPATIBLE for d in self.domains for p in d.points)

    def counts(self) -> dict[str, int]:
        out = {GOOD: 0, DAMAGED: 0, INCOMPATIBLE: 0}
        for d in self.domains:
            for p in d.points:
                out[p.status] += 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"pool": self.pool, "sample_percent": self.sample, "ok": self.ok,
                "sample": self.sample_dict(),
                "seconds": round(self.seconds, 3), "counts": self.counts(),
                "domains": [d.to_dict() for d in self.domains]}


def format_point(p: PointCheck) -> str:
    """``point 3 (gen 1, 2026-...): good`` / ``...: damaged: vda blocks 17, 18 (2 of 1024)``."""
    gen = f"gen {p.generation}" if p.generation is not None else "gen ?"
    head = f"point {p.number} ({gen}, {p.taken})" if p.taken else f"point {p.number} ({gen})"
    if p.status == GOOD:
        return f"{head}: good"
    if p.reason is not None:
        return f"{head}: {p.status}: manifest: {p.reason}"
    return f"{head}: {p.status}: " + "; ".join(d.summary() for d in p.disks if not d.ok)


def format_report(report: VerifyReport) -> str:
    """The whole report as text: a line per domain, a line per point, a summary."""
    lines = []
    for d in report.domains:
        lines.append(f"domain {d.name} ({d.uuid}):")
        lines.extend(f"  {problem}" for problem in d.problems)
        if not d.points:
            lines.append("  no points")
        lines.extend(f"  {format_point(p)}" for p in d.points)
    c = report.counts()
    if report.sample:
        t = report.tally
        how = (f"{report.sample:g}% of stored blocks sampled: {t.sampled} of {t.stored}, "
               f"would find one damaged block with p={t.chance(1):.1%}, ten with "
               f"p={t.chance(10):.1%}; --seed {report.seed} repeats this sample")
    else:
        how = "every block read"
    verdict = "ok" if report.ok else "DAMAGE FOUND"
    lines.append(f"{verdict}: {c[GOOD]} good, {c[DAMAGED]} damaged"
                 + (f", {c[INCOMPATIBLE]} incompatible" if c[INCOMPATIBLE] else "")
                 + f" ({how}, {report.seconds:.1f} s)")
    return "\n".join(lines)
