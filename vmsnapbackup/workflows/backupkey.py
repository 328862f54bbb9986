"""The pool a backup writes into, and its key when it is encrypted (FORMAT.md §15.2).

Why apart from the recipe: whether a pool is encrypted is fixed when it is
created (the header, which holds the salt, is never rewritten), so a backup
either creates an encrypted pool with ``--encrypt --key-file``, or continues an
encrypted pool (which needs the key whether ``--encrypt`` is given or not), or
writes into a plain pool (where ``--encrypt`` is refused: its earlier points
would stay in the clear while the user believes the pool is protected).  Every
refusal comes before the pool is touched or a point number is burnt.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..adapters.keyfile import KeyFile, unlock_pool
from ..adapters.volumeformat import VolumeLayout, resolve_compression
from ..core.manifest import PoolEncryption
from ..core.names import POOL_HEADER
from ..core.pool import Pool
from ..core.sealed import new_salt
from ..errors import UsageError

__all__ = ["check_encryption", "open_backup_pool"]


def check_encryption(encrypt: bool, compression: str | None, key_file: str | None,
                     base_format: str) -> None:
    """The arguments alone: ``--encrypt`` needs a key file, qcow2 and no compression."""
    if not encrypt:
        return
    VolumeLayout(compression, key_file=key_file or "").check(base_format)
    if key_file is None:
        raise UsageError("--encrypt needs the pool's key: --key-file FILE "
                         "(make one with `openssl rand -base64 48 > FILE; chmod 600 FILE`)")


def open_backup_pool(pool_dir: str | os.PathLike[str], compression: str | None,
                     encrypt: bool, key_file: str | None) -> tuple[Pool, VolumeLayout]:
    """The pool (created when missing, encrypted when ``encrypt``), unlocked, and the
    layout of the volumes this backup writes."""
    root = Path(os.path.abspath(os.fspath(pool_dir)))
    encryption = None
    if encrypt and key_file is not None and not (root / POOL_HEADER).exists():
        salt = new_salt()
        new_key = KeyFile(key_file)
        new_key.check_new()
        sealing = new_key.sealing_key(salt)
        encryption = PoolEncryption(salt=salt.hex(), key_id=sealing.key_id.hex())
    new_default = compression if compression != "none" else None
    pool = Pool.open(root, create=True, compression=new_default, encryption=encryption)
    if encrypt and pool.encryption is None:
        raise UsageError(f"pool {pool.root} is not encrypted, and a pool is encrypted only "
                         "from its creation on: back up into a new pool with --encrypt")
    unlock_pool(pool, key_file)
    chosen = resolve_compression(compression, pool.compression)
    if pool.encryption is not None and compression is None:
        chosen = None   # an encrypted pool's default: no compression (never both)
    layout = VolumeLayout(chosen, key_file=pool.key.key_file if pool.key else None)
    return pool, layout
