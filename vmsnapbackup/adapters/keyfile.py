"""The user's key file of an encrypted pool (FORMAT.md §15.2), read on the host.

The file is the secret: its bytes are the LUKS passphrase QEMU reads itself (a
``secret`` object with ``file=``, never the bytes on a command line) and the
input from which :class:`..core.sealed.SealingKey` derives the key that seals
tables and XML.  Here it is only read -- bounded, a regular file, and refused
when others may read it, since a key anyone can read protects nothing.
"""
from __future__ import annotations

import os
import stat

from ..core.pool import Pool
from ..core.poolkey import PoolKey
from ..core.poolread import read_bounded
from ..core.sealed import MAX_KEY_FILE, SealingKey, check_key_material, check_key_strength
from ..errors import NotFoundError, UsageError

__all__ = ["KeyFile", "unlock_pool"]


class KeyFile:
    """A key file: its absolute path (for QEMU) and its bytes (for the sealing key)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.path.abspath(os.fspath(path))
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise NotFoundError(f"key file {self.path} does not exist") from None
        except OSError as err:
            raise UsageError(f"cannot read key file {self.path}: {err.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"key file {self.path} is not a regular file")
        if st.st_mode & 0o077:
            raise UsageError(f"key file {self.path} may be read by others "
                             f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 it")
        data = read_bounded(self.path, MAX_KEY_FILE, "key file")
        if data is None:
            raise NotFoundError(f"key file {self.path} does not exist")
        check_key_material(data, self.path)
        self._material = data

    def __repr__(self) -> str:             # the path only, never the bytes
        return f"KeyFile({self.path!r})"

    def check_new(self) -> None:
        """Refuse a key that looks guessable, before a new pool is encrypted with it."""
        check_key_strength(self._material, self.path)

    def sealing_key(self, salt: bytes) -> SealingKey:
        """The key that seals the records of the pool with this ``salt``."""
        return SealingKey.derive(self._material, salt, self.path)


def unlock_pool(pool: Pool, key_file: str | os.PathLike[str] | None) -> None:
    """Give ``pool`` the key read from ``key_file`` (None: no key given): checked against
    the pool's key id before anything is read or written (:meth:`Pool.unlock`)."""
    enc = pool.encryption
    if key_file is None or enc is None:
        pool.unlock(None if key_file is None else _unchecked(key_file))
        return
    kf = KeyFile(key_file)
    pool.unlock(PoolKey(kf.sealing_key(bytes.fromhex(enc.salt)), kf.path))


def _unchecked(key_file: str | os.PathLike[str]) -> PoolKey:
    """A key for a plain pool, which :meth:`Pool.unlock` refuses (a usage error)."""
    kf = KeyFile(key_file)
    return PoolKey(kf.sealing_key(bytes(32)), kf.path)
