"""Which storage daemons a backup runs, and where.

On the hypervisor itself one daemon serves both sides of the pass: the frozen
image read-only and the volume being filled writable, over its private
socket.  When the hypervisor is another machine (``qemu+ssh``) they part: the
frozen image is exported by a daemon started *on the hypervisor* (reached by
ssh forwarding or NBD over TLS, :mod:`..adapters.sourceexport`), and the pool
-- which is here -- is written by a second daemon *here*, whose runtime directory lives under
``writers/`` so that a killed backup's is found again (:mod:`..adapters.writerdirs`).
Both are stopped when the block ends, before the commit back: no export holds a
frozen image then.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from ..adapters.host import Host
from ..adapters.hostinflight import host_runtime_root
from ..adapters.nbdtls import DEFAULT_TLS_DIR
from ..adapters.sourceexport import (
    DEFAULT_NBD_PORTS,
    DataPath,
    is_remote,
    parse_port_range,
    start_source_daemon,
)
from ..adapters.storagedaemon import StorageDaemon
from ..adapters.writerdirs import writers_base
from ..errors import UsageError

__all__ = ["backup_daemons", "data_path_from"]


def data_path_from(tls_dir: str | None, nbd_ports: str | None) -> DataPath | None:
    """The CLI's ``--tls-dir [DIR]`` (empty: QEMU's default directory) and ``--nbd-ports``."""
    if tls_dir is None:
        if nbd_ports is not None:
            raise UsageError("--nbd-ports is for NBD over TLS: give --tls-dir too")
        return None
    ports = parse_port_range(nbd_ports) if nbd_ports is not None else DEFAULT_NBD_PORTS
    return DataPath(tls_dir=os.path.abspath(tls_dir or DEFAULT_TLS_DIR), ports=ports)


@contextlib.contextmanager
def backup_daemons(host: Host, tag: str,
                   data: DataPath | None) -> Iterator[tuple[StorageDaemon, StorageDaemon]]:
    """``(source daemon, volume daemon)``: one and the same on this machine."""
    if not is_remote(host):
        with StorageDaemon(tag=tag) as daemon:
            yield daemon, daemon
        return
    with contextlib.ExitStack() as stack:
        source = start_source_daemon(host, tag, host_runtime_root(host), data or DataPath())
        stack.callback(source.close)
        # not in the journal (that names the source daemon's, on the hypervisor): it
        # lives where hostopen finds a dead one's again (writerdirs)
        volumes = stack.enter_context(StorageDaemon(writers_base(), tag=f"{tag}-vol"))
        yield source, volumes
