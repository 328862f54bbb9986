"""Reading the JSON records of a pool strictly (FORMAT.md §1.2): the parse, the format
and version gate, and typed field access that names the file and the field it refuses.

Every record kind (pool header, ``domain.json``, ``generation.json``, manifests, the
journal) goes through here, so "what counts as a valid field" is decided once.
Reading validates everything before any value is used, because these files decide
what a restore reads and what a prune deletes: a flipped byte must become a named
:class:`~vmsnapbackup.errors.CorruptFileError`, never a wrong path or number.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any, NoReturn, Union

from ..errors import CorruptFileError, IncompatibleFormatError
from .blocksize import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE
from .names import (
    canonical_uuid,
    is_checkpoint_name,
    is_host_path,
    is_safe_domain_name,
    is_safe_relpath,
    is_safe_target,
)
from .timefmt import is_timestamp

__all__ = [
    "ENCRYPTED_VERSION",
    "FORMAT_VERSION",
    "NEWEST_VERSION",
    "READABLE_VERSIONS",
    "Fields",
    "JsonDict",
    "PathArg",
    "check_header",
    "check_target",
    "digest_hex",
    "kind_of",
    "load_json_object",
    "record_bytes",
]

#: The format version this code writes into a plain pool (FORMAT.md §12).
FORMAT_VERSION = 2
#: The version of the header and manifests of an encrypted pool (FORMAT.md §15.2).
ENCRYPTED_VERSION = 3
#: The newest version this code reads; a newer one is INCOMPATIBLE.
NEWEST_VERSION = ENCRYPTED_VERSION
#: The versions it reads: every version ever written, so old pools stay restorable.
READABLE_VERSIONS = (1, 2, 3)

JsonDict = dict[str, Any]
#: a file name, only ever used in messages
PathArg = Union[str, "os.PathLike[str]"]

_HEX32 = re.compile(r"[0-9a-f]{32}")


def _fail(path: PathArg, reason: str) -> NoReturn:
    raise CorruptFileError(path, reason)


def _no_constants(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> JsonDict:
    out: JsonDict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def load_json_object(data: bytes | str, path: PathArg) -> JsonDict:
    """Parse a record file, strictly: UTF-8, an object, no NaN/Infinity, no duplicate
    keys (a damaged byte can turn one key into a copy of another), and no nesting so
    deep that the parser itself gives up (RecursionError must not escape: one bad
    manifest would otherwise break ``list`` for the whole pool)."""
    if len(data) == 0:
        _fail(path, "empty file (truncated?)")
    try:
        if isinstance(data, bytes):
            data = data.decode("utf-8")
        obj = json.loads(data, parse_constant=_no_constants, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as err:  # JSONDecodeError is a ValueError
        raise CorruptFileError(path, f"not valid JSON ({err})") from None
    except RecursionError:
        raise CorruptFileError(path, "not valid JSON (nested too deeply)") from None
    if not isinstance(obj, dict):
        _fail(path, f"expected a JSON object, found {kind_of(obj)}")
    return obj


def check_header(obj: Mapping[str, Any], path: PathArg, fmt: str, kind: str) -> int:
    """The format and version gate every record passes first (§2); returns the version.

    Version before anything else: a newer writer may have changed every other field,
    and "upgrade" is a more useful message than "corrupt".
    """
    if "format" not in obj:
        _fail(path, f"not a {fmt} file (no 'format' field)")
    if obj["format"] != fmt:
        _fail(path, f"not a {fmt} file (format {obj['format']!r})")
    if "version" not in obj:
        _fail(path, "missing field 'version'")
    version = obj["version"]
    if type(version) is not int or version < 1:
        _fail(path, f"version: expected a positive integer, found {version!r}")
    if version > NEWEST_VERSION:
        raise IncompatibleFormatError(
            f"{path}: {kind} format version {version} is newer than this vmsnapbackup "
            f"({NEWEST_VERSION}); upgrade"
        )
    if version not in READABLE_VERSIONS:
        _fail(path, f"version {version} was never written by vmsnapbackup")
    return int(version)


def digest_hex(digest: bytes) -> str:
    """A 16-byte XXH3-128 digest as the 32 lowercase hex digits records store."""
    if len(digest) != 16:
        raise ValueError("an XXH3-128 digest is 16 bytes")
    return digest.hex()


def record_bytes(obj: JsonDict) -> bytes:
    """The on-disk form of every JSON record: indented and sorted for people, ASCII so
    no encoding question arises, newline-terminated."""
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=True) + "\n").encode("ascii")


def kind_of(v: Any) -> str:
    return "null" if v is None else type(v).__name__


class Fields:
    """Typed access to one JSON object of a record, failing with the file and the field
    named (``disks[1].blocks.total: expected an integer``).

    ``optional=True`` means the key must be present but may be null; ``absent_ok``
    getters (``checkpoint``, ``opt_*``) also accept a missing key, for fields added
    after version 1 was first written.
    """

    def __init__(self, obj: Mapping[str, Any], path: PathArg, where: str = "") -> None:
        self.obj = obj
        self.path = path
        self.where = where

    def fail(self, key: str, msg: str) -> NoReturn:
        _fail(self.path, f"{self.where}{key}: {msg}")

    def raw(self, key: str) -> Any:
        if key not in self.obj:
            _fail(self.path, f"missing field '{self.where}{key}'")
        return self.obj[key]

    def text(self, key: str, *, optional: bool = False, allow_empty: bool = False) -> Any:
        v = self.raw(key)
        if v is None and optional:
            return None
        if not isinstance(v, str):
            self.fail(key, f"expected a string, found {kind_of(v)}")
        if not v and not allow_empty:
            self.fail(key, "must not be empty")
        return v

    def integer(self, key: str, *, minimum: int = 0, optional: bool = False) -> Any:
        v = self.raw(key)
        if v is None and optional:
            return None
        if type(v) is not int:  # bool is an int subclass: refuse it too
            self.fail(key, f"expected an integer, found {kind_of(v)}")
        if v < minimum:
            self.fail(key, f"must be >= {minimum}, found {v}")
        return v

    def number(self, key: str) -> float:
        v = self.raw(key)
        if type(v) not in (int, float) or not math.isfinite(v) or v < 0:
            self.fail(key, f"expected a non-negative number, found {v!r}")
        return float(v)

    def flag(self, key: str) -> bool:
        v = self.raw(key)
        if type(v) is not bool:
            self.fail(key, f"expected true or false, found {kind_of(v)}")
        return bool(v)

    def choice(self, key: str, choices: tuple[str, ...]) -> str:
        v = self.text(key)
        if v not in choices:
            self.fail(key, f"expected one of {', '.join(choices)}, found {v!r}")
        return str(v)

    def matching(self, key: str, pattern: re.Pattern[str], what: str) -> str:
        v = self.text(key)
        if not pattern.fullmatch(v):
            self.fail(key, f"not {what}: {v!r}")
        return str(v)

    def digest(self, key: str, *, optional: bool = False) -> Any:
        v = self.text(key, optional=optional)
        if v is not None and not _HEX32.fullmatch(v):
            self.fail(key, "expected 32 lowercase hex digits")
        return v

    def timestamp(self, key: str, *, optional: bool = False) -> Any:
        v = self.text(key, optional=optional)
        if v is not None and not is_timestamp(v):
            self.fail(key, f"not an ISO 8601 timestamp: {v!r}")
        return v

    def uuid(self, key: str) -> str:
        v = self.text(key)
        if canonical_uuid(v) != v:
            self.fail(key, f"not a lowercase UUID: {v!r}")
        return str(v)

    def domain_name(self, key: str) -> str:
        v = self.text(key)
        if not is_safe_domain_name(v):
            self.fail(key, f"not a usable domain name: {v!r}")
        return str(v)

    def target(self, key: str) -> str:
        v = self.text(key)
        check_target(self, key, v)
        return str(v)

    def host_path(self, key: str, *, optional: bool = False, allow_empty: bool = False) -> Any:
        v = self.text(key, optional=optional, allow_empty=allow_empty)
        if v and not is_host_path(v):
            self.fail(key, f"not an absolute path on the host: {v!r}")
        return v

    def block_size(self, key: str) -> int:
        v = self.integer(key, minimum=MIN_BLOCK_SIZE)
        if v > MAX_BLOCK_SIZE or v & (v - 1):
            self.fail(key, f"must be a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}")
        return int(v)

    def relpath(self, key: str, *, optional: bool = False) -> Any:
        v = self.text(key, optional=optional)
        if v is not None and not is_safe_relpath(v):
            self.fail(key, f"not a relative path inside the domain directory: {v!r}")
        return v

    def checkpoint(self, key: str) -> str | None:
        """A checkpoint name of ours; an absent key reads as null (an optional v1 field)."""
        v = self.obj.get(key)
        if v is None:
            return None
        if not isinstance(v, str) or not is_checkpoint_name(v):
            self.fail(key, f"not a vmsnapbackup checkpoint name: {v!r}")
        return v

    def sub(self, key: str) -> Fields:
        v = self.raw(key)
        if not isinstance(v, dict):
            self.fail(key, f"expected an object, found {kind_of(v)}")
        return Fields(v, self.path, f"{self.where}{key}.")

    def items(self, key: str) -> list[Any]:
        v = self.raw(key)
        if not isinstance(v, list):
            self.fail(key, f"expected a list, found {kind_of(v)}")
        return v


def check_target(f: Fields, key: str, value: str) -> None:
    if not is_safe_target(value):
        f.fail(key, f"not a usable disk target name: {value!r}")
