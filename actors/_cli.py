"""The ``refcache`` command line: ``du``, ``prune``, ``inspect``, ``check``, ``smoke``
(``push``/``pull``: ``actors/_cli_registry.py``, ``demo``: ``actors/_demo.py``).

``du``, ``inspect``, ``check`` and ``prune --dry-run`` only read, and work on a cache that
another process has open (LMDB readers never block its writer; handles held in that process
cannot be seen, so ``du`` shows what would be reclaimable with no handle open). ``prune``,
``check --fix`` and ``smoke`` open the cache, so they need it closed elsewhere and say so
clearly when it is not.

The cache is ``--root DIR`` (before or after the command), else ``$REFCACHE_ROOT``, else
``./refcache-data``. Commands about an existing cache (``du``, ``prune``, ``inspect``,
``check``) never create one: no cache there is an error. ``smoke`` and ``demo`` create it.

``prune`` asks before deleting, as ``docker builder prune`` does (``-f``/``--force`` does
not ask, ``--dry-run`` changes nothing and never asks).

Exit codes: 0 success; 1 failure (``check`` found problems, the cache is busy, a prune was
not confirmed, no cache at the root, an unreadable disk); 2 a usage error (bad option, size,
duration or filter: nothing was read or changed); 130 interrupted (Ctrl-C; the cache is
left consistent); 141 stdout was closed early (``refcache du | head``). Errors are one line
on stderr, never a traceback.

Run as ``refcache`` (the console script) or ``python -m refcache.actors._cli``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

import pykka

from ..storage import (
    CorruptedError,
    InvalidError,
    LockedError,
    RefcacheError,
    cache_in_use,
    check,
    repair,
    trash_usage,
)
from ._cache import open_cache
from ._cliutil import (
    CommandFailedError,
    InterruptedCommandError,
    UsageError,
    ago,
    busy,
    existing_cache,
    format_bytes,
    format_duration,
    format_duration_ns,
    hold_interrupts,
    parse_duration,
    parse_size,
    parse_until,
    resolve_root,
    safe,
    sort_usage,
    usage_lines,
    usage_table,
    usage_totals,
    when,
)
from ._listeners import CacheListener
from ._load import logger as _load_logger
from ._offline import (
    RecordDetails,
    inspect_record,
    offline_prune_plan,
    offline_usage,
    pending_removals,
    stored_ids,
)
from ._rows import TableRow
from ._types import PrunePolicy, UsageInfo
from ._usage import parse_usage_filters

__all__ = [
    "EXIT_BROKEN_PIPE",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "UsageError",
    "format_bytes",
    "format_duration",
    "main",
    "parse_duration",
    "parse_size",
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # what a shell reports for a program stopped by SIGPIPE

EPILOG = """\
The cache is --root DIR (before or after the command), else $REFCACHE_ROOT, else
./refcache-data. du, prune, inspect and check need an existing cache there (no cache is an
error, nothing is created); smoke and demo create one.

exit status:
  0    success
  1    failure: check found problems, the cache is busy (open in another process), a prune
       was not confirmed, no cache at the root, the disk or the metadata cannot be read
  2    usage error: unknown option, bad size, duration or filter (nothing was read or
       changed)
  130  interrupted (Ctrl-C): stopped cleanly, what was done is kept, the cache is consistent
  141  stdout was closed early (e.g. piped into head)
"""

# -- the root ------------------------------------------------------------------------------------


def _new_or_existing_root(root: Path) -> Path:
    """For commands that create the cache: ``root`` must be a directory or not exist yet."""
    if root.exists() and not root.is_dir():
        msg = f"{root} is not a directory: a cache needs a directory of its own"
        raise CommandFailedError(msg)
    return root


def _open(root: Path, what: str) -> Any:
    try:
        return open_cache(root)
    except LockedError as exc:
        raise busy(root, what) from exc


def _close(cache: Any) -> None:
    with hold_interrupts("closing the cache cleanly"):
        cache.close()


# -- values --------------------------------------------------------------------------------------


def _option(option: str, text: str | None, parse: Any) -> Any:
    """``parse(text)`` with the option named in the error; None when the option is absent."""
    if text is None:
        return None
    try:
        return parse(text)
    except UsageError as exc:
        msg = f"{option}: {exc}"
        raise UsageError(msg) from None


_UNTIL_RE = re.compile(r"(until|unused-for)==?(.*)", re.DOTALL)


def _filters(values: Sequence[str]) -> tuple[tuple[str, ...], timedelta | None]:
    """The record filters, and docker's ``until=`` filter (a keep duration) when given.

    Raises:
        UsageError: a filter that does not parse or names an unknown field; ``until`` given
            twice or inside another filter; a bad ``until`` value.
    """
    keep: list[str] = []
    until: timedelta | None = None
    for text in values:
        m = _UNTIL_RE.fullmatch(text)
        if m is not None:
            if until is not None:
                msg = f"invalid filter {text!r}: only one until filter may be given"
                raise UsageError(msg)
            until = _option("--filter until", m.group(2), parse_until)
            continue
        if any(_UNTIL_RE.fullmatch(piece.strip()) for piece in text.split(",")):
            msg = f"invalid filter {text!r}: give until=... as a --filter of its own"
            raise UsageError(msg)
        keep.append(text)
    try:
        parse_usage_filters(*keep)
    except InvalidError as exc:
        raise UsageError(str(exc)) from None
    return tuple(keep), until


def _policy(args: argparse.Namespace) -> PrunePolicy:
    """The prune's policy; every value is parsed before anything is read or opened."""
    if args.stray:
        extra = args.stray[0]
        hint = ""
        if "=" in extra or "~" in extra:
            hint = " (-f is --force here, as in docker builder prune; filters go in --filter)"
        msg = f"unexpected argument {extra!r}{hint}"
        raise UsageError(msg)
    filters, until = _filters(args.filter)
    keep_duration = _option("--keep-duration", args.keep_duration, parse_duration)
    if until is not None and keep_duration is not None:
        msg = "--keep-duration and --filter until=... both set how long to keep; give one"
        raise UsageError(msg)
    if until is not None:
        keep_duration = until
    reserved = _option("--reserved-space", args.reserved_space, parse_size)
    keep_storage = _option(
        "--keep-storage", args.keep_storage, lambda t: parse_size(t, bare_unit=10**6)
    )
    if reserved is not None and keep_storage is not None:
        msg = "--keep-storage is the older name of --reserved-space; give one of them"
        raise UsageError(msg)
    return PrunePolicy(
        all=args.all,
        filters=filters,
        keep_duration=keep_duration or None,
        reserved_space=reserved if reserved is not None else keep_storage or 0,
        max_used_space=_option("--max-used-space", args.max_used_space, parse_size) or 0,
        min_free_space=_option("--min-free-space", args.min_free_space, parse_size) or 0,
    )


def _print_lines(lines: Sequence[str], out: TextIO | None = None) -> None:
    stream = out or sys.stdout
    for line in lines:
        stream.write(line + "\n")


def _print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")


def _record_json(r: UsageInfo) -> dict[str, Any]:
    return dataclasses.asdict(r)


# -- du ------------------------------------------------------------------------------------------


def _cmd_du(args: argparse.Namespace) -> int:
    filters, until = _filters(args.filter)
    root = existing_cache(args.root)
    rows = offline_usage(root, filters, age_limit=until)
    if args.format == "json":
        ordered = sort_usage(rows)
        _print_json({"records": [_record_json(r) for r in ordered], "totals": usage_totals(rows)})
    else:
        _print_lines(usage_lines(rows, verbose=args.verbose))
    return EXIT_OK


# -- prune ---------------------------------------------------------------------------------------


class _ProgressBar:
    """A progress line on stderr: redrawn in place on a terminal, every 10 % otherwise.

    A stderr that goes away (a closed pipe) silences the bar; the prune goes on.
    """

    def __init__(self, expected: int, out: TextIO) -> None:
        self.expected = expected
        self.out = out
        self.tty = _isatty(out)
        self.records = 0
        self.bytes = 0
        self._lock = threading.Lock()
        self._last_draw = 0.0
        self._last_step = -1
        self._printed = -1
        self._broken = False

    def advance(self, size: int) -> None:
        with self._lock:
            self.records += 1
            self.bytes += max(size, 0)
            self._draw(final=False)

    def finish(self) -> None:
        with self._lock:
            if self.records == 0 and not self.tty:
                return
            self._draw(final=True)
            if self.tty:
                self._write("\n")

    def _write(self, text: str) -> None:
        if self._broken:
            return
        try:
            self.out.write(text)
            self.out.flush()
        except (OSError, ValueError):
            self._broken = True

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
                self._write("\r" + self._line())
            return
        step = 10 * self.records // max(self.expected, self.records, 1)
        if step > self._last_step or (final and self.records != self._printed):
            self._last_step = step
            self._printed = self.records
            self._write(self._line() + "\n")


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (OSError, ValueError):
        return False


class _PruneProgress(CacheListener, pykka.ThreadingActor):
    """Receives ``record_pruned`` tells and advances the progress bar."""

    def __init__(self, bar: _ProgressBar) -> None:
        super().__init__()
        self.bar = bar

    def record_pruned(self, info: UsageInfo) -> None:
        self.bar.advance(info.size)


def _records(n: int) -> str:
    return f"{n} record{'' if n == 1 else 's'}"


def _describe(policy: PrunePolicy) -> str:
    """What a policy selects, in words (the confirmation question)."""
    parts = [
        "records no one holds"
        + ("" if policy.all else " (internal, frontend and shared records are kept)")
    ]
    if policy.filters:
        parts.append("matching " + " or ".join(repr(f) for f in policy.filters))
    if policy.keep_duration:
        ns = policy.keep_duration // timedelta(microseconds=1) * 1000
        parts.append(f"not used in the last {format_duration_ns(ns)}")
    # BuildKit's size rules stop once the cache is below the bytes to keep.
    if policy.max_used_space:
        parts.append(f"until the cache uses less than {format_bytes(policy.max_used_space)}")
    if policy.reserved_space:
        parts.append(
            f"until the cache is below {format_bytes(policy.reserved_space)} (reserved space)"
        )
    if policy.min_free_space:
        parts.append(f"until the disk has {format_bytes(policy.min_free_space)} free")
    return safe(", ".join(parts))


def _confirm(root: Path, policy: PrunePolicy, plan: Sequence[UsageInfo]) -> None:
    """Asks on stderr and reads the answer from stdin (a terminal or a pipe), as docker does.

    Raises:
        CommandFailedError: anything but y/yes, or no answer at all (end of input).
    """
    size = sum(max(r.size, 0) for r in plan)
    count = _records(len(plan))
    sys.stderr.write(
        f"WARNING! This will delete {count} ({format_bytes(size)}) from the cache at "
        f"{safe(os.path.abspath(root))}:\n  {_describe(policy)}\n"
        "Are you sure you want to continue? [y/N] "
    )
    sys.stderr.flush()
    try:
        answer = sys.stdin.readline() if sys.stdin is not None else ""
    except (OSError, ValueError, UnicodeDecodeError):
        answer = ""
    if not answer or not _isatty(sys.stdin):
        sys.stderr.write("\n")  # the answer was not echoed: end the question's line
    if not answer:
        msg = "no answer (end of input): nothing was deleted; -f/--force prunes without asking"
        raise CommandFailedError(msg)
    if answer.strip().lower() not in ("y", "yes"):
        msg = "not confirmed: nothing was deleted"
        raise CommandFailedError(msg)


def _run_prune(root: Path, policy: PrunePolicy, plan: Sequence[UsageInfo]) -> list[UsageInfo]:
    """The live prune with a progress bar; Ctrl-C stops it cleanly (exit code 130)."""
    cache = _open(root, "prune")
    bar = _ProgressBar(len(plan), sys.stderr)
    listener = _PruneProgress.start(bar)
    deleted: list[UsageInfo] | None = None
    try:
        cache.manager.subscribe(listener).get(timeout=60)
        deleted = cache.manager.prune(policy).get(timeout=7 * 24 * 3600)
    except KeyboardInterrupt:
        pass  # closing the cache below stops the prune after the batch in progress
    finally:
        # The prune job's next question to the manager fails once it is stopped: records
        # are deleted whole (a removal cut short is finished at the next open).
        _close(cache)
        listener.stop()  # processes the events already told first
        bar.finish()
    if deleted is None:
        # Counted from what is stored now: a batch can be deleted after its last event.
        stored = stored_ids(root)
        gone = [r for r in plan if r.id not in stored]
        flagged = sum(1 for r in plan if stored.get(r.id))
        started = (
            f", {flagged} more flagged (finished by the next open or refcache check --fix)"
            if flagged
            else ""
        )
        size = format_bytes(sum(max(r.size, 0) for r in gone))
        msg = (
            f"interrupted: {_records(len(gone))} ({size}) deleted before the prune stopped"
            f"{started}; the rest are kept and the cache is consistent"
        )
        raise InterruptedCommandError(msg)
    return deleted


def _report_prune(
    args: argparse.Namespace, root: Path, rows: Sequence[UsageInfo], *, dry_run: bool
) -> None:
    total = sum(max(r.size, 0) for r in rows)
    if args.format == "json":
        _print_json(
            {
                "root": os.path.abspath(root),
                "dry_run": dry_run,
                "records": [_record_json(r) for r in rows],
                "count": len(rows),
                "total": total,
            }
        )
        return
    lines: list[str] = []
    if rows and (args.verbose or dry_run):
        lines += usage_table(rows)  # in deletion order, as buildctl streams them
    lines.append(f"Total:\t\t{format_bytes(total)}")
    if dry_run:
        lines.append(f"dry run: {_records(len(rows))} would be deleted; nothing was changed")
    _print_lines(lines)


def _cmd_prune(args: argparse.Namespace) -> int:
    policy = _policy(args)
    root = existing_cache(args.root)
    if args.dry_run:
        _report_prune(args, root, offline_prune_plan(root, [policy]), dry_run=True)
        return EXIT_OK
    if cache_in_use(root):
        raise busy(root, "prune")
    # With the cache closed, the plan is what the prune will delete (the same planning).
    plan = offline_prune_plan(root, [policy])
    if not plan:
        _report_prune(args, root, [], dry_run=False)
        return EXIT_OK
    if not args.force:
        _confirm(root, policy, plan)
    deleted = _run_prune(root, policy, plan)
    _report_prune(args, root, deleted, dry_run=False)
    return EXIT_OK


# -- inspect -------------------------------------------------------------------------------------


def _tree_lines(table: dict[str, TableRow], rid: str) -> list[str]:
    lines: list[str] = []

    def label(node_id: str) -> str:
        node = table.get(node_id)
        if node is None:
            return f"{safe(node_id)}  (missing)"
        size = format_bytes(node.size) if node.size >= 0 else "size unknown"
        desc = f"  {node.description!r}" if node.description else ""
        kind = f"{node.kind}{' mutable' if node.mutable else ''}"
        return safe(f"{node_id}  {kind}  {size}{desc}")

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
            lines.append(f"{prefix}{branch}{safe(node_id)}  (cycle)")
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
    root = existing_cache(args.root)
    details = inspect_record(root, args.id)
    doc = _details_dict(details)
    if args.format == "json":
        doc["parent_tree"] = _tree_lines(details.table, details.id)
        _print_json(doc)
        return EXIT_OK
    plain = (
        ("ID", doc["id"]),
        ("Kind", doc["kind"]),
        ("Mutable", str(doc["mutable"]).lower()),
        ("Type", doc["record_type"]),
        ("Description", doc["description"]),
        ("Size", format_bytes(doc["size"]) + ("" if doc["size_cached"] else " (measured now)")),
        ("Created at", when(doc["created_at"])),
        ("Last used", ago(doc["last_used_at"]) or "never"),
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
    lines = [f"{name + ':':<17}{safe(value)}" for name, value in plain]
    snap = doc["snapshot"]
    if snap is None:
        lines.append(f"{'Snapshot state:':<17}missing")
    else:
        parent = f", parent {snap['parent']}" if snap["parent"] else ""
        lines.append(f"{'Snapshot state:':<17}{safe(snap['kind'] + parent)}")
    lines.append("Leases:")
    for lease_id, resources in doc["leases"].items():
        lines.append(safe(f"  {lease_id}: {', '.join(resources) or '(no resources)'}"))
    if not doc["leases"]:
        lines.append("  (none)")
    lines.append("Metadata:")
    lines += [safe(f"  {key} = {doc['metadata'][key]!r}") for key in sorted(doc["metadata"])]
    lines.append("Parent tree:")
    lines += [f"  {line}" for line in _tree_lines(details.table, details.id)]
    _print_lines(lines)
    return EXIT_OK


# -- check ---------------------------------------------------------------------------------------


def _fix(root: Path) -> list[str]:
    """Repairs offline what is safe: what opening the cache does, then orphans and links.

    Opening finishes removals an interrupted prune left (``cache.deleted``) and removes the
    records that cannot load (a mutable record without its active snapshot after a crash,
    a record whose parent is gone, a lazy record without its blob, undecodable metadata),
    with their descendants; it also clears leftover work directories. ``storage.repair``
    then removes orphan files and directories and dangling lease links.

    Returns:
        One line per repair: each problem ``check`` reported that is gone now (in its
        words), then what else was done (descendants removed, interrupted removals
        finished).
    """
    before = check(root)
    # Opening logs each record it removes; the lines returned say it once.
    quiet = _load_logger.disabled
    _load_logger.disabled = True
    try:
        cache = _open(root, "repair")
    finally:
        _load_logger.disabled = quiet
    report = cache.load_report
    _close(cache)
    try:
        repaired = repair(root)
    except LockedError as exc:
        raise busy(root, "repair") from exc
    after = set(check(root))
    fixed = [p for p in before if p not in after]
    named = "\n".join(fixed)
    more = [(rid, f"removed record {rid}: {why}") for rid, why in report.cleared]
    more += [
        (rid, f"finished the interrupted removal of record {rid}")
        for rid in report.finished_deletes
    ]
    more += [
        (rid, f"recovered record {rid}: committed before a crash, its metadata is now complete")
        for rid in report.recovered_half_finalized
    ]
    fixed += [line for rid, line in more if rid not in named]
    fixed += [line for line in repaired if line.rsplit(" ", 1)[-1] not in named]
    return fixed


_OPENING_CLEARS = re.compile(
    r"record (\S+): (corrupt metadata|parent .* does not exist|equal mutable .* does not exist"
    r"|mutable record has no active snapshot)"
)
_DATA_GONE = re.compile(r"record (\S+): snapshot \S+ is missing")
_REPAIR_REMOVES = re.compile(
    r"(content: blob file .* has no metadata|snapshots: directory .* belongs to no snapshot"
    r"|leases: resource .* of missing lease)"
)


def _remedy(problem: str, root: Path, *, fixed: bool) -> str:
    """What repairs a problem ``check`` reported, as a command to run."""
    if not fixed and _OPENING_CLEARS.match(problem):
        return "refcache check --fix removes the record, as opening the cache would"
    if not fixed and _REPAIR_REMOVES.match(problem):
        return "refcache check --fix removes it"
    if problem.startswith("metadata: "):
        return (
            "the metadata environment is damaged, which no repair here restores: restore "
            f"{root / 'meta'} from a backup, or move {root} aside and start a new cache"
        )
    m = _DATA_GONE.match(problem)
    if m:
        return (
            f"the record's data is gone, which no repair restores: refcache --root {root} "
            f"prune -f --all --filter id=={m.group(1)} deletes the record once no other "
            "record is built on it"
        )
    return (
        "the data it names is gone, which no repair restores; prune the records that need "
        "it (refcache inspect ID shows a record's blob and snapshot)"
    )


def _cmd_check(args: argparse.Namespace) -> int:
    root = existing_cache(args.root)
    fixed: list[str] = []
    if args.fix:
        if cache_in_use(root):
            raise busy(root, "repair")
        # A damaged metadata environment is check's finding below (one line), not a crash.
        with contextlib.suppress(CorruptedError):
            fixed = _fix(root)
    problems = check(root)
    remedies = [_remedy(p, root, fixed=args.fix) for p in problems]
    damaged = any(p.startswith("metadata: ") for p in problems)
    pending = [] if damaged else pending_removals(root)
    # Trees forgotten by the metadata, deleted in the background: no problem, but disk space.
    trash = trash_usage(root)
    if args.format == "json":
        _print_json(
            {
                "root": os.path.abspath(root),
                "consistent": not problems,
                "problems": [
                    {"problem": p, "remedy": r} for p, r in zip(problems, remedies, strict=True)
                ],
                "fixed": fixed,
                "pending_removals": pending,
                "trash": {"entries": trash.entries, "bytes": trash.bytes},
            }
        )
        return EXIT_FAILURE if problems else EXIT_OK
    lines = [f"fixed: {safe(line)}" for line in fixed]
    for problem, remedy in zip(problems, remedies, strict=True):
        lines += [safe(problem), f"  to repair: {safe(remedy)}"]
    if pending:
        lines.append(
            f"note: {_records(len(pending))} from an interrupted prune are removed by "
            "check --fix or the next open: "
            + safe(", ".join(pending[:5]))
            + (" ..." if len(pending) > 5 else "")
        )
    if trash.entries:
        lines.append(
            f"note: {trash.entries} removed tree(s), {format_bytes(trash.bytes)}, wait in "
            f"{root / 'trash'} to be deleted in the background (by the open cache, or the "
            "next open)"
        )
    if not problems:
        lines.append("cache is consistent")
    _print_lines(lines)
    if problems:
        sys.stdout.flush()
        sys.stderr.write(f"{len(problems)} problem(s) found\n")
        return EXIT_FAILURE
    return EXIT_OK


# -- smoke ---------------------------------------------------------------------------------------


def _cmd_smoke(args: argparse.Namespace) -> int:
    """Opens the cache, creates, commits and releases a record, prints disk usage."""
    root = _new_or_existing_root(args.root)
    cache = _open(root, "open")
    try:
        manager = cache.manager
        scratch = manager.new(description="smoke: scratch layer").get(timeout=60)
        with scratch.mount().local() as path:
            (path / "hello.txt").write_text("hello from refcache\n")
        layer = scratch.commit()
        layer.finalize()
        print(f"committed {layer.id}: {format_bytes(layer.size())}")
        layer.release()
        _print_lines(usage_lines(manager.disk_usage().get(timeout=60)))
    finally:
        _close(cache)
    return EXIT_OK


# -- parser --------------------------------------------------------------------------------------


def _register_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Registration point of the ``demo`` subcommand (``actors/_demo.py``).

    Contract: when the module ``actors._demo`` exists it defines ``add_parser(subparsers)``,
    which adds a ``demo`` parser (with its own ``--root``, default ``argparse.SUPPRESS``)
    and sets its ``func`` (``func(args) -> int``; ``args.root`` is the resolved ``Path``;
    it raises :class:`UsageError`, ``CommandFailedError`` or ``RefcacheError`` for user errors).
    """
    try:
        module = importlib.import_module("._demo", __package__)
    except ModuleNotFoundError as exc:
        if exc.name == f"{__package__}._demo":
            return  # not there: no demo command
        raise
    module.add_parser(sub)


def _version() -> str:
    try:
        return metadata.version("refcache")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refcache",
        description="Inspect and maintain a refcache layer cache.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"refcache {_version()}")
    root_help = "cache directory (default: $REFCACHE_ROOT, else ./refcache-data)"
    parser.add_argument("--root", metavar="DIR", default=None, help=root_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name, help=help_text, description=help_text, epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip
        # --root after the command too (SUPPRESS: the one before the command stays).
        p.add_argument("--root", metavar="DIR", default=argparse.SUPPRESS, help=root_help)
        return p

    filter_help = (
        "containerd filter over id, parents, description, type, inuse, mutable, immutable, "
        "shared, private (several: OR); until=DURATION|TIMESTAMP as docker's"
    )
    du = command("du", "disk usage (like buildctl du); works while the cache is open")
    du.add_argument("--verbose", "-v", action="store_true", help="every field of every record")
    du.add_argument("--filter", "-f", action="append", default=[], help=filter_help)
    du.add_argument("--format", choices=("table", "json"), default="table")
    du.set_defaults(func=_cmd_du)

    pr = command(
        "prune",
        "delete records no one holds (asks first; needs the cache closed elsewhere)",
    )
    pr.add_argument("--force", "-f", action="store_true", help="do not ask for confirmation")
    pr.add_argument("--all", "-a", action="store_true", help="include internal/frontend/shared")
    pr.add_argument("--filter", action="append", default=[], help=filter_help)
    pr.add_argument("--keep-duration", help="keep records used within this long (e.g. 48h)")
    pr.add_argument("--reserved-space", help="never prune the cache below this (e.g. 10GB)")
    pr.add_argument(
        "--keep-storage",
        metavar="SIZE",
        help="buildctl's older name for --reserved-space; a bare number is MB, as in buildctl",
    )
    pr.add_argument("--max-used-space", help="prune down to this size (e.g. 20GB)")
    pr.add_argument("--min-free-space", help="prune until the disk has this much free")
    pr.add_argument("--dry-run", action="store_true", help="list what would go; change nothing")
    pr.add_argument("--verbose", "-v", action="store_true", help="a table of deleted records")
    pr.add_argument("--format", choices=("table", "json"), default="table")
    pr.add_argument("stray", nargs="*", help=argparse.SUPPRESS)
    pr.set_defaults(func=_cmd_prune)

    ins = command("inspect", "every field of one record and its parent tree")
    ins.add_argument("id", help="record id (or a unique prefix)")
    ins.add_argument("--format", choices=("text", "json"), default="text")
    ins.set_defaults(func=_cmd_inspect)

    ck = command("check", "consistency check (exit 1 on problems)")
    ck.add_argument(
        "--fix",
        action="store_true",
        help="first repair what is safe offline: what opening the cache repairs, orphan "
        "files and directories, dangling lease links (needs the cache closed)",
    )
    ck.add_argument("--format", choices=("text", "json"), default="text")
    ck.set_defaults(func=_cmd_check)

    sm = command("smoke", "create, commit and release one record; print du (creates the cache)")
    sm.set_defaults(func=_cmd_smoke)

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


# -- main ----------------------------------------------------------------------------------------


def _say(command: str, message: object) -> None:
    # One line, whatever the message holds.
    text = safe(str(message))
    try:
        sys.stderr.write(f"refcache {command}: {text}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _os_message(exc: OSError) -> str:
    where = f": {exc.filename}" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


def _quiet_stdout() -> None:
    # stdout is gone: point it at /dev/null so that the interpreter's last flush is silent.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def main(
    argv: Sequence[str] | None = None, *, serve_metrics: Callable[[Any, int], Any] | None = None
) -> int:
    """The ``refcache`` command line; returns the exit code.

    Args:
        argv: The arguments (default ``sys.argv[1:]``).
        serve_metrics: ``(cache, port) -> server`` for ``demo``'s ``/metrics``; the layer
            above passes ``refcache.metrics.serve`` (``refcache/__main__.py``, the console
            script). Without it the demo serves no metrics.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    args.serve_metrics = serve_metrics
    command = args.command
    try:
        args.root = resolve_root(args.root)
        code = int(args.func(args))
        sys.stdout.flush()
        return code
    except UsageError as exc:
        _say(command, exc)
        return EXIT_USAGE
    except InterruptedCommandError as exc:
        _say(command, exc)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        _say(command, "interrupted")
        return EXIT_INTERRUPTED
    except (CommandFailedError, RefcacheError) as exc:
        _say(command, exc)
        return EXIT_FAILURE
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        _say(command, _os_message(exc))
        return EXIT_FAILURE
    except Exception as exc:
        # The last guard against a traceback: an error no check above foresaw.
        if os.environ.get("REFCACHE_DEBUG"):
            raise
        _say(
            command,
            f"unexpected error: {type(exc).__name__}: {exc} (REFCACHE_DEBUG=1 shows where)",
        )
        return EXIT_FAILURE


if __name__ == "__main__":
    raise SystemExit(main())
