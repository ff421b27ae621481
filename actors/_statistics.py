"""``CacheManager.statistics()``: one consistent snapshot of the cache, for metrics.

Runs on the manager's thread (the table is read in one handler, so the snapshot is
consistent); the counters kept outside every actor are copied under their lock.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple

from ._types import SIZE_UNKNOWN, CacheStatistics
from ._usage import records_in_use, shown_size, visible_records

if TYPE_CHECKING:
    from ._core import CacheCore
    from ._pruner import Pruner
    from ._table import RecordTable

__all__ = ["table_statistics"]

_KINDS = ("base", "layer", "merge", "diff")


class _Records(NamedTuple):
    """What the table says (the fields of :class:`CacheStatistics` of the same names)."""

    records: int
    records_by_kind: Mapping[str, int]
    mutable: int
    lazy: int
    in_use: int
    open_handles: int
    bytes_by_kind: Mapping[str, int]
    reclaimable_bytes: int
    active_actors: int
    records_detail: tuple[tuple[str, int, int], ...]


def table_statistics(core: CacheCore, table: RecordTable, pruner: Pruner) -> CacheStatistics:
    """The :class:`CacheStatistics` of the cache now (see ``CacheManager.statistics``)."""
    doubles, ops, lat_sum, lat_buckets = core.counters()
    map_size, used = core.env.map_info()
    reg = core.registry_counters()
    r = _records(table, pruner.pruning)
    return CacheStatistics(
        records=r.records,
        records_by_kind=r.records_by_kind,
        mutable=r.mutable,
        immutable=r.records - r.mutable,
        lazy=r.lazy,
        in_use=r.in_use,
        dead=0,
        open_handles=r.open_handles,
        bytes_by_kind=r.bytes_by_kind,
        reclaimable_bytes=r.reclaimable_bytes,
        active_actors=r.active_actors,
        records_detail=r.records_detail,
        pool_workers=core.pool.workers,
        operations=ops,
        latency_sum_seconds=lat_sum,
        latency_buckets=lat_buckets,
        prune_records_total=pruner.records_total,
        prune_bytes_total=pruner.bytes_total,
        prune_seconds_total=pruner.seconds_total,
        gc_runs_total=pruner.gc_runs,
        gc_bytes_total=pruner.gc_bytes,
        double_releases_total=doubles,
        lmdb_map_size_bytes=map_size,
        lmdb_used_bytes=used,
        registry_bytes=reg.bytes,
        registry_blobs=reg.blobs,
        registry_requests=reg.requests,
        registry_latency_sum_seconds=reg.latency_sum,
        registry_latency_buckets={k: tuple(v) for k, v in reg.latency_buckets.items()},
    )


def _records(table: RecordTable, going: set[str]) -> _Records:
    """The records, handles and bytes of the table.

    Sizes are counted as ``disk_usage`` shows them, through the same functions: an equal
    pair once, a mutable with open handles as 0, unknown sizes as 0; reclaimable are the
    records disk usage reports as not in use.
    """
    counts = table.handle_counts()
    by_kind: dict[str, int] = dict.fromkeys(_KINDS, 0)
    bytes_by_kind: dict[str, int] = dict.fromkeys(_KINDS, 0)
    mutable = lazy = in_use = handles = reclaimable = active = 0
    entries = table.entries
    refs: dict[str, int] = {}
    for rid, e in entries.items():
        by_kind[e.kind] += 1
        mutable += e.mutable
        lazy += e.blob_only
        active += e.actor is not None
        n = counts.get(rid, 0)
        handles += n
        in_use += n > 0
        refs[rid] = n + e.holders
    visible = visible_records(entries, refs, going)
    held = records_in_use(entries, refs, visible, going)
    detail = []
    for rid in visible:
        e = entries[rid]
        n = counts.get(rid, 0)
        size = shown_size(entries, e, n)
        bytes_by_kind[e.kind] += max(size, 0)
        if rid not in held:
            reclaimable += max(size, 0)
        detail.append((rid, n, size))
    if len(visible) != len(entries):
        # The hidden half of a pair has no size of its own to show; its handles count.
        shown = set(visible)
        detail.extend((rid, n, SIZE_UNKNOWN) for rid, n in counts.items() if n and rid not in shown)
    detail.sort(key=lambda d: (d[1] == 0, d[0]))
    return _Records(
        len(entries),
        by_kind,
        mutable,
        lazy,
        in_use,
        handles,
        bytes_by_kind,
        reclaimable,
        active,
        tuple(detail),
    )
