"""``restore --define`` leaves out what the pool's saved XML would reach into the host
with (issue 12, DESIGN §8), unless the caller trusts the pool (``trust_pool_xml``).

The pool's saved domain XML is crafted the way someone who can write the pool
would: a ``<qemu:commandline>`` running a host command, a ``<filesystem>``
exporting the host's ``/``, a PCI and a USB ``<hostdev>``, a serial port writing
a host file and a cdrom reading one.  The new domain, as libvirt stores it, must
hold none of them; with trust it holds them all (so the test sees them at all).
"""
from __future__ import annotations

import contextlib
import uuid as uuidlib
from pathlib import Path

import libvirt
import pytest
from test_restore import SyntheticPool, patterned

from vmsnapbackup.workflows.restore import restore

pytestmark = pytest.mark.integration

HOST_REACHING = """
    <filesystem type='mount' accessmode='passthrough'><source dir='/'/>
      <target dir='hostroot'/></filesystem>
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <source><address domain='0x0000' bus='0x00' slot='0x1f' function='0x2'/></source>
    </hostdev>
    <hostdev mode='subsystem' type='usb'><source><vendor id='0x1d6b'/>
      <product id='0x0002'/></source></hostdev>
    <serial type='file'><source path='/etc/vsb-evil-serial'/><target port='0'/></serial>
    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/>
      <source file='/etc/shadow'/><target dev='sdz' bus='sata'/><readonly/></disk>
  </devices>
  <qemu:commandline><qemu:arg value='-set'/><qemu:arg value='x.y=z'/></qemu:commandline>
</domain>"""

MARKERS = ("<filesystem", "<hostdev", "vsb-evil-serial", "/etc/shadow", "qemu:commandline")


class CraftedPool(SyntheticPool):
    def xml(self) -> str:
        xml = super().xml().replace("<domain type='kvm'>", "<domain type='kvm' xmlns:qemu="
                                    "'http://libvirt.org/schemas/domain/qemu/1.0'>")
        return xml.replace("  </devices>\n</domain>", HOST_REACHING)


@pytest.mark.parametrize("trust", [False, True])
def test_define_strips_host_access(tmp_path: Path, libvirt_conn, trust: bool,  # type: ignore[no-untyped-def]
                                   caplog: pytest.LogCaptureFixture) -> None:
    sp = CraftedPool(tmp_path / "pool")
    sp.add_point({"vda": bytes(patterned(256 * 1024, 7))})
    name = f"vsbtest-def-{uuidlib.uuid4().hex[:8]}"
    try:
        restore(sp.name, sp.pool, point=1, to=tmp_path / "out", define=name,
                trust_pool_xml=trust)
        xml = libvirt_conn.lookupByName(name).XMLDesc(0)
        assert str(tmp_path / "out" / "vda.raw") in xml   # the restored disk is there
        found = [m for m in MARKERS if m in xml]
        if trust:
            assert found == list(MARKERS)
        else:
            assert found == []
            assert "device='cdrom'" in xml   # the drive stays, empty
            logged = " ".join(r.getMessage() for r in caplog.records)
            assert logged.count("--trust-pool-xml keeps it") >= 5
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            libvirt_conn.lookupByName(name).undefine()
