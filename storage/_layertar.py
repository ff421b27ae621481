"""The OCI layer tar conventions the applier and the differ share.

Whiteout names (``.wh.<name>`` deletes ``<name>``, ``.wh..wh..opq`` makes its directory
opaque), nanosecond times in PAX records (``mtime``/``atime`` as ``<seconds>.<fraction>``)
and the tar stream buffer size.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = [
    "TAR_BUFSIZE",
    "WHITEOUT_META_PREFIX",
    "WHITEOUT_OPAQUE",
    "WHITEOUT_PREFIX",
    "format_pax_ns",
    "pax_time_ns",
]

WHITEOUT_PREFIX: Final = ".wh."
WHITEOUT_META_PREFIX: Final = ".wh..wh."
WHITEOUT_OPAQUE: Final = ".wh..wh..opq"

# tarfile's stream buffer: its _Stream copies the leftover buffer on every read, so a large
# value makes small-file archives quadratic; 64 KiB measured best here.
TAR_BUFSIZE: Final = 64 << 10

_NS: Final = 1_000_000_000
_PAX_TIME_RE: Final = re.compile(r"^(-?)(\d+)(?:\.(\d*))?$")


def pax_time_ns(value: str | None) -> int | None:
    """Nanoseconds of a PAX time record (``None`` when absent or malformed)."""
    if value is None:
        return None
    match = _PAX_TIME_RE.match(value.strip())
    if match is None:
        return None
    frac = (match[3] or "")[:9].ljust(9, "0")
    ns = int(match[2]) * _NS + int(frac)
    return -ns if match[1] else ns


def format_pax_ns(ns: int) -> str:
    """A PAX time record of ``ns`` nanoseconds since the epoch (all nine digits kept)."""
    sign = "-" if ns < 0 else ""
    sec, frac = divmod(abs(ns), _NS)
    return f"{sign}{sec}.{frac:09d}"
