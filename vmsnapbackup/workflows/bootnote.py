"""The note a boot leaves in its directory (``vmsnapbackup-boot.json``): what the boot
made, and what its storage daemon serves.

Why apart from :mod:`.boot`: the note is the one record that outlives the ``boot``
command -- :func:`~.boot.resume_boot` serves the point again from it after a host
reboot, :func:`~.boot.discard_boot` removes exactly the files it lists -- so reading
it is strict (a note naming a file outside its directory is refused before anything
is removed), and what it holds is decided here.  Two kinds of boot write it -- on
this machine (:mod:`.boot`) and on a remote hypervisor (:mod:`.remoteboot`) -- and
both read it back through :func:`parse_note`.

A boot of an encrypted pool's point (FORMAT.md §15.2) records the key file's
*path*, never its bytes: the daemon reads the key from that file itself, as a
``secret`` object.  Such a note is version 2, which an older vmsnapbackup refuses
instead of serving LUKS volumes without their key.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..adapters import bootdaemon
from ..adapters.pinnedchain import PinnedImage, check_header
from ..core.atomic import atomic_write_json, read_optional
from ..core.domainstore import DomainStore
from ..core.manifest import PointDisk, utc_now
from ..errors import CorruptFileError, NotFoundError

__all__ = ["BOOT_FORMAT", "BOOT_NOTE", "BOOT_VERSION", "new_note", "note_files",
           "note_key_file", "note_version", "parse_note", "read_note", "served_images",
           "write_note"]

log = logging.getLogger(__name__)

BOOT_NOTE = "vmsnapbackup-boot.json"
BOOT_FORMAT = "vmsnapbackup-boot"
#: 1: plain pools; 2: adds ``key_file`` (a point of an encrypted pool)
BOOT_VERSION = 2


def note_version(key_file: str | None) -> int:
    """The version a new note is written with: 1 unless it needs the key file."""
    return 1 if key_file is None else 2


def new_note(name: str, uri: str, store: DomainStore, point: int,
             volumes: Mapping[str, tuple[PointDisk, PinnedImage]], *,
             key_file: str | None = None, **extra: Any) -> dict[str, Any]:
    """The note of boot ``name`` of ``point`` before its domain is defined (``uuid``
    None); ``volumes`` maps each target to its manifest entry and pinned volume."""
    return {
        "format": BOOT_FORMAT, "version": note_version(key_file), "name": name,
        "uuid": None, "created": utc_now(), "uri": uri, **extra,
        **({} if key_file is None else {"key_file": key_file}),
        "source": {"domain": store.name, "uuid": store.uuid, "point": point,
                   "pool": str(store.pool.root)},
        "disks": {t: {"overlay": f"{t}.qcow2", "export": t, "volume": v.path,
                      "format": d.volume_format, "virtual_size": d.virtual_size,
                      "base": v.backing.path if v.backing else None,
                      "base_format": v.backing.fmt if v.backing else None}
                  for t, (d, v) in sorted(volumes.items())},
    }


def write_note(bdir: Path, note: dict[str, Any]) -> None:
    atomic_write_json(bdir / BOOT_NOTE, note, 0o600)


def read_note(bdir: Path) -> dict[str, Any]:
    """The note of boot directory ``bdir``, checked by :func:`parse_note`."""
    path = bdir / BOOT_NOTE
    data = read_optional(path)
    if data is None:
        raise NotFoundError(f"no boot made by vmsnapbackup in {bdir} (no {BOOT_NOTE})")
    return parse_note(str(path), data)


def parse_note(path: str, data: bytes) -> dict[str, Any]:
    """A note's bytes, checked (CorruptFileError when it is not ours, too new, or names
    a file outside its directory): ``--discard`` removes what it lists."""
    try:
        note = json.loads(data)
    except ValueError as err:
        raise CorruptFileError(path, f"not JSON: {err}") from None
    if not isinstance(note, dict) or note.get("format") != BOOT_FORMAT \
            or not isinstance(note.get("disks"), dict):
        raise CorruptFileError(path, "not a vmsnapbackup boot note")
    if not isinstance(note.get("version"), int) or note["version"] > BOOT_VERSION:
        raise CorruptFileError(path, f"unknown boot note version {note.get('version')!r}")
    key = note.get("key_file")
    if key is not None and (not isinstance(key, str) or not key.startswith("/")):
        raise CorruptFileError(path, f"key_file is not an absolute path: {key!r}")
    for f in note_files(note):
        if "/" in f or f in ("", ".", ".."):
            raise CorruptFileError(path, f"names a file outside its directory: {f!r}")
    return note


def note_files(note: dict[str, Any]) -> list[str]:
    """Every file the note says we created in the boot directory (plain names)."""
    files = [str(d.get("overlay", "")) for d in dict(note.get("disks") or {}).values()]
    return [*files, bootdaemon.SOCKET, bootdaemon.PIDFILE, bootdaemon.LOGFILE]


def note_key_file(note: dict[str, Any]) -> str | None:
    """The key file of the encrypted pool whose point the boot serves (None: plain)."""
    key = note.get("key_file")
    return None if key is None else str(key)


def _chain(d: dict[str, Any], key_file: str | None) -> PinnedImage | None:
    """The pinned backing chain a note records for a disk (docs/DESIGN.md §8).  A
    note written before chains were pinned has no ``base`` key: its volume is then
    served as its header says, with a warning."""
    if "base" not in d:
        log.warning("boot note predates pinned backing chains: %s is served following "
                    "the backing file its header names", d.get("volume"))
        return None
    base = None if d["base"] is None else PinnedImage(str(d["base"]), str(d["base_format"]),
                                                       key_file=key_file)
    return PinnedImage(str(d["volume"]), str(d["format"]), base, key_file=key_file)


def served_images(note: dict[str, Any]) -> list[bootdaemon.ServedImage]:
    """The images the boot's daemon serves; every pinned chain's headers are checked
    first (a tampered pool is refused, never served)."""
    key_file = note_key_file(note)
    served = []
    for _target, d in sorted(dict(note["disks"]).items()):
        chain = _chain(d, key_file)
        if chain is not None:
            check_header(chain)
        elif key_file is not None:
            raise CorruptFileError(str(d.get("volume")), "an encrypted pool's point needs "
                                   "its pinned chain, which this boot note lacks")
        served.append(bootdaemon.ServedImage(export=str(d["export"]), image=str(d["volume"]),
                                             fmt=str(d["format"]), chain=chain))
    return served
