"""The ``refcache`` command line: ``du``, ``prune``, ``inspect``, ``check``, ``smoke``
(``push``/``pull``: ``actors/_cli_registry.py``, ``demo``: ``actors/_demo.py``).

``du``, ``inspect``, ``check`` and ``prune --dry-run`` only read, and work on a cache that
another process has open (LMDB readers never block its writer; handles held in that process
cannot be seen, so ``du`` shows what would be reclaimable with no handle open). ``prune`` and
``smoke`` open the cache, so they need it closed elsewhere and say so clearly when it is not.

Exit codes: 0 success; 1 ``check`` found problems; 2 a user mistake or an error (bad size,
duration, filter, unknown id, missing cache, cache open elsewhere), always one line on
stderr, never a traceback; 130 interrupted.

Run as ``refcache`` (the console script) or ``python -m actors._cli``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import re
import sys
import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, TextIO

import pykka

from ..storage import LockedError, RefcacheError, check, repair
from ._cache import open_cache
from ._offline import (
    RecordDetails,
    inspect_record,
    offline_prune_plan,
    offline_table,
    offline_usage,
    read_only_env,
)
from ._prune import CacheListener, TableRow
from ._types import PrunePolicy, UsageInfo

__all__ = ["UsageError", "format_bytes", "format_duration", "main", "parse_duration", "parse_size"]

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# -- parsing ---------------------------------------------------------------------------------------

_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)([A-Za-z]*)")
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
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h|d)")
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}


class UsageError(Exception):
    """A user mistake on the command line (exit code 2)."""


def parse_size(text: str) -> int:
    """Parses a size strictly: ``"10GB"``, ``"512MiB"``, ``"1.5g"``, ``"1024"`` -> bytes.

    Decimal units (``k``, ``KB``, ``MB``, ... powers of 1000, as ``buildctl`` prints them)
    and binary ones (``Ki``, ``KiB``, ``MiB``, ... powers of 1024), any case, no spaces.

    Raises:
        UsageError: anything else (negative, empty, unknown unit, exponent), naming the value.
    """
    m = _SIZE_RE.fullmatch(text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _SIZE_UNITS:
        msg = f"invalid size {text!r}: expected a number and an optional unit, e.g. 10GB or 512MiB"
        raise UsageError(msg)
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def parse_duration(text: str) -> timedelta:
    """Parses a Go-style duration strictly: ``"48h"``, ``"1h30m"``, ``"90s"``, ``"2d"``, ``"0"``.

    Raises:
        UsageError: anything else (negative, empty, missing or unknown unit), naming the value.
    """
    if text == "0":
        return timedelta(0)
    pos = 0
    total = 0.0
    for m in _DURATION_RE.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if not text or pos != len(text):
        msg = f"invalid duration {text!r}: expected e.g. 48h, 1h30m, 90s or 2d"
        raise UsageError(msg)
    return timedelta(seconds=total)


def format_bytes(n: int) -> str:
    """A size in decimal units, as ``buildctl du`` prints them (``"1.23GB"``)."""
    if n < 0:
        return "unknown"
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{n}B" if unit == "B" else f"{value:.3g}{unit}"
        value /= 1000
    return f"{n}B"  # pragma: no cover


def format_duration(seconds: float) -> str:
    """A rough human duration (``"3 hours"``, ``"2 days"``), as Docker's ``HumanDuration``."""
    seconds = max(seconds, 0.0)
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit[:-1] if n == 1 else unit}"
    n = int(seconds)
    return f"{n} second" if n == 1 else f"{n} seconds"


def _ago(ns: int | None) -> str:
    if not ns:
        return ""
    return format_duration(time.time() - ns / 1e9) + " ago"


def _when(ns: int | None) -> str:
    if not ns:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9))


# -- du ------------------------------------------------------------------------------------------


def _totals(rows: Sequence[UsageInfo]) -> dict[str, int]:
    """``buildctl du``'s summary: shared, private, reclaimable and total bytes."""
    shared = sum(max(r.size, 0) for r in rows if r.shared)
    private = sum(max(r.size, 0) for r in rows if not r.shared)
    reclaimable = sum(max(r.size, 0) for r in rows if not r.in_use)
    return {
        "shared": shared,
        "private": private,
        "reclaimable": reclaimable,
        "total": shared + private,
    }


def _print_usage(rows: Sequence[UsageInfo], *, verbose: bool, out: TextIO) -> None:
    rows = sorted(rows, key=lambda r: (r.size, r.id))
    if verbose:
        for r in rows:
            out.write(
                f"ID:\t\t{r.id}\n"
                f"Parents:\t{';'.join(r.parents)}\n"
                f"Created at:\t{_when(r.created_at)}\n"
                f"Mutable:\t{str(r.mutable).lower()}\n"
                f"Reclaimable:\t{str(not r.in_use).lower()}\n"
                f"Shared:\t\t{str(r.shared).lower()}\n"
                f"Size:\t\t{format_bytes(r.size)}\n"
                f"Description:\t{r.description}\n"
                f"Usage count:\t{r.usage_count}\n"
                f"Last used:\t{_ago(r.last_used_at)}\n"
                f"Type:\t\t{r.record_type}\n\n"
            )
    else:
        width = max([len(r.id) + 1 for r in rows] + [2]) + 2
        out.write(
            f"{'ID':<{width}}{'RECLAIMABLE':<13}{'SIZE':<10}{'LAST ACCESSED':<20}DESCRIPTION\n"
        )
        for r in rows:
            rid = r.id + ("*" if r.mutable else "")  # buildctl marks mutable records
            out.write(
                f"{rid:<{width}}{str(not r.in_use).lower():<13}{format_bytes(r.size):<10}"
                f"{_ago(r.last_used_at):<20}{r.description}\n"
            )
    totals = _totals(rows)
    out.write(f"Shared:\t\t{format_bytes(totals['shared'])}\n")
    out.write(f"Private:\t{format_bytes(totals['private'])}\n")
    out.write(f"Reclaimable:\t{format_bytes(totals['reclaimable'])}\n")
    out.write(f"Total:\t\t{format_bytes(totals['total'])}\n")


def _cmd_du(args: argparse.Namespace) -> int:
    rows = offline_usage(args.root, tuple(args.filter))
    if args.format == "json":
        rows = sorted(rows, key=lambda r: (r.size, r.id))
        doc = {"records": [dataclasses.asdict(r) for r in rows], "totals": _totals(rows)}
        print(json.dumps(doc, indent=2))
    else:
        _print_usage(rows, verbose=args.verbose, out=sys.stdout)
    return EXIT_OK


# -- prune -----------------------------------------------------------------------------------------


class _ProgressBar:
    """A progress line on stderr: redrawn in place on a terminal, every 10 % otherwise."""

    def __init__(self, expected: int, out: TextIO) -> None:
        self.expected = expected
        self.out = out
        self.tty = out.isatty()
        self.records = 0
        self.bytes = 0
        self._lock = threading.Lock()
        self._last_draw = 0.0
        self._last_step = -1
        self._printed = -1

    def advance(self, size: int) -> None:
        with self._lock:
            self.records += 1
            self.bytes += max(size, 0)
            self._draw(final=False)

    def finish(self) -> None:
        with self._lock:
            self._draw(final=True)
            if self.tty:
                self.out.write("\n")
            self.out.flush()

    def _line(self) -> str:
        total = max(self.expected, self.records, 1)
        filled = int(30 * self.records / total)
        bar = "#" * filled + "." * (30 - filled)
        return (
            f"pruning [{bar}] {self.records}/{max(self.expected, self.records)} records, "
            f"{format_bytes(self.bytes)}"
        )

    def _draw(self, *, final: bool) -> None:
        if self.tty:
            now = time.monotonic()
            if final or now - self._last_draw >= 0.1:
                self._last_draw = now
                self.out.write("\r" + self._line())
                self.out.flush()
            return
        step = 10 * self.records // max(self.expected, self.records, 1)
        if step > self._last_step or (final and self.records != self._printed):
            self._last_step = step
            self._printed = self.records
            self.out.write(self._line() + "\n")


class _PruneProgress(CacheListener, pykka.ThreadingActor):
    """Receives ``record_pruned`` tells and advances the progress bar."""

    def __init__(self, bar: _ProgressBar) -> None:
        super().__init__()
        self.bar = bar

    def record_pruned(self, info: UsageInfo) -> None:
        self.bar.advance(info.size)


def _policy(args: argparse.Namespace) -> PrunePolicy:
    # Everything is parsed before anything is opened: a bad value changes nothing.
    return PrunePolicy(
        all=args.all,
        filters=tuple(args.filter),
        keep_duration=parse_duration(args.keep_duration) if args.keep_duration else None,
        reserved_space=parse_size(args.reserved_space) if args.reserved_space else 0,
        max_used_space=parse_size(args.max_used_space) if args.max_used_space else 0,
        min_free_space=parse_size(args.min_free_space) if args.min_free_space else 0,
    )


def _print_records(rows: Sequence[UsageInfo], verb: str) -> None:
    for r in rows:
        print(f"{verb} {r.id}\t{format_bytes(r.size)}\t{r.description}")


def _cmd_prune(args: argparse.Namespace) -> int:
    policy = _policy(args)
    root: Path = args.root
    if args.dry_run:
        plan = offline_prune_plan(root, [policy])
        _print_records(plan, "would delete")
        reclaim = sum(max(r.size, 0) for r in plan)
        print(f"Would reclaim {format_bytes(reclaim)} in {len(plan)} records")
        return EXIT_OK
    if not (root / "meta").is_dir():
        msg = f"no refcache cache at {root} (no {root / 'meta'} directory)"
        raise UsageError(msg)
    try:
        cache = open_cache(root)
    except LockedError as exc:
        msg = (
            f"cannot prune {root}: the cache is open in another process; stop it first "
            f"(du, inspect and check work while it is open) [{exc}]"
        )
        raise UsageError(msg) from exc
    with cache:
        # Nothing else can hold a handle yet: the plan is what this prune will delete.
        expected = len(offline_prune_plan(root, [policy]))
        bar = _ProgressBar(expected, sys.stderr)
        listener = _PruneProgress.start(bar)
        try:
            cache.manager.subscribe(listener).get(timeout=60)
            deleted = cache.manager.prune(policy).get(timeout=7 * 24 * 3600)
        finally:
            listener.stop()  # processes the events already told first
        bar.finish()
    if args.verbose:
        _print_records(deleted, "deleted")
    reclaimed = sum(max(r.size, 0) for r in deleted)
    print(f"Reclaimed {format_bytes(reclaimed)} in {len(deleted)} records")
    return EXIT_OK


# -- inspect ---------------------------------------------------------------------------------------


def _tree_lines(table: dict[str, TableRow], rid: str) -> list[str]:
    lines: list[str] = []

    def label(node_id: str) -> str:
        node = table.get(node_id)
        if node is None:
            return f"{node_id}  (missing)"
        size = format_bytes(node.size) if node.size >= 0 else "size unknown"
        desc = f"  {node.description!r}" if node.description else ""
        return f"{node_id}  {node.kind}{' mutable' if node.mutable else ''}  {size}{desc}"

    lines.append(label(rid))
    # (id, prefix, is_last, seen-on-path)
    stack: list[tuple[str, str, bool, frozenset[str]]] = []
    root = table.get(rid)
    if root is not None:
        parents = root.parent_ids()
        for i, p in reversed(list(enumerate(parents))):
            stack.append((p, "", i == len(parents) - 1, frozenset({rid})))
    while stack:
        node_id, prefix, last, path = stack.pop()
        branch = "└── " if last else "├── "
        if node_id in path:
            lines.append(f"{prefix}{branch}{node_id}  (cycle)")
            continue
        lines.append(prefix + branch + label(node_id))
        node = table.get(node_id)
        if node is None:
            continue
        parents = node.parent_ids()
        child_prefix = prefix + ("    " if last else "│   ")
        for i, p in reversed(list(enumerate(parents))):
            stack.append((p, child_prefix, i == len(parents) - 1, path | {node_id}))
    return lines


def _details_dict(d: RecordDetails) -> dict[str, Any]:
    row = d.row
    return {
        "id": d.id,
        "kind": row.kind,
        "mutable": row.mutable,
        "parents": list(row.parent_ids()),
        "children": d.children,
        "holders": row.holders,
        "equal_mutable": row.equal_mutable,
        "equal_immutable": row.equal_immutable,
        "snapshot_id": row.snapshot_id,
        "size": d.size,
        "size_cached": row.size >= 0,
        "description": row.description,
        "record_type": row.record_type or "regular",
        "created_at": row.created_at,
        "last_used_at": row.last_used_at,
        "usage_count": row.usage_count,
        "blob": row.blob,
        "blob_only": row.blob_only,
        "layers": d.layers,
        "metadata": d.metadata,
        "leases": d.leases,
        "snapshot": d.snapshot,
    }


def _cmd_inspect(args: argparse.Namespace) -> int:
    details = inspect_record(args.root, args.id)
    doc = _details_dict(details)
    if args.format == "json":
        doc["parent_tree"] = _tree_lines(details.table, details.id)
        print(json.dumps(doc, indent=2, default=str))
        return EXIT_OK
    plain = (
        ("ID", doc["id"]),
        ("Kind", doc["kind"]),
        ("Mutable", str(doc["mutable"]).lower()),
        ("Type", doc["record_type"]),
        ("Description", doc["description"]),
        ("Size", format_bytes(doc["size"]) + ("" if doc["size_cached"] else " (measured now)")),
        ("Created at", _when(doc["created_at"])),
        ("Last used", _ago(doc["last_used_at"]) or "never"),
        ("Usage count", doc["usage_count"]),
        ("Parents", ", ".join(doc["parents"])),
        ("Children", ", ".join(doc["children"])),
        ("Held by", f"{doc['holders']} child record slot(s)"),
        ("Equal mutable", doc["equal_mutable"] or ""),
        ("Equal immutable", doc["equal_immutable"] or ""),
        ("Snapshot", doc["snapshot_id"]),
        ("Blob", doc["blob"]),
        ("Blob only", str(doc["blob_only"]).lower()),
        ("Layers", ", ".join(doc["layers"])),
    )
    for name, value in plain:
        print(f"{name + ':':<17}{value}")
    snap = doc["snapshot"]
    if snap is None:
        print(f"{'Snapshot state:':<17}missing")
    else:
        parent = f", parent {snap['parent']}" if snap["parent"] else ""
        print(f"{'Snapshot state:':<17}{snap['kind']}{parent}")
    print("Leases:")
    for lease_id, resources in doc["leases"].items():
        print(f"  {lease_id}: {', '.join(resources) or '(no resources)'}")
    if not doc["leases"]:
        print("  (none)")
    print("Metadata:")
    for key in sorted(doc["metadata"]):
        print(f"  {key} = {doc['metadata'][key]!r}")
    print("Parent tree:")
    for line in _tree_lines(details.table, details.id):
        print(f"  {line}")
    return EXIT_OK


# -- check -----------------------------------------------------------------------------------------


def _cmd_check(args: argparse.Namespace) -> int:
    root: Path = args.root
    if not (root / "meta").is_dir():
        msg = f"no refcache cache at {root} (no {root / 'meta'} directory)"
        raise UsageError(msg)
    if args.fix:
        try:
            fixed = repair(root)
        except LockedError as exc:
            msg = f"cannot repair {root}: the cache is open in another process; stop it first"
            raise UsageError(msg) from exc
        for line in fixed:
            print(f"fixed: {line}")
    problems = check(root)
    with read_only_env(root) as env:
        pending = offline_table(env).deleted
    for line in problems:
        print(line)
    if pending:
        print(
            f"note: {len(pending)} record(s) from an interrupted prune are removed at the next "
            "open: " + ", ".join(sorted(pending)[:5]) + (" ..." if len(pending) > 5 else "")
        )
    if problems:
        print(f"{len(problems)} problem(s) found", file=sys.stderr)
        return EXIT_PROBLEMS
    print("cache is consistent")
    return EXIT_OK


# -- smoke -----------------------------------------------------------------------------------------


def _cmd_smoke(args: argparse.Namespace) -> int:
    """Opens the cache, creates, commits and releases a record, prints disk usage."""
    try:
        cache = open_cache(args.root)
    except LockedError as exc:
        msg = f"cannot open {args.root}: the cache is open in another process"
        raise UsageError(msg) from exc
    with cache:
        manager = cache.manager
        scratch = manager.new(description="smoke: scratch layer").get(timeout=60)
        with scratch.mount().local() as path:
            (path / "hello.txt").write_text("hello from refcache\n")
        layer = scratch.commit()
        layer.finalize()
        print(f"committed {layer.id}: {format_bytes(layer.size())}")
        layer.release()
        _print_usage(manager.disk_usage().get(timeout=60), verbose=False, out=sys.stdout)
    return EXIT_OK


# -- parser ----------------------------------------------------------------------------------------


def _register_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Registration point of the ``demo`` subcommand (``actors/_demo.py``, owned separately).

    Contract: when the module ``actors._demo`` exists it defines ``add_parser(subparsers)``,
    which adds a ``demo`` parser and sets its ``func`` (``func(args) -> int``, raising
    :class:`UsageError` or ``RefcacheError`` for user errors). The module is imported only
    here, when the parser is built; without it there is simply no ``demo`` command.
    """
    try:
        module = importlib.import_module("._demo", __package__)
    except ModuleNotFoundError as exc:
        if exc.name == f"{__package__}._demo":
            return  # not there (yet): no demo command
        raise
    module.add_parser(sub)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refcache", description="Inspect and maintain a refcache layer cache."
    )
    parser.add_argument("--root", type=Path, default=Path("refcache-data"), help="cache directory")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    du = sub.add_parser("du", help="disk usage (like buildctl du); works while the cache is open")
    du.add_argument("--verbose", "-v", action="store_true", help="every field of every record")
    du.add_argument("--filter", "-f", action="append", default=[], help="containerd filter")
    du.add_argument("--format", choices=("table", "json"), default="table")
    du.set_defaults(func=_cmd_du)

    pr = sub.add_parser("prune", help="delete unreferenced records (needs the cache closed)")
    pr.add_argument("--all", "-a", action="store_true", help="include internal/frontend/shared")
    pr.add_argument("--filter", "-f", action="append", default=[], help="containerd filter")
    pr.add_argument("--keep-duration", help="keep records used within this long (e.g. 48h)")
    pr.add_argument("--reserved-space", help="never prune the cache below this (e.g. 10GB)")
    pr.add_argument("--max-used-space", help="prune down to this size")
    pr.add_argument("--min-free-space", help="prune until the disk has this much free")
    pr.add_argument("--dry-run", action="store_true", help="list what would go; change nothing")
    pr.add_argument("--verbose", "-v", action="store_true", help="list every deleted record")
    pr.set_defaults(func=_cmd_prune)

    ins = sub.add_parser("inspect", help="every field of one record and its parent tree")
    ins.add_argument("id", help="record id (or a unique prefix)")
    ins.add_argument("--format", choices=("text", "json"), default="text")
    ins.set_defaults(func=_cmd_inspect)

    ck = sub.add_parser("check", help="consistency check (exit 1 on problems)")
    ck.add_argument("--fix", action="store_true", help="first repair what is safe (cache closed)")
    ck.set_defaults(func=_cmd_check)

    sm = sub.add_parser("smoke", help="create, commit and release one record; print du")
    sm.set_defaults(func=_cmd_smoke)

    # -- the demo command is registered here (see _register_demo) --
    _register_demo(sub)
    # -- push and pull (actors/_cli_registry.py) --
    _register_registry(sub)
    return parser


def _register_registry(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Registration point of ``push`` and ``pull`` (``actors/_cli_registry.py``).

    Contract as for the demo: ``add_parsers(subparsers)`` adds the parsers and sets their
    ``func``; user errors are raised as ``RefcacheError`` (one line, exit code 2).
    """
    importlib.import_module("._cli_registry", __package__).add_parsers(sub)


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
        print(f"refcache {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("refcache: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
