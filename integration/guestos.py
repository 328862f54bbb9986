"""A real Linux guest that writes and fsyncs files on ext4 while it is backed up.

The throwaway domains of domains.py have no operating system; this one boots
the distribution's cloud kernel (apt ``linux-image-cloud-amd64``) with a
minimal initramfs built here from ``busybox-static``: it loads the virtio
modules, mounts its ext4 disk and loops forever writing ``data/fN`` (a known
payload), fsyncing the file and the directory, then printing ``DURABLE N`` on
the serial console, which libvirt logs to a file.  No network, no init system,
and it runs under TCG (about 6 s to boot here) so that it behaves the same on
every host, nested or not.

A restored point is judged as a file system: its journal replays
(``e2fsck -E journal_only`` on a copy, as a mount would), it then passes ``e2fsck -fn``, and every file the
guest logged as durable before the backup's snapshot is there, whole.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import tenacity
from domains import DiskSpec, DomainFactory, TestDomain

log = logging.getLogger(__name__)

BUSYBOX = Path("/bin/busybox")
MODULES = ("virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
           "virtio_pci", "virtio_blk")
DISK_SIZE = 128 * 2**20  # ~25 000 files of 4 KiB: a 30-minute soak writes ~16 000
PAYLOAD_SIZE = 4096
BOOT_DEADLINE = 180.0  # TCG on a loaded 2-core machine

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in {modules}; do insmod /lib/modules/$m.ko 2>/dev/null; done
n=0
while [ ! -b /dev/vda ] && [ $n -lt 300 ]; do usleep 100000; n=$((n+1)); done
mount -t ext4 -o data=ordered /dev/vda /mnt || {{ echo "GUEST FAILED mount"; poweroff -f; }}
mkdir -p /mnt/data
sync /mnt /mnt/data
i=$(ls /mnt/data | wc -l)
echo "READY $i"
while true; do
  i=$((i+1))
  if yes "vsb $i" | head -c {size} > /mnt/data/f$i.tmp && sync /mnt/data/f$i.tmp \
     && mv /mnt/data/f$i.tmp /mnt/data/f$i && sync /mnt/data; then
    echo "DURABLE $i"
  else
    echo "GUEST FULL $i"
    while true; do sleep 60; done
  fi
  usleep 20000
done
"""


class GuestError(RuntimeError):
    """The guest fixture itself failed (not the code under test)."""


def guest_available() -> str | None:
    """None if the guest can be built here, else why not."""
    # a dynamic busybox has an ELF interpreter (ld-linux) and cannot run without a libc
    if not BUSYBOX.exists() or b"ld-linux" in BUSYBOX.read_bytes()[:8192]:
        return "busybox-static is not installed"
    if kernel() is None:
        return "no cloud kernel in /boot (apt-get install linux-image-cloud-amd64)"
    for tool in ("cpio", "mkfs.ext4", "e2fsck", "debugfs", "dumpe2fs"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def kernel() -> Path | None:
    found = sorted(Path("/boot").glob("vmlinuz-*-cloud-amd64"))
    return found[-1] if found else None


def _run(argv: list[str], check: bool = True, **kw: object) -> str:
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          check=False, **kw)  # type: ignore[call-overload]
    if check and proc.returncode != 0:
        raise GuestError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stdout[-2000:]}")
    return str(proc.stdout)


def build_initramfs(out: Path, vmlinuz: Path) -> None:
    """An uncompressed newc cpio: busybox, /init, the virtio modules."""
    version = vmlinuz.name[len("vmlinuz-"):]
    root = out.with_suffix(".d")
    if root.exists():
        shutil.rmtree(root)
    for d in ("bin", "proc", "sys", "dev", "mnt", "lib/modules"):
        (root / d).mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for m in MODULES:
        path = _run(["modinfo", "-k", version, "-n", m]).strip()
        if not path.endswith(".ko"):
            raise GuestError(f"module {m} is {path}: only uncompressed modules are supported")
        shutil.copy2(path, root / "lib" / "modules" / f"{m}.ko")
    init = root / "init"
    init.write_text(INIT.format(modules=" ".join(MODULES), size=PAYLOAD_SIZE))
    init.chmod(0o755)
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    with open(out, "wb") as f:
        subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], input="\n".join(files).encode(),
                       stdout=f, cwd=root, check=True)
    shutil.rmtree(root)


def make_guest(factory: DomainFactory) -> tuple[TestDomain, Path]:
    """Define and start the guest; returns it and its console log."""
    vmlinuz = kernel()
    if vmlinuz is None:
        raise GuestError("no cloud kernel")
    dom = factory(disks=[DiskSpec("vda", "raw", DISK_SIZE)], start=False, name_prefix="vsb-guest")
    image = dom.disks["vda"]
    _run(["mkfs.ext4", "-q", "-F", "-L", "vsbguest", str(image)])
    # libvirt relabels kernel and initrd for QEMU: copies in the domain's own dir
    kcopy, initrd = dom.workdir / "vmlinuz", dom.workdir / "initrd.cpio"
    shutil.copy2(vmlinuz, kcopy)
    build_initramfs(initrd, vmlinuz)
    console = dom.workdir / "console.log"
    root = ET.fromstring(dom.dom.XMLDesc(0))
    # TCG always: a nested or feature-poor KVM (this CI's) can hang the guest kernel
    # before its first console line, and the fixture must work without KVM anyway.
    root.set("type", "qemu")
    os_el = root.find("os")
    devices = root.find("devices")
    assert os_el is not None and devices is not None
    for boot in os_el.findall("boot"):
        os_el.remove(boot)
    ET.SubElement(os_el, "kernel").text = str(kcopy)
    ET.SubElement(os_el, "initrd").text = str(initrd)
    ET.SubElement(os_el, "cmdline").text = "console=ttyS0 panic=-1 quiet"
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=str(console))
    ET.SubElement(serial, "target", port="0")
    dom.dom = dom.conn.defineXML(ET.tostring(root, encoding="unicode"))
    dom.start()
    wait_for(console, r"^READY \d+", BOOT_DEADLINE)
    return dom, console


def wait_for(console: Path, pattern: str, deadline: float) -> None:
    rx = re.compile(pattern, re.MULTILINE)

    @tenacity.retry(stop=tenacity.stop_after_delay(deadline), wait=tenacity.wait_fixed(0.2),
                    retry=tenacity.retry_if_exception_type(TimeoutError), reraise=True)
    def check() -> None:
        text = console.read_text(errors="replace") if console.exists() else ""
        if "GUEST FAILED" in text:
            raise GuestError(f"guest failed: {text[-2000:]}")
        if not rx.search(text):
            raise TimeoutError(f"{pattern!r} not on the console within {deadline} s: "
                               f"{text[-1500:]}")
    check()


def durable(console: Path) -> int:
    """The highest file number the guest has logged as durable.

    The guest logs a file only when every step of writing it succeeded; when one
    fails (its disk is full) it says so and stops, and so does this fixture: a
    count of files that were never written would read as lost data."""
    text = console.read_text(errors="replace")
    if re.search(r"^GUEST FULL", text, re.MULTILINE):
        raise GuestError("the guest's disk is full: make guestos.DISK_SIZE larger")
    found = re.findall(r"^DURABLE (\d+)", text, re.MULTILINE)
    return int(found[-1]) if found else 0


def payload(i: int) -> bytes:
    line = f"vsb {i}\n".encode()
    return (line * (PAYLOAD_SIZE // len(line) + 1))[:PAYLOAD_SIZE]


def judge_image(image: Path, work: Path, durable_before: int) -> list[str]:
    """Problems of a restored ext4 image (see the module docstring); [] if none."""
    copy = work / "judged.img"
    shutil.copyfile(image, copy)
    problems: list[str] = []
    header = _run(["dumpe2fs", "-h", str(copy)], check=False)  # fails on a bad journal too
    if re.search(r"^Filesystem features:.*\bneeds_recovery\b", header, re.MULTILINE):
        # Replay the journal as a mount would.  e2fsck -y repairs whatever else it
        # meets on the way (a destroyed journal is "regenerated"), so anything in its
        # output beyond the replay itself counts as damage.
        replay = subprocess.run(["e2fsck", "-y", "-E", "journal_only", str(copy)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                check=False)
        if replay.returncode not in (0, 1) or re.search(
                r"invalid|corrupt|regenerat|clear|fix|error", replay.stdout, re.IGNORECASE):
            problems.append(f"journal replay ({replay.returncode}): {replay.stdout[-800:]}")
    check = subprocess.run(["e2fsck", "-fn", str(copy)], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, check=False)
    if check.returncode != 0:
        problems.append(f"e2fsck -fn: {check.returncode}: {check.stdout[-800:]}")
    dump = work / "dump"
    if dump.exists():
        shutil.rmtree(dump)
    dump.mkdir()
    _run(["debugfs", "-R", f"rdump /data {dump}", str(copy)])
    missing = [i for i in range(1, durable_before + 1)
               if not (dump / "data" / f"f{i}").exists()
               or (dump / "data" / f"f{i}").read_bytes() != payload(i)]
    if missing:
        problems.append(f"{len(missing)} of {durable_before} durable files missing or wrong "
                        f"(first {missing[:5]})")
    os.unlink(copy)
    return problems
