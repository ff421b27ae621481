"""Read-only views of a cache that may be open in another process (``du``, ``inspect``, dry runs).

LMDB lets a second process read while the owner writes, so these functions open the metadata
read-only (or use this process's own environment when it has the cache open) and compute
what the live manager would, with the same pure functions (:mod:`actors._usage`,
:mod:`actors._planning`):

* open handles live in the process that has the cache open and cannot be seen from here, so
  the rows are what ``disk_usage`` would report with no handle open: only holds of child
  records count, and a chain held only by unreferenced records is reclaimable (BuildKit's
  rule);
* sizes come from the metadata; unknown ones are measured read-only from the snapshot
  records and the content store, and are not written back;
* records flagged ``cache.deleted`` (an interrupted prune) are left out: the next open
  finishes their removal.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from ..storage import (
    KEY_DELETED,
    CorruptMetadataError,
    LmdbLeaseManager,
    LocalContentStore,
    MetadataStore,
    MetaEnv,
    NotFoundError,
    RefcacheError,
    Snapshotter,
    open_snapshotter,
)
from ._entry import RecordEntry, lease_ids
from ._planning import free_bytes, simulate_prune
from ._rows import TableRow, entry_row
from ._types import PrunePolicy, UsageInfo
from ._usage import compute_usage, fill_sizes, measure_row, parse_usage_filters
from ._walk import RefChecker, layer_walk

__all__ = [
    "OfflineTable",
    "RecordDetails",
    "inspect_record",
    "offline_prune_plan",
    "offline_table",
    "offline_usage",
    "pending_removals",
    "read_only_env",
    "stored_ids",
]


def _has_cache(root: Path) -> bool:
    return (root / "meta").is_dir()


@contextmanager
def read_only_env(root: Path) -> Iterator[MetaEnv]:
    """The cache's environment for reading: the live one of this process, or a read-only one.

    Raises:
        RefcacheError: there is no cache under ``root``.
    """
    live = MetaEnv.lookup(root / "meta")
    if live is not None:
        yield live
        return
    if not _has_cache(root):
        msg = f"no refcache cache at {root} (no {root / 'meta'} directory)"
        raise RefcacheError(msg)
    env = MetaEnv(root / "meta", readonly=True)
    try:
        yield env
    finally:
        env.close()


@dataclass
class OfflineTable:
    """The record table as stored: rows, plus what could not be read or is being deleted."""

    rows: dict[str, TableRow] = field(default_factory=dict)
    entries: dict[str, RecordEntry] = field(default_factory=dict)
    broken: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)


def offline_table(env: MetaEnv) -> OfflineTable:
    """Every decodable, not-deleted record as a :class:`TableRow` (no handles visible)."""
    out = OfflineTable()
    for item in MetadataStore(env).all():
        try:
            if item.get_bool(KEY_DELETED):
                out.deleted.append(item.id)
                continue
            out.entries[item.id] = RecordEntry.from_item(item)
        except CorruptMetadataError:
            out.broken.append(item.id)
    entries = out.entries
    for e in entries.values():
        for p in e.parents:
            if p in entries:
                entries[p].holders += 1
        if e.equal_mutable and e.equal_mutable in entries:
            entries[e.equal_mutable].equal_immutable = e.id
    for rid, e in entries.items():
        size_snapshot = e.snapshot_id
        if e.equal_mutable and e.equal_mutable in entries:
            size_snapshot = entries[e.equal_mutable].snapshot_id
        out.rows[rid] = entry_row(e, handles=0, size_snapshot=size_snapshot)
    return out


def stored_ids(root: Path) -> dict[str, bool]:
    """Every stored record id, mapped to whether an interrupted prune flagged it
    ``cache.deleted`` (the next open removes those).

    Raises:
        RefcacheError: no cache under ``root``.
    """
    out: dict[str, bool] = {}
    with read_only_env(root) as env:
        for item in MetadataStore(env).all():
            try:
                out[item.id] = item.get_bool(KEY_DELETED)
            except CorruptMetadataError:
                out[item.id] = False
    return out


def pending_removals(root: Path) -> list[str]:
    """Records an interrupted prune flagged ``cache.deleted`` (the next open removes them).

    Raises:
        RefcacheError: no cache under ``root``.
    """
    return sorted(rid for rid, flagged in stored_ids(root).items() if flagged)


class _Backends:
    """Read-only snapshotter and content store for measuring sizes (None when absent)."""

    def __init__(self, root: Path, env: MetaEnv) -> None:
        self.snapshotter: Snapshotter | None = open_snapshotter(root, env, clean=False)
        self.content: LocalContentStore | None = None
        if (root / "content").is_dir():
            self.content = LocalContentStore(root / "content", env, clean=False)

    def measure(self, row: TableRow) -> int:
        return measure_row(self.snapshotter, self.content, row)[0]


def offline_usage(
    root: Path,
    filters: Sequence[str] = (),
    *,
    age_limit: timedelta | None = None,
    checker: RefChecker | None = None,
) -> list[UsageInfo]:
    """``disk_usage`` computed from the stored metadata (see the module docstring).

    Raises:
        InvalidError: a malformed filter.
        RefcacheError: no cache under ``root``.
    """
    flt = parse_usage_filters(*filters)
    with read_only_env(root) as env:
        table = offline_table(env).rows
        backends = _Backends(root, env)
        cutoff = time.time_ns() - int(age_limit.total_seconds() * 1e9) if age_limit else None
        rows = compute_usage(table, checker=checker, flt=flt, cutoff=cutoff)
        return fill_sizes(rows, table, backends.measure)


def offline_prune_plan(
    root: Path, policies: Sequence[PrunePolicy], *, checker: RefChecker | None = None
) -> list[UsageInfo]:
    """What ``prune(*policies)`` would delete now, in order, if no handle were open.

    Raises:
        InvalidError: a malformed filter.
        RefcacheError: no cache under ``root``.
    """
    with read_only_env(root) as env:
        table = offline_table(env).rows
        backends = _Backends(root, env)
        return simulate_prune(
            table,
            policies,
            checker=checker,
            now=time.time_ns(),
            measure=backends.measure,
            free=lambda: free_bytes(root),
        )


@dataclass
class RecordDetails:
    """Everything ``refcache inspect`` shows about one record."""

    id: str
    row: TableRow
    metadata: dict[str, Any]
    children: list[str]
    layers: list[str]
    leases: dict[str, list[str]]
    snapshot: dict[str, Any] | None
    size: int
    table: dict[str, TableRow]


def _resolve(rows: dict[str, TableRow], wanted: str) -> str:
    if wanted in rows:
        return wanted
    matches = [rid for rid in rows if rid.startswith(wanted)] if wanted else []
    if len(matches) == 1:
        return matches[0]
    if matches:
        msg = f"record id prefix {wanted!r} is ambiguous: {', '.join(sorted(matches)[:5])}"
        raise RefcacheError(msg)
    msg = f"record {wanted!r} not found"
    raise NotFoundError(msg)


def inspect_record(root: Path, record_id: str) -> RecordDetails:
    """Reads every stored field of one record (an id or a unique id prefix).

    Raises:
        NotFoundError: no such record.
        RefcacheError: no cache under ``root``, or an ambiguous prefix.
    """
    with read_only_env(root) as env:
        loaded = offline_table(env)
        rid = _resolve(loaded.rows, record_id)
        row = loaded.rows[rid]
        item = MetadataStore(env).get(rid)
        stored_keys = item.keys()
        metadata = {key: item.get(key) for key in stored_keys}
        children = sorted(other.id for other in loaded.rows.values() if rid in other.parents)
        leases: dict[str, list[str]] = {}
        manager = LmdbLeaseManager(env)
        for lease_id in lease_ids(rid):
            with contextlib.suppress(NotFoundError):
                leases[lease_id] = [f"{r.type}/{r.id}" for r in manager.list_resources(lease_id)]
        backends = _Backends(root, env)
        snapshot: dict[str, Any] | None = None
        if backends.snapshotter is not None:
            with contextlib.suppress(NotFoundError):
                info = backends.snapshotter.stat(row.snapshot_id)
                snapshot = {
                    "key": row.snapshot_id,
                    "kind": str(info.kind.value),
                    "parent": info.parent,
                    "labels": dict(info.labels),
                }
        size = row.size if row.size >= 0 else backends.measure(row)
        return RecordDetails(
            id=rid,
            row=row,
            metadata=metadata,
            children=children,
            layers=layer_walk(loaded.rows, rid),
            leases=leases,
            snapshot=snapshot,
            size=size,
            table=loaded.rows,
        )
