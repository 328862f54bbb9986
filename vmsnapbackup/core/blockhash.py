"""Hashing a disk's blocks: the XXH3-128 value of each block, and of an all-zero block.

Kept apart from the check table (:mod:`.checktable`) that stores the values:
the backup's pass, the dirty-bitmap check and sampled verify hash blocks
without a table, and the value of a zero block is what lets holes go unread.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Union

import xxhash

from ..errors import UsageError
from .tablefile import validate_block_size

__all__ = ["Buffer", "HashedBlocks", "as_bytes_view", "hash_blocks", "zero_value"]

Buffer = Union[bytes, bytearray, memoryview]

_xxh3_128_digest = xxhash.xxh3_128_digest


@functools.lru_cache(maxsize=64)
def zero_value(length: int) -> bytes:
    """The check value of ``length`` zero bytes.

    Computed once per length (a table uses at most two: the block size and the
    short last block), so holes reported by the export are never read.
    """
    if length < 0:
        raise UsageError(f"negative block length {length}")
    return _xxh3_128_digest(bytes(length))


def as_bytes_view(buffer: Buffer) -> memoryview:
    """A flat byte view of any buffer, without copying (slices stay zero-copy)."""
    view = memoryview(buffer)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


class HashedBlocks(NamedTuple):
    """Values of consecutive blocks, and which of them are all zeros.

    The zero flags are what a backup needs besides the values: a block that is
    zeros is skipped in a base volume and written as zeros (not skipped) in a
    point volume.  They come from comparing the value with ``zero_value``, not
    from scanning the data again.
    """

    first: int  # index of the first block (0 for a plain buffer)
    values: list[bytes]
    zero: list[bool]


def hash_blocks(buffer: Buffer, block_size: int, first: int = 0) -> HashedBlocks:
    """Hash ``buffer`` block by block: blocks of ``block_size``, the last one may be short.

    Hashes straight from slices of a memoryview: no block is copied.
    """
    validate_block_size(block_size)
    view = as_bytes_view(buffer)
    size = len(view)
    values = [_xxh3_128_digest(view[off:off + block_size]) for off in range(0, size, block_size)]
    zero_full = zero_value(block_size)
    zero = [value == zero_full for value in values]
    tail = size % block_size
    if tail:
        zero[-1] = values[-1] == zero_value(tail)
    return HashedBlocks(first, values, zero)


