"""Every name in a pool, in one place: the layout of FORMAT.md §1 and the rules a name
read from a pool must pass before it may become part of a path or of libvirt XML.

A pool is data, not instructions (FORMAT.md §13): a manifest, a generation record or a
journal written by a damaged disk or by someone who could write to the pool's storage
must not be able to steer a restore, a prune or a repair outside the domain's
directory.  So names are checked here, at parse time, against what the writer can
produce, and anything else is a damaged record.
"""
from __future__ import annotations

import re
import uuid as _uuid

from ..errors import UsageError

__all__ = [
    "BASE_RE",
    "CHECKPOINT_NAME_RE",
    "CHECKPOINT_PREFIX",
    "DOMAINS_DIR",
    "DOMAIN_RECORD",
    "GENERATIONS_DIR",
    "GENERATION_RECORD",
    "JOURNAL_FILE",
    "LOCK_FILE",
    "MANIFEST_RE",
    "NUMBERED_RE",
    "NUMBER_RE",
    "PARTIAL_SUFFIX",
    "POINTS_DIR",
    "POOL_HEADER",
    "TABLE_RE",
    "VOLUME_FORMATS",
    "base_volume_name",
    "canonical_uuid",
    "difference_name",
    "is_base_name",
    "is_checkpoint_name",
    "is_host_path",
    "is_safe_domain_name",
    "is_safe_relpath",
    "is_safe_target",
    "manifest_name",
    "manifest_number",
    "number_name",
    "numbered",
    "parse_number_name",
    "partial_name",
    "point_volume_name",
    "table_name",
]

POOL_HEADER = "vmsnapbackup-pool.json"
DOMAINS_DIR = "domains"
DOMAIN_RECORD = "domain.json"
LOCK_FILE = "lock"
JOURNAL_FILE = "journal.json"
GENERATIONS_DIR = "generations"
POINTS_DIR = "points"
GENERATION_RECORD = "generation.json"
PARTIAL_SUFFIX = ".partial"

#: Formats a base or point volume may have (§1: base.qcow2 | base.raw; points are qcow2).
VOLUME_FORMATS = ("qcow2", "raw")

#: A point or generation number as a name: 6 digits or more (§1).
NUMBER_RE = re.compile(r"[0-9]{6,}")
#: ``points/<N>.json``
MANIFEST_RE = re.compile(r"([0-9]{6,})\.json")
#: Files of a disk's point store that carry a point number (§1), complete or partial.
NUMBERED_RE = re.compile(r"(table|point|diff)-([0-9]{6,})\.(vsbt|qcow2|vsbd)(\.partial)?")
#: A base volume, complete or partial.
BASE_RE = re.compile(r"base\.(qcow2|raw)(\.partial)?")
#: Table 1 of a generation as ``generation.json`` names it.
TABLE_RE = re.compile(r"table-([0-9]{6,})\.vsbt")

#: Disk targets become directory names: keep them to what libvirt uses (vda, sdb, hdc,
#: xvda, ...) and never let one be ".", ".." or contain a slash.
_TARGET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: Names of the libvirt checkpoints (and their bitmaps) this tool creates (§4).
CHECKPOINT_PREFIX = "vmsnapbackup-"
CHECKPOINT_NAME_RE = re.compile(re.escape(CHECKPOINT_PREFIX) + r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
#: C0 controls and DEL: never in a name we print on one line or put in a file name.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
#: libvirt's own limit on a domain name is far above this; file names are 255 bytes.
MAX_DOMAIN_NAME = 200


# --- numbers as names -------------------------------------------------------------------

def number_name(n: int) -> str:
    """Zero-padded to 6 digits; wider numbers simply widen the field (§1)."""
    if n < 1:
        raise UsageError(f"point and generation numbers start at 1, not {n}")
    return f"{n:06d}"


def parse_number_name(text: str) -> int | None:
    """The number in a 6+-digit name, or None.  Only the one spelling
    :func:`number_name` produces is accepted, so ``1`` and ``000001`` can never be two
    names of one point."""
    if not NUMBER_RE.fullmatch(text):
        return None
    n = int(text)
    return n if n >= 1 and number_name(n) == text else None


def base_volume_name(fmt: str) -> str:
    if fmt not in VOLUME_FORMATS:
        raise UsageError(f"a base volume is qcow2 or raw, not {fmt!r}")
    return f"base.{fmt}"


def table_name(point: int) -> str:
    return f"table-{number_name(point)}.vsbt"


def point_volume_name(point: int) -> str:
    return f"point-{number_name(point)}.qcow2"


def difference_name(point: int) -> str:
    return f"diff-{number_name(point)}.vsbd"


def manifest_name(point: int) -> str:
    return f"{number_name(point)}.json"


def partial_name(name: str) -> str:
    """The name a volume has while it is being filled (§10)."""
    return name + PARTIAL_SUFFIX


# --- recognising names found in a directory ----------------------------------------------

def numbered(name: str) -> tuple[str, int] | None:
    """(kind, number) for ``table-N.vsbt``/``point-N.qcow2``/``diff-N.vsbd`` (or
    ``.partial``), kind being ``table``, ``point`` or ``diff``; None for anything else."""
    m = NUMBERED_RE.fullmatch(name)
    if m is None:
        return None
    n = parse_number_name(m.group(2))
    return None if n is None else (m.group(1), n)


def manifest_number(name: str) -> int | None:
    """The point number of a ``points/`` entry named like a manifest, else None."""
    m = MANIFEST_RE.fullmatch(name)
    return parse_number_name(m.group(1)) if m else None


def is_base_name(name: str) -> bool:
    """``base.qcow2`` / ``base.raw``, complete or ``.partial``."""
    return BASE_RE.fullmatch(name) is not None


# --- names read from a pool --------------------------------------------------------------

def canonical_uuid(text: str) -> str | None:
    """The lowercase 8-4-4-4-12 form of a UUID, or None if ``text`` is not one.

    Domain directories are named by it, so it must be the one spelling libvirt uses.
    """
    try:
        u = _uuid.UUID(text)
    except (ValueError, AttributeError, TypeError):
        return None
    return str(u)


def is_safe_relpath(p: str) -> bool:
    """Relative, POSIX, no empty, ``.`` or ``..`` components: stays inside its root."""
    if not p or p.startswith("/") or "\\" in p or _CONTROL_RE.search(p):
        return False
    return all(part not in ("", ".", "..") for part in p.split("/"))


def is_safe_target(t: str) -> bool:
    """A disk target usable as a directory name (``vda``)."""
    return bool(_TARGET_RE.fullmatch(t)) and t not in (".", "..")


def is_safe_domain_name(name: str) -> bool:
    """A domain name from a pool that may become part of a file name or a message.

    Looser than what ``restore --define`` accepts from a user (libvirt allows spaces
    and non-ASCII letters, and a pool must keep listing such a domain), but never a
    path: no ``/`` or ``\\``, no control character, not ``.`` or ``..``, not empty,
    not longer than :data:`MAX_DOMAIN_NAME`.
    """
    return (0 < len(name) <= MAX_DOMAIN_NAME and "/" not in name and "\\" not in name
            and not _CONTROL_RE.search(name) and name not in (".", "..")
            and name == name.strip())


def is_checkpoint_name(name: str) -> bool:
    """A libvirt checkpoint (and bitmap) name this tool creates (§4)."""
    return CHECKPOINT_NAME_RE.fullmatch(name) is not None


def is_host_path(p: str) -> bool:
    """An absolute path on the hypervisor host, as the journal and manifests record
    images and overlays: absolute, no ``..`` component, no control character."""
    return (p.startswith("/") and not _CONTROL_RE.search(p)
            and ".." not in p.split("/"))
