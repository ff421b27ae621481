"""serve(), wsgi_app(), promtool's linter on the exposition, and the Grafana dashboard."""

from __future__ import annotations

import inspect
import io
import json
import os
import re
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any
from wsgiref.util import setup_testing_defaults

import pykka
import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from refcache.actors._types import CacheStatistics
from refcache.metrics import LATENCY_BUCKETS, CacheCollector, MetricsServer, serve, wsgi_app
from refcache.storage import FailedPreconditionError, InvalidError

_STOP_TIMEOUT = 5.0
_HTTP_TIMEOUT = 10.0
DASHBOARD = Path(__file__).resolve().parents[2] / "metrics" / "dashboards" / "refcache.json"


class SnapshotManager(pykka.ThreadingActor):
    """Answers ``statistics()`` with a fixed snapshot (a real actor, not a mock)."""

    def __init__(self, stats: CacheStatistics) -> None:
        super().__init__()
        self._stats = stats

    def statistics(self) -> CacheStatistics:
        return self._stats


@dataclass(frozen=True)
class StubCache:
    """The two ``Cache`` attributes exposition reads, around a stub manager actor."""

    manager: Any
    root: Path


def full_snapshot(held_id: str = "held", refs: int = 2) -> CacheStatistics:
    """A snapshot that makes every family yield samples (histogram and per-record too)."""
    latencies = (0.0004, 0.02, 3.0)
    buckets = tuple(sum(1 for x in latencies if x <= b) for b in LATENCY_BUCKETS)
    return CacheStatistics(
        records=3,
        records_by_kind=MappingProxyType({"layer": 2, "merge": 1}),
        mutable=1,
        immutable=2,
        in_use=1,
        open_handles=refs,
        bytes_by_kind=MappingProxyType({"layer": 2048, "merge": 512}),
        reclaimable_bytes=1024,
        active_actors=1,
        pool_workers=2,
        operations=MappingProxyType({("get", "ok"): 2, ("get", "locked"): 1}),
        latency_sum_seconds=MappingProxyType({"get": sum(latencies)}),
        latency_buckets=MappingProxyType({"get": (*buckets, len(latencies))}),
        prune_records_total=1,
        prune_bytes_total=4096,
        prune_seconds_total=0.5,
        gc_runs_total=1,
        gc_bytes_total=4096,
        double_releases_total=1,
        lmdb_map_size_bytes=1 << 30,
        lmdb_used_bytes=32768,
        records_detail=(
            (held_id, refs, 2048),
            ("idle", 0, 512),
            ("unsized", 0, -1),
            ('odd "id"\\with\nescapes', 0, 1),
        ),
        registry_bytes=MappingProxyType({"push": 1000, "pull": 2000}),
        registry_blobs=MappingProxyType({("push", "uploaded"): 2, ("pull", "fetched"): 1}),
        registry_requests=MappingProxyType({("blob_get", "200"): len(latencies)}),
        registry_latency_sum_seconds=MappingProxyType({("blob_get", "200"): sum(latencies)}),
        registry_latency_buckets=MappingProxyType({("blob_get", "200"): buckets}),
    )


@pytest.fixture
def start_manager(start: Callable[..., Any]) -> Callable[[CacheStatistics], Any]:
    """Starts stub managers serving ``stats`` (stopped after the test)."""
    return lambda stats: start(SnapshotManager, stats)


@pytest.fixture
def cache(start_manager: Callable[[CacheStatistics], Any], tmp_path: Path) -> StubCache:
    return StubCache(manager=start_manager(full_snapshot()), root=tmp_path)


def get(url: str) -> tuple[int, str, bytes]:
    """GETs ``url``: (status, content type, body), error statuses included."""
    try:
        with urllib.request.urlopen(url, timeout=_HTTP_TIMEOUT) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers["Content-Type"], exc.read()


def require_tool(name: str) -> str:
    """Path of a Prometheus binary; fails under CI (which installs it), else skips."""
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed (Debian package 'prometheus')"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must install it (see .ci/run)")
        pytest.skip(reason)
    return path


# --- serve() ------------------------------------------------------------------------------


def test_serve_exposes_the_cache_metrics_at_slash_metrics_on_an_os_chosen_port(
    cache: StubCache,
) -> None:
    with serve(cache, 0) as server:
        status, content_type, body = get(server.url)

    assert server.port > 0
    assert server.addr == "127.0.0.1"
    assert server.url == f"http://127.0.0.1:{server.port}/metrics"
    assert status == 200
    assert content_type.startswith("text/plain")
    assert b'refcache_record_refs{record_id="held"} 2.0\n' in body
    assert b"refcache_up 1.0\n" in body


def test_concurrent_scrapes_each_get_a_complete_exposition(cache: StubCache) -> None:
    with serve(cache, 0) as server, ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: get(server.url), range(32)))

    assert {status for status, _, _ in results} == {200}
    bodies = {body for _, _, body in results}
    assert all(b'refcache_record_refs{record_id="held"} 2.0\n' in body for body in bodies)
    assert all(body.endswith(b"refcache_record_series_omitted 0.0\n") for body in bodies)


def test_serve_answers_404_outside_the_metrics_path(cache: StubCache) -> None:
    with serve(cache, 0) as server:
        status, _, body = get(f"http://127.0.0.1:{server.port}/")

    assert status == 404
    assert body == b"not found: refcache metrics are at /metrics\n"


def test_a_stopped_server_refuses_connections_and_stopping_again_is_a_no_op(
    cache: StubCache,
) -> None:
    server = serve(cache, 0)
    assert server.running

    server.stop()
    server.stop()

    assert not server.running
    assert "stopped" in repr(server)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(server.url, timeout=_HTTP_TIMEOUT)


def test_serve_never_registers_into_the_global_registry(cache: StubCache) -> None:
    with serve(cache, 0) as server:
        status, _, _ = get(server.url)

    assert status == 200
    assert REGISTRY.get_sample_value("refcache_up") is None


def test_two_caches_are_served_side_by_side_in_one_process(
    start_manager: Callable[[CacheStatistics], Any], tmp_path: Path
) -> None:
    first = StubCache(start_manager(full_snapshot("first-record", 1)), tmp_path / "a")
    second = StubCache(start_manager(full_snapshot("second-record", 3)), tmp_path / "b")

    with serve(first, 0) as one, serve(second, 0) as two:
        _, _, body_one = get(one.url)
        _, _, body_two = get(two.url)

    assert b'refcache_record_refs{record_id="first-record"} 1.0\n' in body_one
    assert b"second-record" not in body_one
    assert b'refcache_record_refs{record_id="second-record"} 3.0\n' in body_two


def test_serve_exposes_a_given_registry_instead_of_building_one(
    start_manager: Callable[[CacheStatistics], Any], cache: StubCache
) -> None:
    registry = CollectorRegistry()
    CacheCollector(start_manager(full_snapshot("custom", 5)), namespace="custom", registry=registry)

    with serve(cache, 0, registry=registry) as server:
        _, _, body = get(server.url)

    assert b'custom_record_refs{record_id="custom"} 5.0\n' in body
    assert b"refcache_" not in body


def test_serve_listens_on_ipv6_loopback_when_asked(cache: StubCache) -> None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")

    with serve(cache, 0, "::1") as server:
        status, _, body = get(server.url)

    assert server.url == f"http://[::1]:{server.port}/metrics"
    assert status == 200
    assert b"refcache_up 1.0\n" in body


def test_serve_on_a_port_in_use_fails_with_a_message_naming_the_address(
    cache: StubCache,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        with pytest.raises(FailedPreconditionError, match=f"127.0.0.1:{port}"):
            serve(cache, port)


@pytest.mark.parametrize("port", [-1, 65536, True, "9464", 80.0])
def test_serve_refuses_a_bad_port(cache: StubCache, port: Any) -> None:
    with pytest.raises(InvalidError, match="invalid metrics port"):
        serve(cache, port)


@pytest.mark.parametrize("addr", ["", None, 127])
def test_serve_refuses_a_bad_address(cache: StubCache, addr: Any) -> None:
    with pytest.raises(InvalidError, match="invalid metrics address"):
        serve(cache, 0, addr)


def test_serve_and_wsgi_app_refuse_a_cache_without_a_manager(tmp_path: Path) -> None:
    with pytest.raises(InvalidError, match="has no manager"):
        serve(tmp_path, 0)  # type: ignore[arg-type]
    with pytest.raises(InvalidError, match="has no manager"):
        wsgi_app(tmp_path)  # type: ignore[arg-type]


def test_metrics_server_is_exported_for_type_hints(cache: StubCache) -> None:
    with serve(cache, 0) as server:
        assert isinstance(server, MetricsServer)


# --- wsgi_app() ---------------------------------------------------------------------------


def call_wsgi(app: Any, path: str) -> tuple[str, dict[str, str], bytes]:
    """Calls a WSGI app in-process, as an embedding server would."""
    environ: dict[str, Any] = {"PATH_INFO": path, "REQUEST_METHOD": "GET"}
    setup_testing_defaults(environ)
    environ["wsgi.input"] = io.BytesIO(b"")
    seen: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        seen["status"], seen["headers"] = status, dict(headers)
        return lambda _data: None

    body = b"".join(app(environ, start_response))
    return seen["status"], seen["headers"], body


def test_wsgi_app_serves_the_cache_metrics_in_process(cache: StubCache) -> None:
    status, headers, body = call_wsgi(wsgi_app(cache), "/metrics")

    assert status == "200 OK"
    assert headers["Content-Type"].startswith("text/plain")
    assert b'refcache_record_refs{record_id="held"} 2.0\n' in body
    assert REGISTRY.get_sample_value("refcache_up") is None


def test_wsgi_app_serves_a_given_registry(
    start_manager: Callable[[CacheStatistics], Any], cache: StubCache
) -> None:
    registry = CollectorRegistry()
    CacheCollector(start_manager(full_snapshot("other", 4)), namespace="other", registry=registry)

    _, _, body = call_wsgi(wsgi_app(cache, registry=registry), "/metrics")

    assert b'other_record_refs{record_id="other"} 4.0\n' in body


# --- promtool check metrics ---------------------------------------------------------------


def promtool_check_metrics(exposition: bytes) -> tuple[int, str]:
    promtool = require_tool("promtool")
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=exposition,
        capture_output=True,
        timeout=60,
        check=False,
    )
    return result.returncode, (result.stdout + result.stderr).decode()


def test_exposition_passes_promtool_check_metrics(
    start_manager: Callable[[CacheStatistics], Any],
) -> None:
    registry = CollectorRegistry()
    CacheCollector(start_manager(full_snapshot()), registry=registry)
    exposition = generate_latest(registry)
    assert b"refcache_operation_duration_seconds_bucket" in exposition

    assert promtool_check_metrics(exposition) == (0, "")


def test_exposition_of_an_unanswering_manager_passes_promtool_check_metrics() -> None:
    ref = SnapshotManager.start(full_snapshot())
    proxy = ref.proxy()
    ref.stop(timeout=_STOP_TIMEOUT)
    registry = CollectorRegistry()
    CacheCollector(proxy, registry=registry)
    exposition = generate_latest(registry)
    assert exposition.endswith(b"\nrefcache_up 0.0\n")

    assert promtool_check_metrics(exposition) == (0, "")


# --- the Grafana dashboard ----------------------------------------------------------------

_METRIC_RE = re.compile(r"\brefcache_[a-zA-Z0-9_]+")


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def produced_sample_names(start_manager: Callable[[CacheStatistics], Any]) -> set[str]:
    registry = CollectorRegistry()
    CacheCollector(start_manager(full_snapshot()), registry=registry)
    return {sample.name for family in registry.collect() for sample in family.samples}


def test_dashboard_is_an_importable_grafana_dashboard_with_a_datasource_input() -> None:
    dashboard = json.loads(DASHBOARD.read_text())

    assert dashboard["schemaVersion"] == 39
    assert dashboard["uid"] == "refcache"
    assert dashboard["id"] is None
    assert [(i["name"], i["type"], i["pluginId"]) for i in dashboard["__inputs"]] == [
        ("DS_PROMETHEUS", "datasource", "prometheus")
    ]
    datasource = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    queried = [panel for panel in panels if panel["type"] != "row"]
    assert queried
    for panel in queried:
        assert panel["type"] in {"stat", "timeseries", "table"}, panel["title"]
        assert panel["datasource"] == datasource, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        assert all(target["datasource"] == datasource for target in panel["targets"])
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"] == datasource


def test_dashboard_panels_stay_on_the_grid_without_overlapping() -> None:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    taken: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & taken, f"panel {panel['title']!r} overlaps another"
        taken |= cells


def test_every_dashboard_expr_uses_only_series_the_collector_produces(
    start_manager: Callable[[CacheStatistics], Any],
) -> None:
    produced = produced_sample_names(start_manager)
    exprs = dashboard_exprs()

    used = set()
    for expr in exprs:
        names = set(_METRIC_RE.findall(expr))
        assert names, f"expr uses no refcache series: {expr}"
        assert names <= produced, f"expr uses unknown series {names - produced}: {expr}"
        used |= names
    # The dashboard covers what the issue asks for: records, handles, bytes, reclaimable,
    # operation rate and latency, prune activity.
    assert {
        "refcache_records",
        "refcache_record_states",
        "refcache_records_in_use",
        "refcache_open_handles",
        "refcache_usage_bytes",
        "refcache_reclaimable_bytes",
        "refcache_operations_total",
        "refcache_operation_duration_seconds_bucket",
        "refcache_prune_records_total",
        "refcache_prune_bytes_total",
        "refcache_prune_seconds_total",
        "refcache_record_refs",
    } <= used


def test_every_dashboard_expr_is_valid_promql(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    exprs = [
        # Grafana substitutes its variables before querying; do the same for the parser.
        re.sub(r"\$instance\b", ".*", re.sub(r"\$__rate_interval\b", "5m", expr))
        for expr in dashboard_exprs()
    ]
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:expr_{i}", "expr": expr} for i, expr in enumerate(exprs)
                ],
            }
        ]
    }
    # JSON is YAML, so promtool reads this rule file as is.
    rule_file = tmp_path / "dashboard-rules.yml"
    rule_file.write_text(json.dumps(rules))

    result = subprocess.run(
        [promtool, "check", "rules", str(rule_file)],
        capture_output=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, (result.stdout + result.stderr).decode()
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout.decode()


def test_open_cache_serves_metrics_when_asked_and_stops_at_close(tmp_path: Path) -> None:
    import urllib.error
    import urllib.request

    from refcache import open_cache

    with open_cache(tmp_path / "cache", snapshotter="native", metrics_port=0) as cache:
        server = cache.metrics_server
        body = urllib.request.urlopen(server.url, timeout=10).read().decode()
        assert "refcache_up 1.0" in body
    assert not server.running
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(server.url, timeout=2)


def test_a_metrics_server_that_cannot_start_leaves_the_cache_closed(tmp_path: Path) -> None:
    from refcache import InvalidError, open_cache

    with pytest.raises(InvalidError, match="invalid metrics port 70000"):
        open_cache(tmp_path / "cache", snapshotter="native", metrics_port=70000)
    # The cache was closed again: its lock is free for the next open.
    with open_cache(tmp_path / "cache", snapshotter="native") as cache:
        assert cache.metrics_server is None


def test_the_actor_layer_opens_caches_without_knowing_metrics(tmp_path: Path) -> None:
    from refcache import actors

    with pytest.raises(actors.InvalidError, match="unknown open_cache options: metrics_port"):
        actors.open_cache(tmp_path / "cache", snapshotter="native", metrics_port=0)
    assert "metrics_port" not in inspect.signature(actors.open_cache).parameters
