"""The ``refcache`` command line: ``du``, ``prune``, ``inspect``, ``check``, ``smoke``.

``du``, ``inspect`` and ``check`` only read, and work on a cache that another process has
open. ``prune`` and ``smoke`` open the cache (and so need it closed elsewhere). A user mistake
(bad size, duration, filter, unknown id) is one line on stderr and exit code 2, never a
traceback; ``check`` exits 1 when it finds problems.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

from actors._cache import open_cache
from actors._offline import offline_entries, offline_usage, read_only_env
from actors._types import PrunePolicy, UsageInfo
from storage import RefcacheError, check, repair

__all__ = ["format_bytes", "main", "parse_duration", "parse_size"]

EXIT_USAGE = 2

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?i?b?)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "p": 1000**5,
    "pb": 1000**5,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
    "pi": 1024**5,
    "pib": 1024**5,
}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|us|ns|d|h|m|s)")
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}


_INSPECT_FIELDS = (
    "id",
    "kind",
    "mutable",
    "parents",
    "holders",
    "equal_mutable",
    "equal_immutable",
    "retain",
    "snapshot_id",
    "description",
    "created_at",
    "last_used_at",
    "usage_count",
    "record_type",
    "size",
    "blob",
    "blob_only",
    "diff_id",
    "chain_id",
    "blob_chain_id",
    "media_type",
)


class UsageError(Exception):
    """A user mistake on the command line (exit code 2)."""


def parse_size(text: str) -> int:
    """Parses ``"10GB"``, ``"512MiB"``, ``"1.5g"``, ``"1024"`` into bytes (strictly).

    Raises:
        UsageError: anything else, naming the value.
    """
    m = _SIZE_RE.match(text)
    unit = (m.group(2) or "").lower() if m else ""
    if m is None or unit not in _SIZE_UNITS:
        msg = f"invalid size {text!r}: expected a number with an optional unit (e.g. 10GB, 512MiB)"
        raise UsageError(msg)
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def parse_duration(text: str) -> timedelta:
    """Parses Go-style durations (``"48h"``, ``"1h30m"``, ``"90s"``, also ``"2d"``).

    Raises:
        UsageError: anything else, naming the value.
    """
    s = text.strip()
    pos = 0
    total = 0.0
    for m in _DURATION_RE.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if not s or pos != len(s):
        msg = f"invalid duration {text!r}: expected e.g. 48h, 1h30m, 90s, 2d"
        raise UsageError(msg)
    return timedelta(seconds=total)


def format_bytes(n: int) -> str:
    """Human size in decimal units, as ``buildctl du`` prints them (``"1.23GB"``)."""
    if n < 0:
        return "unknown"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n}{unit}" if unit == "B" else f"{n:.3g}{unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n}B"  # pragma: no cover


def _ago(ns: int | None) -> str:
    if not ns:
        return ""
    secs = max(time.time() - ns / 1e9, 0)
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if secs >= size:
            return f"{int(secs // size)} {unit} ago"
    return f"{int(secs)} seconds ago"


def _print_usage(rows: list[UsageInfo], *, verbose: bool, out: object) -> None:
    write = out.write  # type: ignore[attr-defined]
    rows = sorted(rows, key=lambda r: (r.size, r.id))
    if verbose:
        for r in rows:
            write(
                f"ID:\t\t{r.id}\nParents:\t{';'.join(r.parents)}\nCreated at:\t"
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(r.created_at / 1e9))}\n"
                f"Mutable:\t{str(r.mutable).lower()}\nReclaimable:\t{str(not r.in_use).lower()}\n"
                f"Shared:\t\t{str(r.shared).lower()}\nSize:\t\t{format_bytes(r.size)}\n"
                f"Description:\t{r.description}\nUsage count:\t{r.usage_count}\n"
                f"Last used:\t{_ago(r.last_used_at)}\nType:\t\t{r.record_type}\n\n"
            )
    else:
        write(f"{'ID':<28}{'RECLAIMABLE':<13}{'SIZE':<10}{'LAST ACCESSED':<20}DESCRIPTION\n")
        for r in rows:
            rid = r.id + ("*" if r.mutable else "")
            write(
                f"{rid:<28}{str(not r.in_use).lower():<13}{format_bytes(r.size):<10}"
                f"{_ago(r.last_used_at):<20}{r.description}\n"
            )
    shared = sum(max(r.size, 0) for r in rows if r.shared)
    private = sum(max(r.size, 0) for r in rows if not r.shared)
    reclaimable = sum(max(r.size, 0) for r in rows if not r.in_use)
    write(f"Shared:\t\t{format_bytes(shared)}\n" if shared else "")
    write(f"Private:\t{format_bytes(private)}\n" if shared else "")
    write(f"Reclaimable:\t{format_bytes(reclaimable)}\n")
    write(f"Total:\t\t{format_bytes(shared + private)}\n")


def _cmd_du(args: argparse.Namespace) -> int:
    rows = offline_usage(args.root, tuple(args.filter))
    if args.format == "json":
        print(json.dumps([asdict(r) for r in sorted(rows, key=lambda r: r.id)], indent=2))
    else:
        _print_usage(rows, verbose=args.verbose, out=sys.stdout)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    with read_only_env(args.root) as env:
        entries, _ = offline_entries(env)
    e = entries.get(args.id)
    if e is None:
        print(f"refcache: record {args.id!r} not found in {args.root}", file=sys.stderr)
        return EXIT_USAGE
    fields = {name: getattr(e, name) for name in _INSPECT_FIELDS}
    print(json.dumps(fields, indent=2, default=str))
    print("parent tree:")

    def show(rid: str, depth: int) -> None:
        node = entries.get(rid)
        label = f"{node.kind} {node.description!r}" if node else "(missing)"
        print(f"{'  ' * depth}{rid} {label}")
        if node is not None:
            for p in node.parent_ids():
                show(p, depth + 1)

    show(e.id, 0)
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    if args.fix:
        for line in repair(args.root):
            print(f"fixed: {line}")
    problems = check(args.root)
    for line in problems:
        print(line)
    if problems:
        print(f"{len(problems)} problem(s) found", file=sys.stderr)
        return 1
    print("cache is consistent")
    return 0


def _cmd_prune(args: argparse.Namespace) -> int:
    policy = PrunePolicy(
        all=args.all,
        filters=tuple(args.filter),
        keep_duration=parse_duration(args.keep_duration) if args.keep_duration else None,
        reserved_space=parse_size(args.reserved_space) if args.reserved_space else 0,
        max_used_space=parse_size(args.max_used_space) if args.max_used_space else 0,
        min_free_space=parse_size(args.min_free_space) if args.min_free_space else 0,
    )
    if args.dry_run:
        rows = [r for r in offline_usage(args.root, policy.filters) if not r.in_use]
        for r in rows:
            print(f"would delete {r.id} {format_bytes(r.size)} {r.description}")
        print(f"Total:\t{format_bytes(sum(max(r.size, 0) for r in rows))} in {len(rows)} records")
        return 0
    with open_cache(args.root) as cache:
        deleted = cache.manager.prune(policy).get(timeout=24 * 3600)
    for r in deleted:
        print(f"deleted {r.id} {format_bytes(r.size)} {r.description}")
    print(f"Total:\t{format_bytes(sum(max(r.size, 0) for r in deleted))} in {len(deleted)} records")
    return 0


def _cmd_smoke(args: argparse.Namespace) -> int:
    """Opens the cache, creates, commits and releases a record, prints disk usage."""
    with open_cache(args.root) as cache:
        manager = cache.manager
        scratch = manager.new(description="smoke: scratch layer").get(timeout=60)
        with scratch.mount().local() as path:
            (path / "hello.txt").write_text("hello from refcache\n")
        layer = scratch.commit()
        layer.finalize()
        print(f"committed {layer.id}: {format_bytes(layer.size())}")
        layer.release()
        _print_usage(manager.disk_usage().get(timeout=60), verbose=False, out=sys.stdout)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refcache", description="Inspect and maintain a refcache layer cache."
    )
    parser.add_argument("--root", type=Path, default=Path("refcache-data"), help="cache directory")
    sub = parser.add_subparsers(dest="command", required=True)

    du = sub.add_parser("du", help="disk usage (like buildctl du)")
    du.add_argument("--verbose", "-v", action="store_true")
    du.add_argument("--filter", "-f", action="append", default=[])
    du.add_argument("--format", choices=("table", "json"), default="table")
    du.set_defaults(func=_cmd_du)

    pr = sub.add_parser("prune", help="delete unreferenced records")
    pr.add_argument("--all", "-a", action="store_true", help="include internal/frontend records")
    pr.add_argument("--filter", "-f", action="append", default=[])
    pr.add_argument("--keep-duration", help="keep records used within this duration (e.g. 48h)")
    pr.add_argument("--reserved-space", help="always keep this much (e.g. 10GB)")
    pr.add_argument("--max-used-space", help="prune down to this much")
    pr.add_argument("--min-free-space", help="prune until the disk has this much free")
    pr.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    pr.set_defaults(func=_cmd_prune)

    ins = sub.add_parser("inspect", help="all fields of one record and its parent tree")
    ins.add_argument("id")
    ins.set_defaults(func=_cmd_inspect)

    ck = sub.add_parser("check", help="consistency check (exit 1 on problems)")
    ck.add_argument("--fix", action="store_true", help="repair what is safe first")
    ck.set_defaults(func=_cmd_check)

    sm = sub.add_parser("smoke", help="create, commit and release one record; print du")
    sm.set_defaults(func=_cmd_smoke)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``refcache`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"refcache: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RefcacheError as exc:
        print(f"refcache: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("refcache: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
