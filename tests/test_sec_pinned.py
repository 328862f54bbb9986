"""Unit tests of the pinned backing chain (issue 12): what the header check refuses and
the option trees QEMU gets.  The real attack is integration/test_sec_pinned.py."""
from __future__ import annotations

import json
from typing import Any

import pytest

from vmsnapbackup.adapters import bootdaemon
from vmsnapbackup.adapters.exportnodes import format_node_args
from vmsnapbackup.adapters.pinnedchain import (
    PinnedImage,
    blockdev_tree,
    check_header,
    json_filename,
)
from vmsnapbackup.adapters.qemuimg import ImageInfo, QemuImg
from vmsnapbackup.errors import CorruptFileError

POINT = "/pool/g/vda/point-000002.qcow2"
BASE = "/pool/g/vda/base.qcow2"
PINNED = PinnedImage(POINT, "qcow2", PinnedImage(BASE, "qcow2"))


class FakeQemuImg(QemuImg):
    def __init__(self, headers: dict[str, dict[str, Any]]) -> None:
        super().__init__()
        self.headers = headers

    def info(self, path: str, *, force_share: bool = False) -> ImageInfo:
        h = {"format": "qcow2", "backing": None, "backing_format": None, "data": {}}
        h.update(self.headers.get(path, {}))
        backing = h["backing"]
        full = None if backing is None else (
            backing if backing.startswith("/") else f"/pool/g/vda/{backing}")
        return ImageInfo(path=path, format=h["format"], virtual_size=1 << 20, backing=backing,
                         backing_path=full, backing_format=h["backing_format"],
                         raw={"format-specific": {"type": "qcow2", "data": h["data"]}})


def good() -> dict[str, dict[str, Any]]:
    return {POINT: {"backing": "base.qcow2", "backing_format": "qcow2"}}


def test_the_header_backup_writes_passes() -> None:
    check_header(PINNED, qemu_img=FakeQemuImg(good()))


@pytest.mark.parametrize(("change", "message"), [
    ({POINT: {"backing": "/etc/shadow", "backing_format": "raw"}}, "not its generation's base"),
    ({POINT: {"backing": None}}, "not its generation's base"),
    ({POINT: {"backing": "base.qcow2", "backing_format": "raw"}}, "backing format 'raw'"),
    ({POINT: {"backing": "base.qcow2", "backing_format": "qcow2",
              "data": {"data-file": "/dev/sda"}}}, "external data file"),
    ({POINT: {"backing": "base.qcow2", "format": "raw"}}, "is raw, the manifest says qcow2"),
    ({BASE: {"backing": "/etc/shadow"}}, "where none belongs"),
])
def test_a_tampered_header_is_refused(change: dict[str, dict[str, Any]], message: str) -> None:
    headers = good()
    for path, h in change.items():
        headers.setdefault(path, {}).update(h)
    with pytest.raises(CorruptFileError, match=message):
        check_header(PINNED, qemu_img=FakeQemuImg(headers))


def test_the_tree_always_names_the_backing() -> None:
    tree = blockdev_tree(PINNED)
    assert tree["file"]["filename"] == POINT and tree["backing"]["file"]["filename"] == BASE
    assert tree["backing"]["backing"] is None   # the base: none, stated
    assert json.loads(json_filename(PINNED)[len("json:"):]) == tree
    raw_base = PinnedImage(POINT, "qcow2", PinnedImage("/pool/base.raw", "raw"))
    assert "backing" not in blockdev_tree(raw_base)["backing"]   # raw takes no backing option
    with pytest.raises(CorruptFileError):
        blockdev_tree(PinnedImage("/x.raw", "raw", PinnedImage(BASE, "qcow2")))


def test_format_node_pins_only_when_asked() -> None:
    assert "backing" not in format_node_args("qcow2", "d", "f", writable=True)
    pinned = format_node_args("qcow2", "d", "f", writable=False, pinned=PINNED)
    assert pinned["backing"]["file"]["filename"] == BASE
    alone = format_node_args("qcow2", "d", "f", writable=False,
                             pinned=PinnedImage(BASE, "qcow2"))
    assert "backing" in alone and alone["backing"] is None


def test_boot_daemon_gets_the_pinned_tree() -> None:
    served = [bootdaemon.ServedImage("vda", POINT, "qcow2", chain=PINNED)]
    argv = bootdaemon.daemon_args("/run/boot", served)
    node = json.loads(argv[3])
    assert node["node-name"] == "vsbd0" and node["file"] == "vsbf0"
    assert node["backing"]["file"]["filename"] == BASE
