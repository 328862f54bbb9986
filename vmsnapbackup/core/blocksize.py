"""The block sizes a check table may have (FORMAT.md §5), in one place.

Kept apart from the table file code so that record validation (and the libvirt
hook, which reads records but never a table) need not import numpy.
"""
from __future__ import annotations

from ..errors import UsageError

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "MAX_BLOCK_SIZE",
    "MIN_BLOCK_SIZE",
    "is_valid_block_size",
    "validate_block_size",
]

MIN_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 4 * 1024 * 1024
DEFAULT_BLOCK_SIZE = 64 * 1024


def is_valid_block_size(block_size: object) -> bool:
    """True for the block sizes the format allows (a power of two, 4 KiB to 4 MiB)."""
    return (
        isinstance(block_size, int)
        and not isinstance(block_size, bool)
        and MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE
        and block_size & (block_size - 1) == 0
    )


def validate_block_size(block_size: object) -> int:
    """Refuse a block size the format cannot record, before any work depends on it."""
    if not is_valid_block_size(block_size):
        raise UsageError(
            f"invalid block size {block_size!r}: must be a power of two "
            f"from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE} bytes"
        )
    assert isinstance(block_size, int)
    return block_size
