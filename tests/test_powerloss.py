"""The power-loss file system keeps exactly what fsync promised, no less and no more.

The model tests replay hand-written logs; the FUSE tests make the same calls a
program would through a real mount (they need /dev/fuse and root, as in CI) and
check the recovered tree for every variant.
"""
from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from powerloss.logfile import read_log
from powerloss.model import DIR, ROOT_ID, VARIANTS, Op, Variant, materialize, replay
from powerloss.mount import PowerLossMount, fuse_available, recover

STRICT_LOST = Variant("strict", "lost")
ORDERED_LOST = Variant("ordered", "lost")
ORDERED_ZEROS = Variant("ordered", "zeros")
ORDERED_KEPT = Variant("ordered", "kept")


def tree(root: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


_built = itertools.count()


def built(ops: list[Op], variant: Variant, tmp_path: Path) -> dict[str, bytes]:
    out = tmp_path / f"{variant.names}-{variant.data}-{next(_built)}"
    materialize(replay(ops), variant, out)
    return tree(out)


# ---------------------------------------------------------------- the model alone
def create(node: int, name: str, parent: int = ROOT_ID, ftype: str = "file") -> Op:
    return Op("create", node=node, parent=parent, name=name, ftype=ftype)


def test_unsynced_write_is_lost_and_synced_one_kept(tmp_path: Path) -> None:
    ops = [create(2, "f"), Op("fsync", node=ROOT_ID),
           Op("write", node=2, offset=0, data=b"durable"), Op("fsync", node=2),
           Op("write", node=2, offset=7, data=b"+tail")]
    assert built(ops, STRICT_LOST, tmp_path) == {"f": b"durable"}
    assert built(ops, ORDERED_ZEROS, tmp_path) == {"f": b"durable" + bytes(5)}
    assert built(ops, ORDERED_KEPT, tmp_path) == {"f": b"durable+tail"}


def test_overwrite_inside_synced_range_is_undone(tmp_path: Path) -> None:
    ops = [create(2, "f"), Op("fsync", node=ROOT_ID), Op("write", node=2, offset=0, data=b"aaaa"),
           Op("fsync", node=2), Op("write", node=2, offset=1, data=b"bb")]
    for v in (STRICT_LOST, ORDERED_ZEROS):
        assert built(ops, v, tmp_path) == {"f": b"aaaa"}
    assert built(ops, ORDERED_KEPT, tmp_path) == {"f": b"abba"}


def test_unsynced_truncate_is_undone(tmp_path: Path) -> None:
    ops = [create(2, "f"), Op("fsync", node=ROOT_ID), Op("write", node=2, offset=0, data=b"12345"),
           Op("fsync", node=2), Op("truncate", node=2, size=2)]
    assert built(ops, STRICT_LOST, tmp_path) == {"f": b"12345"}
    assert built(ops, ORDERED_ZEROS, tmp_path) == {"f": b"12"}


def test_rename_without_dir_fsync_is_lost_only_in_strict(tmp_path: Path) -> None:
    ops = [create(2, "tmp"), Op("write", node=2, offset=0, data=b"new"), Op("fsync", node=2),
           Op("fsync", node=ROOT_ID),
           Op("rename", parent=ROOT_ID, name="tmp", parent2=ROOT_ID, name2="final")]
    assert built(ops, STRICT_LOST, tmp_path) == {"tmp": b"new"}
    assert built(ops, ORDERED_LOST, tmp_path) == {"final": b"new"}
    ops.append(Op("fsync", node=ROOT_ID))
    assert built(ops, STRICT_LOST, tmp_path) == {"final": b"new"}


def test_rename_before_data_fsync_publishes_an_empty_file(tmp_path: Path) -> None:
    """The broken order the crash tests must catch: the name survives, the data not."""
    ops = [create(2, ".m.tmp"), Op("write", node=2, offset=0, data=b"{...}"),
           Op("rename", parent=ROOT_ID, name=".m.tmp", parent2=ROOT_ID, name2="m"),
           Op("fsync", node=ROOT_ID)]
    assert built(ops, STRICT_LOST, tmp_path) == {"m": b""}


def test_a_file_in_a_directory_never_synced_into_its_parent_is_lost(tmp_path: Path) -> None:
    ops = [create(2, "d", ftype=DIR), create(3, "f", parent=2), Op("write", node=3, data=b"x"),
           Op("fsync", node=3), Op("fsync", node=2)]
    assert built(ops, STRICT_LOST, tmp_path) == {}
    assert built(ops, ORDERED_LOST, tmp_path) == {"d/f": b"x"}
    ops.append(Op("fsync", node=ROOT_ID))
    assert built(ops, STRICT_LOST, tmp_path) == {"d/f": b"x"}


def test_unlink_comes_back_without_dir_fsync(tmp_path: Path) -> None:
    ops = [create(2, "f"), Op("write", node=2, data=b"x"), Op("fsync", node=2),
           Op("fsync", node=ROOT_ID), Op("unlink", parent=ROOT_ID, name="f")]
    assert built(ops, STRICT_LOST, tmp_path) == {"f": b"x"}
    assert built(ops, ORDERED_LOST, tmp_path) == {}


def test_rename_over_an_existing_file_keeps_the_old_one_in_strict(tmp_path: Path) -> None:
    ops = [create(2, "m"), Op("write", node=2, data=b"old"), Op("fsync", node=2),
           create(3, ".t"), Op("write", node=3, data=b"new"), Op("fsync", node=3),
           Op("fsync", node=ROOT_ID),
           Op("rename", parent=ROOT_ID, name=".t", parent2=ROOT_ID, name2="m")]
    assert built(ops, STRICT_LOST, tmp_path) == {"m": b"old", ".t": b"new"}
    assert built(ops, ORDERED_LOST, tmp_path) == {"m": b"new"}


def test_hard_links_are_one_file(tmp_path: Path) -> None:
    ops = [create(2, "a"), Op("write", node=2, data=b"x"), Op("fsync", node=2),
           Op("link", node=2, parent=ROOT_ID, name="b"), Op("fsync", node=ROOT_ID)]
    out = tmp_path / "o"
    materialize(replay(ops), STRICT_LOST, out)
    assert os.stat(out / "a").st_ino == os.stat(out / "b").st_ino


def test_every_variant_is_named_once() -> None:
    assert len({v.label for v in VARIANTS}) == 6
    with pytest.raises(ValueError):
        Variant("loose", "lost")


# ---------------------------------------------------------------- through FUSE
needs_fuse = pytest.mark.skipif(fuse_available() is not None or os.geteuid() != 0,
                                reason=f"FUSE mount not possible here: {fuse_available()}")


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[PowerLossMount]:
    backing = tmp_path / "backing"
    backing.mkdir()
    (backing / "seeded").write_bytes(b"was there")
    with PowerLossMount(backing, tmp_path / "mnt", tmp_path / "log") as m:
        yield m
    assert not m.is_mounted()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@needs_fuse
def test_fuse_atomic_write_survives_every_variant(mounted: PowerLossMount, tmp_path: Path) -> None:
    mnt = mounted.mountpoint
    fd = os.open(mnt / ".t", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"complete")
    os.fsync(fd)
    os.close(fd)
    os.rename(mnt / ".t", mnt / "record")
    fsync_dir(mnt)
    with open(mnt / "scratch", "wb") as f:  # never synced
        f.write(b"junk")
    assert (mnt / "record").read_bytes() == b"complete"
    mounted.unmount()
    for v in VARIANTS:
        got = tree(_recover(mounted, v, tmp_path))
        assert got["record"] == b"complete", v
        assert got["seeded"] == b"was there", v
        assert ".t" not in got, v
        assert got.get("scratch", b"") in (b"", bytes(4), b"junk"), v
    assert "scratch" not in tree(_recover(mounted, STRICT_LOST, tmp_path, "again"))


@needs_fuse
def test_fuse_unsynced_data_and_names_are_lost(mounted: PowerLossMount, tmp_path: Path) -> None:
    mnt = mounted.mountpoint
    with open(mnt / "f", "wb") as f:
        f.write(b"synced")
        f.flush()
        os.fsync(f.fileno())
        f.write(b"+lost")
    fsync_dir(mnt)
    os.rename(mnt / "seeded", mnt / "renamed")  # no directory fsync after it
    os.mkdir(mnt / "d")
    (mnt / "d" / "x").write_bytes(b"x")
    mounted.unmount()
    strict = tree(_recover(mounted, STRICT_LOST, tmp_path))
    assert strict == {"f": b"synced", "seeded": b"was there"}
    ordered = tree(_recover(mounted, ORDERED_ZEROS, tmp_path))
    assert ordered == {"f": b"synced" + bytes(5), "renamed": b"was there", "d/x": b"\0"}
    kept = tree(_recover(mounted, ORDERED_KEPT, tmp_path))
    assert kept == {"f": b"synced+lost", "renamed": b"was there", "d/x": b"x"}


@needs_fuse
def test_fuse_logs_every_kind_of_call(mounted: PowerLossMount, tmp_path: Path) -> None:
    mnt = mounted.mountpoint
    with open(mnt / "a", "wb") as f:
        f.write(b"abc")
        os.fdatasync(f.fileno())
    os.truncate(mnt / "a", 1)
    os.link(mnt / "a", mnt / "b")
    os.mkdir(mnt / "d")
    os.rename(mnt / "b", mnt / "d" / "b")
    os.unlink(mnt / "a")
    fsync_dir(mnt / "d")
    mounted.unmount()
    _, ops = read_log(mounted.log)
    kinds = [op.kind for op in ops]
    for kind in ("create", "write", "fsync", "truncate", "link", "rename", "unlink"):
        assert kind in kinds
    assert kinds.count("fsync") == 2


@needs_fuse
def test_fuse_cut_kills_the_writer_and_fails_later_calls(tmp_path: Path) -> None:
    """Live cut: after N operations the writer is SIGKILLed and the disk is gone."""
    import subprocess
    import sys

    script = ("import os,sys\n"
              "m=sys.argv[1]\n"
              "for i in range(100):\n"
              "    fd=os.open(f'{m}/f{i}', os.O_WRONLY|os.O_CREAT, 0o600)\n"
              "    os.write(fd, b'x'); os.fsync(fd); os.close(fd)\n")
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                              start_new_session=True)
    try:
        with PowerLossMount(tmp_path / "b", tmp_path / "m", tmp_path / "log", cut_at=7,
                            kill_pgid=writer.pid) as m:
            proc = subprocess.run([sys.executable, "-c", script, str(m.mountpoint)],
                                  stderr=subprocess.PIPE, text=True, check=False)
            assert proc.returncode != 0 and "Input/output error" in proc.stderr
            with pytest.raises(OSError):
                os.listdir(m.mountpoint)
        assert not m.is_mounted()
        assert writer.wait(timeout=30) == -9
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    _, ops = read_log(tmp_path / "log")
    assert len(ops) == 7
    kept = tree(_recover(m, ORDERED_LOST, tmp_path))
    assert kept == {"f0": b"x", "f1": b"x", "f2": b""}


def _recover(m: PowerLossMount, v: Variant, tmp_path: Path, tag: str = "") -> Path:
    out = tmp_path / f"out-{v.names}-{v.data}{tag}"
    recover(m.log, v, out)
    return out
