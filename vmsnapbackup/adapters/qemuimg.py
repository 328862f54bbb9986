"""Every ``qemu-img`` call of vmsnapbackup: info, create, convert, commit.

Why one module: the tool's quirks are handled once -- its errors become one
line with QEMU's own words, a full disk becomes a StorageError, ``info`` is
parsed in one place -- and it runs through a :class:`~.host.Host`, so the same
call works on the machine we run on or on a remote hypervisor.

Files it creates are private from their first instant: ``create`` makes the
file O_EXCL with mode 0600 first and then lets ``qemu-img create`` write the
header into it (qemu-img truncates an existing file and keeps its inode and
mode); ``convert`` writes with ``-n`` into a target the caller created the same
way.  A file qemu-img itself created would be 0644 until someone chmods it.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import tenacity

from ..errors import HypervisorError, PoolFullError, StorageError, UsageError
from .host import LOCAL, Completed, Host

__all__ = [
    "ImageInfo",
    "MapExtent",
    "QemuImg",
    "relative_backing_path",
]

log = logging.getLogger(__name__)

_PROGRESS_RE = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")
_NO_SPACE = ("No space left on device", "Disk quota exceeded")
#: QEMU's LUKS key-slot setup times PBKDF2 by the thread's *user* CPU time, which
#: the kernel may report as unchanged on a busy (virtual) machine; QEMU then gives
#: up with this message, though nothing is wrong: the create is simply run again
_PBKDF_TIMING = "Unable to get accurate CPU usage"
_CREATE_ATTEMPTS = 4
_INFO_TIMEOUT = 60.0
_CREATE_TIMEOUT = 300.0
#: convert and commit of a large image take long; the deadline only catches a hang.
_LONG_TIMEOUT: float | None = None


@dataclass(frozen=True)
class MapExtent:
    """One extent of ``qemu-img map``: ``offset`` is where its bytes are in the file
    (None: not stored plainly there, e.g. compressed or a hole)."""

    start: int
    length: int
    data: bool
    zero: bool
    offset: int | None
    depth: int


def relative_backing_path(image: str, backing: str) -> str:
    """The backing path to store in ``image``: relative to ``image``'s directory.

    Relative so that the whole pool can be moved or mounted elsewhere and
    point volumes still find their base volume. A leading ``./`` is added when
    the first component holds a ``:``, which QEMU would otherwise read as a
    protocol prefix (``nbd:...``).
    """
    rel = os.path.relpath(os.path.abspath(backing), os.path.dirname(os.path.abspath(image)))
    if ":" in rel.split("/", 1)[0]:
        rel = "./" + rel
    return rel


def _progress_reader(progress: Callable[[float], None]) -> Callable[[bytes], None]:
    """A stdout sink for ``-p``, which prints ``(x.xx/100%)`` (chunks may split one)."""
    pending = [b""]

    def on_stdout(chunk: bytes) -> None:
        data = pending[0] + chunk
        matches = list(_PROGRESS_RE.finditer(data))
        if matches:
            progress(float(matches[-1].group(1)))
            data = data[matches[-1].end():]
        pending[0] = data[-64:]

    return on_stdout


@dataclass(frozen=True)
class ImageInfo:
    """What ``qemu-img info`` says about one image (not its backing chain)."""

    path: str
    format: str
    virtual_size: int
    #: the backing name as the header stores it, and resolved against the image's directory
    backing: str | None
    backing_path: str | None
    backing_format: str | None
    raw: dict[str, Any]


class QemuImg:
    """``qemu-img`` on one host.  Failures raise ``error`` (HypervisorError by default:
    callers that export pass ExportError) or, for a full disk, StorageError."""

    def __init__(self, host: Host = LOCAL, *, binary: str = "qemu-img",
                 error: type = HypervisorError) -> None:
        self.host = host
        self.binary = binary
        self._error = error

    def _run(self, args: list[str], what: str, timeout: float | None,
             on_stdout: Callable[[bytes], None] | None = None,
             full: type | None = None, target: str = "") -> Completed:
        argv = [self.binary, *args]
        log.debug("running %s", " ".join(argv))
        try:
            done = self.host.run(argv, timeout=timeout, on_stdout=on_stdout)
        except HypervisorError as err:
            raise self._error(f"{what}: {err}") from err
        if not done.ok:
            message = done.message()
            if any(s in message for s in _NO_SPACE):
                kind = full or StorageError
                raise kind(f"no space left for {target or what}: {message}")
            raise self._error(f"{what} failed: {message}")
        return done

    # ------------------------------------------------------------------------ info
    def info(self, path: str, *, force_share: bool = False) -> ImageInfo:
        """``qemu-img info`` of ``path``.

        Without ``force_share`` an image a running QEMU holds for writing fails
        with QEMU's lock message (what must stop an offline merge); with it the
        probe reads anyway (to learn the format of an image in use).
        """
        args = ["info", "--output=json"] + (["-U"] if force_share else []) + [path]
        done = self._run(args, f"qemu-img info {path}", _INFO_TIMEOUT)
        try:
            info = json.loads(done.stdout)
            fmt = str(info["format"])
            size = int(info.get("virtual-size", 0))
        except (ValueError, KeyError, TypeError) as err:
            raise self._error(f"qemu-img info {path}: unexpected output") from err
        backing = info.get("backing-filename")
        full = info.get("full-backing-filename") or backing
        if full and not os.path.isabs(full) and "://" not in full and not full.startswith(
                ("nbd:", "json:")):
            full = os.path.join(os.path.dirname(os.path.abspath(path)), full)
        return ImageInfo(path=path, format=fmt, virtual_size=size,
                         backing=str(backing) if backing else None,
                         backing_path=os.path.normpath(full) if full and full.startswith("/")
                         else (str(full) if full else None),
                         backing_format=info.get("backing-filename-format"), raw=info)

    def detect_format(self, path: str) -> str:
        """The format of ``path``, probed (``-U``: also when the image is in use).

        Callers that know the format (the domain XML, the pool manifest) should
        pass it instead: probing lets a raw image whose guest wrote a qcow2 header
        be read as qcow2, with a backing file of the guest's choosing.
        """
        return self.info(path, force_share=True).format

    # ---------------------------------------------------------------------- create
    def create(self, path: str, fmt: str, *, size: int | None = None,
               backing: str | None = None, backing_fmt: str | None = None,
               relative_backing: bool = True, cluster_size: int | None = None,
               mode: int = 0o600, in_pool: bool = False,
               options: Sequence[str] = (), objects: Sequence[str] = ()) -> None:
        """Create a new image (never overwriting), private (``mode``) from the start.

        ``backing`` is a path (stored relative to ``path`` when ``relative_backing``)
        or a URI (``nbd+unix://...``, stored as is).  ``in_pool`` makes a full disk a
        PoolFullError.  On failure the file we made is removed again.  ``objects``
        are ``--object`` arguments (an encrypted volume's key, read by QEMU from its
        file); with them and a size the backing is not opened (``-u``: its key is
        the same, and the size is given).
        """
        if fmt not in ("qcow2", "raw"):
            raise UsageError(f"cannot create images of format {fmt!r}")
        if backing is not None and fmt != "qcow2":
            raise UsageError("only a qcow2 image can have a backing file")
        if size is None and backing is None:
            raise UsageError("a new image needs a size or a backing image")
        if size is not None and size <= 0:
            raise UsageError(f"bad image size {size}")
        args = ["create", "-q", "-f", fmt]
        for obj in objects:
            args += ["--object", obj]
        if objects and backing is not None and size is not None:
            args.append("-u")
        if cluster_size is not None and fmt == "qcow2":
            args += ["-o", f"cluster_size={int(cluster_size)}"]
        for option in options:   # e.g. compression_type=zstd (.volumeformat)
            args += ["-o", option]
        if backing is not None:
            is_uri = "://" in backing
            if backing_fmt is None:
                backing_fmt = "raw" if is_uri else self.detect_format(os.path.abspath(backing))
            stored = backing if is_uri or not relative_backing else \
                relative_backing_path(path, backing)
            args += ["-b", stored, "-F", backing_fmt]
        args.append(path)
        if size is not None:
            args.append(str(int(size)))
        try:
            self.host.create_file(path, mode=mode)
        except FileExistsError:
            raise UsageError(f"{path} already exists; a new image never overwrites") from None
        except OSError as err:
            if err.errno is not None and os.strerror(err.errno) in _NO_SPACE:
                raise (PoolFullError if in_pool else StorageError)(
                    f"no space left for {path}: {err.strerror}") from err
            raise self._error(f"cannot create {path}: {err.strerror or err}") from err
        try:
            # qemu-img create truncates the (still private) file it writes into, so a
            # run again after the PBKDF timing refusal starts from scratch
            tenacity.Retrying(
                retry=tenacity.retry_if_exception(lambda e: _PBKDF_TIMING in str(e)),
                stop=tenacity.stop_after_attempt(_CREATE_ATTEMPTS), reraise=True)(
                self._run, args, f"qemu-img create {path}", _CREATE_TIMEOUT,
                full=PoolFullError if in_pool else StorageError, target=path)
        except BaseException:
            self.host.unlink(path)
            raise

    # ------------------------------------------------------------------------- map
    def map(self, path: str, fmt: str) -> list[MapExtent]:
        """``qemu-img map --output=json`` of ``path``: where each guest range lives in
        the file.  Only for images we created ourselves (a rebase's new base), never
        for pool input: the answer is trusted as offsets into ``path``."""
        done = self._run(["map", "--output=json", "-f", fmt, path], f"qemu-img map {path}",
                         _INFO_TIMEOUT)
        try:
            return [MapExtent(int(e["start"]), int(e["length"]), bool(e["data"]),
                              bool(e["zero"]), int(e["offset"]) if "offset" in e else None,
                              int(e.get("depth", 0)))
                    for e in json.loads(done.stdout)]
        except (ValueError, KeyError, TypeError) as err:
            raise self._error(f"qemu-img map {path}: unexpected output") from err

    # --------------------------------------------------------------------- convert
    def convert(self, src: str, src_fmt: str | None, dst: str, dst_fmt: str, *,
                progress: Callable[[float], None] | None = None,
                target_is_zero: bool = False, objects: Sequence[str] = ()) -> None:
        """Copy ``src`` (read through its backing chain) into the existing ``dst``.

        ``dst`` must exist already (created 0600 by the caller, e.g. an empty
        file for raw or :meth:`create` for qcow2): the convert writes with ``-n``
        and so never creates a file of its own.  Zero regions stay unallocated
        (``-S 4k``, qemu-img's default); ``target_is_zero`` (a fresh ``dst``) spares
        writing them at all.  ``progress`` gets the percentage done.  ``src_fmt``
        None: ``src`` is a ``json:`` pseudo-filename that names its driver (a point
        volume with its backing chain pinned, :mod:`.pinnedchain`).
        """
        fmt_args = ["-f", src_fmt] if src_fmt is not None else []
        args = ["convert", "-n", *fmt_args, "-O", dst_fmt]
        for obj in objects:   # an encrypted source's key (QEMU reads the file)
            args += ["--object", obj]
        if target_is_zero:
            args.append("--target-is-zero")
        on_stdout = None
        if progress is not None:
            args.insert(1, "-p")
            on_stdout = _progress_reader(progress)
        self._run([*args, src, dst], f"qemu-img convert of {src}", _LONG_TIMEOUT, on_stdout,
                  target=dst)

    # ---------------------------------------------------------------------- commit
    def commit(self, overlay: str, base: str, *, fmt: str = "qcow2") -> None:
        """Merge ``overlay`` into ``base`` (``-b`` names the image the caller checked, so
        qemu-img cannot pick another; it implies ``-d``: the overlay keeps its data)."""
        self._run(["commit", "-q", "-f", fmt, "-b", base, overlay],
                  f"qemu-img commit of {overlay} into {base}", _LONG_TIMEOUT, target=base)
