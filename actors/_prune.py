"""Disk usage and prune (BuildKit ``DiskUsage``/``Prune``, reference §4), as a manager mixin.

Where BuildKit holds ``cm.mu`` over a scan of every record for each batch of ten deletions
(quadratic: 41-45 s for 10,000 records, with builds stalled meanwhile, #4401), the work here
is split so that no manager handler is long and no pass rescans the table:

* **Table scan** (``table_scan``): the manager copies its table into immutable
  :class:`TableRow` values, a thousand rows per message. Everything else — visibility of
  equal pairs, in-use propagation, shared marking (the external ref checker is foreign code),
  filters, the LRU ranking — is computed from those rows by pure functions, off the manager's
  thread. ``refcache du`` runs the same functions on rows read from LMDB (``_offline.py``).
* **Planning** (:class:`PrunePlanner`): candidates are found once per policy, in one O(n)
  walk over the rows. A record that a deleted child was holding becomes a candidate when the
  manager reports it freed (``prune_forget`` returns such parents), so the passes of
  BuildKit's loop (leaves first, their parents next) cost work proportional to what they
  delete, not to the table. (Records that others release while a prune runs are left for
  the next prune: BuildKit's rescans would catch them, at the price of the rescans.)
* **Deletion** of a batch: ``prune_mark`` re-checks each record under the manager (refs,
  dead, a use since the scan) and marks it dead — nobody can take it from then on; the job
  persists ``cache.deleted`` in one transaction, measures unknown sizes, then clears the
  metadata and leases in a second transaction; ``prune_forget`` finally drops the records
  from the table (the manager's ``_remove``, whose transaction then has nothing left to
  write) and releases their holds on their parents. Handlers are bounded by a time budget
  (``HANDLER_BUDGET_S``) and hand back what they did not get to.
* **GC** (``storage.collect``) runs once at the end, as BuildKit's ``GarbageCollect``.

Size-limited policies (``max_used_space``/``reserved_space``/``min_free_space``) keep
BuildKit's arithmetic (:func:`calculate_keep_bytes`), stop rule (``total < keep``) and order:
BuildKit's gc mode deletes one record per pass, ranked by ``sortDeleteRecords`` among the
candidates of that pass. The planner plays those passes exactly (:class:`GcRanking` keeps the
lowest score current as candidates go and freed parents come, without rescoring) and a batch
deletes a run of them; the manager accepts a parent in the batch of the children that free it.

Sizes: unknown sizes are measured by the jobs (never by a handler) before they are reported
or counted, and handed to the manager (``known_sizes``), which caches them in its table
(whether or not the record's actor is activated), writes them behind and tells the actor, so
a repeated ``disk_usage`` measures nothing and ``statistics()`` sees what it measured.

Events: listeners subscribed with :meth:`PruneMixin.subscribe` get a *tell* per deleted record,
``("record_pruned", UsageInfo)``, and ``("prune_finished", records, bytes)`` once a prune is
done (Mopidy's listener pattern; :class:`CacheListener` dispatches them to methods). Nothing is
ever asked of a listener, so a slow one cannot stall the cache.

Every method here runs on the manager actor's thread, except the ``*_job`` methods, which run
on the I/O executor and talk to the manager with asks (the manager never waits on them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import itertools
import logging
import os
import time
from bisect import bisect_left, bisect_right, insort
from collections import OrderedDict, deque
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import pykka

from ..storage import (
    KEY_DELETED,
    ClosedError,
    Filter,
    InvalidError,
    NotFoundError,
    RefcacheError,
    collect,
    parse_filters,
)
from ._blobs import measure_record
from ._record import SIZE_UNKNOWN
from ._types import PrunePolicy, UsageInfo

if TYPE_CHECKING:
    from ..storage import WriteTxn
    from ._core import CacheCore
    from ._entry import RecordEntry
    from ._record import Settled

__all__ = [
    "CacheListener",
    "PruneMixin",
    "PrunePlanner",
    "TableRow",
    "calculate_keep_bytes",
    "compute_usage",
    "delete_order",
    "free_bytes",
    "layer_digest_chain",
    "layer_walk",
    "measure_live",
    "measure_row",
    "parse_usage_filters",
    "simulate_prune",
    "simulate_removal",
    "size_limit",
    "usage_adaptor",
]

logger = logging.getLogger(__name__)

SCAN_CHUNK = 1000  #: table rows copied per ``table_scan`` message (~1-2 ms)
SIZES_CHUNK = 200  #: measured sizes persisted per transaction and handed to the manager
PRUNE_BATCH = 200  #: records per mark/persist/clear round (bounds each write transaction)
HANDLER_BUDGET_S = 0.005  #: a mark/forget handler hands back what is left after this long

#: Record types pruned only with ``all`` (BuildKit ``UsageRecordTypeInternal``/``Frontend``).
PROTECTED_TYPES = frozenset({"internal", "frontend"})

#: Labels through which a blob names its compression variants (BuildKit ``size()``).
VARIANT_LABEL_PREFIX = "containerd.io/gc.ref.content.blob-"

#: ``(record id, layer digest chain) -> shared?`` (BuildKit ``ExternalRefChecker.Exists``).
RefChecker = Callable[[str, Sequence[str]], bool]


# -- table rows -------------------------------------------------------------------------------


class TableRow(NamedTuple):
    """An immutable copy of one record table entry, as prune and disk usage need it.

    ``handles`` is the number of open user handles (0 in an offline view); ``holders`` the
    counted holds of child records (one per parent slot). ``size_snapshot`` is the snapshot
    whose usage is the record's size (its equal mutable's until finalize). ``dead`` is set
    while a record is being removed; ``pruning`` when a prune is removing it; ``busy`` while a
    finalize of it runs. ``size_gen`` is the generation of ``size`` (a measurement is cached
    only if no reset happened since). ``trigger_holds`` counts the holds on the record that
    count a use when they go; ``trigger_parents`` are the parents this record holds so.
    """

    id: str
    kind: str
    parents: tuple[str, ...]
    mutable: bool
    size: int
    created_at: int
    last_used_at: int | None
    usage_count: int
    description: str
    record_type: str
    equal_mutable: str | None
    equal_immutable: str | None
    holders: int
    handles: int
    blob: str
    blob_only: bool
    snapshot_id: str
    size_snapshot: str
    dead: bool = False
    pruning: bool = False
    busy: bool = False
    size_gen: int = 0
    trigger_holds: int = 0
    trigger_parents: frozenset[str] = frozenset()

    @property
    def refs(self) -> int:
        """BuildKit's refcount: user handles plus holds of child records."""
        return self.handles + self.holders

    def parent_ids(self) -> tuple[str, ...]:
        """Parent ids without empty diff slots."""
        return tuple(p for p in self.parents if p)


class _Walkable(Protocol):
    """What the layer walk reads of a row (``TableRow`` and ``RecordEntry`` both have it)."""

    @property
    def kind(self) -> str: ...
    @property
    def parents(self) -> tuple[str, ...]: ...
    @property
    def blob(self) -> str: ...


def entry_row(
    e: RecordEntry, *, handles: int, size_snapshot: str, pruning: bool = False
) -> TableRow:
    """The :class:`TableRow` of a manager table entry."""
    return TableRow(
        e.id,
        e.kind,
        e.parents,
        e.mutable,
        e.size,
        e.created_at,
        e.last_used_at,
        e.usage_count,
        e.description,
        e.record_type,
        e.equal_mutable,
        e.equal_immutable,
        e.holders,
        handles,
        e.blob,
        e.blob_only,
        e.snapshot_id,
        size_snapshot,
        e.dead,
        pruning,
        e.finalizing is not None,
        e.size_gen,
        e.trigger_holds,
        e.trigger_parents,
    )


# -- layer chains and shared records -------------------------------------------------------------


def layer_walk(table: Mapping[str, _Walkable], record_id: str) -> list[str]:
    """The layers of ``record_id`` as they would appear in an image, root first.

    BuildKit ``layerWalk``: a layer is its parent's layers plus itself; a merge concatenates
    its inputs; a diff is its upper when the upper is one layer on top of the lower (or a base
    layer diffed with nothing), otherwise the diff itself is one layer. Parents missing from
    ``table`` are skipped (BuildKit #7154/#7157 crashed on them).
    """
    out: list[str] = []
    if record_id not in table:
        return out
    stack: list[tuple[str, bool]] = [(record_id, False)]
    # Only corrupt metadata can hold a parent cycle (loading refuses it); an offline view
    # may still read one, so the walk is bounded rather than trusted.
    budget = 16 * (len(table) + 1)
    while stack:
        budget -= 1
        if budget < 0:
            break
        rid, expanded = stack.pop()
        row = table.get(rid)
        if row is None:
            continue
        if expanded or row.kind == "base":
            out.append(rid)
        elif row.kind == "layer":
            stack.append((rid, True))
            stack.append((row.parents[0], False))
        elif row.kind == "merge":
            stack.extend((p, False) for p in reversed(row.parents))
        elif row.kind == "diff":
            lower, upper = row.parents
            up = table.get(upper) if upper else None
            if up is not None and (
                (not lower and up.kind == "base")
                or (lower and up.kind == "layer" and up.parents[0] == lower)
            ):
                out.append(upper)
            else:
                out.append(rid)
        else:
            out.append(rid)
    return out


def layer_digest_chain(
    table: Mapping[str, _Walkable],
    record_id: str,
    memo: dict[str, tuple[str, ...]] | None = None,
) -> tuple[str, ...]:
    """The blob digests of the record's layer walk (BuildKit ``layerDigestChain``).

    Records without a blob contribute ``""`` (BuildKit appends ``getBlob()`` as it is). A
    layer's chain is memoised in ``memo`` (BuildKit's ``layerDigestChainCache``), so the
    chains of a whole table cost one visit per record plus the lengths of the chains.
    """
    if memo is None:
        memo = {}
    if record_id in memo:
        return memo[record_id]
    row = table.get(record_id)
    if row is None:
        return ()
    if row.kind == "layer":
        # Iterative over the layer parents (chains may be deeper than the recursion limit).
        pending: list[str] = []
        seen: set[str] = set()
        rid: str | None = record_id
        while rid is not None and rid not in memo and rid not in seen:
            r = table.get(rid)
            if r is None:
                break
            if r.kind != "layer":
                memo[rid] = layer_digest_chain(table, rid, memo)
                break
            seen.add(rid)
            pending.append(rid)
            rid = r.parents[0]
        base = memo.get(rid, ()) if rid is not None else ()
        for lid in reversed(pending):
            base = (*base, table[lid].blob)
            memo[lid] = base
        return memo[record_id]
    chain = tuple(table[layer].blob for layer in layer_walk(table, record_id))
    memo[record_id] = chain
    return chain


def ancestors(table: Mapping[str, TableRow], record_id: str) -> list[str]:
    """``record_id`` and every ancestor present in ``table`` (depth first, each once)."""
    seen: set[str] = set()
    out: list[str] = []
    stack = [record_id]
    while stack:
        rid = stack.pop()
        if rid in seen or rid not in table:
            continue
        seen.add(rid)
        out.append(rid)
        stack.extend(p for p in table[rid].parents if p)
    return out


def _check_shared(checker: RefChecker, record_id: str, chain: Sequence[str]) -> bool:
    try:
        return bool(checker(record_id, chain))
    except RefcacheError:
        raise  # e.g. TimeoutError: the cache bounds each call of the checker
    except Exception as exc:
        # A failing checker must not make shared data look private (prune would delete it).
        msg = f"the ref checker failed for record {record_id}: {exc}"
        raise RefcacheError(msg) from exc


def mark_shared(
    table: Mapping[str, TableRow], ids: Iterable[str], checker: RefChecker | None
) -> set[str]:
    """Records the checker reports as used elsewhere, and all their ancestors (``markShared``).

    Raises:
        RefcacheError: the checker raised (naming the record).
    """
    shared: set[str] = set()
    if checker is None:
        return shared
    memo: dict[str, tuple[str, ...]] = {}
    for rid in ids:
        if rid in shared:
            continue
        if _check_shared(checker, rid, layer_digest_chain(table, rid, memo)):
            shared.update(ancestors(table, rid))
    return shared


# -- disk usage ----------------------------------------------------------------------------------


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


def shown_size(table: Mapping[str, TableRow], row: TableRow) -> int:
    """The size disk usage shows for a visible row; -1 when it must be measured.

    A mutable record with open handles is still changing: 0 (BuildKit). A pair's mutable
    shows its twin's size when only the twin knows it (they share one snapshot).
    """
    if row.mutable and row.handles > 0:
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
        size = shown_size(table, row)
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


# -- end of filter fields ------------------------------------------------------------------------


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


# -- keep bytes and deletion order ---------------------------------------------------------------


def calculate_keep_bytes(total_size: int, free: int, policy: PrunePolicy) -> int:
    """Bytes a size-limited prune keeps (BuildKit ``calculateKeepBytes``); 0 = no size limit.

    Args:
        total_size: Bytes the cache uses (records not shared, in use or not).
        free: Free bytes of the disk holding the cache (read only with ``min_free_space``).
        policy: The policy (``max_used_space``, ``min_free_space``, ``reserved_space``).

    Returns:
        ``max_used_space``, lowered so that ``min_free_space`` becomes free; when the disk
        already has that much free and no maximum is set, the whole ``total_size`` (nothing
        to delete, ``ac123b493``); never below ``reserved_space``.
    """
    if not (policy.max_used_space or policy.min_free_space or policy.reserved_space):
        return 0
    keep = policy.max_used_space
    excess = policy.min_free_space - free
    if excess > 0:
        keep = total_size - excess if keep == 0 else min(keep, total_size - excess)
    elif policy.min_free_space != 0 and keep == 0:
        keep = total_size
    return max(keep, policy.reserved_space)


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Free bytes (for unprivileged users) of the filesystem holding ``path``.

    Raises:
        RefcacheError: ``statvfs`` failed (naming the path).
    """
    try:
        st = os.statvfs(path)
    except OSError as exc:
        msg = f"cannot read the free space of {path}: {exc}"
        raise RefcacheError(msg) from exc
    return st.f_bavail * st.f_frsize


def gc_score(lu_rank: int, max_lu: int, uc_rank: int, max_uc: int) -> float:
    """BuildKit's ``sortDeleteRecords`` score, computed as Go computes it (float64)."""
    return lu_rank / max_lu + uc_rank / max_uc


class _Scorer:
    """Rank tables of one candidate set, for :func:`delete_order` (a single sort).

    Last-used ranks start at 1 for never-used records and go up by one per distinct newer
    time; usage-count ranks start at 1 for a count of 0 and go up per distinct count.
    """

    def __init__(self, stats: Iterable[tuple[int | None, int]]) -> None:
        stats = list(stats)
        self.times = sorted({t for t, _ in stats if t is not None})
        self.counts = sorted({c for _, c in stats if c != 0})
        self.max_lu = 1 + len(self.times)
        self.max_uc = 1 + len(self.counts)

    def score(self, last_used_at: int | None, usage_count: int) -> float:
        lu = 1 if last_used_at is None else 1 + bisect_right(self.times, last_used_at)
        uc = 1 if usage_count == 0 else 1 + bisect_right(self.counts, usage_count)
        return gc_score(lu, self.max_lu, uc, self.max_uc)


def delete_order(stats: Mapping[str, tuple[int | None, int]]) -> list[str]:
    """Ids ordered by one BuildKit ``sortDeleteRecords`` over a fixed candidate set.

    Args:
        stats: ``id -> (last_used_at or None, usage_count)``.

    Returns:
        Lowest score first; ties keep the order of ``stats`` (BuildKit's are arbitrary).
        A size-limited prune re-ranks after every deletion (:class:`GcRanking`).
    """
    scorer = _Scorer(stats.values())
    keyed = [(scorer.score(t, c), i, rid) for i, (rid, (t, c)) in enumerate(stats.items())]
    keyed.sort()
    return [rid for _, _, rid in keyed]


class _Fenwick:
    """Prefix sums over ``size`` slots with point updates, both O(log n)."""

    __slots__ = ("size", "tree")

    def __init__(self, size: int) -> None:
        self.size = size
        self.tree = [0] * (size + 1)

    def add(self, slot: int, delta: int) -> None:
        i = slot + 1
        tree, size = self.tree, self.size
        while i <= size:
            tree[i] += delta
            i += i & -i

    def prefix(self, slot: int) -> int:
        """The sum over slots ``0..slot``."""
        i = slot + 1
        total = 0
        tree = self.tree
        while i > 0:
            total += tree[i]
            i -= i & -i
        return total


_NEVER = -1  #: the time key of a never-used record (before every time)


class GcRanking:
    """The record BuildKit's gc mode deletes next, kept current as candidates come and go.

    BuildKit's ``pruneOnce`` in gc mode rescans every record, calls ``sortDeleteRecords`` on
    the candidates and deletes the first; the ranks are dense ranks *within the current
    candidates*, so each deletion can change every other score. This structure gives the
    same choice without rescoring everything:

    * the rank of a time is one plus the number of distinct times present up to it: a
      Fenwick tree over the times' slots holds one per distinct time present (a removal or
      an addition changes one slot, O(log n)); the rank of a count is its position among
      the distinct counts present (a sorted list of them);
    * among candidates with the same usage count the oldest scores lowest (its time rank is
      lowest, the count rank is shared), so only the oldest of each count group can win:
      each group is a heap by time, and a pass looks at one record per count group, in
      count order, stopping once the count rank alone rules out a lower score. Its cost is
      the number of distinct usage counts (small integers in practice) times O(log n).

    Scores are the float expression Go evaluates, so the minimum is BuildKit's whenever it
    is unique; on a tie (BuildKit's order is undefined) the oldest, then the least used,
    then the lowest id wins, so a live prune and a dry run over the same records agree.

    Args:
        times: Every time a candidate may have (more are added on demand).
    """

    def __init__(self, times: Iterable[int] = ()) -> None:
        self._times = sorted(set(times))
        self._slot = {t: i for i, t in enumerate(self._times)}
        self._fenwick = _Fenwick(len(self._times))
        self._time_mult: dict[int, int] = {}
        self._distinct_times = 0
        self._counts: list[int] = []  # distinct counts present, ascending
        self._groups: dict[int, list[tuple[int, str]]] = {}  # count -> heap by (time, id)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, record_id: str, last_used_at: int | None, usage_count: int) -> None:
        """Makes ``record_id`` a candidate."""
        key = _NEVER if last_used_at is None else last_used_at
        if last_used_at is not None:
            n = self._time_mult.get(key, 0)
            if n == 0:
                if key not in self._slot:
                    self._grow(key)
                self._fenwick.add(self._slot[key], 1)
                self._distinct_times += 1
            self._time_mult[key] = n + 1
        group = self._groups.get(usage_count)
        if group is None:
            group = self._groups[usage_count] = []
            insort(self._counts, usage_count)
        heapq.heappush(group, (key, record_id))
        self._size += 1

    def pop(self) -> str | None:
        """Removes and returns the candidate BuildKit deletes next (None: there is none)."""
        best: tuple[float, int, int, str] | None = None  # (score, time key, count, id)
        max_lu = 1 + self._distinct_times
        zero = 1 if self._counts and self._counts[0] == 0 else 0
        max_uc = 1 + len(self._counts) - zero
        oldest_seen = None  # lowest time key of the groups looked at so far
        for index, count in enumerate(self._counts):
            uc_rank = 1 if count == 0 else 1 + index + 1 - zero
            if best is not None and gc_score(1, max_lu, uc_rank, max_uc) > best[0]:
                break  # every later group has a higher count rank: none can score lower
            key, rid = self._groups[count][0]
            if oldest_seen is not None and key >= oldest_seen:
                continue  # an older-or-equal record of a lower count scores lower already
            oldest_seen = key
            lu_rank = 1 if key == _NEVER else 1 + self._fenwick.prefix(self._slot[key])
            candidate = (gc_score(lu_rank, max_lu, uc_rank, max_uc), key, count, rid)
            if best is None or candidate < best:
                best = candidate
        if best is None:
            return None
        _, key, count, _ = best
        group = self._groups[count]
        _, record_id = heapq.heappop(group)
        if not group:
            del self._groups[count]
            del self._counts[bisect_left(self._counts, count)]
        if key != _NEVER:
            n = self._time_mult[key] - 1
            if n == 0:
                del self._time_mult[key]
                self._fenwick.add(self._slot[key], -1)
                self._distinct_times -= 1
            else:
                self._time_mult[key] = n
        self._size -= 1
        return record_id

    def _grow(self, key: int) -> None:
        """Adds a time the tree has no slot for (a record used since the table was read)."""
        insort(self._times, key)
        self._slot = {t: i for i, t in enumerate(self._times)}
        self._fenwick = _Fenwick(len(self._times))
        for t in self._time_mult:
            self._fenwick.add(self._slot[t], 1)


# -- planning ----------------------------------------------------------------------------------


def simulate_removal(table: dict[str, TableRow], ids: Iterable[str]) -> list[TableRow]:
    """Removes ``ids`` (with their equal immutables) from ``table``; returns freed parents.

    What the manager's removal does to the holds, for a dry run: each removed record drops
    one hold per parent slot; a parent left with no refs is returned (once, in order).
    """
    touched: dict[str, None] = {}
    for rid in ids:
        row = table.pop(rid, None)
        if row is None:
            continue
        removed = [row]
        if row.equal_immutable is not None and row.equal_immutable in table:
            removed.append(table.pop(row.equal_immutable))
        for r in removed:
            for p in r.parents:
                parent = table.get(p) if p else None
                if parent is not None:
                    table[p] = parent._replace(holders=parent.holders - 1)
                    touched[p] = None
    return [table[p] for p in touched if p in table and table[p].refs == 0]


class PrunePlanner:
    """Which records one policy deletes, and in which order (BuildKit ``prune``/``pruneOnce``).

    Works on a table snapshot; the caller deletes what :meth:`next_batch` returns and reports
    back with :meth:`done` (what went, what was refused, which parents that freed). The live
    prune gets the freed parents from the manager; a dry run from :func:`simulate_removal`.

    Candidates (§4.2): no refs, not dead, not the hidden half of an equal pair (a pair goes
    with its mutable), internal/frontend and shared records only with ``all``, not used within
    ``keep_duration`` (never-used records are not protected), and matching the filters as a
    ``UsageInfo`` without parents or in-use (so ``parents==`` and ``inuse`` never match).

    Size-limited (BuildKit's gc mode): :meth:`next_batch` plays BuildKit's passes one by one
    — stop once the total is below the bytes to keep, else delete the lowest
    ``sortDeleteRecords`` score among the *current* candidates (:class:`GcRanking`), count
    its size off the total, and let the parents it frees compete from the next pass on (a
    parent whose hold counted uses is stamped as used first, as BuildKit's release does).
    A batch is a run of such passes, deleted together.

    Args:
        table: The rows (the planner keeps and updates its own copy).
        policy: The policy.
        checker: The external ref checker; consulted only when ``not all`` or filters are set
            (BuildKit builds it only then).
        now: The time of the prune (ns), for ``keep_duration``.
        measure: Measures a row whose size is unknown (I/O, in the caller's thread).
        total: Bytes counted against the limit (size-limited mode only).
        keep: Bytes to keep (:func:`calculate_keep_bytes`); 0 = no size limit.
    """

    def __init__(
        self,
        table: Mapping[str, TableRow],
        policy: PrunePolicy,
        *,
        checker: RefChecker | None,
        now: int,
        measure: Callable[[TableRow], int],
        total: int = 0,
        keep: int = 0,
    ) -> None:
        self.table = dict(table)
        self.policy = policy
        self.flt = parse_usage_filters(*policy.filters)
        self.checker = checker if (not policy.all or policy.filters) else None
        self.now = now
        self.cutoff: int | None = None
        if policy.keep_duration:
            self.cutoff = now - _ns(policy.keep_duration)
        self.measure = measure
        self.total = total
        self.keep = keep
        self.size_limited = keep != 0
        self.infos: dict[str, UsageInfo] = {}
        self.sizes: dict[str, int] = {}
        self._memo: dict[str, tuple[str, ...]] = {}
        self._queue: deque[str] = deque()
        # Uses this plan stamps (BuildKit: time.Now() at each release, later ones newer).
        stamps = sum(len(r.trigger_parents) for r in self.table.values())
        self._next_stamp = itertools.count(now)
        self._ranking = GcRanking(
            [r.last_used_at for r in self.table.values() if r.last_used_at is not None]
            + list(range(now, now + stamps))
        )
        self._pending_holds: dict[str, int] = {}
        self._pending_triggers: dict[str, int] = {}
        self._stamped: dict[str, int] = {}  # parent -> time of the use its counting hold gave
        self._freed: set[str] = set()  # parents this plan freed (their rows are decided)
        self._taken: dict[str, int] = {}  # size-limited: id -> size counted off the total
        for rid, row in self.table.items():
            if self._admit(row):
                self._push(rid)

    @property
    def candidates(self) -> int:
        """Candidates waiting to be deleted."""
        return len(self._ranking) if self.size_limited else len(self._queue)

    def evaluate(self, row: TableRow) -> UsageInfo | None:
        """The candidate info of ``row`` (``shared`` filled in), or None if it is kept.

        Raises:
            RefcacheError: the ref checker failed.
        """
        if row.dead or row.pruning or row.busy or row.refs > 0 or row.equal_mutable is not None:
            return None
        if row.equal_immutable is not None:
            twin = self.table.get(row.equal_immutable)
            if twin is not None and (twin.refs > 0 or twin.dead or twin.busy):
                return None
        if not self.policy.all and row.record_type in PROTECTED_TYPES:
            return None
        if _after(row.last_used_at, self.cutoff):
            return None
        shared = False
        if self.checker is not None:
            chain = layer_digest_chain(self.table, row.id, self._memo)
            shared = _check_shared(self.checker, row.id, chain)
            if shared and not self.policy.all:
                return None
        info = UsageInfo(
            id=row.id,
            mutable=row.mutable,
            in_use=False,
            size=row.size,
            created_at=row.created_at,
            last_used_at=row.last_used_at,
            usage_count=row.usage_count,
            parents=(),
            description=row.description,
            record_type=row.record_type or "regular",
            shared=shared,
        )
        if not self.flt.match(usage_adaptor(info)):
            return None
        return info

    def _admit(self, row: TableRow) -> bool:
        info = self.evaluate(row)
        if info is None:
            return False
        self.infos[row.id] = info
        return True

    def _push(self, rid: str) -> None:
        if self.size_limited:
            info = self.infos[rid]
            self._ranking.add(rid, info.last_used_at, info.usage_count)
        else:
            self._queue.append(rid)

    def size_of(self, row: TableRow) -> int:
        """The size to report and count for ``row`` (measured once when unknown).

        An equal pair's mutable uses its own size, else its twin's, else a measurement
        (BuildKit warms sizes the same way before it deletes).
        """
        known = self.sizes.get(row.id)
        if known is not None:
            return known
        size = row.size
        if size == SIZE_UNKNOWN and row.equal_immutable is not None:
            twin = self.table.get(row.equal_immutable)
            if twin is not None:
                size = twin.size
        if size == SIZE_UNKNOWN:
            size = self.measure(row)
        self.sizes[row.id] = size
        return size

    def _release_parents(self, row: TableRow) -> list[TableRow]:
        """What deleting ``row`` (and its twin) does to its parents, by the holds counted so
        far in this plan: the rows of those left with no refs, as BuildKit's next pass sees
        them (a parent whose last counting hold went has a use stamped, ``updateLastUsed``)."""
        slots = [p for p in row.parents if p]
        if row.equal_immutable is not None and row.equal_immutable in self.table:
            slots *= 2  # the twin holds the same parents
        freed = []
        for p in slots:
            parent = self.table.get(p)
            if parent is None:
                continue
            if p in row.trigger_parents:
                left_triggers = self._pending_triggers.get(p, parent.trigger_holds) - 1
                self._pending_triggers[p] = left_triggers
                if left_triggers == 0 and parent.handles == 0:
                    self._stamped[p] = next(self._next_stamp)
            left = self._pending_holds.get(p, parent.holders) - 1
            self._pending_holds[p] = left
            if left == 0 and parent.handles == 0:
                freed.append(p)
        out = []
        for p in freed:
            parent = self.table[p]._replace(holders=0)
            stamp = self._stamped.pop(p, None)
            if stamp is not None:
                parent = parent._replace(usage_count=parent.usage_count + 1, last_used_at=stamp)
            self.table[p] = parent
            self._freed.add(p)
            out.append(parent)
        return out

    def next_batch(self, limit: int = PRUNE_BATCH) -> list[str]:
        """The next records to delete (empty: this policy is done).

        Size-limited: BuildKit's gc-mode passes, one record each, while the total is at least
        the bytes to keep (its stop test is ``total < keep``); parents freed by a pass are
        candidates in the next one. Otherwise: up to ``limit`` candidates.
        """
        out: list[str] = []
        if not self.size_limited:
            while self._queue and len(out) < limit:
                rid = self._queue.popleft()
                if rid in self.infos:
                    out.append(rid)
            return out
        while len(out) < limit and self.total >= self.keep:
            chosen = self._ranking.pop()
            if chosen is None:
                break
            row = self.table.get(chosen)
            if chosen not in self.infos or row is None:
                continue
            rid = chosen
            size = self.size_of(row)
            self.total -= size
            self._taken[rid] = size
            out.append(rid)
            for parent in self._release_parents(row):
                if parent.id not in self.infos and self._admit(parent):
                    self._push(parent.id)
        return out

    def done(
        self,
        removed: Iterable[str],
        refused: Iterable[str] = (),
        freed: Iterable[TableRow] = (),
    ) -> None:
        """Takes back the outcome of a batch.

        Args:
            removed: Ids deleted.
            refused: Ids the manager would not delete (taken or used since the scan); their
                bytes count again.
            freed: Parents left without refs (fresh rows); those the plan did not free
                itself and that qualify become candidates.

        Raises:
            RefcacheError: the ref checker failed.
        """
        for rid in refused:
            self.infos.pop(rid, None)
            self.total += self._taken.pop(rid, 0)
        for rid in removed:
            self.infos.pop(rid, None)
            self._taken.pop(rid, None)
            row = self.table.pop(rid, None)
            if row is not None and row.equal_immutable is not None:
                self.table.pop(row.equal_immutable, None)
        for row in freed:
            if row.id in self._freed:
                continue  # the plan played this release already, as BuildKit's pass would
            self.table[row.id] = row
            self._pending_holds.pop(row.id, None)
            if row.id not in self.infos and self._admit(row):
                self._push(row.id)


def size_limit(
    table: Mapping[str, TableRow],
    policy: PrunePolicy,
    *,
    checker: RefChecker | None,
    measure: Callable[[TableRow], int],
    free: Callable[[], int],
) -> tuple[int, int, bool, dict[str, TableRow]]:
    """``(total, keep, done, table with sizes filled)`` for a policy (zeros without limits).

    BuildKit: the total is the disk usage of every record that is not shared, in use or not,
    with unknown sizes measured first; ``free`` is read only for ``min_free_space``. ``done``
    says that nothing is to be deleted: the total is below the bytes to keep, or
    ``min_free_space`` is already free and no maximum is set. (BuildKit sets keep = total in
    that last case, ``ac123b493``, "delete nothing", but its stop test ``total < keep`` then
    still deletes one record per run; this port deletes nothing, as the commit intends.)
    """
    if not (policy.max_used_space or policy.reserved_space or policy.min_free_space):
        return 0, 0, False, dict(table)
    usage = fill_sizes(compute_usage(table, checker=checker), table, measure)
    total = sum(max(r.size, 0) for r in usage if not r.shared)
    free_now = free() if policy.min_free_space else 0
    keep = calculate_keep_bytes(total, free_now, policy)
    satisfied = (
        policy.min_free_space != 0
        and policy.min_free_space <= free_now
        and policy.max_used_space == 0
    )
    done = keep != 0 and (total < keep or (satisfied and total <= keep))
    known = {r.id: r.size for r in usage}
    filled = {
        rid: row._replace(size=known[rid]) if rid in known and row.size == SIZE_UNKNOWN else row
        for rid, row in table.items()
    }
    return total, keep, done, filled


def simulate_prune(
    table: Mapping[str, TableRow],
    policies: Sequence[PrunePolicy],
    *,
    checker: RefChecker | None,
    now: int,
    measure: Callable[[TableRow], int],
    free: Callable[[], int],
) -> list[UsageInfo]:
    """What a prune with ``policies`` would delete from ``table``, in order (a dry run).

    The same planning as the live prune; removals are simulated with
    :func:`simulate_removal`. Nothing is changed.
    """
    sim = dict(table)
    out: list[UsageInfo] = []
    for policy in policies:
        total, keep, done, filled = size_limit(
            sim, policy, checker=checker, measure=measure, free=free
        )
        if done:
            continue
        planner = PrunePlanner(
            filled, policy, checker=checker, now=now, measure=measure, total=total, keep=keep
        )
        while batch := planner.next_batch():
            rows = [planner.table[rid] for rid in batch]
            out.extend(
                dataclasses.replace(
                    planner.infos[row.id], size=planner.size_of(row), parents=row.parent_ids()
                )
                for row in rows
            )
            freed = simulate_removal(sim, batch)
            planner.done(batch, (), freed)
    return out


def _ns(delta: timedelta) -> int:
    return int(delta.total_seconds() * 1e9)


# -- listeners ----------------------------------------------------------------------------------

#: Events a :class:`CacheListener` may receive, as ``(event, *args)`` tells.
EVENTS = frozenset({"record_pruned", "prune_finished"})


class CacheListener(pykka.Actor):
    """Base for Pykka actors that receive cache events (Mopidy's listener pattern).

    Subscribe an actor with ``cache.manager.subscribe(actor_ref)``. Events are *told* as
    tuples ``(event, *args)`` and dispatched to the method of that name; override the ones
    you need. Other messages go to the next ``on_receive`` in the class hierarchy::

        class Progress(CacheListener, pykka.ThreadingActor):
            def record_pruned(self, info: UsageInfo) -> None:
                print("pruned", info.id, info.size)

    Any actor may subscribe instead, if it accepts these tuples in ``on_receive``.
    """

    def on_receive(self, message: Any) -> Any:
        """Dispatches event tuples to :meth:`on_event`; passes anything else on."""
        if (
            isinstance(message, tuple)
            and message
            and isinstance(message[0], str)
            and message[0] in EVENTS
        ):
            self.on_event(message[0], *message[1:])
            return None
        return super().on_receive(message)

    def on_event(self, event: str, *args: Any) -> None:
        """Calls the method named ``event``; a failing one is logged, not raised (Mopidy)."""
        try:
            getattr(self, event)(*args)
        except Exception:
            logger.exception("cache listener %r failed on %s", self, event)

    def record_pruned(self, info: UsageInfo) -> None:
        """A record was deleted by a prune (``info.size`` is its measured size)."""

    def prune_finished(self, records: int, reclaimed: int) -> None:
        """A prune is done: ``records`` deleted, ``reclaimed`` bytes by their sizes."""


def _notify(listeners: Sequence[pykka.ActorRef[Any]], message: tuple[Any, ...]) -> list[Any]:
    """Tells each listener ``message``; returns the listeners that are gone."""
    gone = []
    for ref in listeners:
        try:
            ref.tell(message)
        except pykka.ActorDeadError:
            gone.append(ref)
    return gone


class _Measurer:
    """Measures rows in a job; :meth:`flush` hands the sizes to the manager.

    The manager caches them (table, metadata through the statistics writer, the record's
    actor and an equal twin), unless the size was reset since the row was read; the
    handler stays short however many records were measured (a chunk per ask).
    """

    def __init__(self, core: CacheCore) -> None:
        self.core = core
        self.cache: dict[str, tuple[int, int]] = {}

    def __call__(self, row: TableRow) -> int:
        size, cacheable = measure_live(self.core, row)
        # A mutable's size holds while nobody has it (it is reset when someone takes it).
        if cacheable and not (row.mutable and row.handles):
            self.cache[row.id] = (size, row.size_gen)
        return size

    def flush(self) -> None:
        """Hands the measured sizes to the manager, a chunk at a time."""
        items = list(self.cache.items())
        self.cache.clear()
        for lo in range(0, len(items), SIZES_CHUNK):
            chunk = dict(items[lo : lo + SIZES_CHUNK])
            try:
                self.core.ask_manager(("known_sizes", chunk))
            except RefcacheError as exc:  # only a cache of sizes: best effort
                logger.warning("caching %d measured sizes failed: %s", len(chunk), exc)


# -- the mixin ------------------------------------------------------------------------------------


@dataclass
class _PruneState:
    """The mixin's own manager state (created on first use, on the manager's thread)."""

    listeners: list[pykka.ActorRef[Any]] = field(default_factory=list)
    scans: OrderedDict[int, list[str]] = field(default_factory=OrderedDict)
    next_scan: int = 1
    pruning: set[str] = field(default_factory=set)
    #: parent id -> holds that records marked for removal will release (a batch deletes a
    #: parent after the children it frees, as BuildKit's later passes do)
    releasing: dict[str, int] = field(default_factory=dict)

    def note_release(self, e: RecordEntry, sign: int) -> None:
        """Counts (``sign`` 1) or uncounts (-1) the holds ``e`` will release."""
        for p in e.parents:
            if p:
                n = self.releasing.get(p, 0) + sign
                if n:
                    self.releasing[p] = n
                else:
                    self.releasing.pop(p, None)


MAX_OPEN_SCANS = 16  #: table scans kept for jobs that have not finished reading them


class PruneMixin:
    """``disk_usage``, ``prune`` and the listener API of :class:`~actors._manager.CacheManager`."""

    if TYPE_CHECKING:
        core: CacheCore
        entries: dict[str, RecordEntry]
        _prune_running: bool
        _prune_queue: list[tuple[tuple[PrunePolicy, ...], Future[list[UsageInfo]]]]
        _prune_stats: list[Any]
        _gc_stats: list[int]

        def _size_snapshot(self, e: RecordEntry) -> str: ...
        def _remove(
            self, e: RecordEntry, *, remove_snapshot: bool, txn: WriteTxn | None = None
        ) -> None: ...
        def _settle(self, e: RecordEntry) -> Settled | None: ...
        def _delete_leases(self, txn: WriteTxn, ids: Iterable[str]) -> None: ...
        def _learn_size(
            self, e: RecordEntry, size: int, generation: int, *, tell: bool
        ) -> bool: ...

    # -- state --------------------------------------------------------------------------------

    def _prune_state(self) -> _PruneState:
        state = self.__dict__.get("_prune_state_")
        if state is None:
            state = self.__dict__["_prune_state_"] = _PruneState()
        return state

    # -- listeners ----------------------------------------------------------------------------

    def subscribe(self, listener: pykka.ActorRef[Any]) -> None:
        """Sends this cache's events to ``listener`` (see :class:`CacheListener`).

        Raises:
            InvalidError: ``listener`` is not a Pykka actor reference.
        """
        if not isinstance(listener, pykka.ActorRef):
            msg = f"listeners must be Pykka actor refs, not {type(listener).__name__}"
            raise InvalidError(msg)
        listeners = self._prune_state().listeners
        if listener not in listeners:
            listeners.append(listener)

    def unsubscribe(self, listener: pykka.ActorRef[Any]) -> None:
        """Stops sending events to ``listener`` (no-op when it is not subscribed)."""
        listeners = self._prune_state().listeners
        with contextlib.suppress(ValueError):
            listeners.remove(listener)

    def _op_listeners(self) -> tuple[pykka.ActorRef[Any], ...]:
        return tuple(self._prune_state().listeners)

    def _op_listeners_gone(self, gone: list[pykka.ActorRef[Any]]) -> None:
        for ref in gone:
            self.unsubscribe(ref)

    # -- table scan ----------------------------------------------------------------------------

    def _op_table_scan(
        self, token: int | None, start: int, count: int
    ) -> tuple[int, list[TableRow], bool]:
        """Rows ``start:start+count`` of a copy of the table's ids taken at the first chunk.

        The set of records is the table's at the first chunk (records removed since are
        skipped, records added since are not seen); each row is read when its chunk is. A
        job that needs a record's latest state re-checks it (``prune_mark`` does).
        """
        state = self._prune_state()
        if token is None or token not in state.scans:
            token = state.next_scan
            state.next_scan += 1
            state.scans[token] = list(self.entries)
            while len(state.scans) > MAX_OPEN_SCANS:
                state.scans.popitem(last=False)  # a job that died mid-scan
        ids = state.scans[token]
        chunk = [self.entries[rid] for rid in ids[start : start + count] if rid in self.entries]
        done = start + count >= len(ids)
        if done:
            del state.scans[token]
        return token, self._rows(chunk), done

    def _rows(self, chunk: Sequence[RecordEntry]) -> list[TableRow]:
        """Rows of ``chunk``; open handles are asked of active record actors all at once."""
        futures = {e.id: e.actor.ask(("count",), block=False) for e in chunk if e.actor is not None}
        counts: dict[str, int] = {}
        for rid, f in futures.items():
            try:
                counts[rid] = int(f.get(timeout=self.core.timeout))
            except pykka.ActorDeadError:
                counts[rid] = 0
        pruning = self._prune_state().pruning
        return [
            entry_row(
                e,
                handles=counts.get(e.id, 0),
                size_snapshot=self._size_snapshot(e),
                pruning=e.id in pruning,
            )
            for e in chunk
        ]

    def _scan_job_table(self) -> dict[str, TableRow]:
        """The whole table, read chunk by chunk (runs in a job)."""
        table: dict[str, TableRow] = {}
        token: int | None = None
        start = 0
        while True:
            token, rows, done = self.core.ask_manager(("table_scan", token, start, SCAN_CHUNK))
            for row in rows:
                table[row.id] = row
            if done:
                return table
            start += SCAN_CHUNK

    def _measure(self, row: TableRow) -> int:
        return measure_live(self.core, row)[0]

    def _op_known_sizes(self, sizes: dict[str, tuple[int, int]]) -> list[str]:
        """Caches sizes a job measured (``id -> (size, generation)``); returns the ids taken.

        The table is the one place sizes are read from (disk usage, ``info()``,
        ``statistics()``), whether or not the record's actor is activated; the actor gets
        the size too, for ``size()``. A size reset since the job read the row is refused.
        """
        accepted = []
        for rid, (size, generation) in sizes.items():
            e = self.entries.get(rid)
            if e is not None and self._learn_size(e, size, generation, tell=True):
                accepted.append(rid)
        return accepted

    # -- disk usage -------------------------------------------------------------------------

    def disk_usage(
        self, filters: Sequence[str] = (), *, age_limit: timedelta | None = None
    ) -> Future[list[UsageInfo]]:
        """One row per visible record (BuildKit ``DiskUsage``), computed off the manager's thread.

        An equal pair shows once; a chain held only by unreferenced records is not in use; a
        mutable record in use reports size 0; records whose layers the ref checker reports as
        used elsewhere are shared, and so are their ancestors. Unknown sizes are measured by
        the job (and cached).

        Args:
            filters: containerd filter strings (OR'ed; each a comma-separated AND) over
                ``id``, ``parents``, ``description``, ``type``, ``inuse``, ``mutable``,
                ``immutable``, ``shared``, ``private``.
            age_limit: Leave out records used more recently than this (never-used records
                are kept), as a prune with that ``keep_duration`` would.

        Raises:
            InvalidError: a malformed filter, a filter naming an unknown field, or a bad age
                limit.
        """
        if isinstance(filters, str):
            filters = (filters,)
        if not isinstance(filters, list | tuple):
            msg = f"disk usage filters must be a sequence of strings, not {filters!r}"
            raise InvalidError(msg)
        if age_limit is not None and (
            not isinstance(age_limit, timedelta) or age_limit < timedelta(0)
        ):
            msg = f"disk usage age_limit must be a timedelta >= 0, not {age_limit!r}"
            raise InvalidError(msg)
        flt = parse_usage_filters(*filters)  # a bad filter fails here, before any work
        return self._submit(self._usage_job, flt if filters else None, age_limit)

    def _usage_job(self, flt: Filter | None, age_limit: timedelta | None) -> list[UsageInfo]:
        core = self.core
        with core.timed("disk_usage"):
            table = self._scan_job_table()
            cutoff = time.time_ns() - _ns(age_limit) if age_limit else None
            rows = compute_usage(table, checker=core.ref_checker, flt=flt, cutoff=cutoff)
            measure = _Measurer(core)
            rows = fill_sizes(rows, table, measure)
            measure.flush()
            return rows

    # -- prune ----------------------------------------------------------------------------------

    def prune(self, *policies: PrunePolicy) -> Future[list[UsageInfo]]:
        """Deletes unreferenced records by each policy in turn, then collects garbage.

        No policy means one that deletes everything unreferenced (``all``). Records are marked
        dead and ``cache.deleted`` is persisted before any removal; deletions and GC run off
        the manager's thread, so other operations keep being served. One prune runs at a
        time; later ones wait their turn (BuildKit ``muPrune``). Listeners get a
        ``("record_pruned", UsageInfo)`` tell per deleted record.

        Returns:
            A future of the deleted records (sizes measured), in deletion order.

        Raises:
            InvalidError: a malformed policy or filter, or a filter naming an unknown field.
        """
        if not policies:
            policies = (PrunePolicy(all=True),)
        for p in policies:
            if not isinstance(p, PrunePolicy):
                msg = f"prune takes PrunePolicy values, not {type(p).__name__}"
                raise InvalidError(msg)
            parse_usage_filters(*p.filters)
        if self._prune_running:
            waiter: Future[list[UsageInfo]] = Future()
            self._prune_queue.append((policies, waiter))
            return waiter
        future = self._submit(self._prune_job, policies)
        self._prune_running = True
        return future

    def _submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        return self.core.submit(fn, *args)

    def _prune_job(self, policies: tuple[PrunePolicy, ...]) -> list[UsageInfo]:
        core = self.core
        start = time.perf_counter()
        deleted: list[UsageInfo] = []
        try:
            with core.timed("prune"):
                for policy in policies:
                    self._run_policy(policy, deleted)
                # BuildKit's GarbageCollect: the snapshots and blobs whose leases went.
                stats = collect(
                    core.env, content=core.content, snapshotter=core.snapshotter, leases=core.leases
                )
                core.ask_manager(("gc_done", stats.bytes_freed))
            reclaimed = sum(max(r.size, 0) for r in deleted)
            listeners = core.ask_manager(("listeners",))
            gone = _notify(listeners, ("prune_finished", len(deleted), reclaimed))
            if gone:
                core.ask_manager(("listeners_gone", gone))
        finally:
            with contextlib.suppress(RefcacheError):
                core.ask_manager(
                    (
                        "prune_done",
                        len(deleted),
                        sum(max(r.size, 0) for r in deleted),
                        time.perf_counter() - start,
                    )
                )
        return deleted

    def _run_policy(self, policy: PrunePolicy, deleted: list[UsageInfo]) -> None:
        """Deletes what one policy selects (BuildKit ``prune``: passes until none deletes)."""
        core = self.core
        table = self._scan_job_table()
        measure = _Measurer(core)
        total, keep, done, table = size_limit(
            table,
            policy,
            checker=core.ref_checker,
            measure=measure,
            free=lambda: free_bytes(core.root),
        )
        measure.flush()
        if done:
            return
        planner = PrunePlanner(
            table,
            policy,
            checker=core.ref_checker,
            now=time.time_ns(),
            measure=self._measure,
            total=total,
            keep=keep,
        )
        while True:
            batch = planner.next_batch()
            if not batch:
                return
            self._delete_batch(planner, batch, deleted)

    def _delete_batch(
        self, planner: PrunePlanner, batch: list[str], deleted: list[UsageInfo]
    ) -> None:
        """Marks, persists, measures, clears and forgets one batch; notifies listeners."""
        core = self.core
        marked: list[tuple[TableRow, str | None]] = []
        refused: list[str] = []
        pending: tuple[str, ...] = tuple(batch)
        while pending:
            got, no, pending = core.ask_manager(("prune_mark", pending, planner.cutoff))
            marked.extend(got)
            refused.extend(no)
        if not marked:
            planner.done((), refused)
            return
        pairs = [(row.id, twin) for row, twin in marked]
        ids = [rid for pair in pairs for rid in pair if rid]
        try:
            # Crash safety: from here a restart finishes the removal (BuildKit cache.deleted).
            with core.env.write_txn() as txn:
                for item in core.store.get_many(ids):
                    if item.exists:
                        item.queue(KEY_DELETED, True)
                        item.commit(txn=txn)
        except BaseException:
            with contextlib.suppress(RefcacheError):
                core.ask_manager(("prune_unmark", tuple(pairs)))
            raise
        # Sizes are measured while the snapshots still exist (BuildKit warms them off-lock).
        sizes = {row.id: planner.size_of(row) for row, _ in marked}
        try:
            with core.env.write_txn() as txn:
                for rid, twin in pairs:
                    core.store.clear(rid, txn=txn)
                    leases = [rid, rid + "-variants", rid + "-view"]
                    if twin is not None:
                        core.store.clear(twin, txn=txn)
                        leases += [twin, twin + "-view"]  # as the manager's _remove does
                    for lease_id in leases:
                        with contextlib.suppress(NotFoundError):
                            core.leases.delete(lease_id, txn=txn)
        except BaseException:
            # The records are dead and flagged: the manager's removal does the I/O itself.
            with contextlib.suppress(RefcacheError):
                self._forget(pairs)
            raise
        freed, listeners = self._forget(pairs)
        infos = [
            UsageInfo(
                id=row.id,
                mutable=row.mutable,
                in_use=False,
                size=max(sizes[row.id], 0),
                created_at=row.created_at,
                last_used_at=row.last_used_at,
                usage_count=row.usage_count,
                parents=row.parent_ids(),
                description=row.description,
                record_type=row.record_type or "regular",
                shared=planner.infos[row.id].shared if row.id in planner.infos else False,
            )
            for row, _ in marked
        ]
        planner.done(sizes, refused, freed)
        deleted.extend(infos)
        gone: list[Any] = []
        for info in infos:
            gone.extend(g for g in _notify(listeners, ("record_pruned", info)) if g not in gone)
        if gone:
            core.ask_manager(("listeners_gone", gone))

    def _forget(
        self, pairs: Sequence[tuple[str, str | None]]
    ) -> tuple[list[TableRow], tuple[pykka.ActorRef[Any], ...]]:
        freed: list[TableRow] = []
        listeners: tuple[pykka.ActorRef[Any], ...] = ()
        rest: tuple[tuple[str, str | None], ...] = tuple(pairs)
        while rest:
            got, listeners, rest = self.core.ask_manager(("prune_forget", rest))
            freed.extend(got)
        return freed, listeners

    # -- prune handlers (manager thread) -----------------------------------------------------

    def _prune_idle(self, e: RecordEntry) -> bool:
        """Whether ``e`` has no handles, settling its actor if so (before removing ``e``).

        Between a last release and the manager's ``unreferenced`` step a released handle can
        still clone through the record actor; settling closes that window.
        """
        if e.actor is None:
            return True
        return self._settle(e) is not None or e.actor is None

    def _op_prune_mark(
        self, ids: tuple[str, ...], cutoff: int | None
    ) -> tuple[list[tuple[TableRow, str | None]], list[str], tuple[str, ...]]:
        """Marks prune candidates dead after re-checking them; returns (marked, refused, rest).

        Re-checked here because the scan is older: no refs, not dead or finalizing, its twin
        idle too, and not used since the scan when ``keep_duration`` protects recent records.
        """
        deadline = time.perf_counter() + HANDLER_BUDGET_S
        state = self._prune_state()
        marked: list[tuple[TableRow, str | None]] = []
        refused: list[str] = []
        for n, rid in enumerate(ids):
            if n and time.perf_counter() > deadline:
                return marked, refused, ids[n:]
            e = self.entries.get(rid)
            if e is None or e.dead or self._held(e, state) or e.finalizing is not None:
                refused.append(rid)
                continue
            if e.equal_mutable is not None:
                refused.append(rid)  # a pair goes with its mutable
                continue
            twin = self.entries.get(e.equal_immutable) if e.equal_immutable else None
            if twin is not None and (
                twin.dead or self._held(twin, state) or twin.finalizing is not None
            ):
                refused.append(rid)
                continue
            if _used_after(e, cutoff):
                refused.append(rid)
                continue
            if not self._prune_idle(e) or (twin is not None and not self._prune_idle(twin)):
                refused.append(rid)
                continue
            if _used_after(e, cutoff):  # settling brought fresher statistics
                refused.append(rid)
                with self.core.env.write_txn() as txn:  # the view lease the settle dropped
                    self._delete_leases(txn, [rid + "-view"])
                continue
            e.dead = True
            state.pruning.add(rid)
            state.note_release(e, 1)
            if twin is not None:
                twin.dead = True
                state.pruning.add(twin.id)
                state.note_release(twin, 1)
            row = entry_row(e, handles=0, size_snapshot=self._size_snapshot(e), pruning=True)
            marked.append((row, twin.id if twin is not None else None))
        return marked, refused, ()

    @staticmethod
    def _held(e: RecordEntry, state: _PruneState) -> bool:
        """Whether a child that is not marked for removal holds ``e``."""
        return e.holders > state.releasing.get(e.id, 0)

    def _op_prune_unmark(self, pairs: tuple[tuple[str, str | None], ...]) -> None:
        """Gives back records marked by ``prune_mark`` when persisting the mark failed."""
        state = self._prune_state()
        for pair in pairs:
            for rid in pair:
                if rid is None:
                    continue
                e = self.entries.get(rid)
                if e is not None and rid in state.pruning:
                    e.dead = False
                    state.note_release(e, -1)
                state.pruning.discard(rid)

    def _op_prune_forget(
        self, pairs: tuple[tuple[str, str | None], ...]
    ) -> tuple[list[TableRow], tuple[pykka.ActorRef[Any], ...], tuple[tuple[str, str | None], ...]]:
        """Drops marked records from the table (their metadata and leases are already gone).

        Returns the parents left without refs (fresh rows: the next candidates), the
        listeners, and the pairs not handled within the time budget.
        """
        deadline = time.perf_counter() + HANDLER_BUDGET_S
        state = self._prune_state()
        parents: dict[str, None] = {}
        rest: tuple[tuple[str, str | None], ...] = ()
        # The job cleared their metadata and leases: this transaction has nothing to write
        # (no fsync) unless that failed, when _remove's own deletions do it.
        with self.core.env.write_txn() as txn:
            for n, (rid, twin_id) in enumerate(pairs):
                if n and time.perf_counter() > deadline:
                    rest = pairs[n:]
                    break
                e = self.entries.get(rid)
                if twin_id is not None:
                    twin = self.entries.get(twin_id)
                    if twin is not None:
                        if twin_id in state.pruning:
                            state.note_release(twin, -1)
                        self._remove(twin, remove_snapshot=False, txn=txn)
                    state.pruning.discard(twin_id)
                if e is not None:
                    if rid in state.pruning:
                        state.note_release(e, -1)
                    self._remove(e, remove_snapshot=True, txn=txn)
                    parents.update(dict.fromkeys(p for p in e.parents if p))
                state.pruning.discard(rid)
        freed = [
            self.entries[p]
            for p in parents
            if p in self.entries and not self.entries[p].dead and self.entries[p].holders == 0
        ]
        return self._rows(freed), tuple(state.listeners), rest

    def _op_prune_done(self, records: int, size: int, seconds: float) -> None:
        self._prune_stats[0] += records
        self._prune_stats[1] += size
        self._prune_stats[2] += seconds
        if not self._prune_queue:
            self._prune_running = False
            return
        policies, waiter = self._prune_queue.pop(0)
        try:
            job = self.core.submit(self._prune_job, policies)
        except ClosedError as exc:  # the executor is shut down: the cache is closing
            self._prune_running = False
            waiter.set_exception(self.core.closed_error("run a queued prune"))
            logger.debug("queued prune not started: %s", exc)
            return
        job.add_done_callback(lambda done: _chain(done, waiter))

    def _op_gc_done(self, freed: int) -> None:
        self._gc_stats[0] += 1
        self._gc_stats[1] += freed


def _after(last_used_at: int | None, cutoff: int | None) -> bool:
    """Whether a record used at ``last_used_at`` is protected by ``cutoff`` (never used: no)."""
    return cutoff is not None and last_used_at is not None and last_used_at > cutoff


def _used_after(e: RecordEntry, cutoff: int | None) -> bool:
    return _after(e.last_used_at, cutoff)


def _chain(done: Future[Any], waiter: Future[Any]) -> None:
    """Copies the outcome of ``done`` to ``waiter`` (a queued prune's reply)."""
    if done.cancelled():
        waiter.set_exception(ClosedError("the prune was cancelled: the cache is closing"))
        return
    exc = done.exception()
    if exc is not None:
        waiter.set_exception(exc)
    else:
        waiter.set_result(done.result())
