"""Writable volumes in the storage daemon: a new base or point volume, created and
exported for the backup to fill.

Kept apart from :mod:`.storagedaemon` (which serves exports) because creating a
volume is where the pool's volume layout comes in -- compressed, encrypted
(:mod:`.volumeformat`) -- and where a file is made that must never overwrite
another and must vanish again if its export fails.  A mixin of
:class:`~.storagedaemon.StorageDaemon`, so callers keep writing
``daemon.create_writable(...)``.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable

from .exportnodes import Export
from .pinnedchain import PinnedImage, secret_objects

if TYPE_CHECKING:
    from .host import Host
    from .qemuimg import QemuImg

__all__ = ["WritableVolumes"]

NodeOptions = Callable[[dict[str, Any]], dict[str, Any]]


class WritableVolumes:
    """``open_writable`` and ``create_writable`` of a storage daemon."""

    host: Host
    _qemu_img: QemuImg

    if TYPE_CHECKING:   # provided by StorageDaemon
        def _add_export(self, path: str, fmt: str | None, writable: bool, name: str | None,
                        direct: bool = False, bitmap: str | None = None,
                        pinned: PinnedImage | None = None,
                        layout_node: NodeOptions | None = None) -> Export: ...

        def use_key(self, key_file: str) -> None: ...

    def open_writable(self, path: str, fmt: str | None = None, *,
                      name: str | None = None) -> Export:
        """Export an existing image writable (for instance a raw base volume)."""
        return self._add_export(path, fmt, True, name)

    def create_writable(
        self,
        path: str,
        *,
        size: int | None = None,
        backing: str | None = None,
        backing_fmt: str | None = None,
        fmt: str = "qcow2",
        cluster_size: int = 65536,
        name: str | None = None,
        options: Sequence[str] = (),
        layout_node: NodeOptions | None = None,
        key_file: str | None = None,
    ) -> Export:
        """Create a new image (never overwriting) and export it writable.

        With ``backing`` the qcow2 stores the backing path relative to its own
        directory (see :func:`.qemuimg.relative_backing_path`); ``size`` then defaults
        to the backing image's size. ``fmt="raw"`` creates a sparse raw file.
        The file is 0600 from its first instant (O_EXCL, then ``qemu-img create``
        into it) and removed again if the export fails. Data written through the
        export reaches the disk (fdatasync) when the export is removed.  ``options``
        (``qemu-img create -o``) and ``layout_node`` (the node exported over the
        format node) come from :class:`.volumeformat.VolumeLayout`.

        ``key_file``: an encrypted pool's volume (FORMAT §15.2).  The daemon and
        ``qemu-img`` read the key from that file as the ``secret`` object
        :data:`.pinnedchain.KEY_SECRET_ID` that ``options`` name.
        """
        path = os.path.abspath(path)
        objects: list[str] = []
        if key_file is not None:
            self.use_key(key_file)
            objects = secret_objects(PinnedImage(path, fmt, key_file=key_file))
        self._qemu_img.create(path, fmt, size=size, backing=backing, backing_fmt=backing_fmt,
                              cluster_size=cluster_size if fmt == "qcow2" else None,
                              mode=0o600, in_pool=True, options=options, objects=objects)
        try:
            return self._add_export(path, fmt, True, name, layout_node=layout_node)
        except BaseException:
            self.host.unlink(path)
            raise
