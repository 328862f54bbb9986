"""The rebase's check reads a plain qcow2 straight from its file (issue 19): what it
reads must be what a guest reads, and anything not stored plainly must fall back."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vmsnapbackup.adapters.mappedimage import open_mapped
from vmsnapbackup.adapters.qemuimg import QemuImg

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="no qemu-img")
MiB = 1 << 20


def _raw(tmp_path: Path) -> bytes:
    data = bytearray(8 * MiB)
    data[0:70000] = bytes(range(256)) * 273 + bytes(112)   # unaligned data end
    data[3 * MiB + 5:3 * MiB + 9000] = b"\x5a" * 8995
    data[8 * MiB - 1] = 7
    (tmp_path / "in.raw").write_bytes(bytes(data))
    return bytes(data)


def _qcow2(tmp_path: Path, *extra: str) -> Path:
    out = tmp_path / "out.qcow2"
    subprocess.run(["qemu-img", "convert", *extra, "-f", "raw", "-O", "qcow2",
                    str(tmp_path / "in.raw"), str(out)], check=True)
    return out


def test_mapped_image_reads_what_the_guest_reads(tmp_path: Path) -> None:
    want = _raw(tmp_path)
    mapped = open_mapped(QemuImg(), str(_qcow2(tmp_path)), len(want))
    assert mapped is not None
    with mapped:
        got = bytearray(len(want))
        view = memoryview(got)
        reqs = [(o, view[o:o + 65536 * 3]) for o in range(0, len(want), 65536 * 3)]
        for _ in mapped.read_many(reqs):
            pass
        assert bytes(got) == want
        runs = list(mapped.data_ranges(65536))
        assert all(o % 65536 == 0 and (n % 65536 == 0 or o + n == len(want)) for o, n in runs)
        covered = bytearray(len(want))
        for o, n in runs:
            covered[o:o + n] = want[o:o + n]
        assert bytes(covered) == want        # every byte of data lies in a data range


def test_compressed_or_wrong_size_falls_back_to_the_export(tmp_path: Path) -> None:
    want = _raw(tmp_path)
    assert open_mapped(QemuImg(), str(_qcow2(tmp_path, "-c")), len(want)) is None
    (tmp_path / "out.qcow2").unlink()
    assert open_mapped(QemuImg(), str(_qcow2(tmp_path)), len(want) + MiB) is None
