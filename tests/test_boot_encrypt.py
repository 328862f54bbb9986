"""Boot of an encrypted pool's point (FORMAT.md §15.2), the parts without QEMU: the
daemon's command line names the key file and never holds the key, every node of the
pinned chain opens with it, and the note records the key file's path only."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmsnapbackup.adapters import bootdaemon
from vmsnapbackup.adapters.pinnedchain import KEY_SECRET_ID, PinnedImage
from vmsnapbackup.errors import CorruptFileError, ExportError
from vmsnapbackup.workflows import bootnote

KEY = "/root/keys/pool,1.key"


def _served(key: str | None, export: str = "vda") -> bootdaemon.ServedImage:
    base = PinnedImage("/pool/d/base.qcow2", "qcow2", key_file=key)
    point = PinnedImage("/pool/d/point-000002.qcow2", "qcow2", base, key_file=key)
    return bootdaemon.ServedImage(export=export, image=point.path, fmt="qcow2", chain=point)


def test_daemon_of_an_encrypted_point_reads_the_key_from_its_file(tmp_path: Path) -> None:
    argv = bootdaemon.daemon_args(str(tmp_path), [_served(KEY), _served(KEY, "vdb")])
    objects = [argv[i + 1] for i, a in enumerate(argv) if a == "--object"]
    assert objects == [f"secret,id={KEY_SECRET_ID},format=raw,file=/root/keys/pool,,1.key"]
    nodes = [json.loads(argv[i + 1]) for i, a in enumerate(argv)
             if a == "--blockdev" and argv[i + 1].startswith("{")]
    assert len(nodes) == 2
    for node in nodes:
        assert node["encrypt"] == {"format": "luks", "key-secret": KEY_SECRET_ID}
        assert node["backing"]["encrypt"] == {"format": "luks", "key-secret": KEY_SECRET_ID}
        assert node["read-only"] is True


def test_daemon_of_a_plain_point_has_no_secret(tmp_path: Path) -> None:
    argv = bootdaemon.daemon_args(str(tmp_path), [_served(None)])
    assert "--object" not in argv and "encrypt" not in " ".join(argv)


def test_one_boot_never_mixes_two_keys(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="key files"):
        bootdaemon.daemon_args(str(tmp_path), [_served(KEY), _served("/other.key", "vdb")])


def _note(bdir: Path, **extra: object) -> None:
    note = {"format": "vmsnapbackup-boot", "version": 2,
            "disks": {"vda": {"overlay": "vda.qcow2", "volume": "/pool/v.qcow2",
                              "format": "qcow2", "export": "vda"}}, **extra}
    (bdir / bootnote.BOOT_NOTE).write_text(json.dumps(note))


def test_note_records_an_absolute_key_path_and_is_version_2(tmp_path: Path) -> None:
    assert bootnote.note_version(None) == 1 and bootnote.note_version(KEY) == 2
    _note(tmp_path, key_file=KEY)
    assert bootnote.note_key_file(bootnote.read_note(tmp_path)) == KEY
    _note(tmp_path, key_file="relative.key")
    with pytest.raises(CorruptFileError, match="absolute"):
        bootnote.read_note(tmp_path)
    # an encrypted point is only served through its pinned chain (no "base" key here)
    _note(tmp_path, key_file=KEY)
    with pytest.raises(CorruptFileError, match="pinned chain"):
        bootnote.served_images(bootnote.read_note(tmp_path))
