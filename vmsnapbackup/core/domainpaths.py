"""Where one domain's files lie in a pool, ``domains/<uuid>/`` (FORMAT §1, §3, §4, §7).

Path naming only: every record, volume, table and manifest of a domain is named here,
and every path read from a manifest or the journal is resolved here, inside the pool
(FORMAT §13), so that no other module builds a pool path by hand.  What the records
*say* (generations, points, point numbers) is :class:`.domainstore.DomainStore`'s job,
which builds on this class.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UsageError
from .names import (
    DOMAIN_RECORD,
    GENERATION_RECORD,
    GENERATIONS_DIR,
    JOURNAL_FILE,
    LOCK_FILE,
    POINTS_DIR,
    base_volume_name,
    difference_name,
    is_safe_relpath,
    is_safe_target,
    manifest_name,
    number_name,
    point_volume_name,
    table_name,
)
from .poolread import check_inside, read_bounded

if TYPE_CHECKING:
    from .pool import Pool

__all__ = ["DomainPaths"]


class DomainPaths:
    """The paths of ``domains/<uuid>/`` and the bounded, in-pool reads of its records."""

    def __init__(self, pool: Pool, uuid: str) -> None:
        self.pool = pool
        self.uuid = uuid
        self.path = pool.domains_dir / uuid

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path})"

    # paths ---------------------------------------------------------------------------

    @property
    def record_path(self) -> Path:
        return self.path / DOMAIN_RECORD

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK_FILE

    @property
    def journal_path(self) -> Path:
        return self.path / JOURNAL_FILE

    @property
    def generations_dir(self) -> Path:
        return self.path / GENERATIONS_DIR

    @property
    def points_dir(self) -> Path:
        return self.path / POINTS_DIR

    def generation_dir(self, generation: int) -> Path:
        return self.generations_dir / number_name(generation)

    def generation_record_path(self, generation: int) -> Path:
        return self.generation_dir(generation) / GENERATION_RECORD

    def disk_dir(self, generation: int, target: str) -> Path:
        """The disk's point store in a generation."""
        if not is_safe_target(target):
            raise UsageError(f"not a usable disk target name: {target!r}")
        return self.generation_dir(generation) / target

    def base_volume_path(self, generation: int, target: str, fmt: str) -> Path:
        return self.disk_dir(generation, target) / base_volume_name(fmt)

    def table_path(self, generation: int, target: str, point: int) -> Path:
        return self.disk_dir(generation, target) / table_name(point)

    def point_volume_path(self, generation: int, target: str, point: int) -> Path:
        return self.disk_dir(generation, target) / point_volume_name(point)

    def difference_path(self, generation: int, target: str, point: int) -> Path:
        return self.disk_dir(generation, target) / difference_name(point)

    def manifest_path(self, point: int) -> Path:
        return self.points_dir / manifest_name(point)

    def relpath(self, path: str | os.PathLike[str]) -> str:
        """``path`` relative to the domain directory, as manifests and the journal store
        it (so the pool can move)."""
        rel = Path(os.path.abspath(os.fspath(path))).relative_to(self.path).as_posix()
        if not is_safe_relpath(rel):
            raise UsageError(f"{path} is not inside {self.path}")
        return rel

    def resolve(self, rel: str) -> Path:
        """The absolute path of a relative path read from a manifest or journal.

        It must stay in the pool even through symlinks (FORMAT §13): a manifest or a
        planted link cannot make a restore read, or a prune remove, a host file.
        """
        if not is_safe_relpath(rel):
            raise UsageError(f"not a relative path inside {self.path}: {rel!r}")
        path = self.path / rel
        check_inside(path, self.pool.root)
        return path

    def read_file(self, path: Path, limit: int, kind: str) -> bytes | None:
        """A record of this domain, bounded (:func:`.poolread.read_bounded`): regular
        file, at most ``limit`` bytes, not through a symlink out of the pool."""
        return read_bounded(path, limit, kind, root=self.pool.root)
