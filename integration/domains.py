"""Throwaway libvirt domains for the integration tests.

A test needs a *running* domain whose disks it can write to "as the guest
would" and whose images it can read back byte for byte once it is shut off.
No guest OS is needed for that (DESIGN.md §4): the domain sits in firmware,
and guest writes are simulated with HMP ``qemu-io`` against the disk's
virtio backend, which goes through the very block graph a guest write would.

Everything a domain brings with it (definition, images, work directory, QEMU
log) is removed by :meth:`DomainFactory.close`, whether the test passed or
not.  Each definition carries a metadata element with the creating process's
id, so a later run can sweep domains left behind by a run that was killed
(:func:`sweep_stale_domains`) without touching those of a run still going on
the same libvirtd.
"""
from __future__ import annotations

import errno
import logging
import os
import pwd
import re
import secrets
import shutil
import stat
import subprocess
import tempfile
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import quoteattr

import libvirt
import libvirt_qemu
import tenacity

log = logging.getLogger(__name__)

IMAGES_ROOT = Path("/var/lib/libvirt/images")
QEMU_LOG_DIR = Path("/var/log/libvirt/qemu")
METADATA_NS = "https://vmsnapbackup.invalid/integration-fixture"
METADATA_KEY = "vsbtest"
QEMU_USER = "libvirt-qemu"

# How long to wait for qemu-io's verdict to reach the domain log (virtlogd
# copies QEMU's stdout asynchronously; it normally takes milliseconds).
QEMU_IO_LOG_DEADLINE = 15.0

_UNDEFINE_FLAGS = (
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
)


class FixtureError(RuntimeError):
    """The test fixture itself failed (not the code under test)."""


@dataclass
class DiskSpec:
    """One disk of a throwaway domain.

    ``size`` is the guest-visible size in bytes and is kept exact (a raw file
    of exactly that length, a qcow2 of exactly that virtual size), so tests
    can use sizes that are not a multiple of the check-table block size.
    """

    target: str
    fmt: str = "qcow2"
    size: int = 64 * 2**20
    backing: str | None = None

    def __post_init__(self) -> None:
        if self.fmt not in ("qcow2", "raw"):
            raise ValueError(f"DiskSpec {self.target}: fmt must be 'qcow2' or 'raw', not {self.fmt!r}")
        if self.size <= 0 or self.size % 512:
            # virtio-blk shows the guest whole 512-byte sectors only; any other
            # size would make "guest-visible content" differ from the file.
            raise ValueError(f"DiskSpec {self.target}: size {self.size} is not a positive multiple of 512")
        if self.backing is not None and self.fmt != "qcow2":
            raise ValueError(f"DiskSpec {self.target}: only a qcow2 disk can have a backing image")


def _run(argv: Sequence[str]) -> str:
    proc = subprocess.run(list(argv), check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise FixtureError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _image_format(path: str) -> str:
    import json

    info = json.loads(_run(["qemu-img", "info", "-U", "--output=json", path]))
    return str(info["format"])


def kvm_usable_by_qemu() -> bool:
    """Whether QEMU, running as libvirt-qemu, can open /dev/kvm read-write.

    A /dev/kvm that only root can open makes QEMU fail to start under
    type='kvm', and makes libvirtd re-probe QEMU on every define.
    """
    try:
        st = os.stat("/dev/kvm")
    except FileNotFoundError:
        return False
    if not stat.S_ISCHR(st.st_mode):
        return False
    try:
        user = pwd.getpwnam(QEMU_USER)
    except KeyError:
        return os.access("/dev/kvm", os.R_OK | os.W_OK)
    if user.pw_uid == 0:
        return True
    rw = stat.S_IRUSR | stat.S_IWUSR
    if st.st_uid == user.pw_uid and st.st_mode & rw == rw:
        return True
    groups = set(os.getgrouplist(user.pw_name, user.pw_gid))
    grw = stat.S_IRGRP | stat.S_IWGRP
    if st.st_gid in groups and st.st_mode & grw == grw:
        return True
    orw = stat.S_IROTH | stat.S_IWOTH
    return st.st_mode & orw == orw


_virt_type_cache: dict[str, str] = {}


def choose_virt_type(conn: libvirt.virConnect) -> str:
    """'kvm' when both QEMU and libvirt can use it, else TCG ('qemu')."""
    key = conn.getURI()
    if key not in _virt_type_cache:
        virt_type = "qemu"
        if kvm_usable_by_qemu():
            try:
                conn.getDomainCapabilities(None, None, None, "kvm")
                virt_type = "kvm"
            except libvirt.libvirtError as exc:
                log.info("libvirt cannot use KVM (%s); test domains use TCG", exc)
        _virt_type_cache[key] = virt_type
    return _virt_type_cache[key]


def _supports_o_direct(directory: Path) -> bool:
    """cache='none' needs O_DIRECT, which tmpfs and some overlays refuse."""
    fd = -1
    try:
        fd, name = tempfile.mkstemp(dir=str(directory), prefix=".odirect-")
        os.close(fd)
        fd = -1
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECT)
            return True
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return False
            raise
        finally:
            os.unlink(name)
    finally:
        if fd >= 0:
            os.close(fd)


def domain_xml(
    name: str,
    uuid: str,
    virt_type: str,
    disks: Sequence[DiskSpec],
    images: dict[str, Path],
    workdir: Path,
    cache_none: bool,
) -> str:
    """A firmware-only domain: no OS, no network, no display."""
    cache = " cache='none'" if cache_none else ""
    disk_xml = "".join(
        f"<disk type='file' device='disk'>"
        f"<driver name='qemu' type='{spec.fmt}'{cache}/>"
        f"<source file={quoteattr(str(images[spec.target]))}/>"
        f"<target dev={quoteattr(spec.target)} bus='virtio'/>"
        f"</disk>"
        for spec in disks
    )
    return (
        f"<domain type='{virt_type}'>"
        f"<name>{name}</name><uuid>{uuid}</uuid>"
        f"<metadata><{METADATA_KEY}:fixture xmlns:{METADATA_KEY}='{METADATA_NS}'"
        f" pid='{os.getpid()}' workdir={quoteattr(str(workdir))}/></metadata>"
        "<memory unit='MiB'>128</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>"
        "<on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot>"
        "<on_crash>destroy</on_crash>"
        f"<devices>{disk_xml}"
        "<controller type='usb' model='none'/>"
        "<memballoon model='none'/>"
        "</devices></domain>"
    )


def _disk_elements(xml: str) -> dict[str, ET.Element]:
    root = ET.fromstring(xml)
    found: dict[str, ET.Element] = {}
    for disk in root.findall("./devices/disk"):
        target = disk.find("target")
        if target is not None and target.get("dev"):
            found[target.get("dev", "")] = disk
    return found


class TestDomain:
    """A throwaway domain with its images; see the module docstring."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self,
        name: str,
        uuid: str,
        conn: libvirt.virConnect,
        workdir: Path,
        disks: dict[str, Path],
        specs: dict[str, DiskSpec],
        virt_type: str,
    ) -> None:
        self.name = name
        self.uuid = uuid
        self.conn = conn
        self.dom: libvirt.virDomain = None  # type: ignore[assignment]
        self.workdir = workdir
        self.disks = disks
        self.specs = specs
        self.virt_type = virt_type
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        t0 = time.monotonic()
        self.dom.create()
        self.timings["start"] = time.monotonic() - t0
        log.info("started %s in %.3f s", self.name, self.timings["start"])

    def shutoff(self) -> None:
        """Hard power-off (QEMU still gets SIGTERM first, so it flushes its caches)."""
        if self.dom.isActive():
            self.dom.destroy()

    def is_active(self) -> bool:
        return bool(self.dom.isActive())

    def live_xml(self) -> str:
        return str(self.dom.XMLDesc(0))

    # ------------------------------------------------------------ guest writes
    def alias(self, target: str) -> str:
        """The device alias QEMU knows the disk by (from the live XML)."""
        disk = _disk_elements(self.live_xml()).get(target)
        if disk is None:
            raise FixtureError(f"{self.name}: no disk {target!r} in the live XML")
        alias = disk.find("alias")
        if alias is None or not alias.get("name"):
            raise FixtureError(f"{self.name}: disk {target!r} has no alias (is the domain running?)")
        return str(alias.get("name"))

    def write(self, target: str, offset: int, length: int, pattern: int) -> None:
        """Write ``length`` bytes of ``pattern`` at ``offset``, as the guest would."""
        if not 0 <= pattern <= 0xFF:
            raise ValueError(f"pattern {pattern!r} is not a byte")
        self._qemu_io(target, f"write -P 0x{pattern:02x} {offset} {length}", offset, length)

    def write_zeroes(self, target: str, offset: int, length: int) -> None:
        """Write zeroes (WRITE_ZEROES, may unmap) at ``offset``, as the guest would."""
        self._qemu_io(target, f"write -z {offset} {length}", offset, length)

    def _qemu_io(self, target: str, command: str, offset: int, length: int) -> None:
        if not self.is_active():
            raise FixtureError(f"{self.name}: write() needs a running domain")
        if offset < 0 or length <= 0:
            raise ValueError(f"bad offset/length {offset}/{length}")
        device = f"/machine/peripheral/{self.alias(target)}/virtio-backend"
        log_path = QEMU_LOG_DIR / f"{self.name}.log"
        start = log_path.stat().st_size if log_path.exists() else 0
        hmp = f'qemu-io -d {device} "{command}"'
        out = libvirt_qemu.qemuMonitorCommand(
            self.dom, hmp, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
        )
        if out.strip():
            # HMP answers only for monitor-level errors (unknown device, ...).
            raise FixtureError(f"{self.name}: HMP {hmp!r} answered {out.strip()!r}")
        # qemu-io's own verdict goes to QEMU's stdout, i.e. the domain log.
        self._await_qemu_io_verdict(log_path, start, command, offset, length)
        out = libvirt_qemu.qemuMonitorCommand(
            self.dom, f'qemu-io -d {device} "flush"', libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
        )
        if out.strip():
            raise FixtureError(f"{self.name}: qemu-io flush answered {out.strip()!r}")

    def _await_qemu_io_verdict(
        self, log_path: Path, start: int, command: str, offset: int, length: int
    ) -> None:
        ok = re.compile(rf"^wrote {length}/{length} bytes at offset {offset}$", re.MULTILINE)
        bad = re.compile(r"^(.*failed.*|.*not found.*|.*[Ee]rror.*)$", re.MULTILINE)

        def verdict() -> str | None:
            try:
                with open(log_path, "rb") as fh:
                    if os.fstat(fh.fileno()).st_size < start:  # rotated by virtlogd
                        fh.seek(0)
                    else:
                        fh.seek(start)
                    text = fh.read().decode("utf-8", "replace")
            except FileNotFoundError:
                return None
            m = bad.search(text)
            if m:
                raise FixtureError(f"{self.name}: qemu-io {command!r}: {m.group(1)}")
            return "ok" if ok.search(text) else None

        try:
            tenacity.Retrying(
                retry=tenacity.retry_if_result(lambda r: r is None),
                stop=tenacity.stop_after_delay(QEMU_IO_LOG_DEADLINE),
                wait=tenacity.wait_exponential(multiplier=0.002, max=0.2),
                reraise=True,
            )(verdict)
        except tenacity.RetryError:
            raise FixtureError(
                f"{self.name}: no qemu-io verdict for {command!r} in {log_path} "
                f"after {QEMU_IO_LOG_DEADLINE} s"
            ) from None

    # ------------------------------------------------------------ reading back
    def current_source(self, target: str) -> Path:
        """The image the domain's definition now names for ``target``."""
        disk = _disk_elements(self.dom.XMLDesc(0)).get(target)
        if disk is None:
            return self.disks[target]
        source = disk.find("source")
        if source is None or not source.get("file"):
            raise FixtureError(f"{self.name}: disk {target!r} has no file source")
        return Path(str(source.get("file")))

    def read_image(self, target: str) -> bytes:
        """The full guest-visible content of a disk; the domain must be shut off."""
        if self.is_active():
            raise FixtureError(f"{self.name}: read_image() needs a shut-off domain")
        source = self.current_source(target)
        fmt = _image_format(str(source))
        fd, tmp = tempfile.mkstemp(dir=str(self.workdir), prefix=f".read-{target}-", suffix=".raw")
        os.close(fd)
        try:
            _run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(source), tmp])
            return Path(tmp).read_bytes()
        finally:
            os.unlink(tmp)


class DomainFactory:
    """Creates throwaway domains and removes every trace of them on close()."""

    def __init__(self, conn: libvirt.virConnect, images_root: Path = IMAGES_ROOT) -> None:
        self.conn = conn
        self.images_root = images_root
        self.domains: list[TestDomain] = []
        self.scratch_dirs: list[Path] = []
        self._cache_none: bool | None = None

    def scratch_dir(self, prefix: str = "vsb-scratch") -> Path:
        """A fresh 0755 directory QEMU can reach (e.g. for a backing image).

        pytest's tmp_path lies under a 0700 directory that QEMU, running as
        libvirt-qemu, cannot enter.  Removed by close().
        """
        path = self.images_root / f"{prefix}-{secrets.token_hex(4)}"
        path.mkdir(mode=0o755, parents=True)
        os.chmod(path, 0o755)
        self.scratch_dirs.append(path)
        return path

    def __call__(
        self,
        disks: Sequence[DiskSpec] | None = None,
        start: bool = True,
        name_prefix: str = "vsb-test",
    ) -> TestDomain:
        specs = list(disks) if disks is not None else [DiskSpec("vda")]
        if len({s.target for s in specs}) != len(specs):
            raise ValueError("two DiskSpecs with the same target")
        name = f"{name_prefix}-{secrets.token_hex(4)}"
        uuid = str(uuidlib.uuid4())
        workdir = self.images_root / name
        images = {
            s.target: workdir / f"{s.target}.{'qcow2' if s.fmt == 'qcow2' else 'img'}" for s in specs
        }
        td = TestDomain(
            name, uuid, self.conn, workdir, images, {s.target: s for s in specs},
            choose_virt_type(self.conn),
        )
        self.domains.append(td)  # registered first: close() cleans up a half-made domain
        workdir.mkdir(mode=0o755, parents=True)
        os.chmod(workdir, 0o755)
        for spec in specs:
            self._create_image(spec, images[spec.target])
        if self._cache_none is None:
            self._cache_none = _supports_o_direct(workdir)
        xml = domain_xml(name, uuid, td.virt_type, specs, images, workdir, self._cache_none)
        t0 = time.monotonic()
        td.dom = self.conn.defineXML(xml)
        td.timings["define"] = time.monotonic() - t0
        log.info("defined %s (%s) in %.3f s", name, td.virt_type, td.timings["define"])
        if start:
            td.start()
        return td

    @staticmethod
    def _create_image(spec: DiskSpec, path: Path) -> None:
        argv = ["qemu-img", "create", "-q", "-f", spec.fmt]
        if spec.backing is not None:
            backing = os.path.abspath(spec.backing)
            argv += ["-b", backing, "-F", _image_format(backing)]
        _run(argv + [str(path), str(spec.size)])
        info_size = path.stat().st_size if spec.fmt == "raw" else None
        if info_size is not None and info_size != spec.size:
            raise FixtureError(f"{path}: raw image is {info_size} bytes, wanted {spec.size}")

    def close(self) -> None:
        """Remove every domain made here; raise at the end if anything stayed."""
        problems: list[str] = []
        while self.domains:
            td = self.domains.pop()
            problems += remove_domain(self.conn, td.name, td.uuid, td.workdir)
        while self.scratch_dirs:  # after the domains: they may use its images
            path = self.scratch_dirs.pop()
            shutil.rmtree(path, ignore_errors=True)
            if path.exists():
                problems.append(f"{path} still exists")
        if problems:
            raise FixtureError("cleanup left things behind: " + "; ".join(problems))


def _lookup(conn: libvirt.virConnect, name: str, uuid: str) -> libvirt.virDomain | None:
    # Listing instead of lookupBy*(): a miss is the normal case here, and
    # libvirt's default error handler would print every miss to stderr.
    for dom in conn.listAllDomains(0):
        if dom.UUIDString() == uuid or dom.name() == name:
            return dom
    return None


def remove_domain(conn: libvirt.virConnect, name: str, uuid: str, workdir: Path) -> list[str]:
    """Destroy and undefine a test domain, delete its files; returns what failed."""
    problems: list[str] = []
    try:
        dom = _lookup(conn, name, uuid)
        if dom is not None:
            if dom.isActive():
                dom.destroy()
            if dom.isPersistent():
                try:
                    dom.undefineFlags(_UNDEFINE_FLAGS)
                except libvirt.libvirtError:
                    dom.undefineFlags(
                        libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                        | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                    )
        if _lookup(conn, name, uuid) is not None:
            problems.append(f"domain {name} still exists")
    except libvirt.libvirtError as exc:
        problems.append(f"domain {name}: {exc}")
    if workdir.parent == IMAGES_ROOT and workdir.name == name:  # never rm anything else
        shutil.rmtree(workdir, ignore_errors=True)
        if workdir.exists():
            problems.append(f"{workdir} still exists")
    try:
        (QEMU_LOG_DIR / f"{name}.log").unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        problems.append(f"log of {name}: {exc}")
    return problems


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_domains(conn: libvirt.virConnect) -> list[str]:
    """Remove fixture domains whose creating process is gone (a killed run)."""
    removed: list[str] = []
    for dom in conn.listAllDomains(0):
        try:
            meta = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS, 0)
        except libvirt.libvirtError:
            continue
        try:
            el = ET.fromstring(meta)
            pid = int(el.get("pid", "0"))
            workdir = Path(el.get("workdir", ""))
        except (ET.ParseError, ValueError):
            continue
        if pid <= 0 or _pid_alive(pid):
            continue
        name = dom.name()
        problems = remove_domain(conn, name, dom.UUIDString(), workdir)
        log.warning("swept stale test domain %s (creator pid %d gone)%s", name, pid,
                    f": {problems}" if problems else "")
        removed.append(name)
    return removed


class DiskModel:
    """What the "guest" wrote, byte for byte: each write goes to the domain and here.

    Starts as zeros of each disk's size (the fixture's images start empty); a test
    whose image starts with data (a backing template) sets those bytes itself.
    ``snapshot()`` is the expected content of a point taken now.
    """

    def __init__(self, dom: TestDomain) -> None:
        self.dom = dom
        self.disks = {t: bytearray(s.size) for t, s in dom.specs.items()}

    def write(self, target: str, offset: int, length: int, pattern: int) -> None:
        self.dom.write(target, offset, length, pattern)
        self.disks[target][offset:offset + length] = bytes([pattern]) * length

    def zero(self, target: str, offset: int, length: int) -> None:
        self.dom.write_zeroes(target, offset, length)
        self.disks[target][offset:offset + length] = bytes(length)

    def snapshot(self) -> dict[str, bytes]:
        return {t: bytes(b) for t, b in self.disks.items()}
