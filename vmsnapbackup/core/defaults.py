"""The defaults a user may leave out, in one place.

The CLI, the hook and the library's keyword defaults must agree on which
hypervisor and which pool "no option given" means; a second copy of any of
these would eventually disagree.  Pure constants: importing this costs nothing.
"""
from __future__ import annotations

__all__ = [
    "BLOCK_OVERLAY_ROOT",
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_BOOT_ROOT",
    "DEFAULT_POOL",
    "DEFAULT_THRESHOLD",
    "DEFAULT_URI",
    "POOL_ENV",
    "RESTORE_FORMATS",
    "URI_ENV",
]

#: The libvirt connection used when none is given (as ``virsh`` does as root).
DEFAULT_URI = "qemu:///system"

#: libvirt's own variable for the default connection (honoured like ``virsh`` does).
URI_ENV = "LIBVIRT_DEFAULT_URI"

#: The pool used when neither ``--pool`` nor :data:`POOL_ENV` names one.
DEFAULT_POOL = "/var/lib/vmsnapbackup"

#: The environment variable naming the default pool (a path or a libvirt pool name).
POOL_ENV = "VMSNAPBACKUP_POOL"

#: A point that changed more than this fraction of a disk starts a new generation.
DEFAULT_THRESHOLD = 0.5

#: Check table block size of a new generation (bytes).
DEFAULT_BLOCK_SIZE = 64 * 1024

#: Where ``boot`` puts a boot domain's throwaway overlays (a directory per domain):
#: libvirt's own image directory, so QEMU may open them under its usual labels.
DEFAULT_BOOT_ROOT = "/var/lib/libvirt/images/vmsnapbackup-boot"

#: Image formats ``restore`` writes.
RESTORE_FORMATS = ("raw", "qcow2")

#: Where the snapshot overlays of a running domain's block-device disks go when no
#: ``--overlay-dir`` is given (a device has no directory beside it): one directory per
#: domain UUID below libvirt's own images directory, which QEMU can reach.
BLOCK_OVERLAY_ROOT = "/var/lib/libvirt/images/vmsnapbackup-overlays"
