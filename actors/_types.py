"""Immutable value types of the public API (API.md "Value types").

Every type here is a frozen, slotted dataclass: values cross actor mailboxes unchanged
(DESIGN.md rule 5).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import BinaryIO, Literal

from ..storage import Descriptor, InvalidError, frozen_map

__all__ = [
    "CacheStatistics",
    "DescHandler",
    "PrunePolicy",
    "RecordInfo",
    "RecordKind",
    "Remote",
    "SIZE_UNKNOWN",
    "UsageInfo",
]

RecordKind = Literal["base", "layer", "merge", "diff"]

#: The size of a record while it is not measured (``RecordInfo.size``, ``UsageInfo.size``).
SIZE_UNKNOWN = -1


@dataclass(frozen=True, slots=True)
class DescHandler:
    """How to fetch a lazy blob: ``provider(desc)`` returns a binary file with the blob."""

    provider: Callable[[Descriptor], BinaryIO]
    annotations: Mapping[str, str] = field(default_factory=lambda: frozen_map(None))
    snapshot_labels: Mapping[str, str] = field(default_factory=lambda: frozen_map(None))
    ref: str = ""

    def __hash__(self) -> int:
        return hash((id(self.provider), self.ref))


@dataclass(frozen=True, slots=True)
class RecordInfo:
    """Everything known about one record (``ImmutableRef.info()``, ``search``).

    Times are nanoseconds since the epoch; ``last_used_at`` is ``None`` when never used;
    ``size`` is -1 while unknown.
    """

    id: str
    kind: RecordKind
    mutable: bool
    description: str
    created_at: int
    last_used_at: int | None
    usage_count: int
    record_type: str
    cache_policy: Literal["default", "retain"]
    parents: tuple[str, ...]
    blob: str
    blob_only: bool
    diff_id: str
    chain_id: str
    blob_chain_id: str
    snapshot_id: str
    media_type: str
    size: int
    equal_mutable: str | None


@dataclass(frozen=True, slots=True)
class UsageInfo:
    """One ``disk_usage``/``prune`` row (BuildKit ``client.UsageInfo``)."""

    id: str
    mutable: bool
    in_use: bool
    size: int
    created_at: int
    last_used_at: int | None
    usage_count: int
    parents: tuple[str, ...]
    description: str
    record_type: str
    shared: bool


@dataclass(frozen=True, slots=True)
class PrunePolicy:
    """One prune pass (BuildKit ``client.PruneInfo``).

    Sizes are bytes; ``keep_duration`` protects records used more recently than that.
    ``filters`` are containerd filter strings (OR'ed; each a comma-separated AND).
    """

    all: bool = False
    filters: tuple[str, ...] = ()
    keep_duration: timedelta | None = None
    reserved_space: int = 0
    max_used_space: int = 0
    min_free_space: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.all, bool):
            msg = f"invalid prune policy all={self.all!r}: expected a bool"
            raise InvalidError(msg)
        filters: object = self.filters
        if isinstance(filters, str):
            filters = (filters,)
        elif isinstance(filters, Iterable) and not isinstance(filters, bytes | bytearray | Mapping):
            filters = tuple(filters)
        if not isinstance(filters, tuple) or not all(isinstance(f, str) for f in filters):
            msg = f"invalid prune policy filters={self.filters!r}: expected filter strings"
            raise InvalidError(msg)
        object.__setattr__(self, "filters", filters)
        for name in ("reserved_space", "max_used_space", "min_free_space"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                msg = f"invalid prune policy {name}={value!r}: expected bytes >= 0"
                raise InvalidError(msg)
        if self.keep_duration is not None and (
            not isinstance(self.keep_duration, timedelta) or self.keep_duration < timedelta(0)
        ):
            msg = f"invalid prune policy keep_duration={self.keep_duration!r}"
            raise InvalidError(msg)


@dataclass(frozen=True, slots=True)
class Remote:
    """Layer descriptors of a ref plus a provider that reads them from the content store."""

    descriptors: tuple[Descriptor, ...]
    provider: Callable[[Descriptor], BinaryIO]


@dataclass(frozen=True, slots=True)
class CacheStatistics:
    """One consistent snapshot of the cache, taken by the manager actor (for metrics).

    Attributes:
        records: Loaded records (dead ones excluded).
        records_by_kind: Count per kind (base, layer, merge, diff).
        mutable: Mutable records.
        immutable: Immutable records.
        lazy: Blob-only records.
        in_use: Records with at least one open handle.
        dead: Records being removed.
        open_handles: Open user handles over all records.
        bytes_by_kind: Sizes as ``disk_usage`` shows them, summed per kind: an equal pair
            once, a mutable in use and sizes not measured yet as 0.
        reclaimable_bytes: Sizes of the records ``disk_usage`` reports as not in use
            (chains held only by unreferenced records included).
        active_actors: Record actors currently activated.
        pool_workers: Worker threads of the record actor pool.
        operations: Count per ``(operation, result)``.
        latency_sum_seconds: Summed latency per operation.
        latency_buckets: Cumulative histogram counts per operation (``LATENCY_BUCKETS``).
        prune_records_total: Records deleted by prune since open.
        prune_bytes_total: Bytes released by prune since open.
        prune_seconds_total: Time spent pruning.
        gc_runs_total: Garbage collections run.
        gc_bytes_total: Bytes freed by garbage collection.
        double_releases_total: Releases of an already released handle (no-ops).
        lmdb_map_size_bytes: LMDB map size.
        lmdb_used_bytes: LMDB pages in use.
        records_detail: ``(id, open handles, size)`` per record ``disk_usage`` shows (its
            size as shown there; -1 while not measured), plus the hidden half of an equal
            pair when it has handles (size -1); in-use first (for per-record series).
        registry_bytes: Bytes moved per direction (``push``: uploaded, ``pull``: fetched)
            to and from registries and OCI layouts.
        registry_blobs: Blobs per ``(direction, result)``: ``("push", "uploaded" |
            "skipped" | "mounted")``, ``("pull", "fetched")``.
        registry_requests: Registry HTTP exchanges per ``(operation, status)``.
        registry_latency_sum_seconds: Their summed latency (until the response headers).
        registry_latency_buckets: Their cumulative histogram counts (``LATENCY_BUCKETS``).
    """

    records: int = 0
    records_by_kind: Mapping[str, int] = field(default_factory=lambda: frozen_map(None))
    mutable: int = 0
    immutable: int = 0
    lazy: int = 0
    in_use: int = 0
    dead: int = 0
    open_handles: int = 0
    bytes_by_kind: Mapping[str, int] = field(default_factory=lambda: frozen_map(None))
    reclaimable_bytes: int = 0
    active_actors: int = 0
    pool_workers: int = 0
    operations: Mapping[tuple[str, str], int] = field(default_factory=dict)
    latency_sum_seconds: Mapping[str, float] = field(default_factory=lambda: frozen_map(None))
    latency_buckets: Mapping[str, tuple[int, ...]] = field(default_factory=lambda: frozen_map(None))
    prune_records_total: int = 0
    prune_bytes_total: int = 0
    prune_seconds_total: float = 0.0
    gc_runs_total: int = 0
    gc_bytes_total: int = 0
    double_releases_total: int = 0
    lmdb_map_size_bytes: int = 0
    lmdb_used_bytes: int = 0
    records_detail: tuple[tuple[str, int, int], ...] = ()
    registry_bytes: Mapping[str, int] = field(default_factory=lambda: frozen_map(None))
    registry_blobs: Mapping[tuple[str, str], int] = field(default_factory=dict)
    registry_requests: Mapping[tuple[str, str], int] = field(default_factory=dict)
    registry_latency_sum_seconds: Mapping[tuple[str, str], float] = field(default_factory=dict)
    registry_latency_buckets: Mapping[tuple[str, str], tuple[int, ...]] = field(
        default_factory=dict
    )

    def __hash__(self) -> int:
        return hash((self.records, self.open_handles))
