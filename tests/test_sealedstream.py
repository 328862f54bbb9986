"""Sealed tables read and written as streams (core/sealedstream.py, FORMAT §15.2): the
envelope is unchanged, a changed byte anywhere is an authentication failure (also
where the table reader would stop early), and no more than one table is held."""
from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from test_poolkey import UUID, _encrypted_pool

from vmsnapbackup.adapters.keyfile import unlock_pool
from vmsnapbackup.core.checktable import CheckTable, write_check_table
from vmsnapbackup.core.domainstore import DomainStore
from vmsnapbackup.core.pool import Pool
from vmsnapbackup.core.poolkey import read_check, table_checksum, write_check
from vmsnapbackup.core.sealed import ENVELOPE_HEADER_SIZE, TAG_SIZE
from vmsnapbackup.errors import CorruptFileError

BS = 65536


def _big(blocks: int) -> CheckTable:
    rng = np.random.default_rng(blocks)
    return CheckTable.from_bytes(blocks * BS, BS, rng.integers(0, 256, blocks * 16,
                                                               dtype=np.uint8).tobytes())


def _store(tmp_path: Path) -> DomainStore:
    pool, key = _encrypted_pool(tmp_path)
    unlock_pool(pool, key)
    store = pool.domain(UUID, "web1", create=True)
    store.disk_dir(1, "vda").mkdir(parents=True)
    return store


def test_the_envelope_is_the_one_whole_sealing_made(tmp_path: Path) -> None:
    """Streamed sealing writes the §15.2 envelope: the whole-record opener reads it."""
    store = _store(tmp_path)
    table = _big(300)
    path = store.table_path(1, "vda", 1)
    checksum = write_check(store, path, table)
    sealed = path.read_bytes()
    key = store.pool.key
    assert key is not None
    plain = key.sealing.open(sealed, store.relpath(path), path)
    other = tmp_path / "plain.vsbt"
    assert write_check_table(other, table) == checksum
    assert plain == other.read_bytes()
    assert table_checksum(store, path) == checksum
    assert read_check(store, path, expected_checksum=checksum) == table


@pytest.mark.parametrize("where", ["magic", "header", "body", "checksum", "tag"])
def test_a_changed_byte_anywhere_is_an_authentication_failure(tmp_path: Path,
                                                              where: str) -> None:
    store = _store(tmp_path)
    path = store.table_path(1, "vda", 1)
    write_check(store, path, _big(300))
    data = bytearray(path.read_bytes())
    at = {"magic": ENVELOPE_HEADER_SIZE, "header": ENVELOPE_HEADER_SIZE + 20,
          "body": len(data) // 2, "checksum": len(data) - TAG_SIZE - 3,
          "tag": len(data) - 1}[where]
    data[at] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="authentication failed"):
        read_check(store, path)
    with pytest.raises(CorruptFileError, match="authentication failed"):
        table_checksum(store, path)


def test_a_truncated_sealed_table_is_refused(tmp_path: Path) -> None:
    store = _store(tmp_path)
    path = store.table_path(1, "vda", 1)
    write_check(store, path, _big(300))
    data = path.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, ENVELOPE_HEADER_SIZE + TAG_SIZE - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(CorruptFileError):
            read_check(store, path)


def test_a_sealed_table_in_a_plain_pool_is_refused_by_its_magic(tmp_path: Path) -> None:
    store = _store(tmp_path)
    path = store.table_path(1, "vda", 1)
    write_check(store, path, _big(30))
    plain = Pool.create(tmp_path / "plain").domain(UUID, "web1", create=True)
    plain.disk_dir(1, "vda").mkdir(parents=True)
    moved = plain.table_path(1, "vda", 1)
    moved.write_bytes(path.read_bytes())
    with pytest.raises(CorruptFileError, match="VSBSEAL"):
        read_check(plain, moved)


def test_reading_and_writing_hold_one_table_not_three(tmp_path: Path) -> None:
    """A 16 MiB table: sealing and opening allocate a few MiB of pieces on top of the
    table, where the whole-record way held the plain and the sealed bytes too."""
    store = _store(tmp_path)
    table = _big(1 << 20)                 # 1 Mi blocks: a 16 MiB body
    path = store.table_path(1, "vda", 1)
    tracemalloc.start()
    try:
        write_check(store, path, table)
        _cur, wrote = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        got = read_check(store, path)
        _cur, read = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == table
    assert wrote < 6 << 20, wrote
    assert read - base < (16 << 20) + (6 << 20), read - base
