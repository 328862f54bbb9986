"""Sealed records of an encrypted pool (FORMAT.md §15.2): AES-256-GCM envelopes.

Why: in an encrypted pool the volumes are LUKS qcow2, but a check table is a list
of XXH3 values, one per block -- whoever holds a known block (a well-known file, a
guessed password database) can hash it and find out whether the disk holds it.
Difference tables say which blocks changed, and the domain XML names paths and
sometimes passwords.  So these are stored sealed: encrypted and authenticated,
so that a wrong key or a changed byte is an integrity error, never garbage.

The key is derived from the user's key file with HKDF-SHA256 and the pool's salt
(one key per pool even when a key file is reused); the key id, derived the same
way with another label, tells a wrong key from a damaged file without revealing
the key.  The envelope's associated data is its header plus the file's pool path,
so a sealed table moved under another point's name does not open.

Pure: bytes in, bytes out; reading the key file is :mod:`..adapters.keyfile`.
"""
from __future__ import annotations

import hmac
import math
import os
import struct
import zlib
from collections import Counter
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import CorruptFileError, IntegrityError, UsageError
from .jsonfields import PathArg

__all__ = [
    "ENVELOPE_HEADER_SIZE",
    "MAGIC",
    "SALT_SIZE",
    "TAG_SIZE",
    "SealingKey",
    "check_key_strength",
    "envelope_header",
    "is_sealed",
    "new_salt",
    "read_header",
]

MAGIC = b"VSBSEAL\0"
ENVELOPE_VERSION = 1
ALGORITHM_AES_256_GCM = 1
SALT_SIZE = 32
KEY_ID_SIZE = 16
NONCE_SIZE = 12
TAG_SIZE = 16
#: magic, version, algorithm, reserved, key id, nonce
_HEADER = struct.Struct("<8sHHI16s12s")
ENVELOPE_HEADER_SIZE = _HEADER.size     # 44
_SEAL_INFO = b"vmsnapbackup-3 seal"
_KEY_ID_INFO = b"vmsnapbackup-3 key id"
#: key files are passphrases QEMU reads as UTF-8 text (FORMAT §15.2)
MIN_KEY_FILE = 32
MAX_KEY_FILE = 4096
#: the least a new pool's key file must hold by :func:`check_key_strength`'s estimate
MIN_KEY_BITS = 100


def new_salt() -> bytes:
    """A pool's salt, made once when the pool is created."""
    return os.urandom(SALT_SIZE)


def is_sealed(data: bytes) -> bool:
    """Whether ``data`` starts like an envelope (a plain table starts with its own magic)."""
    return data[:len(MAGIC)] == MAGIC


def _hkdf(material: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(material)


def check_key_material(material: bytes, where: str) -> None:
    """The rules of a key file (FORMAT §15.2): 32..4096 bytes of UTF-8."""
    if not MIN_KEY_FILE <= len(material) <= MAX_KEY_FILE:
        raise UsageError(f"key file {where} must hold {MIN_KEY_FILE} to {MAX_KEY_FILE} bytes "
                         f"(it has {len(material)}); make one with "
                         "`openssl rand -base64 48 > FILE`")
    try:
        material.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"key file {where} is not UTF-8 text (QEMU takes LUKS passphrases "
                         "only as UTF-8); make one with `openssl rand -base64 48 > FILE`"
                         ) from None


def check_key_strength(material: bytes, where: str) -> None:
    """Refuse (UsageError) a key file for a *new* pool that is plainly not random.

    Why: neither the HKDF of the sealed records nor LUKS at a 10 ms iter-time
    (FORMAT §15.2) stretches the key, so the pool is exactly as strong as the file
    is unpredictable.  The estimate -- the lesser of the Shannon entropy of the
    file's byte counts times its length, and the bits of its deflated form -- cannot
    prove randomness, but it stops the keys that are obviously guessable (one
    character, a word repeated, a date repeated): ``openssl rand -base64 48`` gives
    about 330 by it, ``openssl rand -hex 32`` about 250.  Existing pools are never
    refused by it: their key is what it is.
    """
    text = material.rstrip(b"\n")
    counts = Counter(text)
    n = len(text)
    shannon = -sum(c * math.log2(c / n) for c in counts.values()) if n else 0.0
    deflated = 8 * max(0, len(zlib.compress(text, 9)) - len(zlib.compress(b"", 9)))
    bits = max(0.0, min(shannon, float(deflated)))
    if bits < MIN_KEY_BITS:
        raise UsageError(f"key file {where} does not look random (about {bits:.0f} bits, "
                         f"a new pool needs {MIN_KEY_BITS}); make one with "
                         "`openssl rand -base64 48 > FILE`")


@dataclass(frozen=True)
class SealingKey:
    """The key that seals one pool's records, and its id."""

    key: bytes
    key_id: bytes

    def __repr__(self) -> str:            # never the key, not even in a traceback
        return f"SealingKey(key_id={self.key_id.hex()})"

    @classmethod
    def derive(cls, material: bytes, salt: bytes, where: str = "") -> SealingKey:
        """The pool's key from the key file's bytes ``material`` and the pool's ``salt``."""
        check_key_material(material, where or "(given)")
        if len(salt) != SALT_SIZE:
            raise UsageError(f"a pool salt is {SALT_SIZE} bytes, not {len(salt)}")
        return cls(key=_hkdf(material, salt, _SEAL_INFO, 32),
                   key_id=_hkdf(material, salt, _KEY_ID_INFO, KEY_ID_SIZE))

    def matches(self, key_id: bytes) -> bool:
        return hmac.compare_digest(self.key_id, key_id)

    def check_id(self, key_id: bytes, what: str) -> None:
        """IntegrityError (one line) when the pool was sealed with another key."""
        if not self.matches(key_id):
            raise IntegrityError(f"{what} was encrypted with another key (key id "
                                 f"{key_id.hex()}, this key file's is {self.key_id.hex()})")

    def seal(self, plain: bytes, where: str) -> bytes:
        """The envelope of ``plain`` stored at pool path ``where`` (a fresh nonce)."""
        header, nonce = envelope_header(self)
        return header + AESGCM(self.key).encrypt(nonce, plain, _aad(header, where))

    def open(self, data: bytes, where: str, path: PathArg) -> bytes:
        """The plain bytes of an envelope read from ``path`` (pool path ``where``).

        A wrong key is IntegrityError naming the key ids; anything else that does
        not open -- a changed byte, a file moved to another name -- CorruptFileError.
        """
        if len(data) < ENVELOPE_HEADER_SIZE + TAG_SIZE:
            raise CorruptFileError(path, "not a sealed record (too short or no VSBSEAL magic)")
        header = data[:ENVELOPE_HEADER_SIZE]
        nonce = read_header(header, self, path)
        try:
            return AESGCM(self.key).decrypt(nonce, data[ENVELOPE_HEADER_SIZE:],
                                            _aad(header, where))
        except InvalidTag:
            raise CorruptFileError(path, "authentication failed: the sealed record was "
                                   "changed or belongs to another file") from None


def envelope_header(key: SealingKey) -> tuple[bytes, bytes]:
    """A new envelope's header for ``key``, and its nonce (fresh for every file)."""
    nonce = os.urandom(NONCE_SIZE)
    return _HEADER.pack(MAGIC, ENVELOPE_VERSION, ALGORITHM_AES_256_GCM, 0, key.key_id,
                        nonce), nonce


def read_header(header: bytes, key: SealingKey, path: PathArg) -> bytes:
    """The nonce of an envelope's ``header``, once its magic, version, algorithm and
    key id are known good (a wrong key: IntegrityError; anything else: corrupt)."""
    if len(header) != ENVELOPE_HEADER_SIZE or not is_sealed(header):
        raise CorruptFileError(path, "not a sealed record (too short or no VSBSEAL magic)")
    _magic, version, algorithm, _reserved, key_id, nonce = _HEADER.unpack(header)
    if version != ENVELOPE_VERSION:
        raise CorruptFileError(path, f"unknown envelope version {version}")
    if algorithm != ALGORITHM_AES_256_GCM:
        raise CorruptFileError(path, f"unknown envelope algorithm {algorithm}")
    key.check_id(key_id, str(path))
    return bytes(nonce)


def _aad(header: bytes, where: str) -> bytes:
    return header + where.encode("utf-8")
