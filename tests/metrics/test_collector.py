"""CacheCollector against real Pykka actors standing in for the manager (never mocks).

Values are read with ``CollectorRegistry.get_sample_value`` on a fresh registry per test.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from types import MappingProxyType
from typing import Any

import pykka
import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from refcache.actors._types import CacheStatistics
from refcache.metrics import LATENCY_BUCKETS, CacheCollector
from refcache.storage import AlreadyExistsError, InvalidError, NotFoundError

_STOP_TIMEOUT = 5.0

# Latencies of five "get" calls: the histogram below is built from these by hand.
GET_LATENCIES = (0.0003, 0.003, 0.003, 0.2, 20.0)


class SnapshotManager(pykka.ThreadingActor):
    """Answers ``statistics()`` with a fixed value and counts the asks (a real actor)."""

    def __init__(self, stats: object) -> None:
        super().__init__()
        self._stats = stats
        self._calls = 0

    def statistics(self) -> object:
        self._calls += 1
        return self._stats

    def statistics_calls(self) -> int:
        return self._calls


class StuckManager(pykka.ThreadingActor):
    """A manager whose ``statistics()`` handler blocks until ``release`` is set."""

    def __init__(self, release: threading.Event) -> None:
        super().__init__()
        self._release = release

    def statistics(self) -> CacheStatistics:
        self._release.wait(30)
        return CacheStatistics(
            records=1, records_by_kind=MappingProxyType({"layer": 1}), immutable=1
        )


class FailingManager(pykka.ThreadingActor):
    """A manager whose ``statistics()`` raises (the error reaches the asker's future)."""

    def statistics(self) -> CacheStatistics:
        msg = "record table of cache '/tmp/x' is closed"
        raise NotFoundError(msg)


def total(registry: CollectorRegistry, name: str) -> float | None:
    """The sum of a labelled gauge's samples (``None`` when the family is not exposed)."""
    samples = [s for m in registry.collect() if m.name == name for s in m.samples]
    return sum(s.value for s in samples) if samples else None


def cumulative(latencies: tuple[float, ...]) -> tuple[int, ...]:
    """Cumulative counts per bound of LATENCY_BUCKETS, then the +Inf count."""
    finite = tuple(sum(1 for x in latencies if x <= bound) for bound in LATENCY_BUCKETS)
    return (*finite, len(latencies))


def snapshot(**overrides: Any) -> CacheStatistics:
    """A representative snapshot: 4 records, 2 held, one of unknown size."""
    fields: dict[str, Any] = {
        "records": 4,
        "records_by_kind": MappingProxyType({"base": 1, "layer": 2, "merge": 1}),
        "mutable": 1,
        "immutable": 3,
        "lazy": 1,
        "in_use": 2,
        "dead": 0,
        "open_handles": 3,
        "bytes_by_kind": MappingProxyType({"base": 4096, "layer": 10_000, "merge": 0}),
        "reclaimable_bytes": 8192,
        "active_actors": 2,
        "pool_workers": 4,
        "operations": MappingProxyType(
            {("get", "ok"): 4, ("get", "not_found"): 1, ("prune", "ok"): 2}
        ),
        "latency_sum_seconds": MappingProxyType({"get": sum(GET_LATENCIES)}),
        "latency_buckets": MappingProxyType({"get": cumulative(GET_LATENCIES)}),
        "prune_records_total": 7,
        "prune_bytes_total": 123_456,
        "prune_seconds_total": 0.75,
        "gc_runs_total": 3,
        "gc_bytes_total": 99_000,
        "double_releases_total": 5,
        "lmdb_map_size_bytes": 1 << 30,
        "lmdb_used_bytes": 65_536,
        "records_detail": (
            ("rec-held-twice", 2, 4096),
            ("rec-held-once", 1, -1),
            ("rec-idle-a", 0, 6000),
            ("rec-idle-b", 0, 4000),
        ),
    }
    fields.update(overrides)
    return CacheStatistics(**fields)


def detail(*refs: int) -> tuple[tuple[str, int, int], ...]:
    """records_detail with ids ``r0``, ``r1``, ... holding ``refs``; size = 100 * index."""
    return tuple((f"r{i}", count, 100 * i) for i, count in enumerate(refs))


def samples(registry: CollectorRegistry) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of one scrape, in exposition order."""
    return [(s.name, s.labels, s.value) for m in registry.collect() for s in m.samples]


def record_ids(registry: CollectorRegistry, name: str = "refcache_record_refs") -> list[str]:
    """The record ids of one per-record family, in exposition order."""
    return [labels["record_id"] for n, labels, _ in samples(registry) if n == name]


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """The event that unblocks a StuckManager; set at teardown before the actor stops."""
    event = threading.Event()
    yield event
    event.set()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def collector_for(
    start: Callable[..., pykka.ActorProxy[Any]],
    registry: CollectorRegistry,
    stats: object,
    **options: Any,
) -> CacheCollector:
    return CacheCollector(start(SnapshotManager, stats), registry=registry, **options)


# --- aggregates -------------------------------------------------------------------------------


def test_refcount_and_size_of_each_record_come_from_the_snapshot(
    start: Callable[..., pykka.ActorProxy[Any]], registry: CollectorRegistry
) -> None:
    collector_for(start, registry, snapshot())

    def value(name: str, record_id: str) -> float | None:
        return registry.get_sample_value(name, {"record_id": record_id})

    assert value("refcache_record_refs", "rec-held-twice") == 2.0
    assert value("refcache_record_refs", "rec-held-once") == 1.0
    assert value("refcache_record_refs", "rec-idle-a") == 0.0
    assert value("refcache_record_size_bytes", "rec-held-twice") == 4096.0
    assert value("refcache_record_size_bytes", "rec-idle-b") == 4000.0
    assert registry.get_sample_value("refcache_record_series_omitted") == 0.0


def test_record_of_unknown_size_has_a_refs_sample_but_no_size_sample(
    start: Callable[..., pykka.ActorProxy[Any]], registry: CollectorRegistry
) -> None:
    collector_for(start, registry, snapshot())

    assert registry.get_sample_value("refcache_record_refs", {"record_id": "rec-held-once"}) == 1
    assert (
        registry.get_sample_value("refcache_record_size_bytes", {"record_id": "rec-held-once"})
        is None
    )
    assert record_ids(registry, "refcache_record_size_bytes") == [
        "rec-held-twice",
        "rec-idle-a",
        "rec-idle-b",
    ]


def test_record_counts_by_kind_and_state_come_from_the_snapshot(
    start: Callable[..., pykka.ActorProxy[Any]], registry: CollectorRegistry
) -> None:
    collector_for(start, registry, snapshot())

    assert registry.get_sample_value("refcache_up") == 1.0
    by_kind = {
        kind: registry.get_sample_value("refcache_records", {"kind": kind})
        for kind in ("base", "layer", "merge", "diff")
    }
    # "diff" is absent from the snapshot: exposed as 0 so dashboards see a stable label set.
    assert by_kind == {"base": 1.0, "layer": 2.0, "merge": 1.0, "diff": 0.0}
    by_state = {
        state: registry.get_sample_value("refcache_record_states", {"state": state})
        for state in ("mutable", "immutable", "lazy")
    }
    # The lazy record is immutable too: it counts once, as lazy.
    assert by_state == {"mutable": 1.0, "immutable": 2.0, "lazy": 1.0}
    assert registry.get_sample_value("refcache_records_in_use") == 2.0


def test_record_kinds_and_record_states_each_sum_to_all_records(
    start: Callable[..., pykka.ActorProxy[Any]], registry: CollectorRegistry
) -> None:
    stats = snapshot(
        records=9,
        records_by_kind=MappingProxyType({"base": 2, "layer": 5, "diff": 2}),
        mutable=3,
        immutable=6,
        lazy=4,
        in_use=5,
    )
    collector_for(start, registry, stats)
    families = {m.name: m for m in registry.collect()}
    kinds = families["refcache_records"].samples
    states = families["refcache_record_states"].samples
    assert {s.labels["kind"] for s in kinds} == {"base", "layer", "merge", "diff"}
    assert {s.labels["state"] for s in states} == {"mutable", "immutable", "lazy"}
    assert sum(s.value for s in kinds) == 9.0
    assert sum(s.value for s in states) == 9.0
    # In use is a gauge of its own: it overlaps every state, so it is not one of them.
    assert registry.get_sample_value("refcache_records_in_use") == 5.0
    assert "dead" not in {s.labels["state"] for s in states}


def test_handles_bytes_actors_and_lmdb_gauges_come_from_the_snapshot(
    start: Callable[..., pykka.ActorProxy[Any]], registry: CollectorRegistry
) -> None:
    collector_for(start, registry, snapshot())

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("refcache_open_handles") == 3.0
    assert value("refcache_usage_bytes", kind="base") == 4096.0
    assert value("refcache_usage_bytes", kind="layer") == 10_000.0
    assert value("refcache_usage_bytes", kind="merge") == 0.0
    assert value("refcache_usage_bytes", kind="diff") == 0.0
    assert value("refcache_reclaimable_bytes") == 8192.0
    assert value("refcache_active_record_actors") == 2.0
    assert value("refcache_record_pool_workers") == 4.0
    assert value("refcache_lmdb_map_size_bytes") == float(1 << 30)
    assert value("refcache_lmdb_used_bytes") == 65_536.0
    duration = value("refcache_statistics_duration_seconds")
    assert duration is not None
    assert 0.0 <= duration < 2.0


def test_counters_carry_the_total_suffix_and_snapshot_values(
    start: Callable[..., pykka.ActorProxy[Any]], registry: CollectorRegistry
) -> None:
    collector_for(start, registry, snapshot())

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("refcache_operations_total", operation="get", result="ok") == 4.0
    assert value("refcache_operations_total", operation="get", result="not_found") == 1.0
    assert value("refcache_operations_total", operation="prune", result="ok") == 2.0
    assert value("refcache_prune_records_total") == 7.0
    assert value("refcache_prune_bytes_total") == 123_456.0
    assert value("refcache_prune_seconds_total") == 0.75
    assert value("refcache_gc_runs_total") == 3.0
    assert value("refcache_gc_bytes_total") == 99_000.0
    assert value("refcache_double_releases_total") == 5.0
    # Counters carry no _created sample: the snapshot has no creation time to give.
    assert not [name for name, _, _ in samples(registry) if name.endswith("_created")]


def test_latency_histogram_is_built_from_cumulative_buckets_and_sum(
    start: Callable[..., pykka.ActorProxy[Any]], registry: CollectorRegistry
) -> None:
    collector_for(start, registry, snapshot())

    def bucket(le: str) -> float | None:
        return registry.get_sample_value(
            "refcache_operation_duration_seconds_bucket", {"operation": "get", "le": le}
        )

    assert bucket("0.0005") == 1.0
    assert bucket("0.005") == 3.0
    assert bucket("0.25") == 4.0
    assert bucket("10.0") == 4.0
    assert bucket("+Inf") == 5.0
    labels = {"operation": "get"}
    assert registry.get_sample_value("refcache_operation_duration_seconds_count", labels) == 5.0
    assert registry.get_sample_value(
        "refcache_operation_duration_seconds_sum", labels
    ) == pytest.approx(sum(GET_LATENCIES))
    le_values = [
        labels["le"]
        for name, labels, _ in samples(registry)
        if name == "refcache_operation_duration_seconds_bucket"
    ]
    assert len(le_values) == len(LATENCY_BUCKETS) + 1
    # Operations without latency buckets (prune here) get no histogram.
    assert (
        registry.get_sample_value(
            "refcache_operation_duration_seconds_count", {"operation": "prune"}
        )
        is None
    )


def test_histogram_without_an_inf_count_uses_the_finished_operation_count(
    start: Callable[..., pykka.ActorProxy[Any]], registry: CollectorRegistry
) -> None:
    finite_only = cumulative(GET_LATENCIES)[:-1]
    collector_for(start, registry, snapshot(latency_buckets=MappingProxyType({"get": finite_only})))

    labels = {"operation": "get", "le": "+Inf"}
    # 4 ok + 1 not_found "get" operations finished.
    assert registry.get_sample_value("refcache_operation_duration_seconds_bucket", labels) == 5.0


def test_histogram_with_the_wrong_number_of_buckets_is_left_out_and_the_rest_stays(
    start: Callable[..., pykka.ActorProxy[Any]], registry: CollectorRegistry
) -> None:
    buckets = MappingProxyType({"get": (1, 2, 3), "new": cumulative((0.001,))})
    collector_for(start, registry, snapshot(latency_buckets=buckets))

    count = "refcache_operation_duration_seconds_count"
    assert registry.get_sample_value(count, {"operation": "get"}) is None
    assert registry.get_sample_value(count, {"operation": "new"}) == 1.0
    assert registry.get_sample_value("refcache_up") == 1.0


# --- bounded per-record series ------------------------------------------------------------


def test_in_use_records_come_first_even_when_the_snapshot_is_unordered(
    start: Callable[..., pykka.ActorProxy[Any]], registry: CollectorRegistry
) -> None:
    collector_for(
        start, registry, snapshot(records_detail=detail(0, 0, 3, 0, 1)), max_record_series=3
    )

    assert record_ids(registry) == ["r2", "r4", "r0"]
    assert record_ids(registry, "refcache_record_size_bytes") == ["r2", "r4", "r0"]
    assert registry.get_sample_value("refcache_record_series_omitted") == 2.0


def test_per_record_series_are_capped_and_the_omitted_gauge_counts_the_rest(
    start: Callable[..., pykka.ActorProxy[Any]], registry: CollectorRegistry
) -> None:
    collector_for(
        start,
        registry,
        snapshot(records_detail=detail(1, 1, 1, 1, 1, 0, 0, 0, 0, 0)),
        max_record_series=3,
    )

    assert record_ids(registry) == ["r0", "r1", "r2"]
    assert record_ids(registry, "refcache_record_size_bytes") == ["r0", "r1", "r2"]
    assert registry.get_sample_value("refcache_record_series_omitted") == 7.0


def test_a_cap_of_zero_exposes_no_per_record_series_and_counts_every_record_omitted(
    start: Callable[..., pykka.ActorProxy[Any]], registry: CollectorRegistry
) -> None:
    collector_for(start, registry, snapshot(records_detail=detail(2, 0, 1)), max_record_series=0)

    assert record_ids(registry) == []
    assert record_ids(registry, "refcache_record_size_bytes") == []
    assert registry.get_sample_value("refcache_record_series_omitted") == 3.0


def test_the_default_cap_is_one_thousand_series_per_family(
    start: Callable[..., pykka.ActorProxy[Any]], registry: CollectorRegistry
) -> None:
    many = tuple((f"r{i}", 1 if i % 7 == 0 else 0, i) for i in range(2500))
    collector = collector_for(start, registry, snapshot(records_detail=many))

    ids = record_ids(registry)
    held = [f"r{i}" for i in range(0, 2500, 7)]
    assert collector.max_record_series == 1000
    assert len(ids) == 1000
    assert ids[: len(held)] == held
    assert len(record_ids(registry, "refcache_record_size_bytes")) == 1000
    assert registry.get_sample_value("refcache_record_series_omitted") == 1500.0


# --- manager not answering ----------------------------------------------------------------


def test_up_is_zero_and_nothing_else_when_the_manager_does_not_answer_in_time(
    start: Callable[..., pykka.ActorProxy[Any]],
    registry: CollectorRegistry,
    release: threading.Event,
) -> None:
    CacheCollector(start(StuckManager, release), registry=registry, timeout=0.1)

    began = time.monotonic()
    scraped = samples(registry)
    elapsed = time.monotonic() - began

    assert scraped == [("refcache_up", {}, 0.0)]
    assert elapsed < 5.0  # the scrape gave up after its timeout, not the handler's 30 s


def test_scrapes_recover_once_the_manager_answers_again(
    start: Callable[..., pykka.ActorProxy[Any]],
    registry: CollectorRegistry,
    release: threading.Event,
) -> None:
    collector = CacheCollector(start(StuckManager, release), registry=registry, timeout=0.1)
    assert samples(registry) == [("refcache_up", {}, 0.0)]

    release.set()

    assert collector.timeout == 0.1
    assert registry.get_sample_value("refcache_up") == 1.0
    assert total(registry, "refcache_records") == 1.0


def test_up_is_zero_and_nothing_else_when_statistics_raises(
    start: Callable[..., pykka.ActorProxy[Any]], registry: CollectorRegistry
) -> None:
    CacheCollector(start(FailingManager), registry=registry)

    assert samples(registry) == [("refcache_up", {}, 0.0)]


def test_up_is_zero_and_nothing_else_when_the_manager_actor_is_stopped(
    registry: CollectorRegistry,
) -> None:
    ref = SnapshotManager.start(snapshot())
    proxy = ref.proxy()
    CacheCollector(proxy, registry=registry)
    ref.stop(timeout=_STOP_TIMEOUT)

    assert samples(registry) == [("refcache_up", {}, 0.0)]


def test_up_is_zero_when_statistics_returns_something_other_than_a_snapshot(
    start: Callable[..., pykka.ActorProxy[Any]], registry: CollectorRegistry
) -> None:
    collector_for(start, registry, {"records": 4})

    assert samples(registry) == [("refcache_up", {}, 0.0)]


# --- describe, one snapshot per scrape, registration -------------------------------------


def test_registering_and_describing_never_ask_the_manager(
    start: Callable[..., pykka.ActorProxy[Any]], registry: CollectorRegistry
) -> None:
    manager = start(SnapshotManager, snapshot())
    collector = CacheCollector(manager, registry=registry)

    families = collector.describe()

    assert [family.samples for family in families] == [[]] * len(families)
    assert manager.statistics_calls().get(timeout=_STOP_TIMEOUT) == 0


def test_describing_does_not_wait_for_a_stuck_manager(
    start: Callable[..., pykka.ActorProxy[Any]],
    registry: CollectorRegistry,
    release: threading.Event,
) -> None:
    began = time.monotonic()
    collector = CacheCollector(start(StuckManager, release), registry=registry, timeout=30.0)
    families = collector.describe()
    elapsed = time.monotonic() - began

    assert families[0].name == "refcache_up"
    assert elapsed < 5.0  # asking the manager would have waited for the 30 s timeout


def test_each_scrape_takes_exactly_one_snapshot(
    start: Callable[..., pykka.ActorProxy[Any]], registry: CollectorRegistry
) -> None:
    manager = start(SnapshotManager, snapshot())
    CacheCollector(manager, registry=registry)

    generate_latest(registry)
    assert manager.statistics_calls().get(timeout=_STOP_TIMEOUT) == 1
    generate_latest(registry)
    assert manager.statistics_calls().get(timeout=_STOP_TIMEOUT) == 2


def test_describe_lists_exactly_the_families_a_successful_scrape_yields(
    start: Callable[..., pykka.ActorProxy[Any]], registry: CollectorRegistry
) -> None:
    collector = collector_for(start, registry, snapshot())

    described = [(family.name, family.type) for family in collector.describe()]
    collected = [(family.name, family.type) for family in collector.collect()]

    assert described == collected
    assert len(described) == 26


def test_namespace_prefixes_every_series(
    start: Callable[..., pykka.ActorProxy[Any]], registry: CollectorRegistry
) -> None:
    collector = collector_for(start, registry, snapshot(), namespace="buildcache")

    names = {name for name, _, _ in samples(registry)}
    assert collector.namespace == "buildcache"
    assert registry.get_sample_value("buildcache_up") == 1.0
    assert registry.get_sample_value("buildcache_record_refs", {"record_id": "rec-held-twice"}) == 2
    assert all(name.startswith("buildcache_") for name in names)


def test_a_second_collector_with_the_same_namespace_is_refused_and_changes_nothing(
    start: Callable[..., pykka.ActorProxy[Any]], registry: CollectorRegistry
) -> None:
    collector_for(start, registry, snapshot())
    other = start(SnapshotManager, snapshot(records=99))

    with pytest.raises(AlreadyExistsError, match="'refcache'"):
        CacheCollector(other, registry=registry)

    assert total(registry, "refcache_records") == 4.0
    assert [n for n, _, _ in samples(registry)].count("refcache_up") == 1
    assert other.statistics_calls().get(timeout=_STOP_TIMEOUT) == 0


def test_two_caches_share_a_registry_under_different_namespaces(
    start: Callable[..., pykka.ActorProxy[Any]], registry: CollectorRegistry
) -> None:
    collector_for(start, registry, snapshot(records=4), namespace="cache_a")
    nine = MappingProxyType({"layer": 9})
    collector_for(start, registry, snapshot(records=9, records_by_kind=nine), namespace="cache_b")

    assert total(registry, "cache_a_records") == 4.0
    assert total(registry, "cache_b_records") == 9.0


def test_registry_none_registers_nowhere(
    start: Callable[..., pykka.ActorProxy[Any]], registry: CollectorRegistry
) -> None:
    collector = collector_for(start, None, snapshot())  # type: ignore[arg-type]

    assert REGISTRY.get_sample_value("refcache_up") is None
    assert [s.value for m in collector.collect() if m.name == "refcache_up" for s in m.samples] == [
        1.0
    ]


def test_the_default_registry_is_the_global_one(
    start: Callable[..., pykka.ActorProxy[Any]],
) -> None:
    collector = CacheCollector(start(SnapshotManager, snapshot()))
    try:
        assert total(REGISTRY, "refcache_records") == 4.0
    finally:
        REGISTRY.unregister(collector)
    assert total(REGISTRY, "refcache_records") is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"namespace": ""}, "namespace ''"),
        ({"namespace": "9lives"}, "namespace '9lives'"),
        ({"namespace": "ref-cache"}, "namespace 'ref-cache'"),
        ({"namespace": "ref:cache"}, "namespace 'ref:cache'"),
        ({"namespace": 7}, "namespace 7"),
        ({"max_record_series": -1}, "max_record_series -1"),
        ({"max_record_series": True}, "max_record_series True"),
        ({"max_record_series": 1.5}, "max_record_series 1.5"),
        ({"timeout": 0}, "timeout 0"),
        ({"timeout": -1.0}, "timeout -1.0"),
        ({"timeout": float("nan")}, "timeout nan"),
        ({"timeout": float("inf")}, "timeout inf"),
        ({"timeout": "2"}, "timeout '2'"),
        ({"registry": object()}, "registry <object"),
    ],
)
def test_bad_arguments_are_refused_and_register_nothing(
    start: Callable[..., pykka.ActorProxy[Any]],
    registry: CollectorRegistry,
    options: dict[str, Any],
    message: str,
) -> None:
    manager = start(SnapshotManager, snapshot())
    arguments: dict[str, Any] = {"registry": registry, **options}

    with pytest.raises(InvalidError, match=message):
        CacheCollector(manager, **arguments)

    assert samples(registry) == []
    assert manager.statistics_calls().get(timeout=_STOP_TIMEOUT) == 0


def test_a_manager_without_statistics_is_refused(registry: CollectorRegistry) -> None:
    with pytest.raises(InvalidError, match="has no statistics"):
        CacheCollector(object(), registry=registry)  # type: ignore[arg-type]

    assert samples(registry) == []
