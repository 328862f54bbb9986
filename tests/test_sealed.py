"""Sealed records (core/sealed.py, FORMAT §15.2): what opens, and what is refused."""
from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from vmsnapbackup.adapters.keyfile import KeyFile
from vmsnapbackup.core.sealed import (
    ENVELOPE_HEADER_SIZE,
    MAGIC,
    SealingKey,
    check_key_material,
    check_key_strength,
    is_sealed,
    new_salt,
)
from vmsnapbackup.errors import CorruptFileError, IntegrityError, NotFoundError, UsageError

MATERIAL = b"q8Kx3yY0wH1Zb4VnT7mR2sL9aP6dC5eF0gJ1kU8iO3u=\n"
PLAIN = b"VSBTABLE" + bytes(range(256)) * 4
WHERE = "generations/000001/vda/table-000001.vsbt"


def test_seal_then_open_gives_the_plain_bytes_and_hides_them() -> None:
    salt = new_salt()
    key = SealingKey.derive(MATERIAL, salt)
    sealed = key.seal(PLAIN, WHERE)
    assert is_sealed(sealed) and not is_sealed(PLAIN)
    assert sealed[:8] == MAGIC and sealed[16:32] == key.key_id
    assert PLAIN[8:40] not in sealed and b"VSBTABLE" not in sealed
    assert len(sealed) == ENVELOPE_HEADER_SIZE + len(PLAIN) + 16
    assert key.open(sealed, WHERE, "t") == PLAIN
    # a fresh nonce each time: equal tables do not give equal files
    assert key.seal(PLAIN, WHERE) != sealed


def test_key_derivation_depends_on_salt_and_material_and_hides_the_key() -> None:
    salt = new_salt()
    a = SealingKey.derive(MATERIAL, salt)
    assert a == SealingKey.derive(MATERIAL, salt)
    assert a.key_id != SealingKey.derive(MATERIAL, new_salt()).key_id
    assert a.key_id != SealingKey.derive(MATERIAL.replace(b"q", b"Q"), salt).key_id
    assert a.key_id not in a.key and MATERIAL not in repr(a).encode()
    assert a.key.hex() not in repr(a)


def test_wrong_key_is_an_integrity_error_naming_both_ids() -> None:
    salt = new_salt()
    sealed = SealingKey.derive(MATERIAL, salt).seal(PLAIN, WHERE)
    other = SealingKey.derive(MATERIAL[::-1], salt)
    with pytest.raises(IntegrityError, match="another key") as err:
        other.open(sealed, WHERE, "t")
    assert not isinstance(err.value, CorruptFileError)


@pytest.mark.parametrize("offset", [0, 9, 13, 20, 40, ENVELOPE_HEADER_SIZE + 3, -1])
def test_any_changed_byte_is_refused(offset: int) -> None:
    key = SealingKey.derive(MATERIAL, new_salt())
    sealed = bytearray(key.seal(PLAIN, WHERE))
    sealed[offset] ^= 0x01
    with pytest.raises(IntegrityError):
        key.open(bytes(sealed), WHERE, "t")


def test_a_record_moved_to_another_name_does_not_open() -> None:
    key = SealingKey.derive(MATERIAL, new_salt())
    sealed = key.seal(PLAIN, WHERE)
    with pytest.raises(CorruptFileError, match="authentication failed"):
        key.open(sealed, WHERE.replace("000001.vsbt", "000002.vsbt"), "t")
    with pytest.raises(CorruptFileError):
        key.open(sealed[:30], WHERE, "t")


@pytest.mark.parametrize("material", [b"short", b"\xff" * 40, b"x" * 5000])
def test_bad_key_material_is_a_usage_error(material: bytes) -> None:
    with pytest.raises(UsageError):
        SealingKey.derive(material, new_salt())


def test_key_file_rules(tmp_path: Path) -> None:
    path = tmp_path / "pool.key"
    with pytest.raises(NotFoundError):
        KeyFile(path)
    path.write_bytes(MATERIAL)
    os.chmod(path, 0o644)
    with pytest.raises(UsageError, match="chmod 600"):
        KeyFile(path)
    os.chmod(path, 0o600)
    kf = KeyFile(path)
    salt = new_salt()
    assert kf.sealing_key(salt) == SealingKey.derive(MATERIAL, salt)
    assert MATERIAL.decode() not in repr(kf)
    with pytest.raises(UsageError, match="regular file"):
        KeyFile(tmp_path)


def test_compress_with_encrypt_is_refused_before_anything(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str],
                                                          ) -> None:
    """FORMAT §15.2: the combination leaks plaintext on QEMU 7.2; refused as bad usage,
    before libvirt or the pool is touched (the domain need not even exist)."""
    from vmsnapbackup.cli import main
    from vmsnapbackup.errors import ExitCode

    key = tmp_path / "pool.key"
    key.write_bytes(MATERIAL)
    key.chmod(0o600)
    pool = tmp_path / "pool"
    rc = main(["--pool", str(pool), "--connect", "test:///default", "backup", "no-such-domain",
               "--compress", "zstd", "--encrypt", "--key-file", str(key)])
    assert rc == ExitCode.USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "compression and encryption together are refused" in err[0]
    assert not pool.exists()
    rc = main(["--pool", str(pool), "--connect", "test:///default", "backup", "no-such-domain",
               "--encrypt"])
    assert rc == ExitCode.USAGE
    assert "--encrypt needs the pool's key" in capsys.readouterr().err and not pool.exists()
    # accepted arguments: the missing domain is found out before a pool is made
    rc = main(["--pool", str(pool), "--connect", "test:///default", "backup", "no-such-domain",
               "--encrypt", "--key-file", str(key)])
    assert rc == ExitCode.NOT_FOUND and not pool.exists()


@pytest.mark.parametrize("material", [
    b"a" * 40 + b"\n",                         # one character
    b"passwordpassword" * 3,                   # a word repeated
    b"2024-01-01 2024-01-01 2024-01-01 x",     # a date repeated
])
def test_a_new_pool_refuses_a_key_that_is_plainly_not_random(material: bytes) -> None:
    check_key_material(material, "k")            # an existing pool would still open
    with pytest.raises(UsageError, match="does not look random"):
        check_key_strength(material, "k")


@pytest.mark.parametrize("material", [
    base64.b64encode(bytes(range(7, 55))) + b"\n",   # like openssl rand -base64 48
    bytes(range(16, 48)).hex().encode() + b"\n",     # like openssl rand -hex 32
    b"correct horse battery staple, pool key 0001\n",
])
def test_a_new_pool_takes_a_random_or_long_key(material: bytes) -> None:
    check_key_strength(material, "k")
