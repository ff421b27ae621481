"""What ``refcache``'s commands share: strict value parsing, buildctl's output shape, signals.

* **Values** are parsed exactly and strictly: a size is an integer number of bytes computed
  with exact decimal arithmetic (``1.5GB`` is 1,500,000,000 bytes; no float round trip), a
  duration an integer number of nanoseconds within Go's ``time.Duration`` range, as
  BuildKit's own fields are. Empty, blank, negative, overflowing or malformed values are a
  :class:`UsageError` naming the value.
* **Output** follows ``buildctl du``/``prune``: rows sorted by size (largest first, ties by
  id, descending), sizes in decimal units with three significant digits, ``Shared:`` and
  ``Private:`` only when something is shared. Every text field that comes from the cache
  (ids, descriptions, types, metadata) goes through :func:`safe`, so an escape sequence in a
  description can neither forge rows nor retitle the terminal.
* **Ctrl-C**: :func:`hold_interrupts` keeps a second Ctrl-C from breaking a clean shutdown
  (a third one exits at once; the cache is crash-safe).

The ``refcache`` command itself is ``actors/_cli.py``; ``refcache demo`` (``actors/_demo.py``)
prints its disk usage with the same :func:`usage_lines`.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal, localcontext
from fractions import Fraction
from pathlib import Path
from types import FrameType
from typing import Any

from ._types import UsageInfo

__all__ = [
    "HOW_TO_CHOOSE",
    "cli_main",
    "busy",
    "existing_cache",
    "DEFAULT_ROOT",
    "MAX_DURATION_NS",
    "MAX_SIZE",
    "ROOT_ENV",
    "CommandFailedError",
    "InterruptedCommandError",
    "UsageError",
    "ago",
    "format_bytes",
    "format_duration",
    "format_duration_ns",
    "hold_interrupts",
    "parse_duration",
    "parse_size",
    "parse_until",
    "resolve_root",
    "safe",
    "sort_usage",
    "usage_lines",
    "usage_table",
    "usage_summary",
    "usage_totals",
    "usage_verbose",
    "when",
]


class UsageError(Exception):
    """A mistake on the command line itself (exit code 2); nothing was read or changed."""


class CommandFailedError(Exception):
    """The command could not do its job (exit code 1): no cache, busy, not confirmed."""


class InterruptedCommandError(Exception):
    """Ctrl-C stopped the command cleanly (exit code 130); the message says what was done."""


# -- the root ------------------------------------------------------------------------------------

#: The cache directory when neither ``--root`` nor ``$REFCACHE_ROOT`` names one.
DEFAULT_ROOT = "refcache-data"
ROOT_ENV = "REFCACHE_ROOT"


def resolve_root(value: str | os.PathLike[str] | None) -> Path:
    """The cache directory: ``--root``, else ``$REFCACHE_ROOT`` (when not empty), else
    ``./refcache-data``.

    Raises:
        UsageError: ``--root`` was given empty.
    """
    if value is None:
        value = os.environ.get(ROOT_ENV) or DEFAULT_ROOT
    if not str(value).strip():
        msg = "--root is empty: give the cache directory"
        raise UsageError(msg)
    return Path(value)


# -- sizes ---------------------------------------------------------------------------------------

#: The largest size accepted: BuildKit keeps sizes in an int64.
MAX_SIZE = 2**63 - 1

_SIZE_RE = re.compile(r"([0-9]+)(?:\.([0-9]+))?([A-Za-z]*)")
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    **{p: 1000**n for n, p in enumerate("kmgtp", 1)},
    **{p + "b": 1000**n for n, p in enumerate("kmgtp", 1)},
    **{p + "i": 1024**n for n, p in enumerate("kmgtp", 1)},
    **{p + "ib": 1024**n for n, p in enumerate("kmgtp", 1)},
}


def _why(text: str, expected: str) -> str:
    if not text.strip():
        return "empty"
    if text.lstrip().startswith("-"):
        return "negative values are not allowed"
    return expected


def _number(whole: str, frac: str | None) -> Fraction:
    return Fraction(int(whole + (frac or "")), 10 ** len(frac or ""))


def parse_size(text: str, *, bare_unit: int = 1) -> int:
    """Parses a size exactly: ``"10GB"``, ``"512MiB"``, ``"1.5g"``, ``"1024"`` -> bytes.

    Decimal units (``k``/``kB``, ``M``/``MB``, ... powers of 1000, as ``buildctl`` prints
    them) and binary ones (``Ki``/``KiB``, ``Mi``/``MiB``, ... powers of 1024), any case, no
    spaces. A fraction is exact decimal arithmetic and must come to a whole number of bytes
    (``1.5kB`` is 1500; ``1.5B`` is an error).

    Args:
        text: The value as typed.
        bare_unit: Bytes per unit of a number given without a unit (1; ``--keep-storage``
            passes 1,000,000: buildctl reads it in MB).

    Raises:
        UsageError: empty, blank, negative, malformed, an unknown unit, a fraction of a byte,
            or more than :data:`MAX_SIZE`; the message names the value.
    """
    m = _SIZE_RE.fullmatch(text)
    unit = m.group(3).lower() if m else ""
    if m is None or unit not in _SIZE_UNITS:
        why = _why(text, "expected a number and an optional unit")
        msg = f"invalid size {text!r}: {why}, e.g. 10GB, 512MiB or 1.5GB"
        raise UsageError(msg)
    value = _number(m.group(1), m.group(2)) * (_SIZE_UNITS[unit] if unit else bare_unit)
    if value.denominator != 1:
        msg = f"invalid size {text!r}: not a whole number of bytes ({float(value):g})"
        raise UsageError(msg)
    if value > MAX_SIZE:
        msg = f"invalid size {text!r}: larger than the maximum, {MAX_SIZE} bytes (9.22EB)"
        raise UsageError(msg)
    return int(value)


_DECIMAL_UNITS = ("kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB")


def format_bytes(n: int) -> str:
    """A size as ``buildctl du`` prints it: decimal units, three significant digits.

    Rounding happens before the unit is chosen, so 999,999 bytes is ``1MB`` (Go's ``%.3g``
    would print ``1e+03kB``). A negative size (unknown) prints as ``unknown``.
    """
    if n < 0:
        return "unknown"
    if n < 1000:
        return f"{n}B"
    with localcontext() as ctx:
        ctx.prec = 60  # exact for any int64 and beyond
        value = Decimal(n)
        for unit in _DECIMAL_UNITS:
            value /= 1000
            digits = len(str(int(value)))  # 1-3 digits before the point
            rounded = value.quantize(Decimal(1).scaleb(digits - 3), rounding=ROUND_HALF_EVEN)
            if rounded < 1000 or unit == _DECIMAL_UNITS[-1]:
                text = format(rounded.normalize(), "f")
                return f"{text}{unit}"
    return f"{n}B"  # pragma: no cover - the loop always returns


# -- durations -----------------------------------------------------------------------------------

#: The longest duration accepted: Go's ``time.Duration`` (int64 nanoseconds), about 292 years.
MAX_DURATION_NS = 2**63 - 1

_DURATION_RE = re.compile(r"([0-9]+)(?:\.([0-9]+))?(ns|us|µs|μs|ms|s|m|h|d)")
_DURATION_NS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,  # micro sign
    "μs": 1_000,  # Greek mu, which Go also accepts
    "ms": 1_000_000,
    "s": 10**9,
    "m": 60 * 10**9,
    "h": 3600 * 10**9,
    "d": 86400 * 10**9,
}


def format_duration_ns(ns: int) -> str:
    """A duration in the form :func:`parse_duration` reads (``"106751d23h47m16.854775807s"``)."""
    days, rest = divmod(ns, _DURATION_NS["d"])
    hours, rest = divmod(rest, _DURATION_NS["h"])
    minutes, rest = divmod(rest, _DURATION_NS["m"])
    seconds = Fraction(rest, 10**9)
    parts = [f"{days}d" if days else "", f"{hours}h" if hours else ""]
    parts.append(f"{minutes}m" if minutes else "")
    if seconds or not any(parts):
        whole, frac = divmod(rest, 10**9)
        parts.append(f"{whole}.{frac:09d}".rstrip("0").rstrip(".") + "s")
    return "".join(parts)


def _duration_ns(text: str) -> int:
    if text == "0":
        return 0
    pos = 0
    total = Fraction(0)
    for m in _DURATION_RE.finditer(text):
        if m.start() != pos:
            break
        total += _number(m.group(1), m.group(2)) * _DURATION_NS[m.group(3)]
        pos = m.end()
    if not text or pos != len(text):
        why = _why(text, "expected e.g. 48h, 1h30m, 90s or 2d")
        msg = f"invalid duration {text!r}: {why}"
        raise UsageError(msg)
    ns = int(total)  # Go truncates a fraction of a nanosecond
    if ns > MAX_DURATION_NS:
        msg = (
            f"invalid duration {text!r}: longer than the maximum, "
            f"{format_duration_ns(MAX_DURATION_NS)} (Go's time.Duration)"
        )
        raise UsageError(msg)
    return ns


def parse_duration(text: str) -> timedelta:
    """Parses a Go-style duration exactly: ``"48h"``, ``"1h30m"``, ``"90s"``, ``"2d"``, ``"0"``.

    Units ``ns``, ``us``/``µs``, ``ms``, ``s``, ``m``, ``h`` (Go's) and ``d`` (24 hours);
    fractions are exact (``1.5h`` is 90 minutes). The result is whole microseconds (what a
    ``timedelta`` holds).

    Raises:
        UsageError: empty, blank, negative, a missing or unknown unit, spaces, or longer than
            Go's ``time.Duration`` allows (:data:`MAX_DURATION_NS`); the message names the value.
    """
    return timedelta(microseconds=_duration_ns(text) // 1000)


def parse_until(text: str, *, now: datetime | None = None) -> timedelta:
    """Reads docker's ``until`` filter value as a keep duration.

    ``docker builder prune --filter until=24h`` prunes what was not used in the last 24
    hours; the value may also be a timestamp (RFC 3339 / ISO 8601, ``2024-05-01``,
    ``2024-05-01T12:00:00Z``; naive times are local) or Unix seconds (``1714560000``), and
    then means "not used since then".

    Raises:
        UsageError: none of these, or a time in the future.
    """
    try:
        return parse_duration(text)
    except UsageError as exc:
        if not text or "longer than the maximum" in str(exc):
            raise
    now = now or datetime.now(UTC)
    when: datetime | None = None
    if re.fullmatch(r"[0-9]+(\.[0-9]+)?", text):
        with contextlib.suppress(OverflowError, ValueError, OSError):
            when = datetime.fromtimestamp(float(text), UTC)
    else:
        with contextlib.suppress(ValueError):
            when = datetime.fromisoformat(text)
            if when.tzinfo is None:
                when = when.astimezone()  # local time, as docker reads it
    if when is None:
        msg = (
            f"invalid until {text!r}: expected a duration (24h, 7d) or a timestamp "
            "(2024-05-01, 2024-05-01T12:00:00Z, Unix seconds)"
        )
        raise UsageError(msg)
    if when > now:
        msg = f"invalid until {text!r}: {when.isoformat()} is in the future"
        raise UsageError(msg)
    return now - when


def format_duration(seconds: float) -> str:
    """A rough human duration (``"3 hours"``, ``"2 days"``), as Docker's ``HumanDuration``."""
    seconds = max(seconds, 0.0)
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit[:-1] if n == 1 else unit}"
    n = int(seconds)
    return f"{n} second" if n == 1 else f"{n} seconds"


def ago(ns: int | None) -> str:
    """``"3 hours ago"`` for a time in ns since the epoch; ``""`` for never."""
    if not ns:
        return ""
    return format_duration(time.time() - ns / 1e9) + " ago"


def when(ns: int | None) -> str:
    """A local timestamp for a time in ns since the epoch; ``""`` for never."""
    if not ns:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9))


# -- terminal-safe text --------------------------------------------------------------------------


def _escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def safe(text: object) -> str:
    """``text`` with every non-printable character escaped (``\\x1b``, ``\\u202e``).

    Control characters (escape sequences, carriage returns, newlines, tabs, C1 controls),
    bidirectional overrides and other invisible formatting characters cannot reach the
    terminal from a description or id, so they can neither forge table rows nor change the
    terminal's title or colours. Ordinary text, spaces and non-ASCII letters are unchanged.
    """
    s = text if isinstance(text, str) else str(text)
    if s.isprintable():
        return s
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in s)


# -- buildctl's du table -------------------------------------------------------------------------


def sort_usage(rows: Sequence[UsageInfo]) -> list[UsageInfo]:
    """``buildctl du``'s order: largest first; equal sizes by id, descending."""
    return sorted(rows, key=lambda r: (r.size, r.id), reverse=True)


def usage_totals(rows: Sequence[UsageInfo]) -> dict[str, int]:
    """``buildctl du``'s summary: shared, private, reclaimable and total bytes.

    Unknown sizes (-1) count as 0; private is the total less what is shared.
    """
    total = sum(r.size for r in rows if r.size > 0)
    shared = sum(r.size for r in rows if r.size > 0 and r.shared)
    reclaimable = sum(r.size for r in rows if r.size > 0 and not r.in_use)
    return {
        "shared": shared,
        "private": total - shared,
        "reclaimable": reclaimable,
        "total": total,
    }


def usage_table(rows: Sequence[UsageInfo], *, limit: int | None = None) -> list[str]:
    """The table of ``buildctl du``/``prune``, in the given order, plus a description column.

    A ``*`` after an id marks a mutable record; after a size, a shared one. ``limit`` shows
    the first rows and a line counting the others.
    """
    shown = list(rows if limit is None else rows[:limit])
    width = max([len(r.id) + 1 for r in shown] + [2]) + 2
    lines = [f"{'ID':<{width}}{'RECLAIMABLE':<13}{'SIZE':<10}{'LAST ACCESSED':<20}DESCRIPTION"]
    for r in shown:
        rid = safe(r.id) + ("*" if r.mutable else "")
        size = format_bytes(r.size) + ("*" if r.shared else "")
        lines.append(
            f"{rid:<{width}}{str(not r.in_use).lower():<13}{size:<10}"
            f"{ago(r.last_used_at):<20}{safe(r.description)}".rstrip()
        )
    if limit is not None and len(rows) > limit:
        lines.append(f"... and {len(rows) - limit} more records")
    return lines


def usage_verbose(rows: Sequence[UsageInfo]) -> list[str]:
    """``buildctl du --verbose``: one block of fields per record (empty fields left out)."""
    lines: list[str] = []
    for r in rows:
        lines.append(f"ID:\t\t{safe(r.id)}")
        if r.parents:
            lines.append(f"Parents:\t{safe(';'.join(r.parents))}")
        lines.append(f"Created at:\t{when(r.created_at)}")
        lines.append(f"Mutable:\t{str(r.mutable).lower()}")
        lines.append(f"Reclaimable:\t{str(not r.in_use).lower()}")
        lines.append(f"Shared:\t\t{str(r.shared).lower()}")
        lines.append(f"Size:\t\t{format_bytes(r.size)}")
        if r.description:
            lines.append(f"Description:\t{safe(r.description)}")
        lines.append(f"Usage count:\t{r.usage_count}")
        if r.last_used_at:
            lines.append(f"Last used:\t{ago(r.last_used_at)}")
        lines.append(f"Type:\t\t{safe(r.record_type)}")
        lines.append("")
    return lines


def usage_summary(rows: Sequence[UsageInfo]) -> list[str]:
    """``buildctl du``'s summary lines (``Shared:``/``Private:`` only when something is)."""
    totals = usage_totals(rows)
    lines = []
    if totals["shared"] > 0:
        lines.append(f"Shared:\t\t{format_bytes(totals['shared'])}")
        lines.append(f"Private:\t{format_bytes(totals['private'])}")
    lines.append(f"Reclaimable:\t{format_bytes(totals['reclaimable'])}")
    lines.append(f"Total:\t\t{format_bytes(totals['total'])}")
    return lines


def usage_lines(
    rows: Sequence[UsageInfo], *, verbose: bool = False, limit: int | None = None
) -> list[str]:
    """What ``refcache du`` prints: the sorted table (or verbose blocks) and the summary."""
    ordered = sort_usage(rows)
    body = usage_verbose(ordered) if verbose else usage_table(ordered, limit=limit)
    return body + usage_summary(ordered)


# -- Ctrl-C --------------------------------------------------------------------------------------


@contextlib.contextmanager
def hold_interrupts(what: str = "stopping cleanly") -> Iterator[None]:
    """Runs a block (closing the cache) that Ctrl-C must not cut in half.

    In the block, a first Ctrl-C only says that the command is ``what``; another one exits
    at once with code 130 (the cache is crash-safe: the next open finishes what was cut
    off). Outside the main thread, or when signals cannot be handled, the block just runs.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    presses = [0]

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        presses[0] += 1
        with contextlib.suppress(OSError):
            if presses[0] == 1:
                sys.stderr.write(f"refcache: {what}; press Ctrl-C again to exit at once\n")
                sys.stderr.flush()
                return
            sys.stderr.write("refcache: exiting at once\n")
            sys.stderr.flush()
        os._exit(130)

    previous: Any = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


HOW_TO_CHOOSE = "choose it with --root DIR or REFCACHE_ROOT; the default is ./refcache-data"


def existing_cache(root: Path) -> Path:
    """``root`` when it holds a cache this process can read; otherwise a clear failure."""
    try:
        st = root.stat()
    except FileNotFoundError:
        msg = f"no cache at {root}: the directory does not exist ({HOW_TO_CHOOSE})"
        raise CommandFailedError(msg) from None
    except OSError as exc:
        msg = f"cannot read {root}: {exc.strerror or exc}"
        raise CommandFailedError(msg) from None
    if not stat.S_ISDIR(st.st_mode):
        msg = f"{root} is not a directory, so it holds no cache ({HOW_TO_CHOOSE})"
        raise CommandFailedError(msg)
    if not os.access(root, os.R_OK | os.X_OK):
        msg = f"cannot read {root}: permission denied"
        raise CommandFailedError(msg)
    meta = root / "meta"
    if not os.access(meta, os.F_OK):
        msg = f"no refcache cache at {root} (it has no meta/ directory; {HOW_TO_CHOOSE})"
        raise CommandFailedError(msg)
    if not os.access(meta, os.R_OK | os.X_OK):
        msg = f"cannot read {meta}: permission denied"
        raise CommandFailedError(msg)
    return root


def busy(root: Path, what: str) -> CommandFailedError:
    return CommandFailedError(
        f"cannot {what} {root}: the cache is busy (open in another process); stop that "
        "process first (du, inspect and check work while it is open)"
    )


def cli_main(
    argv: Sequence[str] | None = None, *, serve_metrics: Callable[[Any, int], Any] | None = None
) -> int:
    """The ``refcache`` command line (``refcache --help``); returns its exit code.

    Args:
        argv: The arguments (default ``sys.argv[1:]``).
        serve_metrics: ``(cache, port) -> server`` for ``demo``'s ``/metrics`` (the console
            script passes ``refcache.metrics.serve``); without it the demo serves none.
    """
    # Imported here, not at the top: ``python -m refcache.actors._cli`` must find its module
    # not yet imported by the package (runpy warns, and the warning is not ours to print).
    from ._cli import main  # noqa: PLC0415

    return main(argv, serve_metrics=serve_metrics)
