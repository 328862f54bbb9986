"""The one timestamp format of every pool record (FORMAT.md §1.3).

Written as UTC with millisecond precision and a ``Z`` suffix, so timestamps sort as
strings and read the same on every host; read leniently (any RFC 3339 date-time with
an offset and up to 9 fraction digits), because a record is worth more than the
precision another writer chose.
"""
from __future__ import annotations

import datetime as _dt
import re

__all__ = ["TIMESTAMP_RE", "format_timestamp", "is_timestamp", "parse_timestamp", "utc_now"]

#: The grammar a reader accepts (FORMAT.md §1.3).
TIMESTAMP_RE = re.compile(
    r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:\d{2})"
)


def format_timestamp(when: _dt.datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SS.mmmZ`` of an aware datetime, in UTC."""
    utc = when.astimezone(_dt.timezone.utc)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def utc_now() -> str:
    """Now, as every record writes it."""
    return format_timestamp(_dt.datetime.now(_dt.timezone.utc))


def parse_timestamp(text: str) -> _dt.datetime:
    """An aware datetime from a record timestamp (for prune's keep-daily and friends).

    Python 3.9's ``fromisoformat`` knows neither ``Z`` nor more than 6 fraction
    digits, hence the normalisation.  ValueError for anything outside the grammar or
    not a real date and time.
    """
    m = TIMESTAMP_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"not a timestamp: {text!r}")
    base, frac, tz = m.groups()
    frac = "." + frac[:6].ljust(6, "0") if frac else ""
    return _dt.datetime.fromisoformat(base + frac + ("+00:00" if tz == "Z" else tz))


def is_timestamp(text: str) -> bool:
    try:
        parse_timestamp(text)
    except ValueError:
        return False
    return True
