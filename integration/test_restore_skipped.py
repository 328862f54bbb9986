"""``restore`` with no ``--point`` says loudly when it skipped a newer damaged point
(issue 12): on stderr (a WARNING log line) and as ``skipped_damaged`` in the result."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
from test_restore import read_image, three_points

from vmsnapbackup.workflows.restore import restore

pytestmark = pytest.mark.integration


def test_newer_damaged_point_is_reported(tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    sp = three_points(tmp_path)
    sp.store.manifest_path(3).write_bytes(b"{ not a manifest")
    with caplog.at_level(logging.WARNING):
        result = restore(sp.name, sp.pool, to=tmp_path / "out")
    assert result.point == 2 and result.skipped_damaged == (3,)
    assert result.to_dict()["skipped_damaged"] == [3]
    assert any("point(s) 3 are damaged" in r.getMessage() for r in caplog.records)
    assert read_image(Path(result.disks[0].path), "raw") == sp.contents[2]["vda"]
    # a point asked for by number: nothing was skipped
    assert restore(sp.name, sp.pool, point=2, to=tmp_path / "o2").skipped_damaged == ()
