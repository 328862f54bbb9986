"""Encrypted pools' records (core/poolkey.py, core/manifest.py, FORMAT §15.2): the header
field, unlocking, sealed tables and XML, and the refusals around them."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from vmsnapbackup.adapters.keyfile import KeyFile, unlock_pool
from vmsnapbackup.adapters.pinnedchain import (
    KEY_SECRET_ID,
    PinnedImage,
    blockdev_tree,
    secret_objects,
)
from vmsnapbackup.adapters.volumeformat import LUKS_OPTIONS, VolumeLayout
from vmsnapbackup.core.checktable import CheckTable, read_check_table
from vmsnapbackup.core.difftable import compare
from vmsnapbackup.core.manifest import PoolEncryption, PoolHeader
from vmsnapbackup.core.pointmanifest import DomainInfo
from vmsnapbackup.core.pool import Pool
from vmsnapbackup.core.poolkey import (
    domain_xml,
    read_check,
    read_difference,
    seal_xml,
    table_checksum,
    write_check,
    write_difference,
)
from vmsnapbackup.core.sealed import is_sealed, new_salt
from vmsnapbackup.errors import CorruptFileError, IntegrityError, UsageError

MATERIAL = b"q8Kx3yY0wH1Zb4VnT7mR2sL9aP6dC5eF0gJ1kU8iO3u=\n"
OTHER = b"another key file of at least 32 bytes, 0002\n"
UUID = "0b8a3f0e-9d6c-4d7e-8f59-3c2a1b4d5e6f"
BS = 65536


def _key(tmp_path: Path, material: bytes, name: str = "pool.key") -> Path:
    path = tmp_path / name
    path.write_bytes(material)
    path.chmod(0o600)
    return path


def _encrypted_pool(tmp_path: Path) -> tuple[Pool, Path]:
    key = _key(tmp_path, MATERIAL)
    salt = new_salt()
    sk = KeyFile(key).sealing_key(salt)
    pool = Pool.create(tmp_path / "pool",
                       encryption=PoolEncryption(salt=salt.hex(), key_id=sk.key_id.hex()))
    return pool, key


def _table(seed: int) -> CheckTable:
    rng = np.random.default_rng(seed)
    return CheckTable.from_bytes(16 * BS, BS, rng.integers(0, 256, 16 * 16,
                                                           dtype=np.uint8).tobytes())


def test_header_records_salt_and_key_id_as_version_3(tmp_path: Path) -> None:
    pool, _key_path = _encrypted_pool(tmp_path)
    raw = json.loads(pool.header_path.read_bytes())
    assert raw["version"] == 3
    assert raw["encryption"]["records"] == "aes-256-gcm" and len(raw["encryption"]["salt"]) == 64
    assert MATERIAL.strip() not in pool.header_path.read_bytes()
    again = Pool.open(pool.root)
    assert again.encryption == pool.encryption
    # a plain pool keeps writing version 2
    assert json.loads(PoolHeader(created="2026-01-01T00:00:00Z").to_json())["version"] == 2
    bad = dict(raw, encryption=dict(raw["encryption"], kdf="pbkdf2"))
    with pytest.raises(CorruptFileError, match="kdf"):
        PoolHeader.from_json(json.dumps(bad), "h")


def test_unlock_needs_the_right_key(tmp_path: Path) -> None:
    pool, key = _encrypted_pool(tmp_path)
    with pytest.raises(UsageError, match="--key-file"):
        unlock_pool(Pool.open(pool.root), None)
    with pytest.raises(IntegrityError, match="another key"):
        unlock_pool(Pool.open(pool.root), _key(tmp_path, OTHER, "other.key"))
    opened = Pool.open(pool.root)
    unlock_pool(opened, key)
    assert opened.key is not None and opened.key.key_file == str(key)
    plain = Pool.create(tmp_path / "plain")
    with pytest.raises(UsageError, match="not encrypted"):
        unlock_pool(plain, key)


def test_sealed_tables_open_only_with_the_key_and_at_their_path(tmp_path: Path) -> None:
    pool, key = _encrypted_pool(tmp_path)
    unlock_pool(pool, key)
    store = pool.domain(UUID, "web1", create=True)
    d = store.disk_dir(1, "vda")
    d.mkdir(parents=True)
    t1, t2 = _table(1), _table(2)
    path1 = store.table_path(1, "vda", 1)
    checksum = write_check(store, path1, t1)
    data = path1.read_bytes()
    assert is_sealed(data) and bytes(t1.value(3)) not in data
    assert table_checksum(store, path1) == checksum
    assert read_check(store, path1, expected_checksum=checksum) == t1
    diff = compare(t1, t2)
    path2 = store.difference_path(1, "vda", 2)
    write_difference(store, path2, diff)
    assert read_difference(store, path2, table1=t1) == diff
    # moved to another name: does not open
    moved = store.table_path(1, "vda", 7)
    moved.write_bytes(data)
    with pytest.raises(CorruptFileError, match="authentication failed"):
        read_check(store, moved)
    # a plain table where a sealed one belongs is refused, not read
    plain = store.table_path(1, "vda", 8)
    from vmsnapbackup.core.checktable import write_check_table
    write_check_table(plain, t1)
    with pytest.raises(CorruptFileError, match="not sealed"):
        read_check(store, plain)
    # without the key: a usage error, not garbage
    locked = Pool.open(pool.root).domain(UUID)
    with pytest.raises(UsageError, match="--key-file"):
        read_check(locked, path1)
    # and the sealed bytes are no table to the plain reader
    with pytest.raises(CorruptFileError):
        read_check_table(path1)


def test_domain_xml_is_sealed_to_its_manifest(tmp_path: Path) -> None:
    pool, key = _encrypted_pool(tmp_path)
    unlock_pool(pool, key)
    store = pool.domain(UUID, "web1", create=True)
    xml, sealed = seal_xml(store, 4, "<domain><name>web1</name></domain>")
    assert xml == "" and sealed is not None and b"<domain" not in base64.b64decode(sealed)
    info = DomainInfo(name="web1", uuid=UUID, xml=xml, xml_sealed=sealed)

    class _M:   # the two fields domain_xml reads
        domain = info
        point = 4
    assert domain_xml(store, _M()) == "<domain><name>web1</name></domain>"  # type: ignore[arg-type]
    _M.point = 5
    with pytest.raises(CorruptFileError, match="authentication failed"):
        domain_xml(store, _M())  # type: ignore[arg-type]


def test_plain_pool_writes_plain_tables(tmp_path: Path) -> None:
    pool = Pool.create(tmp_path / "pool")
    store = pool.domain(UUID, "web1", create=True)
    store.disk_dir(1, "vda").mkdir(parents=True)
    path = store.table_path(1, "vda", 1)
    write_check(store, path, _table(1))
    assert not is_sealed(path.read_bytes()) and read_check_table(path) == _table(1)
    assert seal_xml(store, 1, "<domain/>") == ("<domain/>", None)


def test_luks_volume_options_and_secret_by_file() -> None:
    layout = VolumeLayout(key_file="/k/pool.key")
    assert layout.create_options() == list(LUKS_OPTIONS)
    assert "encrypt.cipher-mode=xts" in LUKS_OPTIONS
    with pytest.raises(UsageError, match="compression and encryption"):
        VolumeLayout("zstd", key_file="/k").check("qcow2")
    with pytest.raises(UsageError, match="raw volume cannot be encrypted"):
        VolumeLayout(key_file="/k").check("raw")
    node = layout.writer_node(PinnedImage("/p/base.qcow2", "qcow2"))
    assert node is not None
    args = node({"driver": "qcow2", "node-name": "n", "file": "f"})
    assert args["encrypt"] == {"format": "luks", "key-secret": KEY_SECRET_ID}
    assert args["backing"]["encrypt"]["key-secret"] == KEY_SECRET_ID
    image = PinnedImage("/p/point,1.qcow2", "qcow2", PinnedImage("/p/b.qcow2", "qcow2",
                                                                  key_file="/k/a,b"),
                        key_file="/k/a,b")
    assert secret_objects(image) == [f"secret,id={KEY_SECRET_ID},format=raw,file=/k/a,,b"]
    tree = blockdev_tree(image)
    assert tree["encrypt"]["key-secret"] == tree["backing"]["encrypt"]["key-secret"]
    assert secret_objects(PinnedImage("/p/x.qcow2", "qcow2")) == []


def test_rebase_is_refused_in_an_encrypted_pool(tmp_path: Path) -> None:
    from vmsnapbackup.workflows.rebase import rebase

    pool, _key_path = _encrypted_pool(tmp_path)
    with pytest.raises(UsageError, match="rebase in an encrypted pool is not available"):
        rebase("web1", pool.root)
