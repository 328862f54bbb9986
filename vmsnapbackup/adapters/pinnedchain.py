"""Point volumes opened with their backing chain pinned from the manifest.

A point volume is a qcow2 whose backing file is its generation's base volume.
The qcow2 header names that backing file, and QEMU by default opens whatever
the header names.  The pool's storage is not trusted (docs/DESIGN.md §8): one
``qemu-img rebase -u -b /some/host/file point-3.qcow2`` would make a restore
copy, a verify hash and a mount serve that host file.  So a reader never lets
QEMU follow the header:

* :func:`check_header` reads the header (``qemu-img info``, which never opens
  the backing file) and refuses, as damage, a volume whose header names any
  backing file or backing format other than the one the manifest expects, or an
  external ``data-file`` (another way to make QEMU read a file of the header's
  choosing);
* the image is then opened with the backing node given explicitly -- the
  expected base, opened by us with its format given -- so even a header changed
  between the check and the open cannot redirect a read.  ``backing: null`` is
  given only for an image that must have no backing file (a base volume, a
  restored image), which the header check has just confirmed: nothing that the
  image needs is ever silently dropped.

:func:`blockdev_tree` builds the QMP/``--blockdev`` option tree, :func:`json_filename`
the ``json:`` pseudo-filename that ``qemu-img convert`` takes.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from ..errors import CorruptFileError
from .host import LOCAL, Host
from .qemuimg import QemuImg

__all__ = ["KEY_SECRET_ID", "PinnedImage", "blockdev_tree", "check_header",
           "encrypt_options", "json_filename", "secret_objects"]

#: the id of the ``secret`` object holding an encrypted pool's key in a QEMU process
KEY_SECRET_ID = "vsbpoolkey"


def encrypt_options() -> dict[str, Any]:
    """The ``encrypt`` member of a LUKS qcow2 node opened with the pool's key."""
    return {"format": "luks", "key-secret": KEY_SECRET_ID}


def secret_objects(image: PinnedImage) -> list[str]:
    """``--object`` arguments of ``qemu-img`` for ``image``'s key: QEMU reads the file
    itself, so only its path is on the command line, never the key."""
    files = sorted(image.key_files())
    if len(files) > 1:
        raise CorruptFileError(image.path, "a chain encrypted with two key files")
    return [f"secret,id={KEY_SECRET_ID},format=raw,file={f.replace(',', ',,')}" for f in files]


@dataclass(frozen=True)
class PinnedImage:
    """An image, its format and the one backing image it must be read through.

    ``backing`` None: the image must have no backing file at all.  ``key_file``: the
    image is a LUKS qcow2 of an encrypted pool (FORMAT §15.2), opened with the
    ``secret`` object :data:`KEY_SECRET_ID` that QEMU reads from that file.
    """

    path: str
    fmt: str
    backing: PinnedImage | None = None
    key_file: str | None = None

    def key_files(self) -> set[str]:
        """The key files the chain needs (one, in practice: a pool has one key)."""
        return {link.key_file for link in self.chain() if link.key_file is not None}

    def chain(self) -> list[PinnedImage]:
        """This image, then its backing, then that one's backing, ..."""
        out: list[PinnedImage] = []
        image: PinnedImage | None = self
        while image is not None:
            out.append(image)
            image = image.backing
        return out


def _same_file(a: str, b: str) -> bool:
    if os.path.normpath(a) == os.path.normpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_header(image: PinnedImage, host: Host = LOCAL,
                 qemu_img: QemuImg | None = None) -> None:
    """Refuse (CorruptFileError) any image of ``image``'s chain whose header disagrees
    with the chain: another format, a backing file other than the pinned one (or
    one where none is expected), another backing format, or an external data file."""
    img = qemu_img or QemuImg(host)
    for link in image.chain():
        info = img.info(link.path, force_share=True)
        if info.format != link.fmt:
            raise CorruptFileError(link.path, f"is {info.format}, the manifest says "
                                   f"{link.fmt}: refusing to read it")
        data = (info.raw.get("format-specific") or {}).get("data") or {}
        if isinstance(data, dict) and data.get("data-file"):
            raise CorruptFileError(link.path, f"its header names an external data file "
                                   f"{data.get('data-file')!r}: refusing to read it")
        expected = link.backing
        if expected is None:
            if info.backing is not None:
                raise CorruptFileError(link.path, f"its header names a backing file "
                                       f"{info.backing!r} where none belongs: refusing "
                                       "to read it")
            continue
        named = info.backing_path or info.backing
        if named is None or not _same_file(named, expected.path):
            raise CorruptFileError(link.path, f"its header names backing file "
                                   f"{info.backing!r}, not its generation's base volume "
                                   f"{expected.path}: refusing to read it")
        if info.backing_format not in (None, expected.fmt):
            raise CorruptFileError(link.path, f"its header names backing format "
                                   f"{info.backing_format!r}, the base volume is "
                                   f"{expected.fmt}: refusing to read it")


def _file_driver(path: str, host: Host) -> str:
    st = host.stat(path)
    return "host_device" if st is not None and st.is_block_device else "file"


def blockdev_tree(image: PinnedImage, *, host: Host = LOCAL, read_only: bool = True,
                  file_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The blockdev options of ``image`` as one tree: format node over its file node,
    with ``backing`` always given (the pinned base's tree, or null).

    ``file_extra`` (cache mode, aio) is applied to every file node of the chain.
    The top node gets no node-name here; callers add theirs.
    """
    extra = dict(file_extra or {})
    tree: dict[str, Any] = {
        "driver": image.fmt, "read-only": read_only,
        "file": {"driver": _file_driver(image.path, host), "filename": image.path,
                 "read-only": read_only, **extra},
    }
    if image.key_file is not None:
        tree["encrypt"] = encrypt_options()
    if image.fmt == "qcow2":
        tree["backing"] = None if image.backing is None else blockdev_tree(
            image.backing, host=host, read_only=True, file_extra=extra)
    elif image.backing is not None:
        raise CorruptFileError(image.path, f"a {image.fmt} image cannot have a backing file")
    return tree


def json_filename(image: PinnedImage, host: Host = LOCAL) -> str:
    """The ``json:`` pseudo-filename of ``image`` with its chain pinned, for qemu-img."""
    return "json:" + json.dumps(blockdev_tree(image, host=host), separators=(",", ":"))
