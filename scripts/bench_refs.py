"""Benchmark of the ref layer: handles, record actors and the manager, on both record shapes.

The workloads are those of BuildKit's cache benchmark (``TestBenchHot`` and
``TestBenchOpen``), with the same parameters and output fields where they exist, measured
on both record shapes (``--shapes``): ``pairs``, what ``new(retain=True)`` + ``commit()``
leave (an equal mutable + immutable, never finalized: what a build step leaves), and
``finalized`` (the same plus ``finalize()``). See ``scripts/_bench.py``.

* ``base``: the ceilings, no cache: a raw Pykka ask round trip (``raw_ask``), and the
  clone+release bookkeeping on a dict behind a lock (``lock_clone_release``);
* (a) ``a_clone_release_held``: ``clone()`` + ``release()`` of ``--records`` held records
  (made with ``new(retain=True)`` + ``commit()`` [+ ``finalize()``], never released), at each
  of ``--threads`` (pairs/s, p50/p99/p99.9/max latency of a pair);
* (b) ``b_get_release_unref``: the same records released, then ``manager.get`` + ``release``
  of records nobody holds;
* (c) ``c_new_commit_release``: ``new`` + ``commit`` + ``release`` in a loop, per policy:
  ``retain`` leaves a pair (shape ``pairs``), ``default`` leaves nothing (BuildKit removes
  an unretained pair on its last release; shape ``none``), ``finalize`` adds ``finalize()``
  before the release and leaves a finalized record (shape ``finalized``);
* (d) ``d_open``: opening a cache of ``--open-records`` released records of the shape in a
  fresh process: wall time of ``open_cache``, table entries (2 per pair), growth of the
  resident set (VmRSS from /proc/self/status, at return and after ``gc.collect()``; not
  ``ru_maxrss``, which is a peak) and the threads of the process.

Each measurement runs ``--repeat`` times in a fresh cache; the table shows the medians and
``/proc/loadavg``. ``--dir`` is where the caches go: the disk by default; on tmpfs
(``--dir /dev/shm``) the hot workloads (a)-(c) measure the CPU path without fsync costs.
The (d) datasets are written in bulk through the storage layer (``--build api`` uses the
API: slower, the same records; ``scripts/_bench.py`` explains and the tests verify it)::

    python scripts/bench_refs.py --records 1000 --seconds 3 --threads 1,16 --open-records 100000
    python scripts/bench_refs.py --workloads a,b,c --dir /dev/shm     # CPU only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pykka
from refcache.actors import open_cache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import (
    Report,
    add_common_arguments,
    add_dataset_arguments,
    add_shape_argument,
    copy_dataset,
    dataset,
    make_held,
    parse_ints,
    parse_shapes,
    remove_tree,
    run_threads,
    work_dir,
)

WORKLOADS = ("base", "a", "b", "c", "d")
_RATE = ["pairs_per_s", "p50_us", "p99_us", "max_us"]
#: What the table shows (``--json`` has every field).
COLUMNS = {
    "raw_ask": _RATE,
    "lock_clone_release": _RATE,
    "create_held": ["per_s"],
    "a_clone_release_held": _RATE,
    "b_get_release_unref": _RATE,
    "c_new_commit_release": _RATE,
    "d_open": [
        "cm_records",
        "open_s",
        "rss_growth_at_return_mib",
        "rss_growth_after_gc_mib",
        "kib_per_entry",
        "threads",
    ],
}


class Echo(pykka.ThreadingActor):
    def on_receive(self, message: Any) -> Any:
        return message


def bench_raw_ask(seconds: float) -> dict[str, float]:
    ref = Echo.start()
    try:
        return run_threads(1, lambda _i: ref.ask(1, timeout=10), seconds, keys=1)
    finally:
        ref.stop()


def bench_lock_reference(threads: int, seconds: float, records: int) -> dict[str, float]:
    lock = threading.Lock()
    handles: dict[int, set[int]] = {i: {0} for i in range(records)}
    counter = [1]

    def pair(rid: int) -> None:
        with lock:
            hid = counter[0]
            counter[0] += 1
            handles[rid].add(hid)
        with lock:
            handles[rid].discard(hid)

    return run_threads(threads, pair, seconds, keys=records)


def hot(
    report: Report, work: Path, shape: str, args: argparse.Namespace, wanted: set[str], rep: int
) -> None:
    """(a), (b) and (c) in one fresh cache, as BuildKit's ``TestBenchHot`` runs them."""
    n = args.records
    threads = parse_ints(args.threads)
    with open_cache(work / f"hot-{shape}", snapshotter="native", timeout=600) as cache:
        if wanted & {"a", "b"}:
            t0 = time.perf_counter()
            held = make_held(cache, n, shape)
            secs = time.perf_counter() - t0
            report.add(
                "create_held",
                shape,
                {"records": n},
                {"seconds": secs, "per_s": n / secs},
                repeat=rep,
            )
            if "a" in wanted:
                for g in threads:
                    res = run_threads(g, lambda i: held[i].clone().release(), args.seconds, keys=n)
                    report.add(
                        "a_clone_release_held", shape, {"threads": g, "records": n}, res, repeat=rep
                    )
            ids = [r.id for r in held]
            for r in held:
                r.release()
            if "b" in wanted:
                get = cache.manager.get

                def get_release(i: int) -> None:
                    get(ids[i]).get(timeout=600).release()

                for g in threads:
                    res = run_threads(g, get_release, args.seconds, keys=n)
                    report.add(
                        "b_get_release_unref", shape, {"threads": g, "records": n}, res, repeat=rep
                    )
        if "c" in wanted:
            variants = ("retain", "default") if shape == "pairs" else ("finalize",)
            for variant in variants:
                retain = variant != "default"
                finalize = variant == "finalize"

                def cycle(_i: int, retain: bool = retain, finalize: bool = finalize) -> None:
                    m = cache.manager.new(retain=retain, description="cycle").get(timeout=600)
                    ref = m.commit()
                    if finalize:
                        ref.finalize()
                    ref.release()

                left = shape if variant != "default" else "none"
                for g in threads:
                    res = run_threads(g, cycle, args.seconds, keys=1)
                    report.add(
                        "c_new_commit_release",
                        left,
                        {"policy": variant, "threads": g},
                        res,
                        repeat=rep,
                    )


OPEN_CHILD = """
    import gc, json, sys, threading, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from _bench import proc_status
    from refcache.actors import open_cache
    gc.collect()
    s0 = proc_status()
    t0 = time.perf_counter()
    cache = open_cache(sys.argv[1], snapshotter="native", timeout=600)
    secs = time.perf_counter() - t0
    s1 = proc_status()
    py_threads = threading.active_count()
    gc.collect()
    s2 = proc_status()
    stats = cache.manager.statistics().get(timeout=600)
    cache.close()
    mib = 1024.0
    print(json.dumps({
        "open_s": secs,
        "cm_records": stats.records,
        "rss_before_kib": s0["VmRSS"],
        "rss_at_return_mib": s1["VmRSS"] / mib,
        "rss_growth_at_return_mib": (s1["VmRSS"] - s0["VmRSS"]) / mib,
        "rss_growth_after_gc_mib": (s2["VmRSS"] - s0["VmRSS"]) / mib,
        "anon_growth_at_return_mib": (s1["RssAnon"] - s0["RssAnon"]) / mib,
        "file_growth_mib": (s1["RssFile"] - s0["RssFile"]) / mib,
        "kib_per_entry": (s2["VmRSS"] - s0["VmRSS"]) / max(stats.records, 1),
        "threads": s1["Threads"],
        "python_threads": py_threads,
    }))
"""


def open_in_child(root: Path) -> dict[str, Any]:
    """Opens the cache at ``root`` in a fresh interpreter; its measurements."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(OPEN_CHILD),
            str(root),
            str(Path(__file__).resolve().parent),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"opening {root} in a child process failed:\n{out.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workloads", default=",".join(WORKLOADS), help="any of base,a,b,c,d (comma-separated)"
    )
    add_shape_argument(parser)
    parser.add_argument("--records", type=int, default=1000, help="held records of (a) and (b)")
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--threads", default="1,16", help="client threads, comma-separated")
    parser.add_argument(
        "--open-records", type=int, default=100_000, help="records (pairs) of the (d) dataset"
    )
    add_dataset_arguments(parser)
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    wanted = {w.strip() for w in args.workloads.split(",") if w.strip()}
    if wanted - set(WORKLOADS):
        parser.error(f"unknown workloads: {sorted(wanted - set(WORKLOADS))}")
    shapes = parse_shapes(args.shapes)

    report = Report("bench_refs", args, args.dir, columns=COLUMNS)
    work = work_dir(args.dir, "bench-refs-")
    try:
        datasets: dict[str, Path] = {}
        if "d" in wanted and args.open_records:
            store = args.datasets or work / "datasets"
            for shape in shapes:
                t0 = time.perf_counter()
                datasets[shape] = dataset(store, args.open_records, shape, args.build)
                report.note(
                    f"(d) dataset: {args.open_records:,} {shape} records ({args.build}), "
                    f"ready in {time.perf_counter() - t0:.1f} s"
                )
        for rep in range(args.repeat):
            if "base" in wanted:
                report.add("raw_ask", None, {}, bench_raw_ask(args.seconds), repeat=rep)
                for g in parse_ints(args.threads):
                    res = bench_lock_reference(g, args.seconds, args.records)
                    report.add("lock_clone_release", None, {"threads": g}, res, repeat=rep)
            for shape in shapes:
                if wanted & {"a", "b", "c"}:
                    hot(report, work / f"rep{rep}", shape, args, wanted, rep)
                    remove_tree(work / f"rep{rep}")
                if shape in datasets:
                    copy_dataset(datasets[shape], work / "open")
                    res = open_in_child(work / "open")
                    remove_tree(work / "open")
                    report.add("d_open", shape, {"records": args.open_records}, res, repeat=rep)
    finally:
        remove_tree(work)
    summarise(report, parse_ints(args.threads), shapes)
    report.finish()
    return 0


def summarise(report: Report, threads: list[int], shapes: list[str]) -> None:
    """Ratios worth reading next to the table: actor overhead, pairs against finalized."""
    for g in threads:
        lock = report.median("lock_clone_release", None, threads=g)
        for shape in shapes:
            held = report.median("a_clone_release_held", shape, threads=g)
            if lock and held and held["pairs_per_s"]:
                report.note(
                    f"(a) {shape}, {g} threads: the lock-based reference is "
                    f"{lock['pairs_per_s'] / held['pairs_per_s']:.1f}x faster"
                )
    if len(shapes) == 2:
        for bench in ("a_clone_release_held", "b_get_release_unref"):
            for g in threads:
                p = report.median(bench, "pairs", threads=g)
                f = report.median(bench, "finalized", threads=g)
                if p and f and f["pairs_per_s"]:
                    report.note(
                        f"{bench}, {g} threads: pairs / finalized = "
                        f"{p['pairs_per_s'] / f['pairs_per_s']:.2f}"
                    )


if __name__ == "__main__":
    raise SystemExit(main())
