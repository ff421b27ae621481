"""The ``/metrics`` server under hostile or heavy load: bounded threads, timeouts, one snapshot.

* Idle and half-open connections hold no thread and are dropped after the connection
  timeout; a trickling request is cut off at the same bound.
* Hundreds of idle connections do not stop a real scrape.
* Many parallel scrapers share one ``statistics()`` snapshot, so the manager keeps
  answering ``get`` quickly.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pykka
import pytest
from refcache.actors._entry import new_id
from refcache.actors._types import CacheStatistics
from refcache.metrics import CacheCollector, serve
from refcache.storage import (
    KEY_COMMITTED,
    KEY_CREATED_AT,
    KEY_SIZE,
    KEY_SNAPSHOT,
    MetadataStore,
    MetaEnv,
)

from refcache import Cache, open_cache

WAIT = 30.0


class CountingManager(pykka.ThreadingActor):
    """Answers ``statistics()`` with a fixed snapshot after ``delay`` s; counts the asks."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self._delay = threading.Event()
        self._seconds = delay
        self.calls = 0

    def statistics(self) -> CacheStatistics:
        self.calls += 1
        self._delay.wait(self._seconds)  # a slow snapshot (a large table)
        return CacheStatistics(records=1)

    def statistics_calls(self) -> int:
        return self.calls


class Stub:
    """What ``serve`` reads from a cache: its manager."""

    def __init__(self, manager: Any) -> None:
        self.manager = manager


@pytest.fixture
def stub() -> Iterator[Callable[[float], Any]]:
    refs: list[pykka.ActorRef[Any]] = []

    def start(delay: float = 0.0) -> Any:
        ref = CountingManager.start(delay)
        refs.append(ref)
        return ref.proxy()

    yield start
    for ref in refs:
        ref.stop(timeout=WAIT)


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)  # sleep-ok: polling a counter the server exposes
    return True


def scrape(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=WAIT) as response:
        body: bytes = response.read()
        return body


def test_300_idle_connections_hold_no_threads_and_a_scrape_still_works(
    stub: Callable[[float], Any],
) -> None:
    with serve(Stub(stub(0.0)), 0, workers=4, connection_timeout=WAIT) as server:
        scrape(server.url)  # the server's own threads have started
        before = threading.active_count()
        sockets = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(300)]
        try:
            assert wait_until(lambda: server.waiting_connections == 300)
            threads = threading.active_count()
            body = scrape(server.url)  # a real scrape goes through meanwhile
            assert b"refcache_up 1.0" in body
            assert threading.active_count() - before <= 4  # at most the worker pool
        finally:
            for s in sockets:
                s.close()
        assert threads - before <= 4, f"{threads - before} threads for 300 idle connections"
        # Closed by the clients: each becomes readable, is served (EOF) and goes away.
        assert wait_until(lambda: server.waiting_connections == 0)


def test_a_half_open_connection_is_dropped_after_the_connection_timeout(
    stub: Callable[[float], Any],
) -> None:
    with serve(Stub(stub(0.0)), 0, connection_timeout=0.5) as server:
        silent = socket.create_connection(("127.0.0.1", server.port))
        trickling = socket.create_connection(("127.0.0.1", server.port))
        try:
            silent.settimeout(WAIT)
            trickling.settimeout(WAIT)
            started = time.monotonic()
            trickling.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
            assert silent.recv(1) == b""  # the server closed it
            assert trickling.recv(1) == b""  # cut off by the socket timeout of its read
            elapsed = time.monotonic() - started
        finally:
            silent.close()
            trickling.close()
        assert elapsed < 5.0, elapsed
        assert server.waiting_connections == 0
        assert b"refcache_up 1.0" in scrape(server.url)


def test_concurrent_scrapes_share_one_snapshot(stub: Callable[[float], Any]) -> None:
    manager = stub(0.3)
    with serve(Stub(manager), 0, workers=8) as server:
        barrier = threading.Barrier(16)
        bodies: list[bytes] = []

        def scraper() -> None:
            barrier.wait(WAIT)
            bodies.append(scrape(server.url))

        threads = [threading.Thread(target=scraper) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
    assert len(bodies) == 16
    assert all(b"refcache_up 1.0" in body for body in bodies)
    # 16 scrapes within the snapshot's lifetime: one ask (two if a scrape came just late).
    assert manager.statistics_calls().get(timeout=WAIT) <= 2


def test_a_collector_without_max_age_still_shares_the_snapshot_in_flight(
    stub: Callable[[float], Any],
) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    manager = stub(0.3)
    registry = CollectorRegistry()
    CacheCollector(manager, registry=registry)
    barrier = threading.Barrier(8)

    def scraper() -> None:
        barrier.wait(WAIT)
        generate_latest(registry)

    threads = [threading.Thread(target=scraper) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert manager.statistics_calls().get(timeout=WAIT) <= 2
    generate_latest(registry)  # later scrapes ask afresh (no max age)
    assert manager.statistics_calls().get(timeout=WAIT) >= 2


def bulk_records(root: Path, n: int) -> list[str]:
    """``n`` committed records of known size, written straight to the metadata."""
    with open_cache(root, snapshotter="native"):
        pass
    ids = [new_id() for _ in range(n)]
    env = MetaEnv(root / "meta")
    try:
        MetadataStore(env).write_many(
            {
                rid: {KEY_COMMITTED: True, KEY_CREATED_AT: 1, KEY_SNAPSHOT: rid, KEY_SIZE: 4096}
                for rid in ids
            }
        )
    finally:
        env.close()
    return ids


def test_64_parallel_scrapers_do_not_stall_get(tmp_path: Path) -> None:
    ids = bulk_records(tmp_path / "cache", 5000)
    cache: Cache = open_cache(tmp_path / "cache", snapshotter="native", metrics_port=0)
    stop = threading.Event()
    scrapes: list[int] = []
    try:
        held = [cache.manager.get(rid).get(timeout=WAIT) for rid in ids[:500]]
        url = cache.metrics_server.url

        def scraper() -> None:
            done = 0
            while not stop.is_set():
                scrape(url)
                done += 1
            scrapes.append(done)

        threads = [threading.Thread(target=scraper, daemon=True) for _ in range(64)]
        for t in threads:
            t.start()
        latencies = []
        started = time.monotonic()
        i = 0
        while time.monotonic() - started < 3.0:
            t0 = time.perf_counter()
            ref = cache.manager.get(ids[500 + i % 4500]).get(timeout=WAIT)
            ref.release()
            latencies.append(time.perf_counter() - t0)
            i += 1
        stop.set()
        for t in threads:
            t.join(WAIT)
        for ref in held:
            ref.release()
    finally:
        stop.set()
        cache.close()
    assert len(scrapes) == 64
    assert sum(scrapes) >= 64
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99)]
    # Loose bounds (a shared machine); docs/BENCHMARKS.md has the measured figures.
    assert p99 < 0.5, f"get+release p99 {p99 * 1e3:.1f} ms, median {statistics.median(latencies)}"
    assert latencies[-1] < 2.0, f"slowest get+release {latencies[-1] * 1e3:.1f} ms"


def test_alike_scrapes_within_the_snapshot_age_share_one_rendering(
    stub: Callable[[float], Any],
) -> None:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import GaugeMetricFamily

    renderings: list[float] = []
    gate = threading.Event()

    class Slow:
        def collect(self) -> Iterator[GaugeMetricFamily]:
            renderings.append(time.monotonic())
            gate.wait(0.3)  # a rendering that takes a while: the others arrive meanwhile
            yield GaugeMetricFamily("slow_rendering", "a test gauge", value=1)

    registry = CollectorRegistry()
    registry.register(Slow())  # type: ignore[arg-type]  # a duck-typed collector
    with serve(Stub(stub(0.0)), 0, registry=registry, workers=8) as server:
        bodies: list[bytes] = []
        barrier = threading.Barrier(8)

        def scraper() -> None:
            barrier.wait(WAIT)
            bodies.append(scrape(server.url))

        threads = [threading.Thread(target=scraper) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        other = urllib.request.Request(
            server.url, headers={"Accept": "application/openmetrics-text"}
        )
        with urllib.request.urlopen(other, timeout=WAIT) as response:
            openmetrics = response.read()
    assert len(bodies) == 8
    assert all(b"slow_rendering 1.0" in body for body in bodies)
    assert len(set(bodies)) == 1
    assert b"# EOF" in openmetrics  # another format: rendered on its own
    # One rendering for the 8 alike scrapes (two if one came in just after), one for the other.
    assert 2 <= len(renderings) <= 3
