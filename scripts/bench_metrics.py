"""Benchmark of a metrics scrape: time and exposition size against the number of records.

A real Pykka actor stands in for the manager and answers ``statistics()`` with a synthetic
``CacheStatistics`` of N records (5 % held, in-use first as the manager orders them, ten
operations with latency histograms). One scrape is ``generate_latest(registry)``: the
``statistics()`` ask, choosing the bounded per-record series, and rendering the text format
-- what a Prometheus scrape of ``serve()`` costs, minus HTTP.

Each size runs with the default cap (``max_record_series=1000``) and uncapped (cap = N) to
show what unbounded per-record series would cost. Target: < 100 ms per scrape at 100k
records with the default cap (exit status 1 when missed)::

    python scripts/bench_metrics.py --sizes 1000,10000,100000 --repeat 15
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from types import MappingProxyType

import pykka
from prometheus_client import CollectorRegistry, generate_latest
from refcache.actors._types import CacheStatistics
from refcache.metrics import LATENCY_BUCKETS, CacheCollector

DEFAULT_CAP = 1000
TARGET_SECONDS = 0.100
TARGET_RECORDS = 100_000
OPERATIONS = (
    "get",
    "get_mutable",
    "new",
    "get_by_blob",
    "merge",
    "diff",
    "release",
    "search",
    "disk_usage",
    "prune",
)


class SyntheticManager(pykka.ThreadingActor):
    """Answers ``statistics()`` with one prebuilt snapshot, as the manager would."""

    def __init__(self, stats: CacheStatistics) -> None:
        super().__init__()
        self._stats = stats

    def statistics(self) -> CacheStatistics:
        return self._stats


def synthetic_statistics(records: int) -> CacheStatistics:
    """A snapshot of ``records`` records: 1 in 20 held (1-3 refs), in-use first."""
    held = [(f"rec-{i:07d}", 1 + i % 3, 4096 * (1 + i % 50)) for i in range(0, records, 20)]
    idle = [
        (f"rec-{i:07d}", 0, 4096 * (1 + i % 50) if i % 11 else -1) for i in range(records) if i % 20
    ]
    detail = tuple(held + idle)
    per_kind = records // 4
    bounds = len(LATENCY_BUCKETS)
    return CacheStatistics(
        records=records,
        records_by_kind=MappingProxyType(
            {"base": per_kind, "layer": records - 3 * per_kind, "merge": per_kind, "diff": per_kind}
        ),
        mutable=records // 10,
        immutable=records - records // 10,
        lazy=records // 50,
        in_use=len(held),
        open_handles=sum(refs for _, refs, _ in held),
        bytes_by_kind=MappingProxyType(
            {"base": 1 << 30, "layer": 1 << 32, "merge": 1 << 28, "diff": 1 << 26}
        ),
        reclaimable_bytes=1 << 31,
        active_actors=len(held),
        pool_workers=4,
        operations=MappingProxyType(
            {(op, result): 1000 for op in OPERATIONS for result in ("ok", "error")}
        ),
        latency_sum_seconds=MappingProxyType(dict.fromkeys(OPERATIONS, 12.5)),
        latency_buckets=MappingProxyType(
            {op: (*(100 * (i + 1) for i in range(bounds)), 2000) for op in OPERATIONS}
        ),
        lmdb_map_size_bytes=1 << 34,
        lmdb_used_bytes=1 << 28,
        records_detail=detail,
    )


def bench(stats: CacheStatistics, cap: int, repeat: int) -> tuple[list[float], int, int]:
    """Scrapes ``repeat`` times; returns (seconds per scrape, exposition bytes, series)."""
    ref = SyntheticManager.start(stats)
    try:
        registry = CollectorRegistry()
        CacheCollector(ref.proxy(), registry=registry, max_record_series=cap, timeout=30.0)
        body = generate_latest(registry)  # warm-up: first-call costs are not a scrape's
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            body = generate_latest(registry)
            times.append(time.perf_counter() - started)
        series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
        return times, len(body), series
    finally:
        ref.stop(timeout=30.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", default="1000,10000,100000", help="record counts, comma-separated"
    )
    parser.add_argument("--repeat", type=int, default=15, help="scrapes per capped run")
    parser.add_argument(
        "--uncapped-repeat", type=int, default=5, help="scrapes per uncapped run (slow)"
    )
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]

    print(
        f"{'records':>8} {'cap':>8} {'series':>8} {'median ms':>10} {'min ms':>8} "
        f"{'max ms':>8} {'KiB':>9}"
    )
    failed = False
    for records in sizes:
        stats = synthetic_statistics(records)
        runs = [(DEFAULT_CAP, args.repeat)]
        if records > DEFAULT_CAP:
            runs.append((records, args.uncapped_repeat))  # uncapped: one series per record
        for cap, repeat in runs:
            times, size, series = bench(stats, cap, repeat)
            median = statistics.median(times)
            print(
                f"{records:>8} {cap:>8} {series:>8} {median * 1000:>10.2f} "
                f"{min(times) * 1000:>8.2f} {max(times) * 1000:>8.2f} {size / 1024:>9.1f}"
            )
            if records >= TARGET_RECORDS and cap == DEFAULT_CAP and median >= TARGET_SECONDS:
                failed = True
    verdict = "MISSED" if failed else "met"
    print(
        f"target: < {TARGET_SECONDS * 1000:.0f} ms/scrape at 100k records, default cap: {verdict}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
