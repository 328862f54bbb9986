"""How a pool volume is laid out in qcow2 (FORMAT.md §15): plain, compressed or encrypted.

A compressed volume is a qcow2 image created with ``compression_type=zstd`` and
written through QEMU's ``compress`` filter driver, stacked over the qcow2 node
in the storage daemon that fills it.  Why the filter rather than qcow2 options:
a qcow2 node written over NBD never compresses (QEMU compresses only writes
flagged as compressed, which the filter turns every write into).  Where a
cluster does not get smaller QEMU stores it uncompressed, so incompressible
data costs what it costs in a plain volume.  A compressed cluster cannot be
rewritten (QEMU answers EIO), which fits our write-once volumes as long as a
block is a whole number of clusters: :func:`cluster_size` sees to that.

Reading needs nothing: QEMU decompresses any qcow2, so restore, verify, mount
and boot open a compressed volume exactly like a plain one.

An encrypted volume (FORMAT §15.2) is a LUKS qcow2 (aes-256-xts) whose passphrase
is the pool's key file, which QEMU reads itself as a ``secret`` object; readers
open it with that secret (:class:`.pinnedchain.PinnedImage` ``key_file``).

This module only builds options; the storage daemon
(:mod:`.storagedaemon`) applies them.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError
from .pinnedchain import KEY_SECRET_ID, PinnedImage, blockdev_tree, encrypt_options

__all__ = [
    "COMPRESSIONS",
    "LUKS_OPTIONS",
    "MAX_CLUSTER",
    "VolumeLayout",
    "cluster_size",
    "refuse_encryption",
    "resolve_compression",
]

#: the compression types we write (QEMU 5.1+ reads zstd qcow2 images)
COMPRESSIONS = ("zstd",)
#: qcow2's largest cluster
MAX_CLUSTER = 2 * 1024 * 1024
#: qcow2's default cluster, kept for plain volumes with small blocks (less metadata)
_PLAIN_MIN_CLUSTER = 65536
#: qcow2's smallest cluster
_MIN_CLUSTER = 512

NodeOptions = Callable[[dict[str, Any]], dict[str, Any]]


def resolve_compression(asked: str | None, pool_default: str | None) -> str | None:
    """The compression of one backup: ``asked`` (``"none"`` turns the pool's default
    off), else the pool's default."""
    if asked is None:
        return pool_default
    if asked == "none":
        return None
    if asked not in COMPRESSIONS:
        raise UsageError(f"unknown compression {asked!r}: use one of "
                         f"{', '.join(COMPRESSIONS)} or none")
    return asked


def cluster_size(block_size: int, compression: str | None, disk_size: int) -> int:
    """The qcow2 cluster size of a volume of a generation with ``block_size``.

    Compressed: the block size itself (at most 2 MiB, a divisor of every larger
    block size), so that a block never shares a cluster with another one and
    each compressed cluster is written exactly once -- halved until it divides
    the disk's size, because QEMU's ``compress`` filter aligns requests to the
    cluster and refuses to write an image whose size is not a multiple of that
    ("Image size is not a multiple of request alignment", QEMU 7.2).  Plain: at
    least 64 KiB, as before.
    """
    if compression is None:
        return min(max(block_size, _PLAIN_MIN_CLUSTER), MAX_CLUSTER)
    cluster = min(block_size, MAX_CLUSTER)
    while cluster > _MIN_CLUSTER and disk_size % cluster:
        cluster //= 2
    return cluster


def refuse_encryption(compression: str | None) -> None:
    """Compression and encryption together: a UsageError, raised before anything is
    touched.

    On QEMU 7.2 a ``compress`` filter over a LUKS qcow2 accepts the writes and stores
    the compressed clusters unencrypted (a guest marker was found in the raw file;
    ``qemu-img convert`` refuses the combination, the block layer does not), so
    compression and encryption together are never written.
    """
    if compression is not None:
        raise UsageError("compression and encryption together are refused: QEMU writes "
                         "the compressed clusters of a LUKS qcow2 unencrypted; choose one")


#: PBKDF2 time of a LUKS key slot, in ms: QEMU's default (2000) costs each open of a
#: volume about 2 s, and stretching adds nothing to a random key file (FORMAT §15.2)
LUKS_ITER_TIME_MS = 10
#: ``qemu-img create -o`` of an encrypted volume (FORMAT §15.2)
LUKS_OPTIONS = ("encrypt.format=luks", f"encrypt.key-secret={KEY_SECRET_ID}",
                "encrypt.cipher-alg=aes-256", "encrypt.cipher-mode=xts",
                f"encrypt.iter-time={LUKS_ITER_TIME_MS}")


@dataclass(frozen=True)
class VolumeLayout:
    """How a volume is written: its qcow2 creation options and the block node the
    writable export serves."""

    compression: str | None = None
    #: an encrypted pool's key file (FORMAT §15.2): volumes are LUKS qcow2
    key_file: str | None = None

    def check(self, fmt: str) -> None:
        """Refuse what cannot be stored: only qcow2 compresses or encrypts, and never
        both at once."""
        if self.compression is not None and fmt != "qcow2":
            raise UsageError(f"a {fmt} volume cannot be compressed: compression needs "
                             "qcow2 (drop --base-format raw or --compress)")
        if self.key_file is not None:
            refuse_encryption(self.compression)
            if fmt != "qcow2":
                raise UsageError(f"a {fmt} volume cannot be encrypted: an encrypted pool "
                                 "needs qcow2 (drop --base-format raw)")

    def create_options(self) -> list[str]:
        """``qemu-img create -o`` entries."""
        if self.key_file is not None:
            return list(LUKS_OPTIONS)
        if self.compression is None:
            return []
        return [f"compression_type={self.compression}"]

    def writer_node(self, backing: PinnedImage | None = None) -> NodeOptions | None:
        """A function turning the qcow2 node's ``blockdev-add`` arguments into those of
        the node to export for writing, or None to export the qcow2 node itself.

        An encrypted volume is opened with the key, and its ``backing`` (a point
        volume's base, encrypted with the same key) given explicitly: QEMU cannot
        open the base its header names without the key."""
        if self.key_file is not None:
            key_file = self.key_file

            def encrypted(fmt_args: dict[str, Any]) -> dict[str, Any]:
                out = {**fmt_args, "encrypt": encrypt_options()}
                if backing is not None:
                    out["backing"] = blockdev_tree(
                        dataclasses.replace(backing, key_file=key_file))
                return out
            return encrypted
        if self.compression is None:
            return None
        return _compress_over

    def describe(self) -> str:
        if self.key_file is not None:
            return "luks"
        return self.compression or "plain"


def _compress_over(fmt_args: dict[str, Any]) -> dict[str, Any]:
    """``compress`` filter node named like the qcow2 node, with the qcow2 node inline
    below it (so deleting the filter frees both, and the export's node names stay
    the two the daemon knows)."""
    name = str(fmt_args["node-name"])
    inner = {**fmt_args, "node-name": f"{name}z"}
    out: dict[str, Any] = {"driver": "compress", "node-name": name, "file": inner}
    for key in ("read-only", "discard"):
        if key in fmt_args:
            out[key] = fmt_args[key]
    return out
