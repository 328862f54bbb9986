"""The hook as an attacker or a broken host meets it: a missing or broken interpreter,
files others can write, a domain named like an option, a hung file system."""
from __future__ import annotations

import io
import logging
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from vmsnapbackup.cli import build_parser
from vmsnapbackup.core import inflight
from vmsnapbackup.core.inflight import InflightRecord
from vmsnapbackup.errors import UsageError
from vmsnapbackup.hooks import install as hookinstall
from vmsnapbackup.hooks import logic
from vmsnapbackup.hooks.config import CONFIG_ENV, HookConfig, load_config
from vmsnapbackup.hooks.jobs import open_job_log, spawn_detached
from vmsnapbackup.hooks.logic import REFUSE_EXIT, hook_main
from vmsnapbackup.hooks.trust import UntrustedPathError, path_problem, tree_problem

UUID = "4b1e2c3d-5f60-4718-9a2b-3c4d5e6f7081"
NAME = "web1"
IMAGE = "/var/lib/libvirt/images/web1.qcow2"
OVERLAY = "/var/lib/libvirt/images/web1.vmsnapbackup-20240101T000000-1.qcow2"
NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="ownership checks need root (chown)")


def domain_xml(name: str = NAME, source: str = IMAGE) -> str:
    return (f"<domain type='kvm'><name>{name}</name><uuid>{UUID}</uuid><devices>"
            f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
            f"<source file='{source}'/><target dev='vda' bus='virtio'/></disk>"
            f"</devices></domain>")


@pytest.fixture(autouse=True)
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "run"
    monkeypatch.setenv(inflight.RUNTIME_DIR_ENV, str(root))
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "hooks.conf"))
    return root


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    return tmp_path / "hooks.conf"


def offline_record() -> None:
    inflight.register(InflightRecord.now(UUID, NAME, "backup", "/srv/p", [IMAGE], offline=True,
                                         pid=os.getpid()))


class Spawned:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str]) -> None:
        self.calls.append(list(argv))


def run_shim(where: Path, interpreter: str, args: Sequence[str], xml: str,
             env_extra: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    shim = where / "hook"
    shim.write_text(hookinstall.shim_text(interpreter))
    shim.chmod(0o755)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", **env_extra}
    return subprocess.run([str(shim), *args], input=xml.encode(), cwd="/", env=env,
                          capture_output=True, timeout=60, check=False)


# ---------------------------------------------------------------- a broken interpreter

def _broken_interpreters(tmp_path: Path) -> dict[str, str]:
    failing = tmp_path / "failing-python"
    failing.write_text("#!/bin/sh\necho 'Fatal Python error: init_fs_encoding' >&2\nexit 1\n")
    crashing = tmp_path / "crashing-python"
    crashing.write_text("#!/bin/sh\nkill -SEGV $$\n")
    not_executable = tmp_path / "not-executable-python"
    not_executable.write_text("")
    for p in (failing, crashing):
        p.chmod(0o755)
    return {
        "missing": str(tmp_path / "deleted-venv" / "bin" / "python"),
        "fails": str(failing),
        "crashes": str(crashing),
        "not executable": str(not_executable),
        "no package": "/usr/bin/python3",  # the system python, without vmsnapbackup
    }


@pytest.mark.parametrize("case", ["missing", "fails", "crashes", "not executable", "no package"])
def test_a_broken_interpreter_or_package_lets_the_domain_start(
        tmp_path: Path, runtime: Path, case: str) -> None:
    interpreter = _broken_interpreters(tmp_path)[case]
    if case == "no package":
        probe = subprocess.run([interpreter, "-I", "-c", "import vmsnapbackup"],
                               capture_output=True, check=False)
        if probe.returncode == 0:
            pytest.skip(f"{interpreter} can import vmsnapbackup")
    offline_record()  # a working hook would refuse this start
    env = {inflight.RUNTIME_DIR_ENV: str(runtime)}
    proc = run_shim(tmp_path, interpreter, [NAME, "prepare", "begin", "-"], domain_xml(), env)
    assert (proc.returncode, proc.stdout) == (0, b""), proc.stderr
    # ...and the same shim with a working interpreter does refuse it
    proc = run_shim(tmp_path, sys.executable, [NAME, "prepare", "begin", "-"], domain_xml(), env)
    assert proc.returncode == 1 and b"cannot start" in proc.stderr


def test_only_the_deliberate_refusal_status_becomes_1(tmp_path: Path) -> None:
    """A Python that dies with status 1 (its own traceback status) must not refuse."""
    fake = tmp_path / "python"
    for status, expected in ((REFUSE_EXIT, 1), (1, 0), (2, 0), (0, 0)):
        fake.write_text(f"#!/bin/sh\ncat >/dev/null\nexit {status}\n")
        fake.chmod(0o755)
        proc = run_shim(tmp_path, str(fake), [NAME, "start", "begin", "-"], domain_xml(), {})
        assert proc.returncode == expected, (status, proc.stderr)


def test_the_shim_runs_python_isolated(tmp_path: Path, runtime: Path) -> None:
    """PYTHONPATH (or a vmsnapbackup/ in the current directory) cannot replace the package."""
    fake = tmp_path / "evil" / "vmsnapbackup" / "hooks"
    fake.mkdir(parents=True)
    marker = tmp_path / "evil-ran"
    for d in (fake.parent, fake):
        (d / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (fake / "logic.py").write_text("")
    env = {inflight.RUNTIME_DIR_ENV: str(runtime), "PYTHONPATH": str(tmp_path / "evil")}
    proc = run_shim(tmp_path, sys.executable, [NAME, "prepare", "begin", "-"], domain_xml(), env)
    assert proc.returncode == 0 and not marker.exists()


# ---------------------------------------------------------------- who may write hooks.conf

def test_config_of_root_alone_is_read(conf: Path) -> None:
    conf.write_text("[DEFAULT]\npool = /srv/p\n")
    conf.chmod(0o644)
    assert load_config(conf).pool == "/srv/p"


@pytest.mark.parametrize("how", ["world-writable", "group-writable", "owned by nobody",
                                 "directory writable by others", "symlink to an untrusted file"])
def test_config_others_can_change_is_refused(conf: Path, tmp_path: Path, how: str) -> None:
    text = "[DEFAULT]\npool = /srv/p\ncommand = /usr/bin/env\n"
    path = conf
    if how == "directory writable by others":
        d = tmp_path / "shared"
        d.mkdir()
        d.chmod(0o777)
        path = d / "hooks.conf"
    path.write_text(text)
    path.chmod(0o644)
    if how == "world-writable":
        path.chmod(0o666)
    elif how == "group-writable":
        path.chmod(0o664)
    elif how == "owned by nobody":
        os.chown(path, NOBODY, NOBODY)
    elif how == "symlink to an untrusted file":
        target = tmp_path / "elsewhere.conf"
        target.write_text(text)
        os.chown(target, NOBODY, NOBODY)
        path.unlink()
        path.symlink_to(target)
    with pytest.raises(UntrustedPathError, match="not trusted") as info:
        load_config(path)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, UsageError)


def test_sticky_root_directory_is_accepted_others_are_not(tmp_path: Path) -> None:
    d = tmp_path / "sticky"
    d.mkdir()
    d.chmod(0o1777)
    (d / "f").write_text("x")
    assert path_problem(d / "f") is None
    os.chown(d, NOBODY, NOBODY)
    assert "owned by uid 65534" in (path_problem(d / "f") or "")


def test_untrusted_config_starts_no_job(conf: Path, caplog: pytest.LogCaptureFixture) -> None:
    conf.write_text("[DEFAULT]\ncommand = /usr/bin/env\n")
    conf.chmod(0o666)
    spawn = Spawned()
    with caplog.at_level(logging.WARNING, logger="vmsnapbackup"):
        code = hook_main([NAME, "started", "begin", "-"], io.StringIO(domain_xml(source=OVERLAY)),
                         spawn=spawn, stderr=io.StringIO())
    assert code == 0 and spawn.calls == []
    assert any("not trusted" in r.getMessage() for r in caplog.records)


def test_untrusted_command_is_not_run(conf: Path, tmp_path: Path) -> None:
    script = tmp_path / "job"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o777)
    conf.write_text(f"[DEFAULT]\ncommand = {script}\n")
    spawn = Spawned()
    hook_main([NAME, "started", "begin", "-"], io.StringIO(domain_xml(source=OVERLAY)),
              spawn=spawn, stderr=io.StringIO())
    assert spawn.calls == []
    script.chmod(0o755)
    hook_main([NAME, "started", "begin", "-"], io.StringIO(domain_xml(source=OVERLAY)),
              spawn=spawn, stderr=io.StringIO())
    assert [c[0] for c in spawn.calls] == [str(script)]


# ---------------------------------------------------------------- the job log

def test_job_log_does_not_follow_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "shadow"
    victim.write_text("root:x:0:\n")
    link = tmp_path / "logs" / "hook-jobs.log"
    link.parent.mkdir()
    link.symlink_to(victim)
    with pytest.raises(OSError):
        open_job_log(link)
    spawn_detached(["/bin/true"], link)  # the job still runs; its output is discarded
    assert victim.read_text() == "root:x:0:\n"


def test_job_log_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError):  # ENXIO without a reader, "not a regular file" with one
        open_job_log(fifo)


def test_job_log_is_private(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        with open_job_log(tmp_path / "new" / "jobs.log") as f:
            f.write(b"x\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new" / "jobs.log").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700


def test_hook_and_its_jobs_run_with_umask_077(conf: Path, tmp_path: Path, runtime: Path) -> None:
    out = tmp_path / "umask"
    job = tmp_path / "job"
    job.write_text(f"#!/bin/sh\numask > {out}.tmp && mv {out}.tmp {out}\n")
    job.chmod(0o755)
    conf.write_text(f"[DEFAULT]\ncommand = {job}\njob_log = {tmp_path / 'jobs.log'}\n")
    env = {inflight.RUNTIME_DIR_ENV: str(runtime), CONFIG_ENV: str(conf)}
    old = os.umask(0)  # the shim must not inherit libvirtd's umask
    try:
        proc = run_shim(tmp_path, sys.executable, [NAME, "started", "begin", "-"],
                        domain_xml(source=OVERLAY), env)
    finally:
        os.umask(old)
    assert proc.returncode == 0, proc.stderr
    deadline = time.monotonic() + 20
    while not out.exists() and time.monotonic() < deadline:
        threading.Event().wait(0.05)
    assert out.read_text().strip() == "0077"


# ---------------------------------------------------------------- names that look like options

def test_a_domain_named_like_an_option_stays_a_name() -> None:
    spawn = Spawned()
    hook_main(["--all", "started", "begin", "-"],
              io.StringIO(domain_xml(name="--all", source=OVERLAY)), spawn=spawn,
              stderr=io.StringIO())
    (argv,) = spawn.calls
    # what the real CLI makes of it: one domain called "--all", not every domain
    args = build_parser().parse_args(argv[1:])
    assert args.command == "repair" and args.domain == "--all" and not args.all_domains


def test_a_pool_named_like_an_option_stays_a_pool() -> None:
    argv = logic.backup_argv(HookConfig(command=("vmsnapbackup",)), "-v", "--help")
    args = build_parser().parse_args(argv[1:])
    assert (args.pool, args.domains) == ("-v", ["--help"])


# ---------------------------------------------------------------- the time budget

@pytest.fixture
def hung(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Every look at the in-flight records hangs (a hung NFS path, a blocked flock)."""
    release = threading.Event()

    def hang() -> list[InflightRecord]:
        release.wait(8)
        return []

    monkeypatch.setattr(inflight, "records", hang)
    yield release
    release.set()


@pytest.mark.parametrize("op,code", [("prepare", 1), ("start", 1), ("migrate", 1),
                                     ("started", 0), ("release", 0)])
def test_a_hung_hook_gives_up_in_time(hung: threading.Event, op: str, code: int,
                                      caplog: pytest.LogCaptureFixture) -> None:
    err = io.StringIO()
    began = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="vmsnapbackup"):
        result = hook_main([NAME, op, "begin", "-"], io.StringIO(domain_xml()), spawn=Spawned(),
                           stderr=err, deadline=0.3)
    assert time.monotonic() - began < 5
    assert result == code
    assert any("gave up" in r.getMessage() for r in caplog.records)
    assert ("could not check within" in err.getvalue()) == (code == 1)


def test_no_job_starts_after_giving_up(monkeypatch: pytest.MonkeyPatch, conf: Path) -> None:
    release, spawn = threading.Event(), Spawned()

    def slow_config() -> HookConfig:
        release.wait(60)
        return HookConfig()

    code = hook_main([NAME, "started", "begin", "-"], io.StringIO(domain_xml(source=OVERLAY)),
                     spawn=spawn, config_loader=slow_config, stderr=io.StringIO(), deadline=0.2)
    assert code == 0
    worker = next(t for t in threading.enumerate() if t.name == "vmsnapbackup-hook")
    release.set()
    worker.join(10)
    assert spawn.calls == []


# ---------------------------------------------------------------- hook install

def test_install_refuses_an_interpreter_others_can_replace(tmp_path: Path) -> None:
    """The venv reached through a directory others can write: they could swap the venv."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    venv = Path(sys.executable).parent.parent
    (shared / "venv").symlink_to(venv)
    python = shared / "venv" / "bin" / Path(sys.executable).name
    with pytest.raises(UntrustedPathError, match="shared is writable by others"):
        hookinstall.install(tmp_path / "hooks", interpreter=str(python))
    assert not hookinstall.hook_path(tmp_path / "hooks").exists()
    shared.chmod(0o755)
    hookinstall.install(tmp_path / "hooks", interpreter=str(python))


def test_install_refuses_a_package_or_site_others_can_change(tmp_path: Path) -> None:
    pkg = tmp_path / "site" / "vmsnapbackup"
    (pkg / "hooks").mkdir(parents=True)
    (pkg / "hooks" / "logic.py").write_text("")
    (pkg / "hooks" / "logic.py").chmod(0o664)
    found: dict[str, object] = {"package": str(pkg), "site": [str(tmp_path / "site")]}
    with pytest.raises(UntrustedPathError, match="logic.py is writable by its group"):
        hookinstall._check_trusted(sys.executable, found)
    (pkg / "hooks" / "logic.py").chmod(0o644)
    pth = tmp_path / "site" / "evil.pth"
    pth.write_text("")
    os.chown(pth, NOBODY, NOBODY)
    with pytest.raises(UntrustedPathError, match="evil.pth is owned by uid 65534"):
        hookinstall._check_trusted(sys.executable, found)
    pth.unlink()
    hookinstall._check_trusted(sys.executable, found)


def test_tree_problem_walks_below_the_root(tmp_path: Path) -> None:
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    (deep / "c.py").write_text("")
    assert tree_problem(tmp_path / "a") is None
    (deep / "c.py").chmod(0o646)
    assert "c.py is writable by others" in (tree_problem(tmp_path / "a") or "")


def test_hook_status_names_an_untrusted_config(conf: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from vmsnapbackup.cli import main as cli_main

    conf.write_text("[DEFAULT]\n")
    conf.chmod(0o666)
    assert cli_main(["hook", "status", "--hooks-dir", str(tmp_path / "hooks")]) == 0
    assert "NOT TRUSTED" in capsys.readouterr().out
    conf.chmod(0o644)
    assert cli_main(["hook", "status", "--hooks-dir", str(tmp_path / "hooks")]) == 0
    assert "NOT TRUSTED" not in capsys.readouterr().out


def test_cli_install_refusal_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vmsnapbackup.cli import main as cli_main

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    (shared / "venv").symlink_to(Path(sys.executable).parent.parent)
    python = shared / "venv" / "bin" / Path(sys.executable).name
    code = cli_main(["hook", "install", "--hooks-dir", str(tmp_path / "hooks"),
                     "--python", str(python)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "writable by others" in err
