"""The export step: serve images over NBD from a private ``qemu-storage-daemon``.

The process (runtime directory, start, QMP, signals, stop, repair's leftover
clean-up) is :mod:`~vmsnapbackup.adapters.daemonprocess`, the block nodes
themselves :mod:`~vmsnapbackup.adapters.exportnodes`, creating a volume to fill
:mod:`~vmsnapbackup.adapters.writablevolume`; this module is what runs
inside the daemon: one NBD server, and block nodes plus an NBD export per image --
the frozen image read-only, the point volume being filled writable, a point
volume read back (chain pinned) for a restore, a verify or a mount -- and, for an
encrypted pool, the pool's key as a ``secret`` object QEMU reads from the key file.

Nodes are added by QMP rather than on the command line so that O_DIRECT can
fall back where the filesystem refuses it.  Removing an export waits for QEMU's
``BLOCK_EXPORT_DELETED``: only then is the image closed and flushed, and only
then may it be committed, renamed or sealed.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from typing_extensions import Self

from .. import errors
from . import exportnodes as nodes
from .daemonleftover import stop_leftover_daemon
from .daemonprocess import NBD_SOCKET, RUNTIME_DIR_PREFIX, DaemonProcess, qemu_opt
from .exportnodes import Export
from .host import LOCAL, Host
from .pinnedchain import KEY_SECRET_ID, PinnedImage, check_header
from .processes import daemon_arguments
from .qemuimg import QemuImg, relative_backing_path
from .writablevolume import WritableVolumes

__all__ = [
    "RUNTIME_DIR_PREFIX",
    "Export",
    "PinnedImage",
    "StorageDaemon",
    "daemon_arguments",
    "detect_format",
    "qemu_opt",
    "relative_backing_path",
    "stop_leftover_daemon",
]

log = logging.getLogger(__name__)

_TLS_ID = "vsbtls"  # id of the tls-creds-x509 object of a TLS-only NBD server


def detect_format(path: str, host: Host = LOCAL) -> str:
    """Probe an image's format (see :meth:`QemuImg.detect_format` for why callers
    that know it -- domain XML, pool manifest -- should pass it instead)."""
    return QemuImg(host, error=errors.ExportError).detect_format(path)


class StorageDaemon(WritableVolumes, DaemonProcess):
    """A private ``qemu-storage-daemon`` with one NBD server and our exports.

    Use as a context manager (or call :meth:`start` / :meth:`close`)::

        with StorageDaemon(tag="web1-vda") as qsd:
            exp = qsd.export_image(frozen, "qcow2", name="vda")
            ... read exp.uri / exp.socket_path + exp.name ...

    ``runtime_base`` is the directory *under which* the private 0700 runtime
    directory ``qsd-TAG-XXXXXXXX`` is created (default ``/run/vmsnapbackup``
    for root, else ``$XDG_RUNTIME_DIR/vmsnapbackup``, else the temp dir); it is
    never removed itself.  ``host`` is where the daemon runs and the images are.
    ``nbd_address`` is a QMP SocketAddress for the NBD server (``{"type": "unix",
    "data": {"path": P}}`` or ``{"type": "inet", "data": {"host": H, "port": "P"}}``);
    by default a socket in the private runtime directory, reachable by root only.
    A socket elsewhere is created 0600 (the daemon runs with umask 077 and it is
    chmodded before the server is announced) and removed on close.

    ``tls_dir`` serves the NBD server with TLS only: a ``tls-creds-x509`` object
    (QEMU's file names ca-cert.pem, server-cert.pem, server-key.pem in that
    directory) with ``verify-peer`` on, so a client needs a certificate the CA
    signed.  The object is added over QMP with the directory only: no key
    material and no path to it ever appears on a command line.
    """

    def __init__(self, runtime_base: str | None = None, tag: str = "vmsnapbackup", *,
                 host: Host = LOCAL, binary: str = "qemu-storage-daemon",
                 start_timeout: float = 15.0, command_timeout: float = 300.0,
                 stop_timeout: float = 15.0, handle_signals: bool = True,
                 nbd_address: dict[str, Any] | None = None,
                 tls_dir: str | None = None) -> None:
        super().__init__(runtime_base, tag, host=host, binary=binary,
                         start_timeout=start_timeout, command_timeout=command_timeout,
                         stop_timeout=stop_timeout, handle_signals=handle_signals)
        self._nbd_address = nbd_address
        self._tls_dir = tls_dir
        self._qemu_img = QemuImg(host, error=errors.ExportError)
        self._exports: list[Export] = []
        self._deleted_export_ids: set[str] = set()
        self._counter = 0
        self._key_file: str | None = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        self._close(raise_deferred=exc_type is None)

    @property
    def nbd_socket(self) -> str | None:
        """The NBD server's unix socket, None when it listens on TCP."""
        if self._nbd_address is None:
            return self._path(NBD_SOCKET)
        if self._nbd_address.get("type") == "unix":
            return str(self._nbd_address["data"]["path"])
        return None

    @property
    def exports(self) -> list[Export]:
        return list(self._exports)

    def _nbd_server_address(self) -> dict[str, Any]:
        if self._nbd_address is None:
            return {"type": "unix", "data": {"path": self._path(NBD_SOCKET)}}
        return self._nbd_address

    def _on_started(self) -> None:
        server: dict[str, Any] = {"addr": self._nbd_server_address()}
        if self._tls_dir is not None:
            creds: dict[str, Any] = {"qom-type": "tls-creds-x509", "id": _TLS_ID,
                                     "dir": self._tls_dir, "endpoint": "server",
                                     "verify-peer": True}
            self._cmd("object-add", **creds)
            server["tls-creds"] = _TLS_ID
        self._cmd("nbd-server-start", **server)
        sock = self.nbd_socket
        if sock is not None:
            # created under the daemon's umask 077; exactly 0600 as FORMAT states
            self.host.chmod(sock, 0o600)
        log.info("[%s] storage daemon pid %s serving NBD on %s", self.tag, self.pid,
                 sock if sock is not None else self._tcp_endpoint())

    def _before_quit(self, alive: bool) -> None:
        for exp in list(reversed(self._exports)):
            if not alive:
                break
            try:
                self.remove_export(exp, force=True)
            except errors.VmSnapBackupError as err:
                log.warning("[%s] could not remove export %s: %s", self.tag, exp.name, err)
        self._exports.clear()

    def _after_stop(self) -> None:
        own = self._nbd_address
        if own is not None and own.get("type") == "unix":
            # a socket the caller placed outside the runtime dir: QEMU leaves it behind
            path = str(own["data"]["path"])
            info = self.host.stat(path, follow=False)
            if info is not None and info.is_socket:
                self.host.unlink(path)

    def _wait_export_deleted(self, export_id: str) -> None:
        """Wait for BLOCK_EXPORT_DELETED: deletion finishes only once clients are gone."""
        timeout = self._stop_timeout if self._closing else self._command_timeout
        deadline = time.monotonic() + timeout
        while export_id not in self._deleted_export_ids:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            event = self._pull_event(float(remaining))
            if event is None:
                break
            log.debug("[%s] QMP event %s", self.tag, event.get("event"))
            if event.get("event") == "BLOCK_EXPORT_DELETED":
                self._deleted_export_ids.add(str(event.get("data", {}).get("id")))
        if export_id in self._deleted_export_ids:
            self._deleted_export_ids.discard(export_id)
            return
        remaining_ids = [e.get("id") for e in self._cmd("query-block-exports")]
        if export_id in remaining_ids:
            raise errors.ExportError(
                f"export {export_id} was not deleted within {timeout:g} s "
                "(an NBD client still connected?)"
            )

    # --------------------------------------------------------------- exports
    def _next_ids(self) -> tuple[str, str, str]:
        self._counter += 1
        n = self._counter
        return f"vsbf{n}", f"vsbd{n}", f"vsbe{n}"

    def _check_name(self, name: str | None, default: str) -> str:
        name = nodes.check_export_name(default if name is None else name)
        if any(e.name == name for e in self._exports):
            raise errors.UsageError(f"export name {name!r} is already in use")
        return name

    def _add_export(self, path: str, fmt: str | None, writable: bool, name: str | None,
                    direct: bool = False, bitmap: str | None = None,
                    pinned: PinnedImage | None = None,
                    layout_node: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                    ) -> Export:
        if self._qmp is None or self._closed:
            raise errors.ExportError("storage daemon is not running")
        path = os.path.abspath(path)
        try:
            st = self.host.stat(path)
        except OSError as err:
            raise errors.ExportError(f"cannot access image {path}: {err.strerror}") from err
        if st is None:
            raise errors.NotFoundError(f"image {path} does not exist")
        if fmt is None:
            fmt = self._qemu_img.detect_format(path)
        nodes.check_format(fmt)
        for key_file in pinned.key_files() if pinned is not None else ():
            self.use_key(key_file)
        file_node, node, export_id = self._next_ids()
        name = self._check_name(name, node)
        file_args = nodes.file_node_args(path, file_node, block_device=st.is_block_device,
                                         writable=writable)
        direct = self._add_node(path, file_args, direct, cache={"direct": True}, aio="native")
        try:
            # the backing images below the format node (a point volume's base)
            # inherit its cache mode: without it the base, read once end to
            # end, went through the page cache and cost twice the time
            fmt_args = nodes.format_node_args(fmt, node, file_node, writable=writable,
                                              pinned=pinned, host=self.host)
            # a volume layout's node over the format node (.volumeformat: compress filter)
            self._add_node(path, layout_node(fmt_args) if layout_node else fmt_args, direct,
                           cache={"direct": True})
            export_args: dict[str, Any] = {"type": "nbd", "id": export_id, "node-name": node,
                                           "name": name, "writable": writable}
            refused = None
            if bitmap is not None:
                refused = self._bitmap_problem(node, bitmap)
            try:
                if bitmap is not None and refused is None:
                    try:
                        self._cmd("block-export-add", _image=path, **export_args,
                                  bitmaps=[bitmap])
                    except errors.ExportError as err:
                        refused = f"QEMU would not export it: {err}"
                if bitmap is None or refused is not None:
                    self._cmd("block-export-add", _image=path, **export_args)
            except BaseException:
                self._undo(lambda: self._cmd("blockdev-del", **{"node-name": node}))
                raise
        except BaseException:
            self._undo(lambda: self._cmd("blockdev-del", **{"node-name": file_node}))
            raise
        export = Export(
            name=name,
            socket_path=self.nbd_socket,
            image_path=path,
            fmt=fmt,
            writable=writable,
            size=0,
            node_name=node,
            file_node=file_node,
            export_id=export_id,
            bitmap=bitmap if bitmap is not None and refused is None else None,
            bitmap_refused=refused,
            tls_dir=self._tls_dir,
            **self._tcp_endpoint(),
        )
        if refused is not None:
            log.info("[%s] %s: dirty bitmap %s not used: %s", self.tag, path, bitmap, refused)
        self._exports.append(export)
        size = self._virtual_size(node)
        export = dataclasses.replace(export, size=size)
        self._exports[-1] = export
        log.info(
            "[%s] exported %s (%s, %s, %d bytes) as %s",
            self.tag, path, fmt, "writable" if writable else "read-only", size, export.uri,
        )
        return export

    def use_key(self, key_file: str) -> None:
        """Hold an encrypted pool's key as the ``secret`` object :data:`KEY_SECRET_ID`
        (FORMAT §15.2): QEMU reads the file itself, so the key is never in a QMP
        message, a command line or a log.  One key per daemon: a daemon serves one pool."""
        if self._key_file == key_file:
            return
        if self._key_file is not None:
            raise errors.UsageError("one storage daemon holds one pool's key, not two")
        self._cmd("object-add", **{"qom-type": "secret", "id": KEY_SECRET_ID,
                                   "format": "raw", "file": key_file})
        self._key_file = key_file

    def _add_node(self, path: str, args: dict[str, Any], direct: bool,
                  **direct_options: Any) -> bool:
        """``blockdev-add``, with ``direct_options`` (O_DIRECT) when ``direct``.

        A filesystem without O_DIRECT (tmpfs) answers EINVAL: the node is then
        added without them, reading through the page cache.  Returns whether
        the node reads directly.
        """
        if direct:
            try:
                self._cmd("blockdev-add", _image=path, **args, **direct_options)
                return True
            except errors.ExportError as err:
                if "Invalid argument" not in str(err):
                    raise
                log.info("[%s] %s: no O_DIRECT here, reading through the page cache",
                         self.tag, path)
        self._cmd("blockdev-add", _image=path, **args)
        return False

    def _undo(self, action: Callable[[], Any]) -> None:
        try:
            action()
        except errors.VmSnapBackupError as err:
            log.warning("[%s] clean-up after a failed export: %s", self.tag, err)

    def _tcp_endpoint(self) -> dict[str, Any]:
        addr = self._nbd_address
        if addr is None or addr.get("type") != "inet":
            return {}
        return {"host": str(addr["data"]["host"]), "port": int(addr["data"]["port"])}

    def _bitmap_problem(self, node: str, bitmap: str) -> str | None:
        """Why ``bitmap`` of ``node`` cannot be trusted, or None when it can."""
        return nodes.bitmap_problem(self._cmd("query-named-block-nodes", flat=True), node, bitmap)

    def _virtual_size(self, node: str) -> int:
        return nodes.virtual_size(self._cmd("query-named-block-nodes", flat=True), node)

    def export_image(self, path: str, fmt: str | None = None, *, name: str | None = None,
                     direct: bool = False, bitmap: str | None = None,
                    pinned: PinnedImage | None = None) -> Export:
        """Export an image read-only (the frozen image, a point volume, ...).

        ``fmt`` None probes the format with qemu-img (see :func:`detect_format`
        for why callers should rather pass it). An image held for writing by
        a running QEMU is refused with an "is in use by a running QEMU (image
        lock)" :class:`ExportError`.

        ``direct`` reads with O_DIRECT and native AIO, when the filesystem allows
        it: for an image read once from end to end (the frozen image), which
        then neither costs a page-cache copy per byte nor evicts the host's cache.

        ``bitmap`` also serves that persistent dirty bitmap of the image, but
        only when QEMU holds it intact: present, persistent and not
        ``inconsistent`` (the flag QEMU leaves on a bitmap whose writer died
        with it in use).  Otherwise the export is made without it and
        :attr:`Export.bitmap_refused` says why: a caller that cannot trust a
        bitmap must read everything, which is slower but never wrong.
        """
        return self._add_export(path, fmt, False, name, direct, bitmap)

    def export_pinned(self, image: PinnedImage, *, name: str | None = None,
                      direct: bool = False) -> Export:
        """Export a pool volume read-only with its backing chain pinned (docs/DESIGN.md §8).

        The header of every image of the chain is checked first (a backing name,
        backing format or data file other than ``image`` says is a
        CorruptFileError), then the format node is opened with its ``backing``
        given explicitly -- the pinned base, opened by us, or null -- so the name
        in the qcow2 header is never followed.
        """
        check_header(image, self.host, self._qemu_img)
        return self._add_export(image.path, image.fmt, False, name, direct, pinned=image)

    def remove_export(self, export: Export, *, force: bool = False) -> None:
        """Stop serving ``export`` and close its image.

        Without ``force`` QEMU refuses while an NBD client is connected; with
        it the clients are dropped. Returns once QEMU reports the export
        deleted and the image is closed (flushed): only then may the image be
        committed, renamed or sealed. Removing an unknown export is a no-op.
        """
        if export not in self._exports:
            return
        self._cmd("block-export-del", id=export.export_id, mode="hard" if force else "safe")
        self._wait_export_deleted(export.export_id)
        self._exports.remove(export)
        self._cmd("blockdev-del", **{"node-name": export.node_name})
        self._cmd("blockdev-del", **{"node-name": export.file_node})
        log.info("[%s] removed export %s of %s", self.tag, export.name, export.image_path)


