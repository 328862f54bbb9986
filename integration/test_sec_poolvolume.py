"""``restore --pool-volume`` writes only inside the libvirt storage pool's directory
(issue 12, DESIGN §8).

The volume name is built from names a backup pool supplies (the domain, the disk
target), and the pool is not trusted; a planted symlink in the storage pool's
directory must not redirect the restore either.
"""
from __future__ import annotations

import json
import os
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_restore import SyntheticPool, read_image, three_points

from vmsnapbackup.errors import CorruptFileError, UsageError
from vmsnapbackup.workflows.restore import restore

pytestmark = pytest.mark.integration


@pytest.fixture
def storage_pool(make_domain, libvirt_conn) -> Iterator[tuple[str, Path]]:  # type: ignore[no-untyped-def]
    target = make_domain.scratch_dir("vsb-sec-pool")
    name = f"vsbtest-sp-{uuidlib.uuid4().hex[:8]}"
    lpool = libvirt_conn.storagePoolCreateXML(
        f"<pool type='dir'><name>{name}</name><target><path>{target}</path></target></pool>", 0)
    try:
        yield name, target
    finally:
        lpool.destroy()


def test_a_crafted_domain_name_never_reaches_a_path(tmp_path: Path, make_domain,  # type: ignore[no-untyped-def]
                                                    storage_pool: tuple[str, Path]) -> None:
    name, target = storage_pool
    sp = three_points(tmp_path)
    path = sp.store.manifest_path(2)
    m: dict[str, Any] = json.loads(path.read_text())
    m["domain"]["name"] = "../../escaped"
    path.write_text(json.dumps(m))
    # refused as damage (the manifest's checksum, then its name check): never a path
    with pytest.raises(CorruptFileError):
        restore(sp.uuid, sp.pool, point=2, pool_volume=name)
    assert os.listdir(target) == []
    assert not list(target.parent.parent.glob("escaped*"))


def test_a_planted_symlink_is_refused(tmp_path: Path, make_domain,  # type: ignore[no-untyped-def]
                                      storage_pool: tuple[str, Path]) -> None:
    name, target = storage_pool
    sp: SyntheticPool = three_points(tmp_path)
    victim = tmp_path / "victim"
    victim.write_bytes(b"host file\n")
    (target / "vm1-vda.raw").symlink_to(victim)
    with pytest.raises(UsageError, match="outside storage pool directory"):
        restore(sp.name, sp.pool, point=2, pool_volume=name, force=True)
    assert victim.read_bytes() == b"host file\n"
    assert os.readlink(target / "vm1-vda.raw") == str(victim)
    assert sorted(os.listdir(target)) == ["vm1-vda.raw"]   # nothing else written either
    # a plain directory restore is not affected, and a clean pool works
    (target / "vm1-vda.raw").unlink()
    restore(sp.name, sp.pool, point=2, pool_volume=name)
    assert read_image(target / "vm1-vda.raw", "raw") == sp.contents[2]["vda"]
