"""The libvirt adapter on the real stack: snapshot, guest writes, commit and pivot."""
from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import tempfile
from collections.abc import Iterator

import libvirt
import pytest
import tenacity
from domains import DiskSpec, DomainFactory, TestDomain

from vmsnapbackup.adapters.domainxml import find_disk
from vmsnapbackup.adapters.hypervisor import (
    Hypervisor,
    ImageRef,
    connect,
    is_our_overlay,
    overlay_path,
)
from vmsnapbackup.errors import (
    HypervisorError,
    NotFoundError,
    RepairNeededError,
    UsageError,
)

pytestmark = pytest.mark.integration

log = logging.getLogger(__name__)

MiB = 2**20


@pytest.fixture
def hv() -> Iterator[Hypervisor]:
    with connect() as hyp:
        yield hyp


def image_digest(path: str, fmt: str, workdir: str) -> str:
    """Digest of the guest-visible content of an image (read-only, no lock override)."""
    fd, tmp = tempfile.mkstemp(dir=workdir, prefix=".digest-", suffix=".raw")
    os.close(fd)
    try:
        subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", path, tmp], check=True,
                       capture_output=True)
        with open(tmp, "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()
    finally:
        os.unlink(tmp)


def top(td: TestDomain, target: str) -> ImageRef:
    return find_disk(td.live_xml(), target).top


def test_find_domain_by_name_uuid_id_and_unknown(hv: Hypervisor, running_domain: TestDomain) -> None:
    td = running_domain
    by_name = hv.find_domain(td.name)
    assert hv.domain_uuid(by_name) == td.uuid
    assert hv.domain_name(hv.find_domain(td.uuid)) == td.name
    assert hv.domain_name(hv.find_domain(td.uuid.replace("-", "").upper())) == td.name
    assert hv.domain_name(hv.find_domain(td.dom.ID())) == td.name
    assert hv.domain_name(hv.find_domain(str(td.dom.ID()))) == td.name
    with pytest.raises(NotFoundError, match=r"domain 'vsb-no-such-domain' not found on qemu:///system"):
        hv.find_domain("vsb-no-such-domain")
    with pytest.raises(NotFoundError):
        hv.find_domain("00000000-0000-4000-8000-00000000dead")


def test_connect_failure_names_the_uri() -> None:
    with pytest.raises(HypervisorError, match="qemu:///nonsense"):
        connect("qemu:///nonsense")


def test_snapshot_and_commit_both_disks(hv: Hypervisor, running_domain: TestDomain) -> None:
    td = running_domain
    dom = hv.find_domain(td.name)
    td.write("vda", 0, 64 * 1024, 0x11)
    td.write("vdb", 32 * MiB, 12 * 1024, 0x22)  # the odd tail of vdb
    disks, skipped = hv.backup_disks(dom)
    assert [d.target for d in disks] == ["vda", "vdb"] and skipped == []

    snap = hv.snapshot(dom, disks, lambda d: overlay_path(d, "t1"), quiesce=None)
    log.info("snapshot of 2 disks: %.3f s", snap.seconds)

    assert snap.quiesced is False  # no guest agent: crash-consistent fallback
    for target, fmt in (("vda", "qcow2"), ("vdb", "raw")):
        original = str(td.disks[target])
        assert snap.frozen[target] == ImageRef(original, fmt)
        ovl = snap.overlays[target]
        assert is_our_overlay(ovl) and os.path.dirname(ovl) == str(td.workdir)
        assert top(td, target) == ImageRef(ovl, "qcow2")
        assert hv.top_image(dom, target) == ImageRef(ovl, "qcow2")
        assert find_disk(td.live_xml(), target).backing_chain[0] == ImageRef(original, fmt)

    frozen_before = {t: image_digest(p.path, p.format or "raw", str(td.workdir))
                     for t, p in snap.frozen.items()}
    td.write("vda", 1 * MiB, 128 * 1024, 0xAA)
    td.write("vdb", 0, 4096, 0xBB)
    td.write_zeroes("vda", 0, 4096)
    frozen_after = {t: image_digest(p.path, p.format or "raw", str(td.workdir))
                    for t, p in snap.frozen.items()}
    assert frozen_after == frozen_before  # the guest now writes to the overlays only

    for target in ("vda", "vdb"):
        result = hv.commit(dom, target, snap.overlays[target], timeout=120)
        log.info("commit+pivot of %s: ready %.3f s, total %.3f s",
                 target, result.ready_seconds, result.seconds)
        assert result.image.path == str(td.disks[target])
        assert top(td, target).path == str(td.disks[target])
        assert find_disk(td.live_xml(), target).backing_chain == ()
        assert not os.path.lexists(snap.overlays[target])

    assert hv.is_active(dom)
    td.shutoff()
    assert not hv.is_active(dom)
    vda = td.read_image("vda")
    vdb = td.read_image("vdb")
    assert vda[:4096] == bytes(4096)
    assert vda[4096:64 * 1024] == b"\x11" * (60 * 1024)
    assert vda[1 * MiB:1 * MiB + 128 * 1024] == b"\xaa" * (128 * 1024)
    assert vdb[:4096] == b"\xbb" * 4096
    assert vdb[32 * MiB:] == b"\x22" * (12 * 1024)
    assert len(vdb) == 32 * MiB + 12 * 1024


def test_snapshot_only_selected_disk(hv: Hypervisor, running_domain: TestDomain) -> None:
    td = running_domain
    dom = hv.find_domain(td.uuid)
    disks, skipped = hv.backup_disks(dom, select=["vda"])
    assert [d.target for d in disks] == ["vda"]
    assert [(s.disk.target, s.reason) for s in skipped] == [("vdb", "not selected")]
    snap = hv.snapshot(dom, disks, {"vda": overlay_path(disks[0], "only")}, quiesce=False)
    assert list(snap.overlays) == ["vda"] and list(snap.frozen) == ["vda"]
    assert top(td, "vda").path == snap.overlays["vda"]
    assert top(td, "vdb") == ImageRef(str(td.disks["vdb"]), "raw")
    assert find_disk(td.live_xml(), "vdb").backing_chain == ()
    td.write("vdb", 0, 4096, 0x5C)
    hv.commit(dom, "vda", snap.overlays["vda"], timeout=120)
    assert top(td, "vda").path == str(td.disks["vda"])
    td.shutoff()
    assert td.read_image("vdb")[:4096] == b"\x5c" * 4096


def test_backing_chain_survives_commit(hv: Hypervisor, make_domain: DomainFactory) -> None:
    template = make_domain(disks=[DiskSpec("vda", "qcow2", 32 * MiB)], start=True)
    template.write("vda", 0, MiB, 0x7E)
    template.shutoff()
    base = str(template.disks["vda"])
    td = make_domain(disks=[DiskSpec("vda", "qcow2", 32 * MiB, backing=base)], start=True)
    dom = hv.find_domain(td.name)
    child = str(td.disks["vda"])
    assert find_disk(td.live_xml(), "vda").backing_chain == (ImageRef(base, "qcow2"),)
    base_digest = image_digest(base, "qcow2", str(td.workdir))

    disks, _ = hv.backup_disks(dom)
    snap = hv.snapshot(dom, disks, lambda d: overlay_path(d, "chain"))
    assert snap.frozen["vda"] == ImageRef(child, "qcow2")
    assert find_disk(td.live_xml(), "vda").backing_chain == (
        ImageRef(child, "qcow2"), ImageRef(base, "qcow2"))
    td.write("vda", 512 * 1024, MiB, 0x3D)
    hv.commit(dom, "vda", snap.overlays["vda"], timeout=120)

    disk = find_disk(td.live_xml(), "vda")
    assert disk.top.path == child
    assert disk.backing_chain == (ImageRef(base, "qcow2"),)  # SHALLOW: not flattened
    td.shutoff()
    assert image_digest(base, "qcow2", str(td.workdir)) == base_digest
    data = td.read_image("vda")
    assert data[:512 * 1024] == b"\x7e" * (512 * 1024)
    assert data[512 * 1024:512 * 1024 + MiB] == b"\x3d" * MiB


def test_commit_refuses_when_top_is_not_our_overlay(
    hv: Hypervisor, running_domain: TestDomain
) -> None:
    td = running_domain
    dom = hv.find_domain(td.name)
    disks, _ = hv.backup_disks(dom, ["vda"])
    ours = overlay_path(disks[0], "mine")

    # No snapshot at all: the top is the source disk itself.
    with pytest.raises(RepairNeededError, match="not on our overlay"):
        hv.commit(dom, "vda", ours)
    assert top(td, "vda").path == str(td.disks["vda"])
    with pytest.raises(UsageError, match="not a vmsnapbackup overlay"):
        hv.commit(dom, "vda", str(td.disks["vda"]))

    # Somebody else's snapshot on top of ours.
    snap = hv.snapshot(dom, disks, {"vda": ours})
    foreign = str(td.workdir / "vda.someone-else.qcow2")
    dom.virdomain.snapshotCreateXML(
        "<domainsnapshot><disks><disk name='vda' snapshot='external' type='file'>"
        f"<source file='{foreign}'/></disk><disk name='vdb' snapshot='no'/></disks>"
        "</domainsnapshot>",
        libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA,
    )
    with pytest.raises(RepairNeededError, match="someone-else"):
        hv.commit(dom, "vda", snap.overlays["vda"])
    chain = find_disk(td.live_xml(), "vda")
    assert chain.top.path == foreign
    assert [p.path for p in chain.backing_chain] == [ours, str(td.disks["vda"])]
    assert os.path.exists(ours)


def test_snapshot_refuses_existing_overlay_and_bad_names(
    hv: Hypervisor, running_domain: TestDomain
) -> None:
    td = running_domain
    dom = hv.find_domain(td.name)
    disks, _ = hv.backup_disks(dom, ["vda"])
    leftover = overlay_path(disks[0], "old")
    with open(leftover, "wb") as fh:
        fh.write(b"leftover")
    with pytest.raises(RepairNeededError, match="already exists"):
        hv.snapshot(dom, disks, {"vda": leftover})
    with pytest.raises(UsageError, match="vmsnapbackup"):
        hv.snapshot(dom, disks, {"vda": str(td.workdir / "vda.snap.qcow2")})
    assert top(td, "vda").path == str(td.disks["vda"])


def test_quiesce_true_without_agent_raises(hv: Hypervisor, running_domain: TestDomain) -> None:
    td = running_domain
    dom = hv.find_domain(td.name)
    disks, _ = hv.backup_disks(dom)
    with pytest.raises(HypervisorError, match="quiesced snapshot.*agent"):
        hv.snapshot(dom, disks, lambda d: overlay_path(d, "q"), quiesce=True)
    for target in ("vda", "vdb"):
        assert top(td, target).path == str(td.disks[target])
        assert not os.path.lexists(overlay_path(find_disk(td.live_xml(), target), "q"))


def test_shut_off_domain_gives_its_configured_disks(
    hv: Hypervisor, make_domain: DomainFactory
) -> None:
    td = make_domain(
        disks=[DiskSpec("vda", "qcow2", 16 * MiB), DiskSpec("vdb", "raw", 8 * MiB)], start=False)
    dom = hv.find_domain(td.name)
    assert not hv.is_active(dom)
    disks, skipped = hv.backup_disks(dom)
    assert [(d.target, d.source, d.format) for d in disks] == [
        ("vda", str(td.disks["vda"]), "qcow2"), ("vdb", str(td.disks["vdb"]), "raw")]
    assert skipped == []
    assert [d.target for d in hv.disks(dom, inactive=True)] == ["vda", "vdb"]
    with pytest.raises(HypervisorError, match="not running"):
        hv.snapshot(dom, disks, lambda d: overlay_path(d, "off"))
    with pytest.raises(RepairNeededError, match="shut off"):
        hv.commit(dom, "vda", overlay_path(disks[0], "off"))
    with pytest.raises(NotFoundError, match="vdz"):
        hv.backup_disks(dom, ["vda", "vdz"])


def _wait_gone(pid: int) -> None:
    def alive() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    tenacity.Retrying(
        retry=tenacity.retry_if_result(bool),
        wait=tenacity.wait_exponential(multiplier=0.01, max=0.5),
        stop=tenacity.stop_after_delay(30),
        reraise=True,
    )(alive)


def test_commit_refused_while_an_exporter_holds_the_frozen_image(
    hv: Hypervisor, running_domain: TestDomain
) -> None:
    td = running_domain
    dom = hv.find_domain(td.name)
    disks, _ = hv.backup_disks(dom, ["vda"])
    snap = hv.snapshot(dom, disks, lambda d: overlay_path(d, "held"))
    frozen = snap.frozen["vda"].path
    pidfile = td.workdir / "qsd.pid"
    subprocess.run(
        ["qemu-storage-daemon",
         "--blockdev", f"driver=file,node-name=f,filename={frozen},read-only=on",
         "--blockdev", "driver=qcow2,node-name=q,file=f,read-only=on",
         "--daemonize", "--pidfile", str(pidfile)],
        check=True, capture_output=True,
    )
    pid = int(pidfile.read_text())
    try:
        td.write("vda", 0, 64 * 1024, 0x66)
        with pytest.raises(HypervisorError, match="lock.*stop it first"):
            hv.commit(dom, "vda", snap.overlays["vda"], timeout=60)
        assert top(td, "vda").path == snap.overlays["vda"]  # nothing changed
    finally:
        os.kill(pid, signal.SIGTERM)
        _wait_gone(pid)
    hv.commit(dom, "vda", snap.overlays["vda"], timeout=60)
    assert top(td, "vda").path == str(td.disks["vda"])
    td.shutoff()
    assert td.read_image("vda")[:64 * 1024] == b"\x66" * (64 * 1024)
