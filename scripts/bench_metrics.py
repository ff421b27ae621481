"""Benchmark of a metrics scrape: time and exposition size against the number of records.

Two measurements:

* ``synthetic``: a real Pykka actor stands in for the manager and answers ``statistics()``
  with a synthetic ``CacheStatistics`` of N records (5 % held, in-use first as the manager
  orders them, ten operations with latency histograms). One scrape is
  ``generate_latest(registry)``: the ``statistics()`` ask, choosing the bounded per-record
  series, and rendering the text format -- what a Prometheus scrape of ``serve()`` costs,
  minus HTTP. Each size runs with the default cap (``max_record_series=1000``) and uncapped
  (cap = N) to show what unbounded per-record series would cost. The snapshot is what the
  collector renders (counts and one row per visible record), so it has no record shape.
* ``real``: the same scrape of a real cache of N released records per record shape
  (``--shapes``; ``pairs``: N lazy-commit pairs from ``new(retain=True)`` + ``commit()``,
  2N table entries; ``finalized``), built in bulk under ``--dir`` (``scripts/_bench.py``)
  and opened: the manager's own ``statistics()`` walks its table inside the scrape.

``--repeat`` is the number of scrapes per measurement (each a run: medians are reported,
with ``/proc/loadavg``); ``--json`` prints JSON lines. Target: < 100 ms per scrape at 100k
records with the default cap, synthetic (exit status 1 when missed)::

    python scripts/bench_metrics.py --sizes 1000,10000,100000 --repeat 15
    python scripts/bench_metrics.py --sizes "" --real-sizes 10000,100000 --dir /dev/shm
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pykka
from prometheus_client import CollectorRegistry, generate_latest
from refcache.actors import open_cache
from refcache.actors._types import CacheStatistics
from refcache.metrics import LATENCY_BUCKETS, CacheCollector

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import (
    Report,
    add_common_arguments,
    add_shape_argument,
    build_dataset,
    parse_ints,
    parse_shapes,
    remove_tree,
    work_dir,
)

DEFAULT_CAP = 1000
TARGET_SECONDS = 0.100
TARGET_RECORDS = 100_000
#: What the table shows (``--json`` has every field).
COLUMNS = {"synthetic": ["series", "scrape_ms", "kib"], "real": ["series", "scrape_ms", "kib"]}
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


def scrape_times(manager: Any, cap: int, repeat: int) -> tuple[list[float], int, int]:
    """Scrapes ``repeat`` times; returns (seconds per scrape, exposition bytes, series)."""
    registry = CollectorRegistry()
    CacheCollector(manager, registry=registry, max_record_series=cap, timeout=600.0)
    body = generate_latest(registry)  # warm-up: first-call costs are not a scrape's
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        body = generate_latest(registry)
        times.append(time.perf_counter() - started)
    series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    return times, len(body), series


def bench(stats: CacheStatistics, cap: int, repeat: int) -> tuple[list[float], int, int]:
    """Scrapes a synthetic manager ``repeat`` times (see :func:`scrape_times`)."""
    ref = SyntheticManager.start(stats)
    try:
        return scrape_times(ref.proxy(), cap, repeat)
    finally:
        ref.stop(timeout=30.0)


def add_scrapes(
    report: Report,
    bench_name: str,
    shape: str | None,
    params: dict[str, Any],
    result: tuple[list[float], int, int],
) -> None:
    times, size, series = result
    for rep, secs in enumerate(times):
        report.add(
            bench_name,
            shape,
            params,
            {"scrape_ms": secs * 1e3, "series": series, "kib": size / 1024},
            repeat=rep,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", default="1000,10000,100000", help="synthetic record counts, comma-separated"
    )
    parser.add_argument(
        "--uncapped-repeat", type=int, default=5, help="scrapes per uncapped run (slow)"
    )
    parser.add_argument(
        "--real-sizes", default="10000", help='records of the real caches ("": none)'
    )
    add_shape_argument(parser)
    add_common_arguments(parser, repeat=15)
    args = parser.parse_args(argv)
    sizes = parse_ints(args.sizes)
    shapes = parse_shapes(args.shapes)
    real_sizes = parse_ints(args.real_sizes)

    report = Report("bench_metrics", args, args.dir if real_sizes else None, columns=COLUMNS)
    failed = False
    for records in sizes:
        stats = synthetic_statistics(records)
        runs = [(DEFAULT_CAP, args.repeat)]
        if records > DEFAULT_CAP:
            runs.append((records, args.uncapped_repeat))  # uncapped: one series per record
        for cap, repeat in runs:
            result = bench(stats, cap, repeat)
            add_scrapes(report, "synthetic", None, {"records": records, "cap": cap}, result)
            median = statistics.median(result[0])
            if records >= TARGET_RECORDS and cap == DEFAULT_CAP and median >= TARGET_SECONDS:
                failed = True
    if real_sizes:
        work = work_dir(args.dir, "bench-metrics-")
        try:
            for shape in shapes:
                for records in real_sizes:
                    root = work / f"{shape}-{records}"
                    build_dataset(root, records, shape)
                    with open_cache(root, snapshotter="native", timeout=600) as cache:
                        entries = cache.manager.statistics().get(timeout=600).records
                        result = scrape_times(cache.manager, DEFAULT_CAP, args.repeat)
                    params = {"records": records, "entries": entries, "cap": DEFAULT_CAP}
                    add_scrapes(report, "real", shape, params, result)
                    remove_tree(root)
        finally:
            remove_tree(work)
    if sizes:
        verdict = "MISSED" if failed else "met"
        report.note(
            f"target: < {TARGET_SECONDS * 1000:.0f} ms/scrape at 100k records, default cap, "
            f"synthetic: {verdict}"
        )
    report.finish()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
