"""strip_host_access: what a new domain from a pool's saved XML leaves out (issue 12)."""
from __future__ import annotations

import pytest

from vmsnapbackup.adapters.newdomain import new_domain_xml, set_disk_source

SAVED = """<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>web</name><uuid>0b338ccc-f3ed-4bb9-a10d-67066c6b599d</uuid>
  <os><type>hvm</type></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/web.qcow2'/><target dev='vda'/></disk>
    <disk type='block' device='cdrom'><source dev='/dev/sr0'/><target dev='sda'/></disk>
    <hostdev mode='subsystem' type='pci'><source><address bus='0x3'/></source></hostdev>
    <hostdev mode='subsystem' type='usb'><source><vendor id='0x1'/></source></hostdev>
    <redirdev bus='usb' type='tcp'><source mode='connect' host='10.0.0.1' service='4000'/>
      </redirdev>
    <filesystem type='mount'><source dir='/'/><target dir='root'/></filesystem>
    <smartcard mode='host'/>
    <shmem name='x'><server path='/tmp/ivshmem'/></shmem>
    <interface type='hostdev'><source><address type='pci' bus='0x4'/></source></interface>
    <interface type='ethernet'><script path='/tmp/evil.sh'/></interface>
    <interface type='network'><source network='default'/></interface>
    <serial type='file'><source path='/etc/x'/></serial>
    <serial type='pty'/>
    <console type='dev'><source path='/dev/ttyS0'/></console>
    <channel type='unix'><source mode='bind' path='/var/lib/x.sock'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <channel type='unix'><source mode='connect' path='/run/host.sock'/>
      <target type='virtio' name='evil'/></channel>
  </devices>
  <qemu:commandline><qemu:arg value='-evil'/></qemu:commandline>
  <qemu:capabilities><qemu:add capability='x'/></qemu:capabilities>
</domain>"""

GONE = ("<hostdev", "<redirdev", "<filesystem", "<smartcard", "<shmem", "type=\"hostdev\"",
        "evil.sh", "/etc/x", "/dev/ttyS0", "/dev/sr0", "/run/host.sock", "commandline",
        "capabilities", "-evil")


def rewrite(trust: bool) -> str:
    xml, dropped = new_domain_xml(SAVED, "restored", {
        "vda": lambda el: set_disk_source(el, "/restore/vda.raw", "raw")}, trust=trust)
    assert dropped == []
    return xml


def test_everything_reaching_the_host_is_left_out(caplog: pytest.LogCaptureFixture) -> None:
    xml = rewrite(trust=False)
    assert [g for g in GONE if g in xml] == []
    # what a guest needs stays: its disk, the (now empty) cdrom, network, pty, the agent
    for kept in ("/restore/vda.raw", 'device="cdrom"', "network=\"default\"", "type=\"pty\"",
                 "org.qemu.guest_agent.0", 'type="ethernet"'):
        assert kept in xml
    assert len([r for r in caplog.records if "--trust-pool-xml" in r.getMessage()]) == 14


def test_trusted_xml_keeps_it() -> None:
    xml = rewrite(trust=True)
    assert [g for g in GONE if g not in xml.replace("ns0:", "qemu:")
            and g not in ("type=\"hostdev\"",)] == []
