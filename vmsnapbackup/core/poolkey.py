"""Tables and domain XML of a pool, sealed when the pool is encrypted (FORMAT.md §15.2).

Why one module: every reader and writer of a check table, a difference table or
the saved domain XML goes through these few functions, so an encrypted pool can
never get one of them written in the clear by a code path that forgot the key,
and a plain pool never gets a sealed one.  In a plain pool they are the plain
readers and writers of :mod:`.checktable` and :mod:`.difftable`, unchanged.

A sealed table is the envelope of :mod:`.sealed` around the very bytes of the
plain file, so the checksums a manifest records (``table1_digest``,
``difference_digest``) are those of the plain bytes in both kinds of pool.  The
envelope is bound to the file's path relative to the domain directory: a sealed
table renamed to another point's does not open.
"""
from __future__ import annotations

import base64
import dataclasses
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CorruptFileError, UsageError
from .atomic import atomic_write_bytes
from .checktable import CheckTable, read_check_table, write_check_table
from .difftable import DifferenceTable, read_difference_table, write_difference_table
from .poolread import read_bounded
from .sealed import SealingKey, is_sealed
from .tablefile import file_checksum

if TYPE_CHECKING:
    from .domainstore import DomainStore
    from .pointmanifest import PointManifest

__all__ = [
    "PoolKey",
    "domain_xml",
    "read_check",
    "read_difference",
    "seal_xml",
    "table_checksum",
    "with_domain_xml",
    "write_check",
    "write_difference",
]

#: the largest table file read into memory to be opened (a 4 TiB disk in 4 KiB blocks)
MAX_SEALED_TABLE = 1 << 34
_XML_SUFFIX = "#domain.xml"


@dataclass(frozen=True)
class PoolKey:
    """The key of an encrypted pool: the sealing key, and the key file's path that QEMU
    reads itself as a ``secret`` object (never its bytes on a command line)."""

    sealing: SealingKey
    key_file: str

    def __repr__(self) -> str:
        return f"PoolKey({self.sealing!r}, {self.key_file!r})"


class _Named(io.BytesIO):
    """Plain bytes of a sealed file, named like the file in the readers' messages."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self.name = name


def _key(store: DomainStore) -> SealingKey | None:
    if store.pool.encryption is None:
        return None
    if store.pool.key is None:
        raise UsageError(f"pool {store.pool.root} is encrypted (docs/FORMAT.md §15.2): "
                         "give its key with --key-file FILE")
    return store.pool.key.sealing


def _plain(store: DomainStore, path: Path, kind: str) -> _Named | Path:
    """What the table readers read: the file itself, or the opened envelope."""
    key = _key(store)
    if key is None:
        # a plain pool's table is read by the readers themselves, streamed or mapped:
        # reading it whole here would cost its size in memory (issue 19's bound)
        try:
            with open(path, "rb") as f:
                head = f.read(64)
        except FileNotFoundError:
            raise CorruptFileError(path, "file is missing") from None
        if is_sealed(head):
            raise CorruptFileError(path, "sealed, but the pool is not encrypted")
        return path
    data = read_bounded(path, MAX_SEALED_TABLE, kind, root=store.pool.root)
    if data is None:
        raise CorruptFileError(path, "file is missing")
    if not is_sealed(data):
        raise CorruptFileError(path, "not sealed, but the pool is encrypted: refusing a "
                               "table in the clear where a sealed one belongs")
    return _Named(key.open(data, store.relpath(path), path), os.fspath(path))


def read_check(store: DomainStore, path: Path, *, expected_checksum: bytes | None = None,
               expected_body_digest: bytes | None = None) -> CheckTable:
    """:func:`.checktable.read_check_table` of a table of ``store``, sealed or not."""
    return read_check_table(_plain(store, path, "check table"),
                            expected_checksum=expected_checksum,
                            expected_body_digest=expected_body_digest)


def read_difference(store: DomainStore, path: Path, *, table1: CheckTable,
                    expected_checksum: bytes | None = None) -> DifferenceTable:
    """:func:`.difftable.read_difference_table` of a table of ``store``, sealed or not."""
    return read_difference_table(_plain(store, path, "difference table"), table1=table1,
                                 expected_checksum=expected_checksum)


def table_checksum(store: DomainStore, path: Path) -> bytes:
    """The trailing checksum of the plain bytes of a table file (cheap when not sealed)."""
    if store.pool.encryption is None:
        return file_checksum(path)
    return file_checksum(_plain(store, path, "table"))


def _write(store: DomainStore, path: Path, emit: bytes, checksum: bytes) -> bytes:
    key = _key(store)
    assert key is not None
    atomic_write_bytes(path, key.seal(emit, store.relpath(path)))
    return checksum


def write_check(store: DomainStore, path: Path, table: CheckTable) -> bytes:
    """Write check table ``path`` of ``store`` (atomically); the plain file's checksum."""
    if _key(store) is None:
        return write_check_table(path, table)
    buf = io.BytesIO()
    checksum = write_check_table(buf, table)
    return _write(store, path, buf.getvalue(), checksum)


def write_difference(store: DomainStore, path: Path, diff: DifferenceTable) -> bytes:
    """Write difference table ``path`` of ``store`` (atomically); the plain checksum."""
    if _key(store) is None:
        return write_difference_table(path, diff)
    buf = io.BytesIO()
    checksum = write_difference_table(buf, diff)
    return _write(store, path, buf.getvalue(), checksum)


def seal_xml(store: DomainStore, point: int, xml: str) -> tuple[str, str | None]:
    """``(xml, xml_sealed)`` of a manifest's domain: as is in a plain pool, else ``""``
    and the envelope in base64, bound to the manifest's path."""
    key = _key(store)
    if key is None:
        return xml, None
    where = store.relpath(store.manifest_path(point)) + _XML_SUFFIX
    return "", base64.b64encode(key.seal(xml.encode("utf-8"), where)).decode("ascii")


def domain_xml(store: DomainStore, manifest: PointManifest) -> str:
    """The domain XML a point saved, opened when it is sealed."""
    sealed = manifest.domain.xml_sealed
    if sealed is None:
        if store.pool.encryption is not None:
            raise CorruptFileError(store.manifest_path(manifest.point),
                                   "domain XML in the clear in an encrypted pool")
        return manifest.domain.xml
    key = _key(store)
    path = store.manifest_path(manifest.point)
    if key is None:
        raise CorruptFileError(path, "sealed domain XML, but the pool is not encrypted")
    where = store.relpath(path) + _XML_SUFFIX
    return key.open(base64.b64decode(sealed), where, path).decode("utf-8")


def with_domain_xml(store: DomainStore, manifest: PointManifest) -> PointManifest:
    """``manifest`` with its domain XML opened (the same manifest in a plain pool)."""
    if manifest.domain.xml_sealed is None and store.pool.encryption is None:
        return manifest
    domain = dataclasses.replace(manifest.domain, xml=domain_xml(store, manifest))
    return dataclasses.replace(manifest, domain=domain)
