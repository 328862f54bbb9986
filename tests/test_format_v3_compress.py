"""FORMAT §15.1 (a version-2 amendment): the compression fields of the pool header and
of a manifest's disks, and how a volume's layout is chosen (adapters/volumeformat.py)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import pytest
import xxhash

from vmsnapbackup.adapters.volumeformat import (
    VolumeLayout,
    cluster_size,
    resolve_compression,
)
from vmsnapbackup.core import manifest as mf
from vmsnapbackup.core.pool import Pool
from vmsnapbackup.errors import CorruptFileError, UsageError

KiB = 1024
MiB = 1024 * KiB
PATH = "/pool/domains/x/points/000003.json"


def _v2_with(disk_extra: Dict[str, Any]) -> bytes:
    """A version-2 manifest written by hand, with the §15.1 fields given."""
    from test_manifest import spec_manifest

    obj = spec_manifest()
    obj.pop("checksum")
    obj["version"] = 2
    obj["disks"][0].update(disk_extra)
    head = (json.dumps(obj)[:-1] + ', "checksum": "').encode()
    return head + xxhash.xxh3_128_hexdigest(head).encode() + b'"\n}\n'


def test_manifest_compression_fields_read_and_round_trip() -> None:
    m = mf.from_json(_v2_with({"compression": "zstd", "volume_bytes": 123456}), PATH)
    d = m.disks[0]
    assert (d.compression, d.volume_bytes) == ("zstd", 123456)
    again = mf.from_json(mf.to_json(m), PATH)
    assert again == m and json.loads(mf.to_json(m))["version"] == 2


def test_manifest_without_the_fields_means_plain_and_unknown() -> None:
    m = mf.from_json(_v2_with({}), PATH)
    assert m.disks[0].compression is None and m.disks[0].volume_bytes is None
    assert "compression" not in json.loads(mf.to_json(m))["disks"][0], \
        "absent stays absent: an older reader sees the manifest it knows"


@pytest.mark.parametrize("extra", [{"compression": "lz4"}, {"compression": 1},
                                   {"volume_bytes": -1}, {"volume_bytes": "9"}])
def test_bad_compression_fields_are_corrupt(extra: Dict[str, Any]) -> None:
    with pytest.raises(CorruptFileError):
        mf.from_json(_v2_with(extra), PATH)


def test_pool_default_is_recorded_at_creation_only(tmp_path: Path) -> None:
    pool = Pool.create(tmp_path / "p", compression="zstd")
    assert pool.compression == "zstd"
    header = json.loads(pool.header_path.read_bytes())
    assert header["compression"] == "zstd" and header["version"] == 2
    # opening again (even asking for another default) keeps the recorded one
    assert Pool.open(tmp_path / "p", create=True, compression=None).compression == "zstd"
    assert Pool.create(tmp_path / "q").compression is None
    assert "compression" not in json.loads((tmp_path / "q" / pool.header_path.name).read_bytes())


def test_pool_header_with_unknown_compression_is_corrupt(tmp_path: Path) -> None:
    pool = Pool.create(tmp_path / "p")
    header = json.loads(pool.header_path.read_bytes())
    header["compression"] = "brotli"
    pool.header_path.write_text(json.dumps(header))
    with pytest.raises(CorruptFileError, match="compression"):
        Pool.open(tmp_path / "p")


def test_resolve_compression() -> None:
    assert resolve_compression(None, None) is None
    assert resolve_compression(None, "zstd") == "zstd"
    assert resolve_compression("none", "zstd") is None
    assert resolve_compression("zstd", None) == "zstd"
    with pytest.raises(UsageError):
        resolve_compression("lz4", None)


@pytest.mark.parametrize("block, size, want", [
    (64 * KiB, 64 * MiB, 64 * KiB),
    (4 * KiB, 64 * MiB, 4 * KiB),
    (4 * MiB, 64 * MiB, 2 * MiB),             # qcow2's largest cluster
    (64 * KiB, 32 * MiB + 12 * KiB, 4 * KiB),  # the filter needs size % cluster == 0
    (64 * KiB, 10 * MiB + 512, 512),
])
def test_compressed_cluster_is_the_block_and_divides_the_disk(block: int, size: int,
                                                              want: int) -> None:
    got = cluster_size(block, "zstd", size)
    assert got == want and size % got == 0 and block % got == 0


def test_plain_cluster_is_unchanged() -> None:
    assert cluster_size(4 * KiB, None, 32 * MiB + 12 * KiB) == 64 * KiB
    assert cluster_size(4 * MiB, None, 64 * MiB) == 2 * MiB


def test_layouts() -> None:
    plain = VolumeLayout()
    assert plain.create_options() == [] and plain.writer_node() is None
    z = VolumeLayout("zstd")
    assert z.create_options() == ["compression_type=zstd"]
    node = z.writer_node()
    assert node is not None
    args = {"driver": "qcow2", "node-name": "vsbd3", "file": "vsbf3", "read-only": False,
            "discard": "unmap"}
    out = node(args)
    assert out["driver"] == "compress" and out["node-name"] == "vsbd3"
    assert out["file"]["driver"] == "qcow2" and out["file"]["file"] == "vsbf3"
    assert out["file"]["node-name"] != "vsbd3"
    with pytest.raises(UsageError, match="qcow2"):
        z.check("raw")
    plain.check("raw")
