"""Wire constants and fixed-size structures of the NBD protocol.

Kept apart from the client so that the numbers can be checked against the
specification (NetworkBlockDevice/nbd ``doc/proto.md``) in one screen, and so
that the unit tests' scripted servers speak the protocol with the same
definitions the client parses with.  Everything is big-endian ("network
order"), as the protocol says.
"""
from __future__ import annotations

import errno as _errno
import struct
from typing import NamedTuple

# -- magic numbers ----------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC": first 8 bytes of every greeting
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT": newstyle greeting, and option requests
OLDSTYLE_MAGIC = 0x00420281861253  # oldstyle greeting (unsupported)
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# -- handshake flags (server, 16 bits) and client flags (32 bits) -----------
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# -- options ----------------------------------------------------------------
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# -- option reply types -----------------------------------------------------
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_POLICY = REP_FLAG_ERROR | 2
REP_ERR_INVALID = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG = REP_FLAG_ERROR | 9

REP_ERROR_NAMES: dict[int, str] = {
    REP_ERR_UNSUP: "option not supported",
    REP_ERR_POLICY: "refused by server policy",
    REP_ERR_INVALID: "invalid option",
    REP_ERR_PLATFORM: "not supported on the server's platform",
    REP_ERR_TLS_REQD: "server requires TLS",
    REP_ERR_UNKNOWN: "no such export",
    REP_ERR_SHUTDOWN: "server is shutting down",
    REP_ERR_BLOCK_SIZE_REQD: "server requires block size negotiation",
    REP_ERR_TOO_BIG: "request too big",
}

# -- NBD_OPT_INFO / NBD_OPT_GO information types ----------------------------
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3


class BlockSizes(NamedTuple):
    """The export's block size constraints (``NBD_INFO_BLOCK_SIZE``)."""

    minimum: int
    preferred: int
    maximum: int


# -- transmission flags (16 bits) -------------------------------------------
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_ROTATIONAL = 1 << 4
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_RESIZE = 1 << 9
TF_SEND_CACHE = 1 << 10
TF_SEND_FAST_ZERO = 1 << 11

# -- commands and command flags ---------------------------------------------
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_NAMES: dict[int, str] = {
    CMD_READ: "read",
    CMD_WRITE: "write",
    CMD_DISC: "disconnect",
    CMD_FLUSH: "flush",
    CMD_TRIM: "trim",
    CMD_CACHE: "cache",
    CMD_WRITE_ZEROES: "write-zeroes",
    CMD_BLOCK_STATUS: "block-status",
}

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# -- structured replies -----------------------------------------------------
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR_BIT = 1 << 15
REPLY_TYPE_ERROR = REPLY_TYPE_ERROR_BIT | 1
REPLY_TYPE_ERROR_OFFSET = REPLY_TYPE_ERROR_BIT | 2

# -- base:allocation metadata context ---------------------------------------
META_BASE_ALLOCATION = "base:allocation"
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

# -- qemu:dirty-bitmap:<name> metadata context (QEMU's docs/interop/nbd.txt) -
#: Prefix of the context that exposes a dirty bitmap named in the export
#: (``block-export-add ... bitmaps``, ``qemu-nbd -B``).
META_DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"
#: In that context, descriptor status bit 0 means "dirty" (set since the
#: bitmap was created or last cleared); other bits are reserved.
STATE_DIRTY = 1 << 0


def dirty_bitmap_context(bitmap: str) -> str:
    """The metadata context name under which QEMU serves dirty bitmap ``bitmap``."""
    return META_DIRTY_BITMAP_PREFIX + bitmap


# -- limits -----------------------------------------------------------------
MAX_STRING = 4096  # the spec's limit for names and messages
#: Default request limits a careful client keeps to when the server gave none
#: (the spec's advice for maximum interoperability).
DEFAULT_MIN_BLOCK = 1
DEFAULT_PREFERRED_BLOCK = 4096
DEFAULT_MAX_BLOCK = 32 * 1024 * 1024
#: Largest length field a request can carry.
MAX_REQUEST_LENGTH = 0xFFFFFFFF

# -- error values -----------------------------------------------------------
#: The error values the spec defines (they equal Linux errno numbers), mapped
#: to this platform's errno constant and the symbolic name we show people.
_NBD_ERRORS: dict[int, tuple[int, str]] = {
    1: (_errno.EPERM, "EPERM"),
    5: (_errno.EIO, "EIO"),
    12: (_errno.ENOMEM, "ENOMEM"),
    22: (_errno.EINVAL, "EINVAL"),
    28: (_errno.ENOSPC, "ENOSPC"),
    75: (_errno.EOVERFLOW, "EOVERFLOW"),
    95: (_errno.ENOTSUP, "ENOTSUP"),
    108: (_errno.ESHUTDOWN, "ESHUTDOWN"),
}
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108


def nbd_errno(value: int) -> tuple[int, str]:
    """Map an NBD error value to ``(errno, "NAME")``.

    Values outside the spec's list are shown by number; the spec tells
    clients to treat them like EINVAL, which is what the errno says.
    """
    known = _NBD_ERRORS.get(value)
    if known is not None:
        return known
    return _errno.EINVAL, f"error {value}"


# -- fixed-size structures --------------------------------------------------
GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags (+124 zeroes)
INFO_EXPORT_PAYLOAD = struct.Struct(">HQH")  # type, size, transmission flags
INFO_BLOCK_SIZE_PAYLOAD = struct.Struct(">HIII")  # type, min, preferred, max
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
STRUCTURED_REPLY = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
OFFSET_DATA_HEAD = struct.Struct(">Q")
OFFSET_HOLE_PAYLOAD = struct.Struct(">QI")
ERROR_HEAD = struct.Struct(">IH")  # error, message length
ERROR_OFFSET_TAIL = struct.Struct(">Q")
BLOCK_STATUS_HEAD = struct.Struct(">I")  # metadata context id
BLOCK_DESCRIPTOR = struct.Struct(">II")  # length, status flags
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
