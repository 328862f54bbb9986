"""The binary frame shared by check table (``.vsbt``) and difference table (``.vsbd``) files.

Both files (docs/FORMAT.md §5 and §6) have the same 64-byte header prefix, a body
of fixed-size entries and a trailing XXH3-128 checksum of every byte before it.
Keeping the frame in one place means the two readers check the same things in
the same order (the order §5 prescribes), so a damaged file of either kind is
named with the same words, and a reader never allocates a body before the file
length has confirmed the header's entry count.

This module knows nothing of what the entries mean; checktable.py and
difftable.py do.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Callable, Union

import numpy as np
import xxhash

from ..errors import CorruptFileError, IncompatibleFormatError, UsageError
from .atomic import atomic_write
from .blocksize import (  # re-exported: their home before blocksize.py
    DEFAULT_BLOCK_SIZE,
    MAX_BLOCK_SIZE,
    MIN_BLOCK_SIZE,
    is_valid_block_size,
    validate_block_size,
)
from .poolread import open_regular

log = logging.getLogger(__name__)

__all__ = [
    "ALGORITHM_XXH3_128",
    "CHECKSUM_SIZE",
    "DEFAULT_BLOCK_SIZE",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "MAX_BLOCK_SIZE",
    "MIN_BLOCK_SIZE",
    "MIN_FILE_SIZE",
    "VALUE_SIZE",
    "Destination",
    "Source",
    "TableHeader",
    "block_count",
    "file_checksum",
    "is_valid_block_size",
    "pack_header",
    "read_table_file",
    "validate_block_size",
    "write_table_file",
]

FORMAT_VERSION = 1
ALGORITHM_XXH3_128 = 1
VALUE_SIZE = 16
HEADER_SIZE = 64
CHECKSUM_SIZE = 16
MIN_FILE_SIZE = HEADER_SIZE + CHECKSUM_SIZE

# magic, version, algorithm, value size, flags, block size, reserved, disk size, count
_PREFIX = struct.Struct("<8sHHHHIIQQ")
_EXTRA_SIZE = HEADER_SIZE - _PREFIX.size  # 24 bytes whose meaning depends on the file kind
assert _EXTRA_SIZE == 24

Source = Union[str, "os.PathLike[str]", IO[bytes]]
Destination = Union[str, "os.PathLike[str]", IO[bytes]]


def block_count(disk_size: int, block_size: int) -> int:
    """Entries of a check table: the last block may be short, so round up."""
    return -(-disk_size // block_size)


@dataclass(frozen=True)
class TableHeader:
    """The 64-byte header of a table file, as found on disk (checked by read_table_file)."""

    magic: bytes
    version: int
    algorithm: int
    value_size: int
    flags: int
    block_size: int
    disk_size: int
    count: int
    extra: bytes  # bytes 40..64: reserved in .vsbt, table-1 digest + reserved in .vsbd


def pack_header(magic: bytes, block_size: int, disk_size: int, count: int,
                extra: bytes = b"") -> bytes:
    """Build a version-1 header; ``extra`` fills bytes 40..64 (zero padded)."""
    if len(magic) != 8 or len(extra) > _EXTRA_SIZE:
        raise UsageError("bad table header fields")
    prefix = _PREFIX.pack(magic, FORMAT_VERSION, ALGORITHM_XXH3_128, VALUE_SIZE, 0,
                          block_size, 0, disk_size, count)
    return prefix + extra.ljust(_EXTRA_SIZE, b"\0")


def _unpack_header(raw: bytes) -> TableHeader:
    fields = _PREFIX.unpack_from(raw)
    magic, version, algorithm, value_size, flags, block_size, _reserved, disk_size, count = fields
    return TableHeader(magic, version, algorithm, value_size, flags, block_size, disk_size,
                       count, bytes(raw[_PREFIX.size:HEADER_SIZE]))


# -- reading -----------------------------------------------------------------

@contextlib.contextmanager
def _open_source(source: Source) -> Iterator[tuple[IO[bytes], str]]:
    """Yield a readable binary file and the name to put in error messages."""
    if not isinstance(source, (str, os.PathLike)):
        fobj = source
        yield fobj, str(getattr(fobj, "name", "<stream>"))
        return
    path = os.fspath(source)
    try:
        # a regular file only: a FIFO or a device put in the pool must not hang or
        # feed us forever (FORMAT §13); the length check below bounds the rest
        fobj = os.fdopen(open_regular(path), "rb")
    except FileNotFoundError:
        raise CorruptFileError(path, "file is missing") from None
    with fobj:
        yield fobj, path


def _read_exact(fobj: IO[bytes], into: memoryview) -> int:
    """Fill ``into`` unless the file ends first; return how much was read."""
    done = 0
    total = len(into)
    while done < total:
        got = fobj.readinto(into[done:])  # type: ignore[attr-defined]
        if not got:
            break
        done += got
    return done


def read_table_file(
    source: Source,
    *,
    magic: bytes,
    kind: str,
    entry_size: int,
    check_count: Callable[[TableHeader], str | None],
    expected_checksum: bytes | None = None,
    body_sink: Callable[[TableHeader], Callable[[int, memoryview], None]] | None = None,
) -> tuple[TableHeader, np.ndarray, bytes, str]:
    """Read and check a table file's frame; return (header, body bytes, checksum, name).

    The checks run in the order of FORMAT §5: length >= 80, magic, version,
    algorithm, value size, flags, block size, ``check_count`` (kind-specific:
    does the count fit the disk and block size), exact file length, checksum,
    and finally ``expected_checksum`` (the digest a manifest recorded).  The body
    is allocated only after the file length has confirmed the count, so a
    damaged count can never make us allocate more than the file holds.

    The body comes back as a fresh, aligned uint8 array of ``count *
    entry_size`` bytes that the caller owns (so it can be viewed as uint64
    columns without copying).  With ``body_sink`` the body is not held: once the
    header is checked, ``body_sink(header)`` gives a function that is handed the
    body in pieces of whole entries, ``(byte offset, piece)``, before the
    checksum is known, and the body comes back empty; the caller must drop what
    it built if this raises.
    """
    with _open_source(source) as (fobj, name):
        start = fobj.tell()
        length = fobj.seek(0, io.SEEK_END) - start
        fobj.seek(start)

        def corrupt(reason: str) -> CorruptFileError:
            return CorruptFileError(name, f"{kind}: {reason}")

        if length < MIN_FILE_SIZE:
            raise corrupt(f"too short ({length} bytes; a {kind} file has at least "
                          f"{MIN_FILE_SIZE})")
        raw_header = fobj.read(HEADER_SIZE)
        if len(raw_header) != HEADER_SIZE:
            raise corrupt("truncated while reading the header")
        header = _unpack_header(raw_header)
        if header.magic != magic:
            raise corrupt(f"bad magic {header.magic!r} (expected {magic!r}): "
                          f"not a {kind} file")
        if header.version > FORMAT_VERSION:
            raise IncompatibleFormatError(
                f"{name}: {kind} format version {header.version} is newer than this "
                f"vmsnapbackup ({FORMAT_VERSION}); upgrade")
        if header.version < 1:
            raise corrupt(f"invalid format version {header.version}")
        if header.algorithm != ALGORITHM_XXH3_128:
            raise corrupt(f"unknown algorithm {header.algorithm} "
                          f"(expected {ALGORITHM_XXH3_128} = XXH3-128)")
        if header.value_size != VALUE_SIZE:
            raise corrupt(f"value size {header.value_size} (expected {VALUE_SIZE})")
        if header.flags != 0:
            raise corrupt(f"unknown flags 0x{header.flags:04x}")
        if not is_valid_block_size(header.block_size):
            raise corrupt(f"invalid block size {header.block_size}")
        count_problem = check_count(header)
        if count_problem is not None:
            raise corrupt(count_problem)
        body_size = header.count * entry_size
        expected_length = MIN_FILE_SIZE + body_size
        if length != expected_length:
            raise corrupt(f"file length {length} bytes, expected {expected_length} for "
                          f"{header.count} entries (truncated or extended)")

        hasher = xxhash.xxh3_128()
        hasher.update(raw_header)
        sink = body_sink(header) if body_sink is not None else None
        body = np.empty(0 if sink else body_size, dtype=np.uint8)
        buf = body if sink is None else np.empty(min(body_size, entry_size << 16), np.uint8)
        for pos in range(0, body_size, max(len(buf), 1)):
            piece = buf.data[:min(len(buf), body_size - pos)]
            if _read_exact(fobj, piece) != len(piece):
                raise corrupt("truncated while reading the entries")
            hasher.update(piece)
            if sink is not None:
                sink(pos, piece)
        trailer = fobj.read(CHECKSUM_SIZE)
        if len(trailer) != CHECKSUM_SIZE:
            raise corrupt("truncated while reading the checksum")

    if hasher.digest() != trailer:
        raise corrupt("checksum mismatch (the file is damaged)")
    if expected_checksum is not None and trailer != expected_checksum:
        raise corrupt(f"file checksum {trailer.hex()} differs from the recorded "
                      f"{expected_checksum.hex()} (not the file the manifest names)")
    return header, body, trailer, name


def file_checksum(source: Source) -> bytes:
    """The trailing checksum of a table file, unchecked (cheap: reads 16 bytes).

    For listings that want to show which file a manifest points at without
    reading a 256 MiB table; anything that trusts the content must use the
    full readers instead.
    """
    with _open_source(source) as (fobj, name):
        end = fobj.seek(0, io.SEEK_END)
        if end < MIN_FILE_SIZE:
            raise CorruptFileError(name, f"too short ({end} bytes) to hold a checksum")
        fobj.seek(end - CHECKSUM_SIZE)
        return fobj.read(CHECKSUM_SIZE)


# -- writing -----------------------------------------------------------------

def write_table_file(dest: Destination, header: bytes, body: Iterable[memoryview],
                     what: str) -> bytes:
    """Write header, body pieces and the checksum; return the checksum.

    A path is written atomically with :func:`.atomic.atomic_write` (temp file
    ``.NAME.tmp-<pid>-<random>`` mode 0600, fsync, rename, fsync of the
    directory; a full or read-only pool becomes a StorageError).  An open file
    object is written at its position as is: the caller then owns flushing,
    fsync and naming.
    """
    hasher = xxhash.xxh3_128()

    def emit(fobj: IO[bytes]) -> bytes:
        hasher.update(header)
        fobj.write(header)
        for piece in body:
            hasher.update(piece)
            fobj.write(piece)
        digest = hasher.digest()
        fobj.write(digest)
        return digest

    if not isinstance(dest, (str, os.PathLike)):
        return emit(dest)
    path = os.fspath(dest)
    with atomic_write(path) as fobj:
        digest = emit(fobj)
    log.debug("wrote %s %s (%s)", what, path, digest.hex())
    return digest
