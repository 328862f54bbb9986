"""The block nodes and the NBD export record of one image served by a storage daemon.

Split from :mod:`~vmsnapbackup.adapters.storagedaemon` (which runs the QMP
conversation) so that what a node *is* -- its driver, read-only flag, discard
mode, pinned backing chain -- is built in one place by plain functions: options
that other pool features need (a compressed or encrypted volume) are added here
and reach every export.

Why two nodes (file, then format) and not one tree: the file node gets O_DIRECT
where the filesystem allows it, and a failure half-way can be undone node by node.
The backing of a format node is *always* given (docs/DESIGN.md §8): the pinned
base's tree from the manifest, or null for an image that must have none -- QEMU
never follows the backing name written in a qcow2 header.
"""
from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from typing import Any

from .. import errors
from .host import LOCAL, Host
from .pinnedchain import PinnedImage, blockdev_tree, encrypt_options

__all__ = ["Export", "bitmap_problem", "check_export_name", "check_format",
           "file_node_args", "format_node_args", "virtual_size"]

_EXPORT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_FORMAT_RE = re.compile(r"^[a-z0-9_-]{1,32}$")


@dataclass(frozen=True)
class Export:
    """One NBD export served by a :class:`~.storagedaemon.StorageDaemon`.

    ``size`` is QEMU's virtual size of the image, which for a raw file whose
    length is not a multiple of 512 is rounded *up* to 512 (the tail reads as
    zeros).
    """

    name: str
    socket_path: str | None   # None when the NBD server listens on TCP
    image_path: str
    fmt: str
    writable: bool
    size: int
    node_name: str
    file_node: str
    export_id: str
    host: str | None = None
    port: int | None = None
    #: the persistent dirty bitmap the export serves as ``qemu:dirty-bitmap:<name>``
    #: (None: not asked, or refused -- ``bitmap_refused`` says why)
    bitmap: str | None = None
    bitmap_refused: str | None = None
    #: the x509 directory clients must use (server served with TLS), None: plain NBD
    tls_dir: str | None = None

    @property
    def uri(self) -> str:
        """``nbd+unix:///NAME?socket=PATH`` (or ``nbd://HOST:PORT/NAME`` on TCP,
        ``nbds://HOST:PORT/NAME`` with TLS), understood by qemu-img, qemu-io, nbdinfo."""
        if self.socket_path is None:
            host = f"[{self.host}]" if self.host and ":" in self.host else self.host
            scheme = "nbds" if self.tls_dir is not None else "nbd"
            return f"{scheme}://{host}:{self.port}/{self.name}"
        sock = urllib.parse.quote(self.socket_path, safe="/")
        return f"nbd+unix:///{self.name}?socket={sock}"


def check_export_name(name: str) -> str:
    if not _EXPORT_NAME_RE.match(name):
        raise errors.UsageError(
            f"bad export name {name!r}: use letters, digits, '.', '_' and '-'"
        )
    return name


def check_format(fmt: str) -> str:
    if not _FORMAT_RE.match(fmt):
        raise errors.UsageError(f"bad image format {fmt!r}")
    return fmt


def _common(writable: bool) -> dict[str, Any]:
    common: dict[str, Any] = {"read-only": not writable}
    if writable:
        # lets WRITE_ZEROES with MAY_TRIM leave holes (raw) or zero clusters (qcow2)
        common["discard"] = "unmap"
    return common


def file_node_args(path: str, node: str, *, block_device: bool,
                   writable: bool) -> dict[str, Any]:
    """The protocol node of an image."""
    return {"driver": "host_device" if block_device else "file", "node-name": node,
            "filename": path, **_common(writable)}


def format_node_args(fmt: str, node: str, file_node: str, *, writable: bool,
                     pinned: PinnedImage | None = None,
                     host: Host = LOCAL) -> dict[str, Any]:
    """The format node over ``file_node``.

    ``pinned`` (a read-only point, base or restored volume) gives the backing
    explicitly: the pinned base's tree, or null when the image must have none.
    Without it (the frozen image, a volume being written) QEMU opens the chain
    its header names, which is the hypervisor's own or one we just created.
    """
    args: dict[str, Any] = {"driver": fmt, "node-name": node, "file": file_node,
                            **_common(writable)}
    if pinned is not None and fmt == "qcow2":
        base = pinned.backing
        args["backing"] = None if base is None else blockdev_tree(base, host=host)
        if pinned.key_file is not None:   # a LUKS volume of an encrypted pool
            args["encrypt"] = encrypt_options()
    return args


def bitmap_problem(nodes: list[dict[str, Any]], node: str, bitmap: str) -> str | None:
    """Why ``bitmap`` of ``node`` (in ``query-named-block-nodes``' answer) cannot be
    trusted, or None when it can."""
    for info in nodes:
        if info.get("node-name") != node:
            continue
        for bm in info.get("dirty-bitmaps") or ():
            if bm.get("name") != bitmap:
                continue
            if not bm.get("persistent", False):
                return "it is not persistent"
            if bm.get("inconsistent", False):
                return "QEMU marks it inconsistent (its writer stopped with it in use)"
            return None
        return "the image has no such bitmap"
    return f"block node {node} vanished from the storage daemon"


def virtual_size(nodes: list[dict[str, Any]], node: str) -> int:
    """The virtual size of ``node`` in ``query-named-block-nodes``' answer."""
    for info in nodes:
        if info.get("node-name") == node:
            return int(info["image"]["virtual-size"])
    raise errors.ExportError(f"block node {node} vanished from the storage daemon")
