"""The Prometheus collector: one ``statistics()`` snapshot of the manager per scrape.

This follows client_python's custom-collector pattern (and Trio's ``statistics()``): the
collector owns no metric objects and no mutable state. Each ``collect()`` asks the manager
actor once for a frozen :class:`~actors._types.CacheStatistics` and turns it into metric
families. The scrape thread never reads an actor's attributes: everything it exposes was
copied by the manager, on the manager's thread, into that one immutable value.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Literal, Protocol

import pykka
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import REGISTRY, CollectorRegistry
from prometheus_client.utils import floatToGoString

from ..actors import LATENCY_BUCKETS, CacheStatistics
from ..storage import AlreadyExistsError, CacheTimeoutError, ClosedError, InvalidError

__all__ = [
    "SNAPSHOT_MAX_AGE",
    "CacheCollector",
    "LATENCY_BUCKETS",
    "RECORD_KINDS",
    "RECORD_STATES",
    "REGISTRY_BLOB_RESULTS",
    "StatisticsSource",
    "check_registry",
    "check_seconds",
]

logger = logging.getLogger(__name__)

# LATENCY_BUCKETS (the upper bounds of ``<namespace>_operation_duration_seconds``) is the
# one tuple the manager fills ``CacheStatistics.latency_buckets`` against; it lives in actors
# (metrics imports actors, never the reverse) and is re-exported here.

#: Kinds always exposed (zero when absent) so that dashboards see a stable label set.
RECORD_KINDS: tuple[str, ...] = ("base", "layer", "merge", "diff")
#: The values of ``<ns>_record_states{state}``: a partition, each record is in exactly one.
RECORD_STATES: tuple[str, ...] = ("mutable", "immutable", "lazy")

_NAMESPACE_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# Bucket bounds rendered once, the way client_python renders its own histograms' ``le``.
_LE_LABELS: tuple[str, ...] = tuple(floatToGoString(bound) for bound in LATENCY_BUCKETS)


class StatisticsSource(Protocol):
    """What the collector needs from the manager: ``cache.manager`` (a ``CacheManagerProxy``)
    satisfies this, and so does a raw Pykka proxy of any actor with ``statistics()``."""

    def statistics(self) -> pykka.Future[CacheStatistics]:
        """Returns a future of one consistent snapshot, taken on the manager's thread."""
        ...


@dataclass(frozen=True, slots=True)
class _Family:
    """The static description of one metric family (name without the namespace)."""

    suffix: str
    type: Literal["gauge", "counter", "histogram"]
    doc: str
    labels: tuple[str, ...] = ()

    def name(self, namespace: str) -> str:
        """Returns the family name (counters get ``_total`` from client_python)."""
        return f"{namespace}_{self.suffix}"

    def gauge(self, namespace: str) -> GaugeMetricFamily:
        """Returns this gauge family, empty."""
        return GaugeMetricFamily(self.name(namespace), self.doc, labels=list(self.labels))

    def counter(self, namespace: str) -> CounterMetricFamily:
        """Returns this counter family, empty (CounterMetricFamily appends ``_total``)."""
        return CounterMetricFamily(self.name(namespace), self.doc, labels=list(self.labels))

    def histogram(self, namespace: str) -> HistogramMetricFamily:
        """Returns this histogram family, empty."""
        return HistogramMetricFamily(self.name(namespace), self.doc, labels=list(self.labels))

    def empty(self, namespace: str) -> Metric:
        """Returns the family with no samples (what ``describe()`` hands the registry)."""
        if self.type == "counter":
            return self.counter(namespace)
        if self.type == "histogram":
            return self.histogram(namespace)
        return self.gauge(namespace)


_UP = _Family(
    "up",
    "gauge",
    "1 when the cache manager answered statistics() for this scrape; 0 when it did not "
    "(timeout, error, stopped), in which case no other refcache series is exposed.",
)
_STATISTICS_DURATION = _Family(
    "statistics_duration_seconds",
    "gauge",
    "Time the manager took to answer statistics() for this scrape.",
)
_RECORDS = _Family(
    "records",
    "gauge",
    "Loaded records per kind (records being removed excluded); the kinds sum to all records.",
    ("kind",),
)
_RECORD_STATES = _Family(
    "record_states",
    "gauge",
    "Loaded records per state: mutable, immutable (with a snapshot) or lazy (immutable, only "
    "a blob so far). Each record is in exactly one state: the states sum to all records.",
    ("state",),
)
_RECORDS_IN_USE = _Family(
    "records_in_use", "gauge", "Records with at least one open handle (in any state)."
)
_OPEN_HANDLES = _Family(
    "open_handles", "gauge", "Open user ref handles over all records (the total refcount)."
)
_USAGE_BYTES = _Family(
    "usage_bytes",
    "gauge",
    "Record sizes as disk usage shows them, summed per kind (an equal pair once; a mutable "
    "in use and sizes not measured yet count 0).",
    ("kind",),
)
_RECLAIMABLE_BYTES = _Family(
    "reclaimable_bytes",
    "gauge",
    "Sizes of the records disk usage reports as not in use (what prune could free).",
)
_ACTIVE_ACTORS = _Family(
    "active_record_actors", "gauge", "Record actors currently activated (not passivated)."
)
_POOL_WORKERS = _Family(
    "record_pool_workers", "gauge", "Worker threads of the pooled record actor runtime."
)
_OPERATIONS = _Family(
    "operations",
    "counter",
    "Manager operations finished since open, per operation and result.",
    ("operation", "result"),
)
_OPERATION_DURATION = _Family(
    "operation_duration_seconds",
    "histogram",
    "Latency of manager operations since open.",
    ("operation",),
)
_PRUNE_RECORDS = _Family("prune_records", "counter", "Records deleted by prune since open.")
_PRUNE_BYTES = _Family("prune_bytes", "counter", "Bytes released by prune since open.")
_PRUNE_SECONDS = _Family("prune_seconds", "counter", "Time spent pruning since open.")
_GC_RUNS = _Family("gc_runs", "counter", "Garbage collections run since open.")
_GC_BYTES = _Family("gc_bytes", "counter", "Bytes freed by garbage collection since open.")
_DOUBLE_RELEASES = _Family(
    "double_releases",
    "counter",
    "Releases of an already released handle since open (logged no-ops).",
)
_LMDB_MAP_SIZE = _Family("lmdb_map_size_bytes", "gauge", "Size of the LMDB memory map.")
_LMDB_USED = _Family("lmdb_used_bytes", "gauge", "Bytes of LMDB pages in use.")
_RECORD_REFS = _Family(
    "record_refs",
    "gauge",
    "Open handles of one record (bounded: in-use records first, at most max_record_series).",
    ("record_id",),
)
_RECORD_SIZE = _Family(
    "record_size_bytes",
    "gauge",
    "Size of one record as disk usage shows it (records of record_refs whose size is known).",
    ("record_id",),
)
_RECORD_SERIES_OMITTED = _Family(
    "record_series_omitted",
    "gauge",
    "Records left out of record_refs and record_size_bytes by max_record_series.",
)

_REGISTRY_BYTES = _Family(
    "registry_bytes",
    "counter",
    "Bytes moved to (push: uploaded) and from (pull: fetched) registries and OCI layouts.",
    ("direction",),
)
_REGISTRY_BLOBS = _Family(
    "registry_blobs",
    "counter",
    "Blobs per direction and result: push uploaded/skipped (target had it)/mounted "
    "(cross-repository), pull fetched.",
    ("direction", "result"),
)
_REGISTRY_REQUEST_DURATION = _Family(
    "registry_request_duration_seconds",
    "histogram",
    "Latency of registry HTTP exchanges until the response headers, per operation and "
    "status (HTTP code, or error for a transport failure).",
    ("operation", "status"),
)

#: Label sets of the registry counters that are always exposed (zero before any transfer).
REGISTRY_BLOB_RESULTS: tuple[tuple[str, str], ...] = (
    ("push", "uploaded"),
    ("push", "skipped"),
    ("push", "mounted"),
    ("pull", "fetched"),
)

#: Every family a successful scrape yields, in exposition order.
_FAMILIES: tuple[_Family, ...] = (
    _UP,
    _STATISTICS_DURATION,
    _RECORDS,
    _RECORD_STATES,
    _RECORDS_IN_USE,
    _OPEN_HANDLES,
    _USAGE_BYTES,
    _RECLAIMABLE_BYTES,
    _ACTIVE_ACTORS,
    _POOL_WORKERS,
    _PRUNE_RECORDS,
    _PRUNE_BYTES,
    _PRUNE_SECONDS,
    _GC_RUNS,
    _GC_BYTES,
    _DOUBLE_RELEASES,
    _LMDB_MAP_SIZE,
    _LMDB_USED,
    _OPERATIONS,
    _OPERATION_DURATION,
    _REGISTRY_BYTES,
    _REGISTRY_BLOBS,
    _REGISTRY_REQUEST_DURATION,
    _RECORD_REFS,
    _RECORD_SIZE,
    _RECORD_SERIES_OMITTED,
)


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """One answer of ``statistics()``: the snapshot (``None``: none to expose), the seconds
    the manager took, and when it was taken (``time.monotonic()``)."""

    stats: CacheStatistics | None
    seconds: float
    taken_at: float


#: Seconds a snapshot is reused by the scrapes of :func:`metrics.serve`: far below any
#: scrape interval, long enough that a burst of scrapers costs the manager one snapshot.
SNAPSHOT_MAX_AGE = 1.0


class CacheCollector:
    """A custom Prometheus collector over one cache manager.

    Each scrape takes exactly one ``manager.statistics()`` snapshot (waiting at most
    ``timeout`` seconds) and exposes it. When the manager does not answer in time, raises,
    or is stopped, the scrape yields ``<namespace>_up 0`` and nothing else, so stale or
    partial numbers never look current.

    Per-record series (``<namespace>_record_refs`` and ``<namespace>_record_size_bytes``,
    label ``record_id``) are the one high-cardinality exception and are bounded: records with
    open handles come first, at most ``max_record_series`` of each are exposed, and
    ``<namespace>_record_series_omitted`` says how many records were left out.

    Concurrent scrapes share one snapshot (single flight): while one scrape waits for the
    manager, the others wait for the same answer instead of queueing their own asks in the
    manager's mailbox (64 parallel scrapers would otherwise stall every ``get`` behind 64
    snapshots). With ``max_age`` > 0, a snapshot that young is reused by later scrapes too.
    The in-flight call and the last snapshot are the collector's only state (under a lock).

    Args:
        manager: The manager proxy (``cache.manager``), or anything whose ``statistics()``
            returns a Pykka future of :class:`~actors._types.CacheStatistics`.
        namespace: Prefix of every metric name.
        registry: Registry to register with; ``None`` registers nowhere. The default is
            client_python's global ``REGISTRY``, like its built-in collectors; two caches
            in one process then need different namespaces (or their own registries, which
            is what :func:`metrics.serve` and :func:`metrics.wsgi_app` use).
        max_record_series: Cap on the per-record series of each family (0 disables them).
        timeout: Seconds to wait for the manager's snapshot per scrape.
        max_age: Seconds a snapshot is reused by later scrapes (0: only scrapes that
            overlap share one). :func:`metrics.serve` and :func:`metrics.wsgi_app` use
            :data:`SNAPSHOT_MAX_AGE`.

    Raises:
        InvalidError: A bad argument (nothing is registered).
        AlreadyExistsError: ``registry`` already exposes series with these names.
    """

    def __init__(
        self,
        manager: StatisticsSource,
        *,
        namespace: str = "refcache",
        registry: CollectorRegistry | None = REGISTRY,
        max_record_series: int = 1000,
        timeout: float = 2.0,
        max_age: float = 0.0,
    ) -> None:
        if not callable(getattr(manager, "statistics", None)):
            msg = f"metrics source {manager!r} has no statistics() method"
            raise InvalidError(msg)
        if not isinstance(namespace, str) or not _NAMESPACE_RE.fullmatch(namespace):
            msg = f"invalid metrics namespace {namespace!r}: expected [a-zA-Z_][a-zA-Z0-9_]*"
            raise InvalidError(msg)
        if (
            not isinstance(max_record_series, int)
            or isinstance(max_record_series, bool)
            or max_record_series < 0
        ):
            msg = f"invalid max_record_series {max_record_series!r}: expected an int >= 0"
            raise InvalidError(msg)
        self._timeout = check_seconds(timeout, "timeout")
        self._max_age = check_seconds(max_age, "max_age", zero=True)
        if registry is not None:
            check_registry(registry)
        self._manager = manager
        self._namespace = namespace
        self._max_record_series = max_record_series
        self._lock = threading.Lock()
        self._flight: Future[_Snapshot] | None = None
        self._last: _Snapshot | None = None
        if registry is not None:
            try:
                registry.register(self)
            except ValueError as exc:
                msg = f"metrics namespace {namespace!r} is already registered: {exc}"
                raise AlreadyExistsError(msg) from exc

    @property
    def namespace(self) -> str:
        """Prefix of every metric name."""
        return self._namespace

    @property
    def max_record_series(self) -> int:
        """Cap on the per-record series of each per-record family."""
        return self._max_record_series

    @property
    def timeout(self) -> float:
        """Seconds a scrape waits for the manager's snapshot."""
        return self._timeout

    def describe(self) -> list[Metric]:
        """Returns the static family list, without asking the manager.

        The registry calls this at registration to detect name clashes; it must not block
        on (or even require) a running manager.
        """
        return [family.empty(self._namespace) for family in _FAMILIES]

    def collect(self) -> Iterator[Metric]:
        """Yields the metric families of one snapshot (runs on the scrape thread).

        Yields:
            Every family of :meth:`describe` from one snapshot, or only ``up`` = 0 when no
            snapshot could be had.
        """
        taken = self._shared_snapshot()
        stats = taken.stats
        up = _UP.gauge(self._namespace)
        if stats is None:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield self._gauge(_STATISTICS_DURATION, taken.seconds)
        yield from self._aggregates(stats)
        yield from self._operations(stats)
        yield from self._registry(stats)
        yield from self._records(stats)

    def _shared_snapshot(self) -> _Snapshot:
        """The snapshot of this scrape: a fresh enough one, the one in flight, or a new one."""
        with self._lock:
            last = self._last
            if last is not None and time.monotonic() - last.taken_at <= self._max_age:
                return last
            flight = self._flight
            leader = flight is None
            if flight is None:
                flight = self._flight = Future()
        if not leader:
            try:
                return flight.result(timeout=self._timeout)
            except TimeoutError:
                logger.warning(
                    "refcache metrics: no statistics() snapshot within %.3f s", self._timeout
                )
                return _Snapshot(None, 0.0, 0.0)
        taken = _Snapshot(None, 0.0, 0.0)
        try:
            started = time.perf_counter()
            stats = self._snapshot()
            taken = _Snapshot(stats, time.perf_counter() - started, time.monotonic())
        finally:
            with self._lock:
                self._flight = None
                if taken.stats is not None and self._max_age > 0:
                    self._last = taken
            flight.set_result(taken)
        return taken

    def _snapshot(self) -> CacheStatistics | None:
        """Asks the manager for one snapshot; ``None`` when there is none to expose."""
        try:
            stats = self._manager.statistics().get(timeout=self._timeout)
        except (pykka.Timeout, CacheTimeoutError):
            # The ask stays queued and its late answer is dropped: Pykka cannot cancel an
            # ask, and the next scrape asks afresh (DESIGN.md: every get() has a timeout).
            logger.warning(
                "refcache metrics: manager did not answer statistics() within %.3f s",
                self._timeout,
            )
            return None
        except (pykka.ActorDeadError, ClosedError):
            logger.warning("refcache metrics: manager actor is not running")
            return None
        except Exception:
            # Whatever the handler raised, a scrape reports up=0 rather than failing with a
            # half-written exposition; the traceback goes to the log.
            logger.exception("refcache metrics: statistics() failed")
            return None
        if not isinstance(stats, CacheStatistics):
            logger.error(
                "refcache metrics: statistics() returned %s, not CacheStatistics",
                type(stats).__name__,
            )
            return None
        return stats

    def _gauge(self, family: _Family, value: float) -> GaugeMetricFamily:
        """Returns an unlabelled gauge family with one sample."""
        return GaugeMetricFamily(family.name(self._namespace), family.doc, value=value)

    def _counter(self, family: _Family, value: float) -> CounterMetricFamily:
        """Returns an unlabelled counter family with one sample."""
        return CounterMetricFamily(family.name(self._namespace), family.doc, value=value)

    def _labelled_gauge(
        self, family: _Family, values: Iterable[tuple[Sequence[str], float]]
    ) -> GaugeMetricFamily:
        """Returns a labelled gauge family with one sample per ``(labels, value)``."""
        metric = family.gauge(self._namespace)
        for labels, value in values:
            metric.add_metric(labels, value)
        return metric

    def _aggregates(self, stats: CacheStatistics) -> Iterator[Metric]:
        """Yields the record, handle, size, actor, prune, GC and LMDB families."""
        yield self._labelled_gauge(
            _RECORDS,
            (([kind], stats.records_by_kind.get(kind, 0)) for kind in _kinds(stats)),
        )
        yield self._labelled_gauge(_RECORD_STATES, _states(stats))
        yield self._gauge(_RECORDS_IN_USE, stats.in_use)
        yield self._gauge(_OPEN_HANDLES, stats.open_handles)
        yield self._labelled_gauge(
            _USAGE_BYTES,
            (([kind], stats.bytes_by_kind.get(kind, 0)) for kind in _kinds(stats)),
        )
        yield self._gauge(_RECLAIMABLE_BYTES, stats.reclaimable_bytes)
        yield self._gauge(_ACTIVE_ACTORS, stats.active_actors)
        yield self._gauge(_POOL_WORKERS, stats.pool_workers)
        yield self._counter(_PRUNE_RECORDS, stats.prune_records_total)
        yield self._counter(_PRUNE_BYTES, stats.prune_bytes_total)
        yield self._counter(_PRUNE_SECONDS, stats.prune_seconds_total)
        yield self._counter(_GC_RUNS, stats.gc_runs_total)
        yield self._counter(_GC_BYTES, stats.gc_bytes_total)
        yield self._counter(_DOUBLE_RELEASES, stats.double_releases_total)
        yield self._gauge(_LMDB_MAP_SIZE, stats.lmdb_map_size_bytes)
        yield self._gauge(_LMDB_USED, stats.lmdb_used_bytes)

    def _operations(self, stats: CacheStatistics) -> Iterator[Metric]:
        """Yields the operation counter and the latency histogram."""
        counter = _OPERATIONS.counter(self._namespace)
        finished: dict[str, int] = {}
        for (operation, result), count in sorted(stats.operations.items()):
            counter.add_metric([operation, result], count)
            finished[operation] = finished.get(operation, 0) + count
        yield counter

        histogram = _OPERATION_DURATION.histogram(self._namespace)
        for operation, counts in sorted(stats.latency_buckets.items()):
            buckets = _histogram_buckets(operation, counts, finished.get(operation, 0))
            if buckets is not None:
                total = stats.latency_sum_seconds.get(operation, 0.0)
                histogram.add_metric([operation], buckets, total)
        yield histogram

    def _registry(self, stats: CacheStatistics) -> Iterator[Metric]:
        """Yields the registry transfer counters and the request latency histogram."""
        nbytes = _REGISTRY_BYTES.counter(self._namespace)
        for direction in ("push", "pull"):
            nbytes.add_metric([direction], stats.registry_bytes.get(direction, 0))
        yield nbytes
        blobs = _REGISTRY_BLOBS.counter(self._namespace)
        keys = list(REGISTRY_BLOB_RESULTS)
        keys += sorted(k for k in stats.registry_blobs if k not in REGISTRY_BLOB_RESULTS)
        for key in keys:
            blobs.add_metric(list(key), stats.registry_blobs.get(key, 0))
        yield blobs
        histogram = _REGISTRY_REQUEST_DURATION.histogram(self._namespace)
        for key, counts in sorted(stats.registry_latency_buckets.items()):
            operation = f"registry {key[0]} {key[1]}"
            buckets = _histogram_buckets(operation, counts, stats.registry_requests.get(key, 0))
            if buckets is not None:
                total = stats.registry_latency_sum_seconds.get(key, 0.0)
                histogram.add_metric(list(key), buckets, total)
        yield histogram

    def _records(self, stats: CacheStatistics) -> Iterator[Metric]:
        """Yields the bounded per-record families and the omitted-series gauge."""
        chosen = _select_records(stats.records_detail, self._max_record_series)
        yield self._labelled_gauge(
            _RECORD_REFS, (([record_id], refs) for record_id, refs, _ in chosen)
        )
        # A size of -1 means "not computed yet" (RecordInfo.size): no sample rather than a
        # negative number that would corrupt every sum() over the family.
        yield self._labelled_gauge(
            _RECORD_SIZE,
            (([record_id], size) for record_id, _, size in chosen if size >= 0),
        )
        yield self._gauge(_RECORD_SERIES_OMITTED, len(stats.records_detail) - len(chosen))


def check_seconds(value: object, what: str, *, zero: bool = False) -> float:
    """Returns ``value`` as seconds: a finite number > 0 (>= 0 with ``zero``).

    Raises:
        InvalidError: Naming the option (``what``) and the value.
    """
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not zero)
    ):
        msg = f"invalid metrics {what} {value!r}: expected seconds {'>= 0' if zero else '> 0'}"
        raise InvalidError(msg)
    return float(value)


def check_registry(registry: object) -> CollectorRegistry:
    """Returns ``registry`` if it is a client_python ``CollectorRegistry``.

    Raises:
        InvalidError: Naming the value.
    """
    if not isinstance(registry, CollectorRegistry):
        msg = f"invalid metrics registry {registry!r}: expected a CollectorRegistry"
        raise InvalidError(msg)
    return registry


def _states(stats: CacheStatistics) -> list[tuple[list[str], int]]:
    """``(labels, records)`` per :data:`RECORD_STATES`: lazy records are immutable ones
    without a snapshot, so they are taken out of ``immutable`` (each record counts once)."""
    lazy = min(stats.lazy, stats.immutable)
    counts = (stats.mutable, stats.immutable - lazy, lazy)
    return [([state], n) for state, n in zip(RECORD_STATES, counts, strict=True)]


def _kinds(stats: CacheStatistics) -> list[str]:
    """The fixed kinds, then any other kind the snapshot reports (sorted)."""
    extra = (set(stats.records_by_kind) | set(stats.bytes_by_kind)) - set(RECORD_KINDS)
    return [*RECORD_KINDS, *sorted(extra)]


def _histogram_buckets(
    operation: str, counts: Sequence[int], finished: int
) -> list[tuple[str, float]] | None:
    """Turns the manager's cumulative counts into client_python histogram buckets.

    ``counts`` holds one cumulative count per bound of ``LATENCY_BUCKETS``, optionally
    followed by the ``+Inf`` count (the number of observations). Without it, the ``+Inf``
    count is the number of finished operations (never less than the last bucket).

    Returns:
        The ``(le, count)`` pairs ending with ``+Inf``, or ``None`` (logged) when the
        counts do not match ``LATENCY_BUCKETS``: wrong buckets are worse than none.
    """
    bounds = len(LATENCY_BUCKETS)
    if len(counts) == bounds + 1:
        finite, infinite = counts[:bounds], counts[bounds]
    elif len(counts) == bounds:
        finite = counts
        infinite = max(counts[-1] if counts else 0, finished)
    else:
        logger.error(
            "refcache metrics: %d latency buckets for operation %r, expected %d "
            "(actors._types.LATENCY_BUCKETS and metrics disagree); histogram skipped",
            len(counts),
            operation,
            bounds,
        )
        return None
    buckets: list[tuple[str, float]] = list(zip(_LE_LABELS, finite, strict=True))
    buckets.append(("+Inf", infinite))
    return buckets


def _select_records(
    detail: Sequence[tuple[str, int, int]], cap: int
) -> Sequence[tuple[str, int, int]]:
    """Picks at most ``cap`` records for the per-record series: in-use records first.

    The manager already orders ``records_detail`` in-use first; this does not rely on it
    (one pass over the refcounts), but keeps the manager's order within each group. Cost is
    O(N) comparisons plus O(cap) copies: ~3 ms at 100k records.
    """
    in_use = [record for record in detail if record[1] > 0]
    if len(in_use) >= cap:
        return in_use[:cap]
    idle = itertools.islice((record for record in detail if record[1] <= 0), cap - len(in_use))
    return in_use + list(idle)
