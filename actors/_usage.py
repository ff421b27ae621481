"""Disk usage (BuildKit ``DiskUsage``) over a snapshot of the record table.

Pure functions over :class:`~actors._rows.TableRow` values, run off the manager's thread by
the live ``disk_usage`` and prune jobs and, on rows read from LMDB, by ``refcache du``:
which records show (an equal pair once), which are in use (a chain held only by unreferenced
records is reclaimable), which are shared (the external ref checker), the filter fields of a
usage row, and the measurement of sizes not known yet.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from ..storage import Filter, InvalidError, NotFoundError, parse_filters
from ._blobs import measure_record
from ._rows import TableRow
from ._types import SIZE_UNKNOWN, UsageInfo
from ._walk import RefChecker, mark_shared

if TYPE_CHECKING:
    from ._core import CacheCore

__all__ = [
    "USAGE_FILTER_FIELDS",
    "compute_usage",
    "fill_sizes",
    "in_use_ids",
    "measure_live",
    "measure_row",
    "parse_usage_filters",
    "records_in_use",
    "shown_size",
    "usage_adaptor",
    "usage_info",
    "visible_ids",
    "visible_records",
]

#: Labels through which a blob names its compression variants (BuildKit ``size()``).
VARIANT_LABEL_PREFIX = "containerd.io/gc.ref.content.blob-"


# -- visibility and use --------------------------------------------------------------------------


class _PairLinks(Protocol):
    """What visibility and in-use read of a record (``TableRow`` and ``RecordEntry``)."""

    @property
    def parents(self) -> tuple[str, ...]: ...
    @property
    def equal_mutable(self) -> str | None: ...
    @property
    def equal_immutable(self) -> str | None: ...


def visible_records(
    table: Mapping[str, _PairLinks], refs: Mapping[str, int], going: Container[str] = ()
) -> list[str]:
    """Records disk usage shows: an equal pair once (BuildKit §4.1 step 2).

    The immutable half is shown while it has refs (``refs``: user handles plus holds of
    child records), otherwise the mutable half; records in ``going`` (a prune is removing
    them) are not shown. Disk usage and ``statistics()`` both count through this.
    """
    out = []
    for rid, row in table.items():
        if rid in going:
            continue
        twin = row.equal_immutable
        if twin is not None and twin in table and refs.get(twin, 0) > 0:
            continue
        if row.equal_mutable is not None and refs.get(rid, 0) == 0:
            continue
        out.append(rid)
    return out


def records_in_use(
    table: Mapping[str, _PairLinks],
    refs: Mapping[str, int],
    visible: Iterable[str],
    going: Iterable[str] = (),
) -> set[str]:
    """Visible records still in use once unreferenced children stop counting (§4.1 step 3).

    A record with no refs releases its holds on its parents (two each for a pair's mutable,
    whose twin holds them too: BuildKit ``doubleRef``), so a chain held only by unreferenced
    records is reclaimable. Parents missing from the table are skipped.
    """
    nodes = set(visible)
    # A record being pruned holds its parents until it is gone, but is going: count it as
    # unreferenced (its twin, if any, is accounted for by its doubleRef).
    nodes.update(rid for rid in going if rid in table and table[rid].equal_mutable is None)
    # Only records with refs left are kept; each unreferenced one releases its holds once.
    adjusted = {rid: n for rid in nodes if (n := refs.get(rid, 0)) > 0}
    work = [rid for rid in nodes if rid not in adjusted]
    while work:
        row = table[work.pop()]
        twin = row.equal_immutable
        step = 2 if twin is not None and twin in table else 1
        for p in row.parents:
            left = adjusted.get(p) if p else None
            if left is not None:
                left -= step
                if left > 0:
                    adjusted[p] = left
                else:
                    del adjusted[p]
                    work.append(p)
    return {rid for rid in visible if rid in adjusted}


def visible_ids(table: Mapping[str, TableRow]) -> list[str]:
    """:func:`visible_records` of a table of rows (rows being pruned are going)."""
    refs = {rid: row.refs for rid, row in table.items()}
    return visible_records(table, refs, {rid for rid, row in table.items() if row.pruning})


def in_use_ids(table: Mapping[str, TableRow], visible: Iterable[str]) -> set[str]:
    """:func:`records_in_use` of a table of rows."""
    refs = {rid: row.refs for rid, row in table.items()}
    going = [rid for rid, row in table.items() if row.pruning]
    return records_in_use(table, refs, visible, going)


class _Sized(Protocol):
    """What :func:`shown_size` reads of a record (``TableRow`` and ``RecordEntry``)."""

    @property
    def mutable(self) -> bool: ...
    @property
    def size(self) -> int: ...
    @property
    def equal_immutable(self) -> str | None: ...


def shown_size(table: Mapping[str, _Sized], row: _Sized, handles: int) -> int:
    """The size disk usage shows for a visible record with ``handles`` open handles; -1 when
    it must be measured.

    A mutable record with open handles is still changing: 0 (BuildKit). A pair's mutable
    shows its twin's size when only the twin knows it (they share one snapshot). Disk usage
    and ``statistics()`` both count through this.
    """
    if row.mutable and handles > 0:
        return 0
    if row.size == SIZE_UNKNOWN and row.equal_immutable is not None:
        twin = table.get(row.equal_immutable)
        if twin is not None:
            return twin.size
    return row.size


def usage_info(row: TableRow, *, in_use: bool, size: int, shared: bool) -> UsageInfo:
    """The ``UsageInfo`` of a row."""
    # Positional: this runs once per record on every disk usage call.
    parents = row.parents if row.kind != "diff" else row.parent_ids()
    return UsageInfo(
        row.id,
        row.mutable,
        in_use,
        size,
        row.created_at,
        row.last_used_at,
        row.usage_count,
        parents,
        row.description,
        row.record_type or "regular",
        shared,
    )


def compute_usage(
    table: Mapping[str, TableRow],
    *,
    checker: RefChecker | None = None,
    flt: Filter | None = None,
    cutoff: int | None = None,
) -> list[UsageInfo]:
    """BuildKit ``DiskUsage`` over a table snapshot; unknown sizes stay -1 (the caller measures).

    Args:
        table: The rows.
        checker: The external ref checker (shared records), or None.
        flt: A parsed filter; rows that do not match are left out.
        cutoff: ``now - age_limit`` in ns: rows used after it are left out (never-used rows
            are kept).

    Raises:
        RefcacheError: the ref checker failed.
    """
    refs = {rid: row.refs for rid, row in table.items()}
    going = [rid for rid, row in table.items() if row.pruning]
    visible = visible_records(table, refs, set(going))
    in_use = records_in_use(table, refs, visible, going)
    shared = mark_shared(table, visible, checker)
    out = []
    for rid in visible:
        row = table[rid]
        size = shown_size(table, row, row.handles)
        info = usage_info(row, in_use=rid in in_use, size=size, shared=rid in shared)
        if flt is not None and not flt.match(usage_adaptor(info)):
            continue
        if cutoff is not None and row.last_used_at is not None and row.last_used_at > cutoff:
            continue
        out.append(info)
    return out


# -- filter fields: one check for disk_usage, prune and the offline views ---------------------

#: The fields a ``disk_usage``/``prune`` filter can name (see :func:`usage_adaptor`).
USAGE_FILTER_FIELDS = (
    "id",
    "parents",
    "description",
    "type",
    "inuse",
    "mutable",
    "immutable",
    "shared",
    "private",
)


def _fieldpaths(flt: Filter) -> Iterator[tuple[str, ...]]:
    # The parsed tree: OR/AND nodes carry ``filters``, selectors a ``fieldpath``.
    stack = [flt]
    while stack:
        node = stack.pop()
        children = getattr(node, "filters", None)
        if children is not None:
            stack.extend(children)
            continue
        path = getattr(node, "fieldpath", None)
        if path is not None:
            yield tuple(path)


def parse_usage_filters(*filters: str) -> Filter:
    """Parses record filters, refusing fields that no record has.

    containerd lets an unknown field simply never be present, so a typo
    (``descripton!=keep``) would match every record and a prune would delete them all;
    here it is an error instead.

    Raises:
        InvalidError: a filter does not parse, or names a field outside
            :data:`USAGE_FILTER_FIELDS` (the message names the filter, the field and the
            valid fields).
    """
    for text in filters:
        for path in _fieldpaths(parse_filters(text)):
            if len(path) == 1 and path[0] in USAGE_FILTER_FIELDS:
                continue
            name = ".".join(path)
            hint = ""
            if path[0] in ("until", "unused-for"):
                hint = " (a prune's keep_duration, or disk_usage's age_limit, does that)"
            msg = (
                f"invalid filter {text!r}: unknown field {name!r}{hint}; valid fields: "
                + ", ".join(USAGE_FILTER_FIELDS)
            )
            raise InvalidError(msg)
    return parse_filters(*filters)


def usage_adaptor(row: UsageInfo) -> Callable[[Sequence[str]], tuple[str, bool]]:
    """containerd filter fields of a usage row (BuildKit ``adaptUsageInfo``).

    ``id``, ``parents`` (``;``-joined, present when there are some), ``description`` (present
    when not empty), ``type``; bare booleans ``inuse``, ``mutable``, ``immutable``, ``shared``,
    ``private``. Unknown fields are never present.
    """

    def adapt(fieldpath: Sequence[str]) -> tuple[str, bool]:
        if len(fieldpath) != 1:
            return "", False
        name = fieldpath[0]
        if name == "id":
            return row.id, bool(row.id)
        if name == "parents":
            return ";".join(row.parents), bool(row.parents)
        if name == "description":
            return row.description, bool(row.description)
        if name == "type":
            return row.record_type, bool(row.record_type)
        if name == "inuse":
            return "", row.in_use
        if name == "mutable":
            return "", row.mutable
        if name == "immutable":
            return "", not row.mutable
        if name == "shared":
            return "", row.shared
        if name == "private":
            return "", not row.shared
        return "", False

    return adapt


# -- sizes ---------------------------------------------------------------------------------------


class _SnapshotUsage(Protocol):
    def usage(self, key: str) -> Any: ...


class _ContentInfo(Protocol):
    def info(self, digest: str) -> Any: ...


def _blob_bytes(content: _ContentInfo, digest: str) -> int:
    """The blob plus every compression variant reachable through its labels, each once."""
    total = 0
    seen: set[str] = set()
    stack = [digest]
    while stack:
        d = stack.pop()
        if d in seen:
            continue
        seen.add(d)
        try:
            info = content.info(d)
        except (NotFoundError, InvalidError):
            continue
        total += int(info.size)
        stack.extend(v for k, v in info.labels.items() if k.startswith(VARIANT_LABEL_PREFIX))
    return total


def _snapshot_bytes(snapshotter: _SnapshotUsage, key: str) -> int | None:
    try:
        return int(snapshotter.usage(key).size)
    except (NotFoundError, InvalidError):
        return None


def measure_row(
    snapshotter: _SnapshotUsage | None, content: _ContentInfo | None, row: TableRow
) -> tuple[int, bool]:
    """Measures a record (BuildKit ``size()``): snapshot usage plus its blob and variants.

    A lazy (blob-only) record counts its blobs only. Returns ``(size, cacheable)``: a missing
    snapshot (a merge not extracted yet) counts 0 and must not be cached.
    """
    size = 0
    cacheable = True
    if not row.blob_only and snapshotter is not None:
        used = _snapshot_bytes(snapshotter, row.size_snapshot)
        if used is None and row.size_snapshot != row.snapshot_id:
            # The equal mutable's snapshot was committed meanwhile: measure the record's own.
            used = _snapshot_bytes(snapshotter, row.snapshot_id)
        if used is None:
            cacheable = False
        else:
            size += used
    if row.blob and content is not None:
        size += _blob_bytes(content, row.blob)
    return size, cacheable


def measure_live(core: CacheCore, row: TableRow) -> tuple[int, bool]:
    """:func:`measure_row` for an open cache, with the core's ``measure_record`` (the very
    numbers ``ImmutableRef.size()`` caches)."""
    size, cacheable = measure_record(core, row.size_snapshot, row.blob, row.blob_only)
    if not cacheable and not row.blob_only and row.size_snapshot != row.snapshot_id:
        # The equal mutable's snapshot was committed meanwhile: measure the record's own.
        size, cacheable = measure_record(core, row.snapshot_id, row.blob, row.blob_only)
    return size, cacheable


def fill_sizes(
    rows: list[UsageInfo], table: Mapping[str, TableRow], measure: Callable[[TableRow], int]
) -> list[UsageInfo]:
    """Replaces unknown (-1) sizes by measured ones (in the caller's thread)."""
    out = []
    for info in rows:
        if info.size == SIZE_UNKNOWN:
            info = dataclasses.replace(info, size=measure(table[info.id]))  # noqa: PLW2901
        out.append(info)
    return out
