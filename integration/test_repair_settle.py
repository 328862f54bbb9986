"""Repair believes a refusal at once, unless libvirt may still be finishing a dead call.

A backup SIGKILLed inside libvirt's snapshot call leaves that call running in
libvirtd: for a moment the persistent definition names our overlay and the running
domain does not yet (found by the soak).  That state is built here for real: the
definition is redefined onto an overlay of ours, repair is started, and only once
repair has refused it and is waiting does a real snapshot put the running domain
on that overlay, as libvirt finishing the call would.  Repair must then repair.
A refusal that cannot pass by itself (a foreign image on top of ours) must not
cost that wait.
"""
from __future__ import annotations

import logging
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from domains import DiskSpec, DomainFactory, TestDomain

from vmsnapbackup.adapters.domainxml import find_disk, is_our_overlay, overlay_path
from vmsnapbackup.adapters.hypervisor import Hypervisor, connect
from vmsnapbackup.core.pool import Pool
from vmsnapbackup.errors import ExitCode
from vmsnapbackup.workflows import repairdomain
from vmsnapbackup.workflows.repair import COMMIT, REFUSE, repair

pytestmark = pytest.mark.integration

MiB = 2**20


@pytest.fixture
def hv() -> Iterator[Hypervisor]:
    with connect() as h:
        yield h


@pytest.fixture
def pool_dir(tmp_path: Path) -> Path:
    Pool.create(tmp_path / "pool")
    return tmp_path / "pool"


class _Looked(logging.Handler):
    """Set once repair has refused and is about to look again."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "looking again" in record.getMessage():
            self.event.set()


def _define_on(td: TestDomain, target: str, overlay: str | None) -> None:
    """The persistent definition names ``overlay`` (over the disk's image, as libvirt
    writes it after a snapshot) for ``target``, or the image again if None; the
    running domain is left as it is."""
    root = ET.fromstring(td.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    image = str(td.disks[target])
    disk = next(d for d in root.iter("disk")
                if d.find("target") is not None and d.find("target").get("dev") == target)
    driver, source = disk.find("driver"), disk.find("source")
    assert driver is not None and source is not None
    for old in disk.findall("backingStore"):
        disk.remove(old)
    if overlay is None:
        source.set("file", image)   # the images here are qcow2, as the overlay: same driver
    else:
        image_format = driver.get("type", "raw")
        source.set("file", overlay)
        driver.set("type", "qcow2")
        backing = ET.SubElement(disk, "backingStore", type="file")
        ET.SubElement(backing, "format", type=image_format)
        ET.SubElement(backing, "source", file=image)
        ET.SubElement(backing, "backingStore")
    td.conn.defineXML(ET.tostring(root, encoding="unicode"))
    inactive = td.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert find_disk(inactive, target).source == (overlay or image)
    assert find_disk(td.live_xml(), target).source == image


def _on_image(td: TestDomain) -> bool:
    return all(find_disk(td.dom.XMLDesc(flags), t).source == str(img)
               for t, img in td.disks.items()
               for flags in (0, libvirt.VIR_DOMAIN_XML_INACTIVE))


def test_a_definition_ahead_of_the_running_domain_is_repaired_once_it_settles(
        hv: Hypervisor, make_domain: DomainFactory, pool_dir: Path) -> None:
    td = make_domain(disks=[DiskSpec("vda", "qcow2", 16 * MiB)], start=True)
    dom = hv.find_domain(td.name)
    disks, _ = hv.backup_disks(dom)
    overlay = overlay_path(disks[0], "p1-settle1")
    _define_on(td, "vda", overlay)

    looked = _Looked()
    errors: list[BaseException] = []

    def finish_the_snapshot() -> None:
        """What libvirtd does when it finishes the dead backup's snapshot call."""
        try:
            if not looked.event.wait(30):
                raise AssertionError("repair never looked again")
            with connect() as other:
                other_dom = other.find_domain(td.uuid)
                other.snapshot(other_dom, disks, lambda d: overlay)
        except BaseException as err:   # reported by the test's thread
            errors.append(err)

    logger = logging.getLogger(repairdomain.__name__)
    logger.addHandler(looked)
    level = logger.level
    logger.setLevel(logging.INFO)
    finisher = threading.Thread(target=finish_the_snapshot, daemon=True)
    finisher.start()
    try:
        report = repair(pool_dir, domain=td.name)
    finally:
        logger.removeHandler(looked)
        logger.setLevel(level)
        looked.event.set()
        finisher.join(60)
    assert not errors, errors
    assert [a.action for a in report.actions] == [COMMIT], report.lines()
    assert report.exit_code == ExitCode.OK
    assert _on_image(td)
    assert not Path(overlay).exists()
    assert repair(pool_dir, domain=td.name).nothing_to_do


def test_a_definition_that_stays_ahead_is_refused_after_the_settle_time(
        hv: Hypervisor, make_domain: DomainFactory, pool_dir: Path) -> None:
    td = make_domain(disks=[DiskSpec("vda", "qcow2", 16 * MiB)], start=True)
    disks, _ = hv.backup_disks(hv.find_domain(td.name))
    overlay = overlay_path(disks[0], "p1-settle2")
    _define_on(td, "vda", overlay)
    started = time.monotonic()
    report = repair(pool_dir, domain=td.name)
    took = time.monotonic() - started
    assert [(a.action, a.target) for a in report.actions] == [(REFUSE, "vda")]
    assert report.exit_code == ExitCode.REPAIR_NEEDED
    assert took >= repairdomain._REFUSAL_SETTLE_SECONDS
    # nothing changed: the definition still names the overlay; put right by hand
    assert find_disk(td.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), "vda").source == overlay
    _define_on(td, "vda", None)
    assert _on_image(td)


def test_a_foreign_image_on_top_of_ours_is_refused_at_once(
        hv: Hypervisor, make_domain: DomainFactory, pool_dir: Path) -> None:
    td = make_domain(disks=[DiskSpec("vda", "qcow2", 16 * MiB)], start=True)
    dom = hv.find_domain(td.name)
    disks, _ = hv.backup_disks(dom)
    ours = hv.snapshot(dom, disks, lambda d: overlay_path(d, "p1-under2")).overlays["vda"]
    foreign = td.workdir / "vda.admin-snap.qcow2"
    subprocess.run(["virsh", "-q", "-c", "qemu:///system", "snapshot-create-as", td.name,
                    "--disk-only", "--no-metadata", "--diskspec", f"vda,file={foreign}"],
                   check=True, capture_output=True)
    assert is_our_overlay(ours)
    started = time.monotonic()
    report = repair(pool_dir, domain=td.name)
    took = time.monotonic() - started
    assert [(a.action, a.target) for a in report.actions] == [(REFUSE, "vda")]
    assert "is not a vmsnapbackup overlay" in report.actions[0].detail
    assert took < repairdomain._REFUSAL_SETTLE_SECONDS, f"a lasting refusal took {took:.1f} s"
