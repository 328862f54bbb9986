"""The soak: a real guest writes while backups, prunes, verifies, SIGKILLs and pool power
cuts run in a loop; at the end every point verifies and restores to a sound file system.

Run by scripts/soak.sh (which takes the shared integration lock); not part of the
test command.  Each round picks one action at random (fixed seed):

* ``backup``  a plain backup;
* ``cut``     a backup whose pool loses power at a random call (powercut.py), the
  pool rebuilt under a random variant and judged (opens, lists only complete
  points, verifies, repair puts the VM back, the next backup succeeds);
* ``kill``    a CLI backup SIGKILLed after a random delay, then ``repair``;
* ``prune``   keep the last 4 points;
* ``verify``  a 10 % sample;
* ``libvirtd`` (only with ``--restart-libvirtd``) libvirtd killed and started again.

Every point gets the guest's durable-file count read before the action that made it;
at the end the guest is stopped and every point is restored and judged with
guestos.judge_image.  The counts are printed as one JSON line.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]
sys.path.append(str(HERE.parent / "tests"))

import libvirt
from domains import DomainFactory, TestDomain
from faults import LIBVIRTD_PID_FILE, revive_connection, wait_gone, wait_libvirtd
from guestos import durable, judge_image, make_guest
from powercut import (
    CLI,
    Outcome,
    daemon_dirs,
    judge,
    restore_pool,
    run_cut,
    sweep_daemon_dirs,
)
from powerloss.model import VARIANTS

import vmsnapbackup

log = logging.getLogger("soak")
URI = "qemu:///system"


class Soak:
    def __init__(self, dom: TestDomain, console: Path, area: Path, rng: random.Random) -> None:
        self.dom, self.console, self.area, self.rng = dom, console, area, rng
        self.pool = area / "pool"
        self.durable_at: dict[int, int] = {}
        self.counts: dict[str, int] = {"rounds": 0, "backups": 0, "cuts": 0, "kills": 0,
                                       "prunes": 0, "verifies": 0, "libvirtd_restarts": 0,
                                       "failures": 0, "restores_judged": 0, "bad_restores": 0}
        self.failures: list[str] = []

    def points(self) -> set[int]:
        if not (self.pool / "vmsnapbackup-pool.json").exists():
            return set()
        return {p.point for p in vmsnapbackup.list_points(self.pool, domain=self.dom.name)}

    def tracked(self, action: str) -> None:
        """Run ``action``; new points get the durable count read before it."""
        before_points, before = self.points(), durable(self.console)
        getattr(self, f"do_{action}")()
        for p in self.points() - before_points:
            self.durable_at[p] = before

    def fail(self, what: str) -> None:
        self.counts["failures"] += 1
        self.failures.append(what)
        log.error("FAILURE: %s", what)

    def do_backup(self) -> None:
        vmsnapbackup.backup(self.dom.name, self.pool)
        self.counts["backups"] += 1

    def do_cut(self) -> None:
        work = self.area / "work"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        backing = work / "backing"
        if self.pool.exists():
            self.pool.rename(backing)
        else:
            backing.mkdir()
        cut = self.rng.randint(0, 180)
        variant = self.rng.choice(VARIANTS)
        run_cut(["backup", self.dom.name], self.pool, work, cut)
        restore_pool(work, variant, self.pool, cut)
        o = Outcome("soak", cut, -1, variant.label)
        judge(o, self.dom, self.pool, next_backup=True)
        self.counts["cuts"] += 1
        if not o.ok:
            self.fail(f"cut at {cut} ({variant.label}): {o.problems}")

    def do_kill(self) -> None:
        proc = subprocess.Popen([CLI, "--pool", str(self.pool), "backup", self.dom.name],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            proc.wait(timeout=self.rng.uniform(0.0, 2.5))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            self.counts["kills"] += 1
        rep = vmsnapbackup.repair(self.pool, domain=self.dom.name)
        if rep.exit_code != 0:
            self.fail(f"repair after kill: {rep.lines()}")

    def do_prune(self) -> None:
        vmsnapbackup.prune(self.dom.name, self.pool, keep_last=4)
        self.counts["prunes"] += 1

    def do_verify(self) -> None:
        rep = vmsnapbackup.verify(self.pool, domain=self.dom.name, sample=0.1,
                                  seed=self.rng.randint(0, 2**31))
        self.counts["verifies"] += 1
        if not rep.ok:
            self.fail(f"sampled verify: {rep.counts()}")

    def do_libvirtd(self) -> None:
        """libvirtd SIGKILLed, then started again as it was (argv, environment)."""
        pid = int(LIBVIRTD_PID_FILE.read_text().split()[0])
        argv = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
        env = dict(line.decode().split("=", 1) for line in
                   Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in line)
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid, deadline=60.0)     # until then it holds its pid file
        subprocess.run(argv, env=env, check=True, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_libvirtd()
        revive_connection(self.dom.conn, [self.dom])   # the factory's connection too
        self.counts["libvirtd_restarts"] += 1

    def finish(self) -> None:
        """Every point verifies in full, restores, and is a sound file system."""
        rep = vmsnapbackup.verify(self.pool, domain=self.dom.name)
        if not rep.ok:
            self.fail(f"final verify: {rep.counts()}")
        self.dom.shutoff()
        for p in sorted(self.points()):
            out = self.area / f"restore-{p}"
            r = vmsnapbackup.restore(self.dom.name, self.pool, point=p, to=out, fmt="raw")
            problems = [] if r.ok else ["restore not verified"]
            problems += judge_image(Path(r.disks[0].path), self.area,
                                    self.durable_at.get(p, 0))
            self.counts["restores_judged"] += 1
            if problems:
                self.counts["bad_restores"] += 1
                self.fail(f"point {p}: {problems}")
            shutil.rmtree(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="vmsnapbackup soak with a real guest")
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--restart-libvirtd", action="store_true",
                    help="also kill and restart libvirtd (only on a machine of your own)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("vmsnapbackup", "qemu", "domains"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    rng = random.Random(args.seed)
    actions = ["backup", "backup", "cut", "cut", "kill", "prune", "verify"]
    if args.restart_libvirtd:
        actions.append("libvirtd")
    area = Path(tempfile.mkdtemp(prefix="vsb-soak-"))
    before_dirs = daemon_dirs()
    factory = DomainFactory(libvirt.open(URI))
    soak_tag = "soak-no-domain-yet"
    soak: Soak | None = None
    t0 = time.monotonic()
    try:
        dom, console = make_guest(factory)
        soak_tag = dom.name
        soak = Soak(dom, console, area, rng)
        soak.tracked("backup")
        while time.monotonic() - t0 < args.minutes * 60:
            action = rng.choice(actions)
            soak.counts["rounds"] += 1
            try:
                soak.tracked(action)
            except vmsnapbackup.VmSnapBackupError as err:
                soak.fail(f"{action}: {type(err).__name__}: {err}")
            log.info("round %d %s: %s", soak.counts["rounds"], action, soak.counts)
        soak.finish()
        soak.counts["minutes"] = round((time.monotonic() - t0) / 60, 1)  # type: ignore[assignment]
        soak.counts["guest_files_durable"] = durable(console)
        print(json.dumps(soak.counts, sort_keys=True))
        for f in soak.failures:
            print("FAILURE:", f)
        return 1 if soak.failures else 0
    finally:
        factory.close()
        sweep_daemon_dirs(before_dirs, soak_tag)
        if soak is not None and soak.failures:
            print(f"kept for inspection: {area}")   # the pool holds the evidence
        else:
            shutil.rmtree(area, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
