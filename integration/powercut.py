"""Cut the pool's power during a real operation, bring the pool back, judge what is left.

One *cut* runs a CLI command (``vmsnapbackup backup``/``prune``...) against a
pool that lives on the power-loss file system (tests/powerloss).  The file
system SIGKILLs the command and fails every later call once the command has
made N calls, which is what a power cut of the pool's disk does to it while
the hypervisor host (and the VM) keeps running.  The pool is then rebuilt, for
one :class:`~powerloss.model.Variant`, from what fsync had made durable, and
put back at the very path the command used (the journal and the host's
in-flight record name it).

:func:`judge` then asks what a user would: does the pool open, does ``list``
show only complete points, does every listed point verify, does ``repair``
put the VM back on its original images, does the next backup succeed (and
verify)?  Every answer is one cell of the table the tests print.
"""
from __future__ import annotations

import logging
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO / "tests"))  # last: integration/ modules shadow tests/ ones

from domains import TestDomain
from powerloss.logfile import read_log
from powerloss.model import VARIANTS, Variant
from powerloss.mount import PowerLossMount, recover

import vmsnapbackup
from vmsnapbackup.adapters import processes

log = logging.getLogger(__name__)

CLI = str(REPO / ".venv" / "bin" / "vmsnapbackup")
if not os.path.exists(CLI):  # an installed package without the repo's venv
    CLI = shutil.which("vmsnapbackup") or CLI
COMMAND_DEADLINE = 120.0
POOL_MARKER = "vmsnapbackup-pool.json"


@dataclass
class Outcome:
    """What one cut left, judged; ``problems`` empty means the pool survived it."""

    scenario: str
    cut: int
    total: int
    variant: str
    listed: list[int] = field(default_factory=list)
    listed_note: str = ""
    repaired: str = "-"
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


def cut_points(total: int, count: int, seed: int) -> list[int]:
    """``count`` cut points spread over 0..total (one at random in each of ``count``
    equal strata, fixed ``seed``), plus 0 and the last call (the extremes)."""
    rng = random.Random(seed)
    if count >= total + 1:
        return list(range(total + 1))
    picks = {0, total - 1}
    width = (total + 1) / count
    for i in range(count):
        lo, hi = int(i * width), max(int(i * width), int((i + 1) * width) - 1)
        picks.add(rng.randint(lo, min(hi, total)))
    return sorted(picks)


def run_cut(argv: Sequence[str], pool: Path, work: Path, cut: int | None,
            cli: Sequence[str] = (CLI,)) -> int:
    """Run ``vmsnapbackup --pool POOL ARGV`` with the pool on the power-loss file
    system, the power going after ``cut`` calls (never when None).  Returns the
    number of calls logged; the log is left at ``work/log``."""
    backing, logf = work / "backing", work / "log"
    if pool.exists():
        shutil.rmtree(pool)
    # The command is started first, held on its stdin, so the file system can be
    # told its process group; it runs once the pool is mounted.
    proc = subprocess.Popen(
        ["sh", "-c", 'read go && exec "$@"', "sh", *cli, "--pool", str(pool), *argv],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True, text=True)
    try:
        with PowerLossMount(backing, pool, logf, cut_at=cut, kill_pgid=proc.pid):
            out, _ = proc.communicate("go\n", timeout=COMMAND_DEADLINE)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    if cut is None and proc.returncode != 0:
        raise AssertionError(f"vmsnapbackup {' '.join(argv)} failed without a cut "
                             f"({proc.returncode}): {out}")
    if cut is not None and proc.returncode not in (0, -9):
        log.info("cut %s: command ended %s: %s", cut, proc.returncode, out.strip()[-300:])
    return len(read_log(logf)[1])


def campaign(scenario: str, argv: Sequence[str], area: Path,
             template: Path | Callable[[Path], None],
             judge_cut: Callable[[Outcome, Path], None], *, cuts: int, seed: int,
             variants: Sequence[Variant] = VARIANTS, cli: Sequence[str] = (CLI,),
             before_each: Callable[[], None] | None = None) -> list[Outcome]:
    """Cut the power of one command at a sample of its pool calls; judge each cut.

    ``argv`` runs once without a cut to count the pool's file-system calls, then
    once per point of :func:`cut_points` (``cuts`` strata, ``seed``), each time
    on a fresh copy of ``template`` -- a pool directory, or a function that makes
    the starting pool at the path it is given (a pool that must be made anew for
    each cut) -- after ``before_each``.  The pool the disk kept is rebuilt at
    ``area/pool`` under the variants in turn (each met at several depths), and
    ``judge_cut(outcome, pool)`` records its problems in the outcome.
    """
    pool, work = area / "pool", area / "work"

    def fresh() -> None:
        if work.exists():
            shutil.rmtree(work)
        work.mkdir()
        if callable(template):
            template(work / "backing")
        else:
            shutil.copytree(template, work / "backing", symlinks=True)
        if before_each is not None:
            before_each()

    fresh()
    total = run_cut(argv, pool, work, None, cli)
    log.info("%s: %d pool calls", scenario, total)
    outcomes: list[Outcome] = []
    for i, cut in enumerate(cut_points(total, cuts, seed)):
        variant = variants[i % len(variants)]
        fresh()
        run_cut(argv, pool, work, cut, cli)
        restore_pool(work, variant, pool, cut)
        outcome = Outcome(scenario, cut, total, variant.label)
        judge_cut(outcome, pool)
        outcomes.append(outcome)
    return outcomes


def restore_pool(work: Path, variant: Variant, pool: Path, cut: int | None) -> None:
    """Put at ``pool`` what the disk kept after ``cut`` calls, under ``variant``."""
    if pool.exists():
        shutil.rmtree(pool)
    recover(work / "log", variant, pool, upto=cut)


def disks_on_originals(dom: TestDomain) -> list[str]:
    """Problems if a disk of ``dom`` is not on the image it was made with."""
    out = []
    for target, image in dom.disks.items():
        now = dom.current_source(target)
        if Path(now) != Path(image):
            out.append(f"{target} on {now}, not {image}")
    return out


def judge(outcome: Outcome, dom: TestDomain, pool: Path, next_backup: bool) -> None:
    """The user's questions, answered into ``outcome`` (see the module docstring)."""
    t0 = time.monotonic()
    p = outcome.problems
    points: list[vmsnapbackup.PointSummary] = []
    if not (pool / POOL_MARKER).exists() and not any(pool.iterdir()):
        outcome.listed_note = "no pool yet"  # nothing durable: the pool was never made
    else:
        try:
            points = vmsnapbackup.list_points(pool)
        except vmsnapbackup.VmSnapBackupError as err:
            p.append(f"list: {type(err).__name__}: {err}")
    outcome.listed = [s.point for s in points]
    damaged = [s.point for s in points if s.damaged]
    if damaged:
        p.append(f"listed damaged points {damaged}")
    if points and not damaged:
        try:
            report = vmsnapbackup.verify(pool, domain=dom.name)
            if not report.ok:
                p.append(f"verify: {report.counts()}")
        except vmsnapbackup.VmSnapBackupError as err:
            p.append(f"verify: {type(err).__name__}: {err}")
    try:
        rep = vmsnapbackup.repair(pool, domain=dom.name)
        outcome.repaired = "nothing" if rep.nothing_to_do else f"{len(rep.actions)} actions"
        if rep.exit_code != 0:
            p.append(f"repair ({rep.exit_code.name}): {'; '.join(rep.lines())}")
    except vmsnapbackup.VmSnapBackupError as err:
        outcome.repaired = "error"
        p.append(f"repair: {type(err).__name__}: {err}")
    p += disks_on_originals(dom)
    if next_backup and not p:
        try:
            res = vmsnapbackup.backup(dom.name, pool)
            after = vmsnapbackup.verify(pool, domain=dom.name)
            if not after.ok:
                p.append(f"verify after next backup (point {res.point}): {after.counts()}")
        except vmsnapbackup.VmSnapBackupError as err:
            p.append(f"next backup: {type(err).__name__}: {err}")
        p += disks_on_originals(dom)
    outcome.seconds += time.monotonic() - t0


def table(outcomes: Sequence[Outcome], pool: Path | None = None) -> str:
    """Cut points x outcomes, one row per cut, for the test output and docs/
    (``pool``'s path is written POOL, to keep rows short)."""
    def short(text: str) -> str:
        return text.replace(str(pool), "POOL") if pool is not None else text

    rows = [("scenario", "cut", "of", "variant", "listed", "repair", "result", "judged in")]
    for o in outcomes:
        rows.append((o.scenario, str(o.cut), str(o.total), o.variant,
                     ",".join(map(str, o.listed)) or o.listed_note or "-", o.repaired,
                     "ok" if o.ok else short("DAMAGED: " + "; ".join(o.problems)), f"{o.seconds:.1f} s"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for r in rows:
        cells = [c.ljust(w) for c, w in zip(r[:-1], widths)]
        lines.append("| " + " | ".join([*cells, r[-1]]) + " |")
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in [*widths, 9]) + "|")
    return "\n".join(lines)


RUNTIME_ROOT = Path("/run/vmsnapbackup")
#: The kernel's short name (15 characters) of a qemu-storage-daemon.
DAEMON_COMM = processes.STORAGE_DAEMON[:15]


def daemon_dirs(tag: str = "") -> set[Path]:
    """The storage daemons' private dirs on this host (FORMAT.md §11); with ``tag``
    (a domain name) only those of that domain's daemons."""
    pattern = f"qsd-{tag}-*" if tag else "qsd-*"
    return set(RUNTIME_ROOT.glob(pattern)) if RUNTIME_ROOT.is_dir() else set()


def sweep_daemon_dirs(before: set[Path], tag: str = "") -> list[Path]:
    """Remove the daemon dirs made since ``before`` that no repair removed; returns
    them (a cut before the journal named the daemon leaves its dir for nobody to find).

    Never another process's live work, so tests and the soak may run side by side:
    a storage daemon that still runs is either tied to a live parent (it dies with
    it, see adapters/localhost.py) or a boot kept on purpose, and is left with its
    dir.  One on its way out (killed with its parent) is waited for, so that its
    image locks are gone with its dir.  A dir without a pid file yet is only taken
    with ``tag`` (the caller's domain name)."""
    left = []
    for d in sorted(daemon_dirs(tag) - before):
        try:
            pid = int((d / "qsd.pid").read_text().strip())
        except (OSError, ValueError):
            if not tag:
                continue
            pid = None
        if pid is not None:
            if processes.daemon_arguments(pid) is not None:
                continue
            if processes.is_exiting(pid, DAEMON_COMM):
                processes.wait_gone(pid, COMMAND_DEADLINE)
        shutil.rmtree(d, ignore_errors=True)
        left.append(d)
    return left


def summary(outcomes: Sequence[Outcome]) -> dict[str, int]:
    return {"cuts": len(outcomes), "ok": sum(o.ok for o in outcomes),
            "damaged": sum(not o.ok for o in outcomes)}


def report(outcomes: Sequence[Outcome], pool: Path) -> str:
    """The cut-point table and its summary, printed (the crash test's output) and returned."""
    text = table(outcomes, pool) + f"\n{summary(outcomes)}"
    print("\n" + text)
    return text
