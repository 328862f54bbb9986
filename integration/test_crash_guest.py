"""A real guest's file system survives our backups: every point of a writing guest
replays its journal, passes e2fsck -fn and holds every file logged durable before it.

The snapshot is crash-consistent (no guest agent): what a point must hold is what
a power cut of the guest at that instant would have kept, i.e. every file whose
fsync (of the file and of its directory) had returned, which the guest logs on
its console as ``DURABLE N``.  The count is read just before each backup starts,
so those files were durable before its snapshot.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from domains import DomainFactory
from guestos import durable, guest_available, judge_image, make_guest, payload, wait_for

import vmsnapbackup

pytestmark = pytest.mark.integration

POINTS = 3


@pytest.fixture(autouse=True)
def _guest() -> None:
    why = guest_available()
    if why is not None:
        pytest.skip(f"real guest unavailable: {why}")


def test_every_point_of_a_writing_guest_is_a_sound_file_system(
        make_domain: DomainFactory, tmp_path: Path) -> None:
    dom, console = make_guest(make_domain)
    pool = tmp_path / "pool"
    taken: list[tuple[int, int]] = []
    for n in range(POINTS):
        # let the guest write a few more files first, so each point differs
        wait_for(console, rf"^DURABLE {durable(console) + 5}$", 120.0)
        before = durable(console)
        res = vmsnapbackup.backup(dom.name, pool, new_generation=(n == 2))
        taken.append((res.point, before))
    assert dom.is_active(), "the guest died during the backups"
    after = durable(console)
    assert after > taken[-1][1], "the guest stopped writing"
    dom.shutoff()
    judged: list[str] = []
    for point, before in taken:
        out = tmp_path / f"restore-{point}"
        r = vmsnapbackup.restore(dom.name, pool, point=point, to=out, fmt="raw")
        assert r.ok, r
        problems = judge_image(Path(r.disks[0].path), tmp_path, before)
        judged.append(f"point {point}: {before} files durable before it: "
                      + ("; ".join(problems) or "ok"))
    print("\n" + "\n".join(judged))
    assert all(line.endswith(": ok") for line in judged), judged


def test_the_judge_finds_missing_files_and_a_broken_file_system(tmp_path: Path) -> None:
    """judge_image can fail: a file lost, a file wrong, metadata zeroed."""
    img = tmp_path / "fs.img"
    with open(img, "wb") as f:
        f.truncate(8 * 2**20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True)
    (tmp_path / "f1").write_bytes(payload(1))
    (tmp_path / "f2").write_bytes(payload(2)[:-1] + b"!")
    cmds = f"mkdir /data\nwrite {tmp_path / 'f1'} /data/f1\nwrite {tmp_path / 'f2'} /data/f2\n"
    subprocess.run(["debugfs", "-w", "-f", "-", str(img)], input=cmds.encode(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert judge_image(img, tmp_path, 1) == []
    problems = judge_image(img, tmp_path, 3)
    assert problems == ["2 of 3 durable files missing or wrong (first [2, 3])"], problems
    info = subprocess.run(["dumpe2fs", str(img)], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True, check=True).stdout
    block = int(re.search(r"^Block size:\s+(\d+)", info, re.MULTILINE).group(1))  # type: ignore[union-attr]
    first, last = map(int, re.search(r"Inode table at (\d+)-(\d+)", info).groups())  # type: ignore[union-attr]
    with open(img, "r+b") as f:  # the inode table of group 0, zeroed
        f.seek(first * block)
        f.write(bytes((last - first + 1) * block))
    assert any(p.startswith("e2fsck -fn") for p in judge_image(img, tmp_path, 1))
