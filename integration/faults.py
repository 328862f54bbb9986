"""Fault injection on the real stack: the helpers of ``test_faults.py`` (issue 6).

A fault is injected into a *real* backup running in a child Python process: the
child replaces one step of the workflow with "print where we are, then wait
for a line on stdin" (or SIGKILL itself there).  The test then does what the
fault needs (writes as the guest, SIGKILLs the child, restarts libvirtd, starts
a second backup, starts the domain...) and lets the child go on or not.  The
hooks live in the child's script only; production code knows nothing of them.

After a fault the tests check the issue's invariants with :func:`assert_recovered`
(domain on its original images, nothing of ours left on the host, only sealed
points in the pool and ``verify`` passes) and compare bytes with a :class:`Model`
of what the "guest" wrote.

Also here: a tmpfs mount for the pool-full / read-only faults, a libvirtd
restart, and :func:`revive_connection`, which gives the session's libvirt
connection object (shared by the domain fixtures) a live connection again once
the daemon it talked to is gone.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import libvirt
import tenacity
from domains import DiskModel, TestDomain

from vmsnapbackup.adapters.domainxml import OVERLAY_MARKER, find_disk, is_our_overlay
from vmsnapbackup.adapters.storagedaemon import stop_leftover_daemon
from vmsnapbackup.core import inflight
from vmsnapbackup.core.pool import GENERATION_RECORD, Pool
from vmsnapbackup.errors import NotFoundError
from vmsnapbackup.workflows.listing import list_points
from vmsnapbackup.workflows.repair import repair
from vmsnapbackup.workflows.verify import verify

REPO = Path(__file__).resolve().parent.parent
MiB = 2**20
URI = "qemu:///system"
LIBVIRTD_PID_FILE = Path("/run/libvirtd.pid")

#: Where a child backup can be stopped.
STEPS = ("snapshot", "read", "write", "manifest", "commit", "commit-2nd")

# The child.  argv[1] is JSON: domain, pool, step, action ("block" or "kill") and, for
# the commit steps, refuse_pivot_once: disks whose first pivot is refused as not ready.
#   snapshot  after the snapshot and the export, before the generation is planned
#   read      in the progress callback, with part of the data read
#   write     in the writer's request stream, with one write sent to the volume
#   manifest  after volumes and tables, before the manifest (the VM is committed back)
#   commit    after blockCommit is READY, before the pivot of the first disk
#   commit-2nd the same for the second disk (the first one is back on its image)
# It prints {"at": STEP} when there, and one last JSON line: the result or the error.
CHILD_SCRIPT = textwrap.dedent("""
    import json, logging, os, signal, sys
    args = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="child %(levelname)s %(name)s: %(message)s")
    import libvirt
    from vmsnapbackup.adapters.nbdclient import NbdClient
    from vmsnapbackup.core.pool import DomainStore
    from vmsnapbackup.errors import VmSnapBackupError
    from vmsnapbackup.workflows import backup as wf

    fired = []

    def fault(where):
        if fired:
            return
        fired.append(where)
        print(json.dumps({"at": where}), flush=True)
        if args["action"] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        sys.stdin.readline()  # the test says go on (or kills us meanwhile)

    step, progress = args["step"], None
    if step == "snapshot":
        plan = wf._BackupRun._plan_generation
        def _plan_generation(self):
            fault(step)
            return plan(self)
        wf._BackupRun._plan_generation = _plan_generation
    elif step == "read":
        def progress(event):
            if event.phase == "read" and event.done > 0 and not event.finished:
                fault(step)
    elif step == "write":
        write_many = NbdClient.write_many
        sent = [0]
        def _write_many(self, requests, **kw):
            def counted():
                for item in requests:
                    if sent[0] == 1:
                        fault(step)
                    sent[0] += 1
                    yield item
            return write_many(self, counted(), **kw)
        NbdClient.write_many = _write_many
    elif step == "manifest":
        write_manifest = DomainStore.write_manifest
        def _write_manifest(self, *a, **kw):
            fault(step)
            return write_manifest(self, *a, **kw)
        DomainStore.write_manifest = _write_manifest
    elif step in ("commit", "commit-2nd"):
        abort = libvirt.virDomain.blockJobAbort
        # disks, not calls: a pivot libvirt refuses as "not ready" is retried, and that
        # retry is still the same disk's pivot (counting calls stopped a CI run at vda's
        # retry, with vda still on its overlay)
        pivoted, refuse_once = [], set(args.get("refuse_pivot_once", ()))
        def _block_job_abort(self, disk, flags=0):
            if flags & libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT:
                if disk not in pivoted:
                    pivoted.append(disk)
                if len(pivoted) == (2 if step == "commit-2nd" else 1):
                    fault(step)
                if disk in refuse_once:
                    refuse_once.discard(disk)
                    # what libvirt says while it has not yet taken in QEMU's READY event
                    # (the job info may already show cur == end on a busy host)
                    text = "block copy still active: disk '%s' not ready for pivot yet" % disk
                    print("child: injected pivot refusal of " + disk, file=sys.stderr,
                          flush=True)
                    err = libvirt.libvirtError(text)
                    err.err = (libvirt.VIR_ERR_BLOCK_COPY_ACTIVE, libvirt.VIR_FROM_QEMU, text,
                               libvirt.VIR_ERR_ERROR, None, None, None, 0, 0)
                    raise err
            return abort(self, disk, flags)
        libvirt.virDomain.blockJobAbort = _block_job_abort
    elif step != "none":
        raise SystemExit("unknown step " + step)

    try:
        r = wf.backup(args["domain"], args["pool"], progress=progress)
    except VmSnapBackupError as err:
        print(json.dumps({"error": type(err).__name__, "exit_code": int(err.exit_code),
                          "message": str(err)}), flush=True)
        sys.exit(int(err.exit_code))
    print(json.dumps({"point": r.point, "generation": r.generation,
                      "consistency": r.consistency}), flush=True)
""")


class ChildBackup:
    """A real backup in a child process, stopped at one step (see :data:`CHILD_SCRIPT`)."""

    def __init__(self, domain: str, pool: Path, step: str, log_dir: Path,
                 action: str = "block", refuse_pivot_once: Sequence[str] = ()) -> None:
        self.step = step
        self.stderr_path = log_dir / f"child-{step}-{os.getpid()}-{id(self):x}.log"
        args = {"domain": domain, "pool": str(pool), "step": step, "action": action,
                "refuse_pivot_once": list(refuse_pivot_once)}
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", CHILD_SCRIPT, json.dumps(args)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                cwd=str(REPO))
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _next(self, timeout: float) -> dict[str, Any] | None:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"child backup ({self.step}) said nothing within {timeout} s; "
                                 f"stderr:\n{self.stderr()}") from None
        return None if line is None else json.loads(line)

    def wait_at(self, timeout: float = 120.0) -> None:
        """Until the child is stopped at its step."""
        msg = self._next(timeout)
        if msg != {"at": self.step}:
            raise AssertionError(f"child backup did not stop at {self.step}: {msg}; "
                                 f"stderr:\n{self.stderr()}")

    def resume(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def outcome(self, timeout: float = 120.0) -> dict[str, Any]:
        """The last line (result or error) and the exit code, once the child has ended."""
        msg = self._next(timeout)
        rc = self.proc.wait(timeout=timeout)
        if msg is None:
            raise AssertionError(f"child backup ended ({rc}) without a result; stderr:\n"
                                 f"{self.stderr()}")
        msg["returncode"] = rc
        return msg

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        self.proc.wait(timeout=30)


class Reaper:
    """What a fault test may leave if it fails half-way; put right at teardown.

    Child backups are killed; the storage daemons and runtime directories their
    journals name are stopped and removed; in-flight records of the domains
    cleared.  The domains themselves (and overlays, which live in their
    directories) go with the domain fixture.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[ChildBackup] = []
        self.watched: list[tuple] = []   # (pool, uuid, name)

    def start(self, td: TestDomain, pool: Path, step: str, action: str = "block",
              refuse_pivot_once: Sequence[str] = ()) -> ChildBackup:
        self.watch(td, pool)
        child = ChildBackup(td.name, pool, step, self.log_dir, action, refuse_pivot_once)
        self.children.append(child)
        return child

    def watch(self, td: TestDomain, pool: Path) -> None:
        if (pool, td.uuid, td.name) not in self.watched:
            self.watched.append((pool, td.uuid, td.name))

    def close(self) -> None:
        for child in self.children:
            child.close()
        for pool, uuid, name in self.watched:
            with contextlib.suppress(Exception):
                entry = Pool.open(pool).domain(uuid).journal.read()
                if entry is not None and entry.daemon is not None:
                    stop_leftover_daemon(entry.daemon.pid, entry.daemon.runtime_dir)
            for rd in glob.glob(str(inflight.runtime_root() / f"qsd-{name}-*")):
                with contextlib.suppress(Exception):
                    stop_leftover_daemon(None, rd)
            with contextlib.suppress(Exception):
                rec = inflight.read(uuid)
                if rec is not None and not inflight.is_live(rec):
                    inflight.clear(uuid)


# -- what the guest wrote --------------------------------------------------------------

class Model(DiskModel):
    """The guest's bytes (:class:`domains.DiskModel`), checked against the disks at the end."""

    def assert_guest_bytes(self) -> None:
        """Shuts the domain off and compares every disk with the model."""
        self.dom.shutoff()
        for target, want in self.disks.items():
            assert_same_bytes(self.dom.read_image(target), bytes(want), f"disk {target}")


def assert_same_bytes(got: bytes, want: bytes, what: str) -> None:
    assert len(got) == len(want), f"{what}: {len(got)} bytes, expected {len(want)}"
    if got != want:
        first = next(i for i in range(len(want)) if got[i] != want[i])
        raise AssertionError(f"{what} differs first at byte {first} "
                             f"(got {got[first]:#04x}, expected {want[first]:#04x})")


def point_bytes(pool: Path, uuid: str, point: int, scratch: Path) -> dict[str, bytes]:
    """The guest-visible bytes of every disk of a point (``qemu-img convert`` of its volume)."""
    store = Pool.open(pool).domain(uuid)
    out: dict[str, bytes] = {}
    for d in store.read_manifest(point).disks:
        raw = scratch / f".point-{point}-{d.target}.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(store.resolve(d.volume)),
                        str(raw)], check=True)
        try:
            out[d.target] = raw.read_bytes()
        finally:
            raw.unlink()
    return out


def assert_points(pool: Path, uuid: str, expected: dict[int, dict[str, bytes]],
                  scratch: Path) -> None:
    """``list`` shows exactly these points, complete, and each holds these bytes."""
    listed = list_points(pool, domain=uuid)
    assert [(p.point, p.damaged) for p in listed] == [(n, None) for n in sorted(expected)]
    for n, disks in expected.items():
        got = point_bytes(pool, uuid, n, scratch)
        assert sorted(got) == sorted(disks)
        for target, want in disks.items():
            assert_same_bytes(got[target], want, f"point {n} disk {target}")


# -- the invariants after a fault --------------------------------------------------------

def qsd_processes(name: str) -> list[int]:
    """Storage daemons serving this domain (their runtime dir carries its name)."""
    found = []
    needle = f"/qsd-{name}-".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read()
        except OSError:
            continue
        if b"qemu-storage-daemon" in argv and needle in argv:
            found.append(int(entry))
    return found


def unreferenced_pool_files(pool: Path, uuid: str) -> list[str]:
    """Files in the domain's point stores that no sealed manifest refers to."""
    store = Pool.open(pool).domain(uuid)
    referenced: set[str] = set()
    for info in store.list_points():
        if info.manifest is not None:
            for d in info.manifest.disks:
                referenced.update(p for p in (d.volume, d.base, d.table, d.difference) if p)
    extra = []
    for path in sorted(store.path.rglob("*")):
        rel = store.relpath(path)
        if path.is_dir() or not rel.startswith("generations/"):
            continue
        if path.name == GENERATION_RECORD or rel in referenced:
            continue
        extra.append(rel)
    return extra


def assert_recovered(td: TestDomain, pool: Path, *, active: bool,
                     pool_writable: bool = True, other_pools: Sequence[Path] = ()) -> list[int]:
    """The issue's invariants once a fault was dealt with; returns the listed points.

    The domain is (not) running on its original images, live and in its
    definition, with no overlay of ours anywhere, no block job, no storage
    daemon, no runtime directory, no in-flight record; the pool has no journal
    and nothing a sealed point does not need; ``verify`` passes on what ``list``
    shows; a further ``repair`` has nothing to do (asked only of a writable pool:
    repair takes the domain's lock, which needs a write).  No checkpoint of ours is
    left but those the current generations of ``pool`` and ``other_pools`` name.
    """
    dom = td.dom
    assert bool(dom.isActive()) == active, f"domain active: {bool(dom.isActive())}"
    for target, image in td.disks.items():
        for flags in ((0, libvirt.VIR_DOMAIN_XML_INACTIVE) if active
                      else (libvirt.VIR_DOMAIN_XML_INACTIVE,)):
            disk = find_disk(dom.XMLDesc(flags), target)
            assert disk.source == str(image), (target, flags, disk.source)
            assert not any(is_our_overlay(i.path) for i in disk.backing_chain), disk
        if active:
            assert dom.blockJobInfo(target, 0) == {}, f"block job left on {target}"
    assert not glob.glob(str(td.workdir / f"*{OVERLAY_MARKER}*")), "an overlay was left"
    assert qsd_processes(td.name) == [], "a storage daemon was left running"
    assert not glob.glob(str(inflight.runtime_root() / f"qsd-{td.name}-*")), \
        "a runtime directory was left"
    assert inflight.read(td.uuid) is None, "an in-flight record was left"
    try:
        store = Pool.open(pool).domain(td.uuid)
    except NotFoundError:   # the pool never got as far as a part for the domain
        assert not pool_writable
        return []
    assert not store.journal.exists(), "the journal was left"
    left = store.leftovers()
    assert left == [], f"pool leftovers: {left}"
    extra = unreferenced_pool_files(pool, td.uuid)
    assert extra == [], f"files no sealed point refers to: {extra}"
    assert not [p for p in store.path.rglob("*") if p.name.endswith(".partial")
                or p.name.startswith(".")], "a partial or temp file was left"
    # no checkpoint of ours but the one the current generation names (a dead backup's
    # is deleted by repair; a replaced generation's by the backup that replaced it)
    named = set()
    for p in (pool, *other_pools):
        try:
            part = Pool.open(p).domain(td.uuid)
        except NotFoundError:
            continue
        current = part.current_generation()
        if current is not None:
            named.add(part.read_generation(current).checkpoint)
    ours = {c.getName() for c in dom.listAllCheckpoints() if c.getName().startswith(
        "vmsnapbackup-")}
    assert ours <= named, f"checkpoints left: {sorted(ours - named)}"
    listed = list_points(pool, domain=td.uuid)
    assert all(p.damaged is None for p in listed), listed
    if listed:
        report = verify(pool, domain=td.uuid)
        assert report.ok, report.to_dict()
    if pool_writable:
        again = repair(pool, domain=td.name)
        assert again.nothing_to_do, f"a second repair still finds: {again.lines()}"
    return [p.point for p in listed]


def wait_gone(pid: int, deadline: float = 20.0) -> None:
    """Until ``pid`` has exited (a zombie counts as gone)."""
    def alive() -> bool:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
        except FileNotFoundError:
            return False

    tenacity.Retrying(retry=tenacity.retry_if_result(bool),
                      stop=tenacity.stop_after_delay(deadline),
                      wait=tenacity.wait_exponential(multiplier=0.01, max=0.2),
                      reraise=True)(alive)


def until(check: Any, deadline: float = 60.0) -> None:
    """Retry ``check`` (which asserts) until it passes or the deadline has passed."""
    for attempt in tenacity.Retrying(stop=tenacity.stop_after_delay(deadline),
                                     wait=tenacity.wait_exponential(0.02, max=0.5),
                                     retry=tenacity.retry_if_exception_type(AssertionError),
                                     reraise=True):
        with attempt:
            check()


# -- a small filesystem for the pool ---------------------------------------------------

@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``path`` (root only); always unmounted."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                    str(path)], check=True, capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True, capture_output=True)


def used_inodes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_files - st.f_ffree


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True,
                   capture_output=True)


# -- libvirtd ----------------------------------------------------------------------------

def _daemon_answers() -> None:
    conn = libvirt.open(URI)
    try:
        conn.getVersion()
    finally:
        conn.close()


def wait_libvirtd(deadline: float = 60.0) -> None:
    tenacity.Retrying(stop=tenacity.stop_after_delay(deadline),
                      wait=tenacity.wait_exponential(0.05, max=0.5),
                      retry=tenacity.retry_if_exception_type(libvirt.libvirtError),
                      reraise=True)(_daemon_answers)


def restart_libvirtd() -> int:
    """Stop libvirtd (SIGTERM, by its pid file) and start it again as it was started
    (same argv, environment and working directory); returns the new pid once the
    daemon answers.  Running domains keep running: libvirtd reconnects to them."""
    pid = int(LIBVIRTD_PID_FILE.read_text().split()[0])
    argv = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    env = dict(line.decode().split("=", 1) for line in
               Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in line)
    cwd = os.readlink(f"/proc/{pid}/cwd")
    if "-d" not in argv and "--daemon" not in argv:
        raise RuntimeError(f"libvirtd pid {pid} runs as {argv}, not daemonized: not restarting")
    os.kill(pid, signal.SIGTERM)
    wait_gone(pid, deadline=60.0)
    subprocess.run(argv, env=env, cwd=cwd, check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_libvirtd()
    return int(LIBVIRTD_PID_FILE.read_text().split()[0])


def revive_connection(conn: libvirt.virConnect, domains: Sequence[TestDomain] = ()) -> None:
    """Give ``conn`` (the session's connection, shared by the domain fixtures) a live
    connection to the restarted daemon, in place, and look the domains up again.

    The fixtures hold that one object everywhere (DomainFactory.conn, TestDomain.conn),
    so it is the object that must come back to life: its handle is swapped with
    a fresh connection's, and the dead handle closed.
    """
    fresh = libvirt.open(URI)
    conn._o, fresh._o = fresh._o, conn._o  # type: ignore[attr-defined]
    with contextlib.suppress(libvirt.libvirtError):
        fresh.close()
    for td in domains:
        td.conn = conn
        td.dom = conn.lookupByUUIDString(td.uuid)


# -- the hook ----------------------------------------------------------------------------

def hook_jobs_running(name: str) -> list[int]:
    """vmsnapbackup processes the hook started for this domain (detached jobs)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if any(b"vmsnapbackup" in a for a in argv[:3]) and name.encode() in argv:
            found.append(int(entry))
    return found
