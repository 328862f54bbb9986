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
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, TypeVar, cast

from ..errors import CorruptFileError, UsageError, VmSnapBackupError
from .atomic import atomic_write
from .checktable import CheckTable, read_check_table, write_check_table
from .difftable import DifferenceTable, read_difference_table, write_difference_table
from .poolread import open_regular
from .sealed import MAGIC, SealingKey, is_sealed
from .sealedstream import CHUNK, OpenedTable, SealingWriter
from .tablefile import CHECKSUM_SIZE, Destination, Source, file_checksum

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

_XML_SUFFIX = "#domain.xml"
_T = TypeVar("_T")


@dataclass(frozen=True)
class PoolKey:
    """The key of an encrypted pool: the sealing key, and the key file's path that QEMU
    reads itself as a ``secret`` object (never its bytes on a command line)."""

    sealing: SealingKey
    key_file: str

    def __repr__(self) -> str:
        return f"PoolKey({self.sealing!r}, {self.key_file!r})"


def _key(store: DomainStore) -> SealingKey | None:
    if store.pool.encryption is None:
        return None
    if store.pool.key is None:
        raise UsageError(f"pool {store.pool.root} is encrypted (docs/FORMAT.md §15.2): "
                         "give its key with --key-file FILE")
    return store.pool.key.sealing


def _read(store: DomainStore, path: Path, read: Callable[[Source], _T]) -> _T:
    """``read`` of table ``path``: the file itself in a plain pool (where the readers'
    magic check refuses a sealed file), else its envelope opened as a stream
    (:mod:`.sealedstream`), so no more than one table is ever held in memory."""
    key = _key(store)
    if key is None:
        return read(path)
    try:
        fobj = os.fdopen(open_regular(os.fspath(path)), "rb")
    except FileNotFoundError:
        raise CorruptFileError(path, "file is missing") from None
    with fobj:
        if not is_sealed(fobj.read(len(MAGIC))):
            raise CorruptFileError(path, "not sealed, but the pool is encrypted: refusing a "
                                   "table in the clear where a sealed one belongs")
        fobj.seek(0)
        opened = OpenedTable(fobj, key, store.relpath(path), os.fspath(path))
        try:
            result = read(cast(IO[bytes], opened))   # a binary file, in io's sense
        except VmSnapBackupError:
            opened.finish()     # a changed byte is an authentication failure, said so
            raise
        opened.finish()
        return result


def read_check(store: DomainStore, path: Path, *, expected_checksum: bytes | None = None,
               expected_body_digest: bytes | None = None) -> CheckTable:
    """:func:`.checktable.read_check_table` of a table of ``store``, sealed or not."""
    return _read(store, path, lambda src: read_check_table(
        src, expected_checksum=expected_checksum, expected_body_digest=expected_body_digest))


def read_difference(store: DomainStore, path: Path, *, table1: CheckTable,
                    expected_checksum: bytes | None = None) -> DifferenceTable:
    """:func:`.difftable.read_difference_table` of a table of ``store``, sealed or not."""
    return _read(store, path, lambda src: read_difference_table(
        src, table1=table1, expected_checksum=expected_checksum))


def table_checksum(store: DomainStore, path: Path) -> bytes:
    """The trailing checksum of the plain bytes of a table file (cheap when not sealed;
    a sealed one is read through, as its tag covers the whole file)."""
    if store.pool.encryption is None:
        return file_checksum(path)

    def tail(src: Source) -> bytes:
        assert not isinstance(src, (str, os.PathLike))
        last = b""
        while chunk := src.read(CHUNK):
            last = (last + chunk)[-CHECKSUM_SIZE:]
        if len(last) != CHECKSUM_SIZE:
            raise CorruptFileError(path, "too short to hold a checksum")
        return last
    return _read(store, path, tail)


def _write(store: DomainStore, path: Path, write: Callable[[Destination, _T], bytes],
           table: _T) -> bytes:
    """``write`` of ``table`` to ``path`` (atomically); the plain file's checksum.  In an
    encrypted pool the writer's bytes are sealed as they come (:mod:`.sealedstream`)."""
    key = _key(store)
    if key is None:
        return write(path, table)
    with atomic_write(path) as fobj:
        sealer = SealingWriter(fobj, key, store.relpath(path))
        checksum = write(cast(IO[bytes], sealer), table)
        sealer.close_seal()
    return checksum


def write_check(store: DomainStore, path: Path, table: CheckTable) -> bytes:
    """Write check table ``path`` of ``store`` (atomically); the plain file's checksum."""
    return _write(store, path, write_check_table, table)


def write_difference(store: DomainStore, path: Path, diff: DifferenceTable) -> bytes:
    """Write difference table ``path`` of ``store`` (atomically); the plain checksum."""
    return _write(store, path, write_difference_table, diff)


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
