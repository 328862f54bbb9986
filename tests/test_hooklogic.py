"""The libvirt qemu hook: decisions for each op, the shim, the policy file, install."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pytest
import tenacity

from vmsnapbackup.cli import main as cli_main
from vmsnapbackup.core import inflight
from vmsnapbackup.core.inflight import InflightRecord
from vmsnapbackup.errors import NotFoundError, UsageError
from vmsnapbackup.hooks import install as hookinstall
from vmsnapbackup.hooks.config import (
    CONFIG_ENV,
    DEFAULT_POOL,
    DomainPolicy,
    HookConfig,
    default_command,
    load_config,
)
from vmsnapbackup.hooks.logic import (
    HookCall,
    hook_main,
    parse_domain,
    setup_hook_logging,
    spawn_detached,
)

REPO = Path(__file__).resolve().parent.parent
UUID = "4b1e2c3d-5f60-4718-9a2b-3c4d5e6f7081"
OTHER_UUID = "0a1b2c3d-4e5f-4061-8293-a4b5c6d7e8f9"
NAME = "web1"
IMAGE = "/var/lib/libvirt/images/web1.qcow2"
OVERLAY = "/var/lib/libvirt/images/web1.vmsnapbackup-20240101T000000-1.qcow2"


def domain_xml(name: str = NAME, uuid: str = UUID, source: str = IMAGE,
               backing: str | None = None, extra_disk: str = "") -> str:
    """Shaped like the XML libvirt gives a hook (live XML of a starting domain)."""
    backing_el = (f"<backingStore type='file' index='1'><format type='qcow2'/>"
                  f"<source file='{backing}'/><backingStore/></backingStore>"
                  if backing else "<backingStore/>")
    return textwrap.dedent(f"""\
        <domain type='kvm' id='7'>
          <name>{name}</name>
          <uuid>{uuid}</uuid>
          <memory unit='KiB'>65536</memory>
          <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>
          <devices>
            <emulator>/usr/bin/qemu-system-x86_64</emulator>
            <disk type='file' device='disk'>
              <driver name='qemu' type='qcow2'/>
              <source file='{source}' index='2'/>
              {backing_el}
              <target dev='vda' bus='virtio'/>
              <alias name='virtio-disk0'/>
            </disk>
            <disk type='file' device='cdrom'>
              <driver name='qemu' type='raw'/>
              <target dev='sda' bus='sata'/>
              <readonly/>
            </disk>
            {extra_disk}
          </devices>
        </domain>
        """)


@pytest.fixture(autouse=True)
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "run"
    monkeypatch.setenv(inflight.RUNTIME_DIR_ENV, str(root))
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "hooks.conf"))
    return root


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    return tmp_path / "hooks.conf"


class Spawned:
    """The fake spawn seam: records argvs instead of starting processes."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str]) -> None:
        self.calls.append(list(argv))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=10)
    return proc.pid


def record(pid: int | None = None, *, uuid: str = UUID, name: str = NAME, offline: bool = False,
           images: Sequence[str] = (IMAGE,), pool: str = "/srv/pool-a",
           operation: str = "backup") -> InflightRecord:
    rec = InflightRecord.now(uuid, name, operation, pool, images, offline=offline,
                             pid=os.getpid() if pid is None else pid)
    inflight.register(rec)
    return rec


def run_hook(argv: Sequence[str], xml: str, spawn: Spawned | None = None) -> tuple[int, str]:
    err = io.StringIO()
    code = hook_main(argv, io.StringIO(xml), spawn=spawn or Spawned(), stderr=err)
    return code, err.getvalue()


# ---------------------------------------------------------------- prepare / start

@pytest.mark.parametrize("op", ["prepare", "start"])
def test_start_refused_while_offline_backup_reads_the_domain(op: str) -> None:
    rec = record(offline=True)
    code, err = run_hook([NAME, op, "begin", "-"], domain_xml())
    assert code == 1
    assert f"domain {NAME} cannot start" in err and "offline backup" in err
    assert str(rec.pid) in err


@pytest.mark.parametrize("op", ["prepare", "start"])
def test_start_allowed_without_records(op: str) -> None:
    assert run_hook([NAME, op, "begin", "-"], domain_xml()) == (0, "")


def test_start_allowed_when_offline_record_is_stale() -> None:
    record(pid=dead_pid(), offline=True)
    assert run_hook([NAME, "prepare", "begin", "-"], domain_xml()) == (0, "")
    # The hook does not clear records on start (that is release's and repair's job).
    assert inflight.read(UUID) is not None


def test_start_allowed_when_another_domain_is_backed_up() -> None:
    record(uuid=OTHER_UUID, name="db1", offline=True, images=["/images/db1.qcow2"])
    assert run_hook([NAME, "start", "begin", "-"], domain_xml())[0] == 0


def test_start_refused_when_another_domains_operation_holds_its_image(tmp_path: Path) -> None:
    shared = tmp_path / "shared.qcow2"
    shared.write_bytes(b"")
    link = tmp_path / "link.qcow2"
    link.symlink_to(shared)
    record(uuid=OTHER_UUID, name="db1", offline=False, images=[str(shared)])
    # The domain names the image through a symlink, as its backing file.
    code, err = run_hook([NAME, "prepare", "begin", "-"],
                         domain_xml(source="/images/top.qcow2", backing=str(link)))
    assert code == 1
    assert str(shared) in err and "db1" in err


def test_start_allowed_when_online_record_shares_nothing() -> None:
    record(offline=False, images=["/images/elsewhere.qcow2"])
    assert run_hook([NAME, "start", "begin", "-"], domain_xml())[0] == 0


def test_record_matched_by_name_when_xml_has_no_uuid() -> None:
    record(offline=True, images=[])
    xml = domain_xml().replace(f"<uuid>{UUID}</uuid>", "")
    assert run_hook([NAME, "start", "begin", "-"], xml)[0] == 1


# ---------------------------------------------------------------- migrate

def test_migrate_refused_while_live_record_exists() -> None:
    record()
    code, err = run_hook([NAME, "migrate", "begin", "-"], domain_xml())
    assert code == 1 and "cannot migrate" in err


def test_migrate_allowed_otherwise() -> None:
    assert run_hook([NAME, "migrate", "begin", "-"], domain_xml()) == (0, "")
    record(pid=dead_pid())
    assert run_hook([NAME, "migrate", "begin", "-"], domain_xml()) == (0, "")


def test_hook_never_writes_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    """libvirt reads a migrate/restore hook's stdout as the replacement XML."""
    record()
    hook_main([NAME, "migrate", "begin", "-"], io.StringIO(domain_xml()), spawn=Spawned(),
              stderr=io.StringIO())
    hook_main([NAME, "restore", "begin", "-"], io.StringIO(domain_xml()), spawn=Spawned())
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------- started / reconnect

@pytest.mark.parametrize("op", ["started", "reconnect"])
def test_started_on_our_overlay_spawns_repair(op: str) -> None:
    spawn = Spawned()
    code, _ = run_hook([NAME, op, "begin", "-"], domain_xml(source=OVERLAY, backing=IMAGE), spawn)
    assert code == 0
    assert spawn.calls == [[*default_command(), f"--pool={DEFAULT_POOL}", "repair", "--", NAME]]


def test_started_repair_uses_pool_of_stale_record() -> None:
    record(pid=dead_pid(), pool="/srv/pool-of-the-dead-backup")
    spawn = Spawned()
    run_hook([NAME, "started", "begin", "-"], domain_xml(source=OVERLAY), spawn)
    assert spawn.calls == [[*default_command(), "--pool=/srv/pool-of-the-dead-backup",
                            "repair", "--", NAME]]


def test_started_repair_uses_configured_pool_and_command(conf: Path) -> None:
    conf.write_text("[DEFAULT]\npool = /srv/p\ncommand = /usr/bin/env -v\n"
                    f"[domain:{NAME}]\npool = /srv/mine\n")
    spawn = Spawned()
    run_hook([NAME, "started", "begin", "-"], domain_xml(source=OVERLAY), spawn)
    assert spawn.calls == [["/usr/bin/env", "-v", "--pool=/srv/mine", "repair", "--", NAME]]


def test_started_no_repair_while_backup_is_live() -> None:
    record()
    spawn = Spawned()
    assert run_hook([NAME, "started", "begin", "-"], domain_xml(source=OVERLAY), spawn)[0] == 0
    assert spawn.calls == []


def test_started_no_repair_on_ordinary_or_foreign_overlay() -> None:
    spawn = Spawned()
    run_hook([NAME, "started", "begin", "-"], domain_xml(), spawn)
    run_hook([NAME, "started", "begin", "-"],
             domain_xml(source="/images/web1.snap-1700000000.qcow2", backing=IMAGE), spawn)
    assert spawn.calls == []


# ---------------------------------------------------------------- release

def test_release_clears_stale_record_only() -> None:
    record(pid=dead_pid())
    assert run_hook([NAME, "release", "end", "-"], domain_xml())[0] == 0
    assert inflight.read(UUID) is None
    live = record()
    run_hook([NAME, "release", "end", "-"], domain_xml())
    assert inflight.read(UUID) == live


def test_release_keeps_the_stale_record_of_a_domain_left_on_our_overlay() -> None:
    """The record names the pool whose journal the repair at the next start needs."""
    stale = record(pid=dead_pid())
    run_hook([NAME, "release", "end", "-"], domain_xml(source=OVERLAY))
    assert inflight.read(UUID) == stale
    spawn = Spawned()
    run_hook([NAME, "started", "begin", "-"], domain_xml(source=OVERLAY), spawn)
    assert [c[-4:] for c in spawn.calls] == [[f"--pool={stale.pool}", "repair", "--", NAME]]


def test_release_leaves_other_domains_stale_records() -> None:
    record(pid=dead_pid(), uuid=OTHER_UUID, name="db1")
    run_hook([NAME, "release", "end", "-"], domain_xml())
    assert inflight.read(OTHER_UUID) is not None


def test_release_backup_on_shutdown(conf: Path) -> None:
    conf.write_text(f"[DEFAULT]\npool = /srv/p\n[domain:{NAME}]\nbackup_on_shutdown = yes\n")
    spawn = Spawned()
    assert run_hook([NAME, "release", "end", "-"], domain_xml(), spawn)[0] == 0
    assert run_hook([NAME, "release", "end", "shutdown"], domain_xml(), spawn)[0] == 0
    # Other domains: no policy.
    run_hook(["db1", "release", "end", "-"], domain_xml(name="db1", uuid=OTHER_UUID), spawn)
    expected = [*default_command(), "--pool=/srv/p", "backup", "--", NAME]
    assert spawn.calls == [expected, expected]


@pytest.mark.parametrize("reason", ["migrated", "failed"])
def test_release_no_backup_after_migration_or_failed_start(conf: Path, reason: str) -> None:
    conf.write_text(f"[domain:{NAME}]\nbackup_on_shutdown = yes\n")
    spawn = Spawned()
    run_hook([NAME, "release", "end", reason], domain_xml(), spawn)
    assert spawn.calls == []


def test_release_no_backup_while_an_operation_is_live(conf: Path) -> None:
    conf.write_text("[DEFAULT]\nbackup_on_shutdown = yes\n")
    record(offline=True)
    spawn = Spawned()
    run_hook([NAME, "release", "end", "-"], domain_xml(), spawn)
    assert spawn.calls == []


# ---------------------------------------------------------------- robustness

@pytest.mark.parametrize("op", ["stopped", "attach", "restore", "nonsense"])
def test_other_ops_do_nothing(op: str) -> None:
    record(offline=True)
    spawn = Spawned()
    assert run_hook([NAME, op, "end", "-"], domain_xml(source=OVERLAY), spawn) == (0, "")
    assert spawn.calls == [] and inflight.read(UUID) is not None


@pytest.mark.parametrize("argv", [[], [NAME], [NAME, "start"]])
def test_short_argv(argv: list[str]) -> None:
    assert HookCall.from_argv(argv).extra == "-"
    assert run_hook(argv, domain_xml())[0] == 0


def test_internal_errors_never_block_a_domain(caplog: pytest.LogCaptureFixture) -> None:
    record(offline=True)
    assert run_hook([NAME, "start", "begin", "-"], "<domain><broken")[0] == 0
    assert "internal error" in caplog.text

    def failing_spawn(argv: Sequence[str]) -> None:
        raise OSError(2, "No such file or directory", argv[0])

    code = hook_main([NAME, "started", "begin", "-"], io.StringIO(domain_xml(source=OVERLAY)),
                     spawn=failing_spawn, stderr=io.StringIO())
    assert code == 0


def test_corrupt_record_does_not_break_the_hook(runtime: Path) -> None:
    d = runtime / "inflight"
    d.mkdir(parents=True)
    (d / f"{UUID}.json").write_text("{garbage")
    assert run_hook([NAME, "start", "begin", "-"], domain_xml())[0] == 0


def test_broken_config_falls_back_to_defaults(conf: Path, caplog: pytest.LogCaptureFixture) -> None:
    conf.write_text("[DEFAULT]\nbackup_on_shutdwon = yes\n")
    spawn = Spawned()
    assert run_hook([NAME, "started", "begin", "-"], domain_xml(source=OVERLAY), spawn)[0] == 0
    assert spawn.calls == [[*default_command(), f"--pool={DEFAULT_POOL}", "repair", "--", NAME]]
    assert "backup_on_shutdwon" in caplog.text


def test_bytes_stdin_is_accepted() -> None:
    record(offline=True)
    code = hook_main([NAME, "start", "begin", "-"], io.BytesIO(domain_xml().encode()),
                     spawn=Spawned(), stderr=io.StringIO())
    assert code == 1


def test_parse_domain() -> None:
    info = parse_domain(domain_xml(source=OVERLAY, backing=IMAGE), "ignored")
    assert (info.name, info.uuid) == (NAME, UUID)
    assert {OVERLAY, IMAGE} <= info.images
    assert [d.target for d in info.overlay_disks] == ["vda"]


# ---------------------------------------------------------------- logging

def test_logging_falls_back_to_stderr_without_syslog(tmp_path: Path) -> None:
    import logging

    handler = setup_hook_logging(str(tmp_path / "no-such-socket"))
    try:
        assert isinstance(handler, logging.StreamHandler)
        assert handler.level == logging.WARNING
    finally:
        logging.getLogger("vmsnapbackup").removeHandler(handler)


def test_logging_to_a_syslog_socket(tmp_path: Path) -> None:
    import logging
    import socket

    path = tmp_path / "log"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(10)
    handler = setup_hook_logging(str(path))
    try:
        logging.getLogger("vmsnapbackup.hooks.logic").warning("hello %s", "syslog")
        data = server.recv(4096)
    finally:
        logging.getLogger("vmsnapbackup").removeHandler(handler)
        handler.close()
        server.close()
    assert b"vmsnapbackup-hook[" in data and b"hello syslog" in data
    assert data.startswith(b"<28>")  # daemon.warning


# ---------------------------------------------------------------- detached jobs

def _wait_for(path: Path) -> str:
    for attempt in tenacity.Retrying(stop=tenacity.stop_after_delay(20),
                                     wait=tenacity.wait_fixed(0.02),
                                     retry=tenacity.retry_if_exception_type(FileNotFoundError),
                                     reraise=True):
        with attempt:
            text = path.read_text()
            if not text.endswith("\n"):
                raise FileNotFoundError(path)
            return text
    raise AssertionError("unreachable")


def test_spawn_detached_does_not_wait_and_leaves_the_session(tmp_path: Path) -> None:
    pidfile, gate = tmp_path / "pid", tmp_path / "gate"
    log_path = tmp_path / "jobs" / "hook-jobs.log"
    script = (f"echo $$ > {pidfile}.tmp && mv {pidfile}.tmp {pidfile}; echo job-output; "
              f"while [ ! -e {gate} ]; do sleep 0.05; done")
    try:
        spawn_detached(["/bin/sh", "-c", script], log_path)
        pid = int(_wait_for(pidfile))
        # Returned while the job still runs, in a session of its own.
        os.kill(pid, 0)
        assert os.getsid(pid) == pid
        assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
        assert os.readlink(f"/proc/{pid}/fd/2") == str(log_path)
    finally:
        gate.touch()
    for attempt in tenacity.Retrying(stop=tenacity.stop_after_delay(20),
                                     wait=tenacity.wait_fixed(0.02),
                                     retry=tenacity.retry_if_exception_type(AssertionError),
                                     reraise=True):
        with attempt:
            assert "job-output" in log_path.read_text()
    text = log_path.read_text()
    assert text.startswith("--- ") and "/bin/sh -c" in text
    try:
        os.waitpid(pid, 0)  # our child in this test process; reap it
    except ChildProcessError:
        pass


# ---------------------------------------------------------------- the shim, as libvirt runs it

def _shim(args: Sequence[str], xml: str, env_extra: dict[str, str], *, where: Path, timeout: float = 30,
          interpreter: str = sys.executable) -> subprocess.CompletedProcess[bytes]:
    """Run the shim as installed (in ``where``) for ``interpreter``, with libvirt's environment."""
    shim = where / "hook"
    shim.write_text(hookinstall.shim_text(interpreter))
    shim.chmod(0o755)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", **env_extra}
    return subprocess.run([str(shim), *args], input=xml.encode(), cwd="/", check=False,
                          capture_output=True, env=env, timeout=timeout)


def test_shim_refuses_and_allows(runtime: Path) -> None:
    env = {inflight.RUNTIME_DIR_ENV: str(runtime), CONFIG_ENV: "/nonexistent/hooks.conf"}
    record(offline=True)
    proc = _shim([NAME, "prepare", "begin", "-"], domain_xml(), env, where=runtime.parent)
    assert proc.returncode == 1, proc.stderr
    assert b"cannot start" in proc.stderr and proc.stdout == b""
    inflight.clear(UUID)
    proc = _shim([NAME, "prepare", "begin", "-"], domain_xml(), env, where=runtime.parent)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"", b"")


def test_shim_does_not_hold_libvirts_pipes_while_the_job_runs(runtime: Path, tmp_path: Path) -> None:
    """libvirt waits for EOF on the hook's stdout/stderr: the repair job must not inherit them."""
    pidfile, gate, argfile = tmp_path / "job.pid", tmp_path / "gate", tmp_path / "args"
    job = tmp_path / "fake-vmsnapbackup"
    job.write_text(f"#!/bin/sh\necho \"$@\" > {argfile}\necho $$ > {pidfile}.tmp\n"
                   f"mv {pidfile}.tmp {pidfile}\n"
                   f"while [ ! -e {gate} ]; do sleep 0.05; done\n")
    job.chmod(0o755)
    conf = tmp_path / "shim.conf"
    conf.write_text(f"[DEFAULT]\ncommand = {job}\npool = /srv/p\njob_log = {tmp_path / 'jobs.log'}\n")
    env = {inflight.RUNTIME_DIR_ENV: str(runtime), CONFIG_ENV: str(conf)}
    try:
        proc = _shim([NAME, "started", "begin", "-"], domain_xml(source=OVERLAY), env,
                     where=tmp_path)
        pid = int(_wait_for(pidfile))
        assert proc.returncode == 0 and proc.stdout == b""
        os.kill(pid, 0)  # the job outlived the hook, and run() still returned
        assert argfile.read_text().split() == ["--pool=/srv/p", "repair", "--", NAME]
    finally:
        gate.touch()  # the job ends by itself, even if the test failed before reading its pid


# ---------------------------------------------------------------- config

def test_config_defaults_when_missing(tmp_path: Path) -> None:
    cfg = load_config(tmp_path / "none.conf")
    assert cfg == HookConfig()
    assert cfg.policy("x") == DomainPolicy(pool=DEFAULT_POOL, backup_on_shutdown=False)
    assert cfg.cli() == default_command()


def test_config_sections(conf: Path) -> None:
    conf.write_text("[DEFAULT]\npool = /srv/a\nbackup_on_shutdown = no\njob_log = /var/log/j\n"
                    "[domain:web1]\nbackup_on_shutdown = yes\n"
                    "[domain:db1]\npool = /srv/b\n")
    cfg = load_config()
    assert cfg.pool == "/srv/a" and cfg.job_log == "/var/log/j" and cfg.command == ()
    assert cfg.policy("web1") == DomainPolicy("/srv/a", True)
    assert cfg.policy("db1") == DomainPolicy("/srv/b", False)
    assert cfg.policy("other") == DomainPolicy("/srv/a", False)


def test_config_default_backup_applies_to_every_domain(conf: Path) -> None:
    conf.write_text("[DEFAULT]\nbackup_on_shutdown = true\n[domain:db1]\nbackup_on_shutdown = 0\n")
    cfg = load_config()
    assert cfg.policy("anything").backup_on_shutdown and not cfg.policy("db1").backup_on_shutdown


@pytest.mark.parametrize("text,match", [
    ("[DEFAULT]\ncolour = red\n", "colour"),
    ("[web1]\npool = /x\n", r"\[web1\]"),
    ("[domain:web1]\nbackup_on_shutdown = perhaps\n", "backup_on_shutdown"),
    ("[DEFAULT]\ncommand = 'unclosed\n", "command"),
    ("[DEFAULT]\npool =\n", "pool"),
    ("no section header\n", "hook configuration"),
])
def test_config_errors_name_the_file(conf: Path, text: str, match: str) -> None:
    conf.write_text(text)
    with pytest.raises(UsageError, match=match) as info:
        load_config()
    assert str(conf) in str(info.value)


# ---------------------------------------------------------------- install

def test_packaged_shim_is_the_repository_copy() -> None:
    assert hookinstall.SHIM_SOURCE == (REPO / "hooks" / "qemu").read_text()
    assert os.access(REPO / "hooks" / "qemu", os.X_OK)


def test_install_status_uninstall(tmp_path: Path, runtime: Path) -> None:
    hooks = tmp_path / "hooks"
    assert not hookinstall.status(hooks).installed
    path = hookinstall.install(hooks)
    assert path == hooks / "qemu.d" / "vmsnapbackup"
    assert path.stat().st_mode & 0o777 == 0o755
    text = path.read_text()
    assert text.splitlines()[0] == "#!/bin/sh"
    assert f"\nPYTHON='{sys.executable}'\n" in text
    assert text.replace(f"PYTHON='{sys.executable}'", "PYTHON='/usr/bin/python3'") == \
        hookinstall.SHIM_SOURCE
    st = hookinstall.status(hooks)
    assert st.installed and st.current and st.interpreter == sys.executable

    # The installed file runs as a program and decides.
    record(offline=True)
    env = {"PATH": "/usr/bin:/bin", inflight.RUNTIME_DIR_ENV: str(runtime),
           CONFIG_ENV: "/nonexistent"}
    proc = subprocess.run([str(path), NAME, "start", "begin", "-"], input=domain_xml().encode(),
                          capture_output=True, env=env, timeout=30, check=False)
    assert proc.returncode == 1 and b"cannot start" in proc.stderr

    path.write_text(text.replace("shim_main", "shim_mian"))
    assert not hookinstall.status(hooks).current
    hookinstall.install(hooks)  # re-install repairs it
    assert hookinstall.status(hooks).current
    assert hookinstall.uninstall(hooks) is True
    assert hookinstall.uninstall(hooks) is False
    assert not hookinstall.status(hooks).installed
    assert (hooks / "qemu.d").is_dir()


@pytest.mark.parametrize("interpreter", ["python3", "/opt/it's/python", "/opt/a\nb/python"])
def test_shim_text_rejects_unusable_interpreters(interpreter: str) -> None:
    with pytest.raises(UsageError):
        hookinstall.shim_text(interpreter)


def test_install_refuses_an_interpreter_without_the_package(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot"):
        hookinstall.install(tmp_path, interpreter="/bin/false")
    assert not hookinstall.hook_path(tmp_path).exists()


def test_reload_signals_the_daemon_of_the_pid_file(tmp_path: Path) -> None:
    marker = tmp_path / "hup"
    daemon = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import signal, sys, time
        signal.signal(signal.SIGHUP, lambda *a: open({str(marker)!r}, "w").write("hup\\n"))
        print("ready", flush=True)
        sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert daemon.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
        missing, pid_file = tmp_path / "gone.pid", tmp_path / "libvirtd.pid"
        pid_file.write_text(f"{daemon.pid}\n")
        assert hookinstall.reload_libvirtd([missing, pid_file]) == daemon.pid
        assert _wait_for(marker) == "hup\n"
    finally:
        daemon.stdin.close()  # type: ignore[union-attr]
        daemon.wait(timeout=10)
    with pytest.raises(NotFoundError):
        hookinstall.reload_libvirtd([tmp_path / "gone.pid"])
    pid_file.write_text(f"{dead_pid()}\n")
    with pytest.raises(NotFoundError):
        hookinstall.reload_libvirtd([pid_file])


def test_cli_hook_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hooks = str(tmp_path / "hooks")
    assert cli_main(["hook", "install", "--hooks-dir", hooks]) == 0
    out = capsys.readouterr().out
    assert "installed" in out and "SIGHUP" in out
    assert cli_main(["hook", "status", "--hooks-dir", hooks, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["installed"] and doc["current"] and doc["interpreter"] == sys.executable
    assert cli_main(["hook", "uninstall", "--hooks-dir", hooks, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["changed"] is True
    assert cli_main(["hook", "status", "--hooks-dir", hooks]) == 0
    assert "not installed" in capsys.readouterr().out
    assert cli_main(["hook"]) == 2
    assert cli_main(["hook", "install", "--hooks-dir", hooks, "--python", "relative"]) == 2
