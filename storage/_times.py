"""RFC 3339 times with nanoseconds, as Go's ``time.MarshalText`` writes them.

containerd's ingest files (``startedat``/``updatedat``) and image documents (creation times)
use this form: UTC, ``Z``, the fraction with trailing zeros trimmed.
"""

from __future__ import annotations

import calendar
import re
import time
from datetime import datetime
from typing import Final

__all__ = ["format_rfc3339_ns", "parse_rfc3339_ns"]

_NS: Final = 1_000_000_000
_RFC3339_RE: Final = re.compile(
    r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)"
)


def format_rfc3339_ns(ns: int) -> str:
    """Go's ``time.MarshalText`` of a UTC time in nanoseconds since the epoch."""
    seconds, fraction = divmod(ns, _NS)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    if fraction:
        text += "." + f"{fraction:09d}".rstrip("0")
    return text + "Z"


def parse_rfc3339_ns(text: str) -> int:
    """Nanoseconds since the epoch of an RFC 3339 time (any offset, up to nanoseconds).

    Raises:
        ValueError: Not such a timestamp (or a date that does not exist).
    """
    match = _RFC3339_RE.fullmatch(text.strip())
    if match is None:
        msg = f"not an RFC 3339 timestamp: {text!r}"
        raise ValueError(msg)
    zone = "+00:00" if match[3] == "Z" else match[3]
    base = datetime.fromisoformat(match[1] + zone)  # checks the ranges (no 13th month)
    fraction = int((match[2] or "").ljust(9, "0"))
    return calendar.timegm(base.utctimetuple()) * _NS + fraction
