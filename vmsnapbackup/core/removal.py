"""Removing from a pool: a point (prune), a generation no point needs, and finding what
interrupted operations left behind (repair) (FORMAT.md §10).

Removal runs in the reverse of the write order: the manifest first (from then on the
point does not exist), then the point's own files, then the generation's base volumes,
tables and directory only when no manifest of that generation is left.  Only names of
§1 are removed and directories only when empty, so a stranger's file stops the removal
of its directory rather than being deleted.  Every function here expects the caller to
hold the domain's lock.
"""
from __future__ import annotations

import errno
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from ..errors import (
    CorruptFileError,
    IncompatibleFormatError,
    NotFoundError,
    storage_error_from_oserror,
)
from .atomic import fsync_dir, is_temp_name, unlink_durable
from .journal import JournalEntry
from .names import (
    GENERATION_RECORD,
    PARTIAL_SUFFIX,
    difference_name,
    is_base_name,
    manifest_number,
    numbered,
    partial_name,
    point_volume_name,
)
from .poolread import MAX_MANIFEST, read_bounded

if TYPE_CHECKING:
    from .pool import DomainStore

__all__ = ["Leftover", "leftovers", "listdir", "referenced_generations", "remove_point"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Leftover:
    """Something an interrupted operation left behind, for ``repair`` (§1, §10).

    ``kind`` is ``temp`` (a ``.NAME.tmp-…`` file), ``partial`` (a volume never
    completed), ``generation`` (a generation directory no manifest refers to) or
    ``orphan`` (a point volume or difference table of a point without a manifest).
    """

    path: Path
    kind: str
    reason: str


def listdir(path: Path) -> list[str]:
    """The sorted names in ``path``; none when it is missing or not a directory."""
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []


def remove_point(store: DomainStore, point: int) -> list[Path]:
    """Remove a point (valid or damaged); returns what was removed, in order."""
    path = store.manifest_path(point)
    if not path.exists():
        raise NotFoundError(f"domain {store.name} has no point {point}")
    try:
        generation: int | None = store.read_manifest(point).generation
    except (CorruptFileError, IncompatibleFormatError):
        # damaged: where its files are beats what its damaged text says
        generation = generation_holding(store, point) or _generation_of_manifest(path)
    removed: list[Path] = []
    unlink_durable(path)
    removed.append(path)
    log.info("domain %s: removed manifest of point %d", store.uuid, point)
    if generation is None:
        log.warning("domain %s: point %d's generation is unknown; its files stay for "
                    "repair", store.uuid, point)
        return removed
    gdir = store.generation_dir(generation)
    for target in listdir(gdir):
        ddir = gdir / target
        if not ddir.is_dir():
            continue
        for name in (point_volume_name(point), difference_name(point)):
            for f in (ddir / name, ddir / partial_name(name)):
                if unlink_durable(f):
                    removed.append(f)
    used = referenced_generations(store)
    if used is None or generation in used:
        return removed
    removed.extend(_remove_generation(store, generation))
    return removed


def generation_holding(store: DomainStore, point: int) -> int | None:
    """For a manifest too damaged to name its generation: the generation whose point
    stores hold this point's files."""
    for g in store.generations():
        for target in listdir(store.generation_dir(g)):
            for name in listdir(store.generation_dir(g) / target):
                k = numbered(name)
                if k and k[1] == point:
                    return g
    return None


def referenced_generations(store: DomainStore) -> set[int] | None:
    """Generations named by a manifest file (valid or damaged) or by the journal.

    A damaged manifest protects both the generation its ``generation`` field still
    names and the one holding its files (a flipped digit must not let its real
    generation go).  None when a manifest is too damaged to tell: then every
    generation must be treated as referenced.
    """
    used: set[int] = set()
    for info in store.list_points():
        if info.manifest is not None:
            used.add(info.manifest.generation)
            continue
        found = {g for g in (_generation_of_manifest(info.path),
                             generation_holding(store, info.number)) if g is not None}
        if not found:
            return None
        used.update(found)
    entry = journal_or_none(store)
    if entry is not None and entry.generation is not None:
        used.add(entry.generation)
    return used


def journal_or_none(store: DomainStore) -> JournalEntry | None:
    try:
        return store.journal.read()
    except (CorruptFileError, IncompatibleFormatError) as err:
        log.warning("domain %s: journal unreadable: %s", store.uuid, err)
        return None


def _remove_generation(store: DomainStore, generation: int) -> list[Path]:
    """Remove a generation no point refers to: our files, then empty directories."""
    removed: list[Path] = []
    gdir = store.generation_dir(generation)
    for target in listdir(gdir):
        ddir = gdir / target
        if not ddir.is_dir():
            continue
        for name in listdir(ddir):
            if numbered(name) or is_base_name(name) or is_temp_name(name):
                f = ddir / name
                if f.is_file() and unlink_durable(f):
                    removed.append(f)
        if _rmdir_if_empty(ddir):
            removed.append(ddir)
    rec = gdir / GENERATION_RECORD
    if unlink_durable(rec):
        removed.append(rec)
    for name in listdir(gdir):
        if is_temp_name(name) and (gdir / name).is_file() and unlink_durable(gdir / name):
            removed.append(gdir / name)
    if _rmdir_if_empty(gdir):
        removed.append(gdir)
    else:
        log.warning("domain %s: generation directory %s keeps files that are not ours; "
                    "left in place", store.uuid, gdir)
    log.info("domain %s: removed generation %d (no point left in it)", store.uuid, generation)
    return removed


def leftovers(store: DomainStore) -> list[Leftover]:
    """What interrupted operations left: temp files, ``.partial`` volumes, generation
    directories no manifest or journal refers to, and point volumes / difference
    tables of points without a manifest (unless the journal names that point).

    Damaged manifests are not leftovers: they are evidence, listed by
    ``list_points``, and only removed on purpose.  Call under the lock, or a running
    backup's files show up here.
    """
    temp = "temp file of an interrupted write"
    out: list[Leftover] = []
    for d in (store.path, store.points_dir, store.generations_dir):
        for name in listdir(d):
            if name.startswith(".") and (d / name).is_file():
                out.append(Leftover(d / name, "temp", temp))
    used = referenced_generations(store)
    entry = journal_or_none(store)
    journal_point = entry.point if entry is not None else None
    manifests = {n for n in map(manifest_number, listdir(store.points_dir)) if n is not None}
    for g in store.generations():
        gdir = store.generation_dir(g)
        if used is not None and g not in used:
            out.append(Leftover(gdir, "generation",
                                f"generation {g} has no sealed point and no journal entry"))
            continue
        for name in listdir(gdir):
            p = gdir / name
            if is_temp_name(name) and p.is_file():
                out.append(Leftover(p, "temp", temp))
            if not p.is_dir():
                continue
            for fname in listdir(p):
                f = p / fname
                if not f.is_file():
                    continue
                if fname.startswith("."):
                    out.append(Leftover(f, "temp", temp))
                elif fname.endswith(PARTIAL_SUFFIX):
                    out.append(Leftover(f, "partial", "volume never completed"))
                else:
                    k = numbered(fname)
                    if (k and k[0] in ("point", "diff") and k[1] not in manifests
                            and k[1] != journal_point):
                        out.append(Leftover(f, "orphan", f"point {k[1]} has no manifest"))
    return out


def _generation_of_manifest(path: Path) -> int | None:
    """The generation a manifest names, read leniently: a damaged manifest still
    protects its generation from removal if its ``generation`` field is readable."""
    try:
        data = read_bounded(path, MAX_MANIFEST, "point manifest")
        obj = json.loads(data) if data is not None else None
    except (CorruptFileError, OSError, ValueError, RecursionError):
        return None
    g = obj.get("generation") if isinstance(obj, dict) else None
    return g if type(g) is int and g >= 1 else None


def _rmdir_if_empty(path: Path) -> bool:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return False
    except OSError as err:
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return False  # a stranger's file is in it: leave it
        raise_storage(err, path)
    fsync_dir(path.parent)
    return True


def raise_storage(err: OSError, path: Path) -> NoReturn:
    mapped = storage_error_from_oserror(err, os.fspath(path))
    if mapped is None:
        raise err
    raise mapped from err
