"""The power-loss file system: a pyfuse3 pass-through that logs what it was asked to do.

Run as a process of its own (``python -m powerloss.fusefs BACKING MOUNTPOINT LOG
[--cut-at N] [--kill-pgid PGID]``), never inside the process under test: a FUSE
server answering the calls of its own process deadlocks on the first one that
takes a lock the caller holds.

Every mutating call is applied to BACKING and appended to LOG as one
:class:`powerloss.model.Op` (see :mod:`powerloss.logfile`).  The backing copy
is never fsynced: durability is decided by the log replay, not by the host's
disk.  With ``--cut-at N`` the power goes when call N+1 arrives: the process
group ``--kill-pgid`` (the program under test) is SIGKILLed before that call
is answered, and every later call fails with EIO, as a disk that is gone.
SIGUSR1 cuts the power at once (the soak uses it).  The log is complete up to
the cut; the state the disk keeps is then built by :mod:`powerloss.model`.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import stat
import sys
from pathlib import Path

import pyfuse3
import trio

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from powerloss.logfile import LogWriter
from powerloss.model import DIR, FILE, ROOT_ID, Op

log = logging.getLogger("powerloss")


def _fail(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


class PowerLossFS(pyfuse3.Operations):
    """Pass-through with model ids as FUSE inode numbers; see the module docstring."""

    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, backing: Path, logw: LogWriter, cut_at: int | None,
                 kill_pgid: int | None) -> None:
        super().__init__()
        self.backing = backing
        self.logw = logw
        self.cut_at = cut_at
        self.kill_pgid = kill_pgid
        self.dead = False
        self.next_id = ROOT_ID + 1
        # one (parent, name) link per node: a path survives renames of its ancestors
        self.link_of: dict[int, tuple[int, str]] = {}
        self.by_ino: dict[tuple[int, int], int] = {}
        self.fds: dict[int, tuple[int, int]] = {}  # fh -> (fd, node)
        st = os.lstat(backing)
        self.by_ino[(st.st_dev, st.st_ino)] = ROOT_ID
        self._seed()

    # ------------------------------------------------------------ bookkeeping
    def path(self, node: int) -> Path:
        parts: list[str] = []
        while node != ROOT_ID:
            try:
                node, name = self.link_of[node]
            except KeyError:
                raise _fail(errno.ESTALE) from None
            parts.append(name)
        return self.backing.joinpath(*reversed(parts))

    def _node_for(self, st: os.stat_result, parent: int, name: str) -> int:
        key = (st.st_dev, st.st_ino)
        node = self.by_ino.get(key)
        if node is None:
            node = self._new_node(key)
        self.link_of.setdefault(node, (parent, name))
        return node

    def _new_node(self, key: tuple[int, int]) -> int:
        node = self.next_id
        self.next_id += 1
        self.by_ino[key] = node
        return node

    def _seed(self) -> None:
        """What BACKING already holds counts as durable: logged before the mark."""
        def walk(node: int, path: Path) -> None:
            for entry in sorted(os.scandir(path), key=lambda e: e.name):
                st = entry.stat(follow_symlinks=False)
                key = (st.st_dev, st.st_ino)
                if key in self.by_ino:
                    child = self.by_ino[key]
                    self.logw.append(Op("link", node=child, parent=node, name=entry.name))
                    continue
                child = self._new_node(key)
                self.link_of[child] = (node, entry.name)
                mode = stat.S_IMODE(st.st_mode)
                if stat.S_ISDIR(st.st_mode):
                    self.logw.append(Op("create", node=child, parent=node, name=entry.name,
                                        ftype=DIR, mode=mode))
                    walk(child, Path(entry.path))
                elif stat.S_ISREG(st.st_mode):
                    self.logw.append(Op("create", node=child, parent=node, name=entry.name,
                                        ftype=FILE, mode=mode))
                    with open(entry.path, "rb") as f:
                        self.logw.append(Op("write", node=child, offset=0, data=f.read()))
                    self.logw.append(Op("fsync", node=child))
            self.logw.append(Op("fsync", node=node))
        walk(ROOT_ID, self.backing)
        self.logw.mark()

    def cut(self) -> None:
        """The power goes: the program under test dies first, then the disk."""
        if self.dead:
            return
        if self.kill_pgid:
            try:
                os.killpg(self.kill_pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.dead = True
        self.logw.flush()
        log.info("power cut after %d operations", self.logw.count)

    def _alive(self) -> None:
        if self.dead:
            raise _fail(errno.EIO)

    def _record(self) -> None:
        """Called before a mutating call is applied: it may be the one the power cuts."""
        self._alive()
        if self.cut_at is not None and self.logw.count >= self.cut_at:
            self.cut()
            raise _fail(errno.EIO)

    def _logged(self, op: Op) -> None:
        self.logw.append(op)

    def _attr(self, node: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node
        a.generation = 0
        a.entry_timeout = 0
        a.attr_timeout = 0
        a.st_mode = st.st_mode
        a.st_nlink = st.st_nlink
        a.st_uid = st.st_uid
        a.st_gid = st.st_gid
        a.st_rdev = st.st_rdev
        a.st_size = st.st_size
        a.st_blksize = st.st_blksize
        a.st_blocks = st.st_blocks
        a.st_atime_ns = st.st_atime_ns
        a.st_mtime_ns = st.st_mtime_ns
        a.st_ctime_ns = st.st_ctime_ns
        return a

    def _stat_child(self, parent: int, name: str) -> tuple[int, os.stat_result]:
        try:
            st = os.lstat(self.path(parent) / name)
        except OSError as err:
            raise _fail(err.errno or errno.EIO) from None
        return self._node_for(st, parent, name), st

    # ------------------------------------------------------------ lookups
    async def lookup(self, parent_inode: int, name: bytes, ctx: object) -> pyfuse3.EntryAttributes:
        self._alive()
        node, st = self._stat_child(parent_inode, os.fsdecode(name))
        return self._attr(node, st)

    async def getattr(self, inode: int, ctx: object) -> pyfuse3.EntryAttributes:
        self._alive()
        try:
            st = os.lstat(self.path(inode))
        except OSError as err:
            raise _fail(err.errno or errno.EIO) from None
        return self._attr(inode, st)

    async def forget(self, inode_list: object) -> None:
        pass  # ids live as long as the mount: the log refers to them

    async def access(self, inode: int, mode: int, ctx: object) -> bool:
        self._alive()
        return True

    async def statfs(self, ctx: object) -> pyfuse3.StatvfsData:
        self._alive()
        sv = os.statvfs(self.backing)
        out = pyfuse3.StatvfsData()
        for attr in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                     "f_ffree", "f_favail", "f_namemax"):
            setattr(out, attr, getattr(sv, attr))
        return out

    async def opendir(self, inode: int, ctx: object) -> int:
        self._alive()
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        self._alive()
        names = sorted(os.listdir(self.path(fh)))
        for i, name in enumerate(names[start_id:], start=start_id):
            try:
                node, st = self._stat_child(fh, name)
            except pyfuse3.FUSEError:
                continue
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attr(node, st), i + 1):
                break

    async def releasedir(self, fh: int) -> None:
        pass

    # ------------------------------------------------------------ names
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: object) -> pyfuse3.EntryAttributes:
        n = os.fsdecode(name)
        self._record()
        path = self.path(parent_inode) / n
        try:
            os.mkdir(path, mode)
            st = os.lstat(path)
        except OSError as err:
            raise _fail(err.errno or errno.EIO) from None
        node = self._new_node((st.st_dev, st.st_ino))
        self.link_of[node] = (parent_inode, n)
        self._logged(Op("create", node=node, parent=parent_inode, name=n, ftype=DIR,
                        mode=stat.S_IMODE(st.st_mode)))
        return self._attr(node, st)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: object) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        n = os.fsdecode(name)
        self._record()
        path = self.path(parent_inode) / n
        try:
            fd = os.open(path, (flags & ~os.O_APPEND) | os.O_CREAT | os.O_EXCL, mode)
            st = os.fstat(fd)
        except OSError as err:
            raise _fail(err.errno or errno.EIO) from None
        node = self._new_node((st.st_dev, st.st_ino))
        self.link_of[node] = (parent_inode, n)
        self._logged(Op("create", node=node, parent=parent_inode, name=n, ftype=FILE,
                        mode=stat.S_IMODE(st.st_mode)))
        self.fds[fd] = (fd, node)
        return pyfuse3.FileInfo(fh=fd), self._attr(node, st)

    async def unlink(self, parent_inode: int, name: bytes, ctx: object) -> None:
        await self._remove(parent_inode, os.fsdecode(name), os.unlink)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: object) -> None:
        await self._remove(parent_inode, os.fsdecode(name), os.rmdir)

    async def _remove(self, parent: int, name: str, fn: object) -> None:
        self._record()
        path = self.path(parent) / name
        try:
            st = os.lstat(path)
            fn(path)  # type: ignore[operator]
        except OSError as err:
            raise _fail(err.errno or errno.EIO) from None
        self._logged(Op("unlink", parent=parent, name=name))
        self._forget_link(st, parent, name)

    def _forget_link(self, st: os.stat_result, parent: int, name: str) -> None:
        key = (st.st_dev, st.st_ino)
        node = self.by_ino.get(key)
        if node is None:
            return
        if st.st_nlink <= 1 or stat.S_ISDIR(st.st_mode):
            del self.by_ino[key]  # the backing fs may reuse the inode number now
        elif self.link_of.get(node) == (parent, name):
            self.link_of.pop(node)  # re-found through its other name on the next lookup

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: object) -> None:
        if flags & ~pyfuse3.RENAME_NOREPLACE:
            raise _fail(errno.EINVAL)  # RENAME_EXCHANGE: nothing of ours uses it
        old, new = os.fsdecode(name_old), os.fsdecode(name_new)
        self._record()
        src = self.path(parent_inode_old) / old
        dst = self.path(parent_inode_new) / new
        try:
            st = os.lstat(src)
            try:
                replaced: os.stat_result | None = os.lstat(dst)
            except FileNotFoundError:
                replaced = None
            if replaced is not None and flags & pyfuse3.RENAME_NOREPLACE:
                raise _fail(errno.EEXIST)
            os.rename(src, dst)
        except OSError as err:
            raise _fail(err.errno or errno.EIO) from None
        self._logged(Op("rename", parent=parent_inode_old, name=old, parent2=parent_inode_new,
                        name2=new))
        if replaced is not None and (replaced.st_dev, replaced.st_ino) != (st.st_dev, st.st_ino):
            self._forget_link(replaced, parent_inode_new, new)
        node = self.by_ino.get((st.st_dev, st.st_ino))
        if node is not None:
            self.link_of[node] = (parent_inode_new, new)

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: object) -> pyfuse3.EntryAttributes:
        n = os.fsdecode(new_name)
        self._record()
        path = self.path(new_parent_inode) / n
        try:
            os.link(self.path(inode), path)
            st = os.lstat(path)
        except OSError as err:
            raise _fail(err.errno or errno.EIO) from None
        self._logged(Op("link", node=inode, parent=new_parent_inode, name=n))
        return self._attr(inode, st)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: object) -> pyfuse3.EntryAttributes:
        raise _fail(errno.EPERM)  # the pool has none; the model does not know them

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: object) -> pyfuse3.EntryAttributes:
        raise _fail(errno.EPERM)

    # ------------------------------------------------------------ data
    async def open(self, inode: int, flags: int, ctx: object) -> pyfuse3.FileInfo:
        self._alive()
        if flags & os.O_TRUNC:
            self._record()
        try:
            # no O_DIRECT on the backing file: its reads into unaligned buffers fail
            fd = os.open(self.path(inode), flags & ~(os.O_APPEND | os.O_CREAT | os.O_DIRECT))
        except OSError as err:
            raise _fail(err.errno or errno.EIO) from None
        if flags & os.O_TRUNC:
            self._logged(Op("truncate", node=inode, size=0))
        self.fds[fd] = (fd, inode)
        return pyfuse3.FileInfo(fh=fd)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        self._alive()
        return os.pread(fh, size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self._record()
        n = os.pwrite(fh, buf, off)
        self._logged(Op("write", node=self.fds[fh][1], offset=off, data=bytes(buf[:n])))
        return n

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None, ctx: object) -> pyfuse3.EntryAttributes:
        self._alive()
        path = self.path(inode)
        try:
            if fields.update_size:
                self._record()
                os.truncate(path, attr.st_size)
                self._logged(Op("truncate", node=inode, size=attr.st_size))
            if fields.update_mode:
                os.chmod(path, stat.S_IMODE(attr.st_mode))
            if fields.update_uid or fields.update_gid:
                os.chown(path, attr.st_uid if fields.update_uid else -1,
                         attr.st_gid if fields.update_gid else -1)
            if fields.update_atime or fields.update_mtime:
                st = os.lstat(path)
                os.utime(path, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                                   attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns))
            st = os.lstat(path)
        except OSError as err:
            raise _fail(err.errno or errno.EIO) from None
        return self._attr(inode, st)

    async def fsync(self, fh: int, datasync: bool) -> None:
        self._record()
        self._logged(Op("fsync", node=self.fds[fh][1]))

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        self._record()
        self._logged(Op("fsync", node=fh))

    async def flush(self, fh: int) -> None:
        self._alive()

    async def release(self, fh: int) -> None:
        entry = self.fds.pop(fh, None)
        if entry is not None:
            os.close(entry[0])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("backing", type=Path)
    p.add_argument("mountpoint", type=Path)
    p.add_argument("log", type=Path)
    p.add_argument("--cut-at", type=int, default=None)
    p.add_argument("--kill-pgid", type=int, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="powerloss: %(message)s")
    with LogWriter(args.log) as logw:
        fs = PowerLossFS(args.backing.resolve(), logw, args.cut_at, args.kill_pgid)
        options = set(pyfuse3.default_options)
        options |= {"fsname=powerloss", "allow_other"}
        pyfuse3.init(fs, str(args.mountpoint), options)

        async def run() -> None:
            async def on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGUSR1) as signals:
                    async for _ in signals:
                        fs.cut()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(on_signal)
                await pyfuse3.main()
                nursery.cancel_scope.cancel()

        try:
            trio.run(run)
        finally:
            pyfuse3.close(unmount=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
