"""The remote data path's options: port ranges, --tls-dir, and what is refused remotely."""
from __future__ import annotations

from pathlib import Path

import pytest

from vmsnapbackup.adapters.nbdtls import DEFAULT_TLS_DIR
from vmsnapbackup.adapters.sourceexport import DEFAULT_NBD_PORTS, DataPath, parse_port_range
from vmsnapbackup.errors import UsageError
from vmsnapbackup.workflows import remoteboot
from vmsnapbackup.workflows.backupdaemons import data_path_from
from vmsnapbackup.workflows.boot import boot_point, discard_boot, resume_boot
from vmsnapbackup.workflows.restore import restore


@pytest.mark.parametrize("text, expected", [("10809-10872", (10809, 10872)),
                                            ("2000", (2000, 2000)), ("1-65535", (1, 65535))])
def test_port_ranges(text: str, expected: tuple[int, int]) -> None:
    assert parse_port_range(text) == expected


@pytest.mark.parametrize("text", ["", "a-b", "10-5", "0-10", "1-65536", "10809-"])
def test_bad_port_ranges_are_one_line_usage_errors(text: str) -> None:
    with pytest.raises(UsageError, match="--nbd-ports"):
        parse_port_range(text)


def test_tls_dir_and_ports_from_the_cli(tmp_path: Path) -> None:
    assert data_path_from(None, None) is None
    assert data_path_from("", None) == DataPath(DEFAULT_TLS_DIR, DEFAULT_NBD_PORTS)
    assert data_path_from(str(tmp_path), "4000-4001") == DataPath(str(tmp_path), (4000, 4001))
    with pytest.raises(UsageError, match="--tls-dir"):
        data_path_from(None, "4000-4001")


@pytest.mark.parametrize("kw, message", [
    ({"define": "copy", "to": "out"}, r"needs --pool-volume POOLNAME"),
    ({"pool_volume": "/var/lib/libvirt/images"}, r"names a libvirt storage pool of the "
                                                 r"hypervisor, not a path"),
])
def test_remote_restore_refuses_what_cannot_reach_the_hypervisor(
        kw: dict[str, str], message: str, tmp_path: Path) -> None:
    """``--define`` of images left on this server, or a path for the hypervisor's
    storage pool: refused before the pool is opened or ssh dialled."""
    if "to" in kw:
        kw = {**kw, "to": str(tmp_path / kw["to"])}
    with pytest.raises(UsageError, match=message):
        restore("dom", tmp_path / "pool", uri="qemu+ssh://root@hv.example/system",
                **kw)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


REMOTE = "qemu+ssh://root@hv.example/system"


@pytest.mark.parametrize("call", [
    lambda d: boot_point("dom", d / "pool", 1, "copy", uri=REMOTE, overlay_dir=d),
    lambda d: resume_boot("copy", uri=REMOTE, overlay_dir=d),
    lambda d: discard_boot("copy", REMOTE, overlay_dir=d),
])
def test_boot_onto_a_remote_hypervisor_is_refused_before_anything(call, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                  ) -> None:
    """The point would be served here, the domain run there: refused, nothing made
    (no pool opened, no boot directory, no ssh connection)."""
    with pytest.raises(UsageError, match=r"own hypervisor, not on qemu\+ssh://root@hv\.example"):
        call(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("call", [
    lambda d: remoteboot.boot_point("dom", d / "pool", 1, "../x", uri=REMOTE, overlay_dir=d),
    lambda d: remoteboot.resume_boot("a b", uri=REMOTE, overlay_dir=d),
    lambda d: remoteboot.discard_boot("", REMOTE, overlay_dir=d),
])
def test_remote_boot_refuses_a_bad_name_before_anything(call, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                        ) -> None:
    """The CLI's boot goes to :mod:`remoteboot` for a qemu+ssh URI: a name that is no
    domain name is refused before the pool is opened or ssh dialled."""
    with pytest.raises(UsageError, match="not a usable domain name"):
        call(tmp_path)
    assert list(tmp_path.iterdir()) == []
