"""Benchmark of the ref layer: handles, record actors and the manager, on the disk.

Measured in one run, so the ratios hold across machines:

* ``raw_ask``: a raw Pykka ask round trip to a ThreadingActor (the ceiling of any actor call);
* ``lock_clone_release``: the same clone+release bookkeeping on a dict behind a lock, no actors
  (the reference the actor overhead is stated against);
* ``clone_release``: clone+release pairs through handles on held records, with 1, 16 and 64
  client threads over 1,000 records (pairs/s, p50/p99 latency of a pair);
* ``unreferenced_get_release``: ``manager.get`` + release of records nobody holds;
* ``new_commit_release``: ``manager.new`` + ``commit`` + release (real snapshots, on the disk);
* ``open``: opening a cache of N stored records in a fresh process (seconds, RSS per record,
  threads).

    python scripts/bench_refs.py --open-records 100000
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pykka
from refcache.actors import ImmutableRef, open_cache
from refcache.storage import (
    KEY_COMMITTED,
    KEY_CREATED_AT,
    KEY_DESCRIPTION,
    KEY_SNAPSHOT,
    MetadataStore,
    MetaEnv,
)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(int(len(values) * q), len(values) - 1)]


def run_threads(n: int, fn: Any, seconds: float) -> tuple[int, list[float]]:
    """Runs ``fn(rng)`` in ``n`` threads for ``seconds``; returns (ops, latencies)."""
    stop = threading.Event()
    counts = [0] * n
    lats: list[list[float]] = [[] for _ in range(n)]
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        rng = random.Random(i)
        try:
            while not stop.is_set():
                t0 = time.perf_counter()
                fn(rng)
                lats[i].append(time.perf_counter() - t0)
                counts[i] += 1
        except BaseException as exc:  # reported below
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    stop.wait(seconds)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]
    return sum(counts), [x for lat in lats for x in lat]


class Echo(pykka.ThreadingActor):
    def on_receive(self, message: Any) -> Any:
        return message


def bench_raw_ask(seconds: float) -> dict[str, float]:
    ref = Echo.start()
    try:
        ops, lats = run_threads(1, lambda _r: ref.ask(1, timeout=10), seconds)
    finally:
        ref.stop()
    return {"ops_per_s": ops / seconds, "p50_ms": percentile(lats, 0.5) * 1e3}


def bench_lock_reference(threads: int, seconds: float) -> dict[str, float]:
    lock = threading.Lock()
    handles: dict[int, set[int]] = {i: {0} for i in range(1000)}
    counter = [1]

    def pair(rng: random.Random) -> None:
        rid = rng.randrange(1000)
        with lock:
            hid = counter[0]
            counter[0] += 1
            handles[rid].add(hid)
        with lock:
            handles[rid].discard(hid)

    ops, lats = run_threads(threads, pair, seconds)
    return {"ops_per_s": ops / seconds, "p99_ms": percentile(lats, 0.99) * 1e3}


def make_committed(cache: Any, n: int) -> list[ImmutableRef]:
    refs = []
    for i in range(n):
        m = cache.manager.new(description=f"bench {i}").get(timeout=60)
        refs.append(m.commit())
    for r in refs:
        r.finalize()
    return refs


def bench_clone_release(refs: list[ImmutableRef], threads: int, seconds: float) -> dict[str, float]:
    def pair(rng: random.Random) -> None:
        c = refs[rng.randrange(len(refs))].clone()
        c.release()

    ops, lats = run_threads(threads, pair, seconds)
    return {
        "ops_per_s": ops / seconds,
        "p50_ms": percentile(lats, 0.5) * 1e3,
        "p99_ms": percentile(lats, 0.99) * 1e3,
    }


def bench_unreferenced(
    cache: Any, ids: list[str], threads: int, seconds: float
) -> dict[str, float]:
    def pair(rng: random.Random) -> None:
        r = cache.manager.get(ids[rng.randrange(len(ids))]).get(timeout=60)
        r.release()

    ops, lats = run_threads(threads, pair, seconds)
    return {
        "ops_per_s": ops / seconds,
        "p50_ms": percentile(lats, 0.5) * 1e3,
        "p99_ms": percentile(lats, 0.99) * 1e3,
    }


def bench_new_commit_release(cache: Any, threads: int, seconds: float) -> dict[str, float]:
    def cycle(_rng: random.Random) -> None:
        m = cache.manager.new(description="cycle").get(timeout=60)
        i = m.commit()
        i.release()

    ops, lats = run_threads(threads, cycle, seconds)
    return {
        "ops_per_s": ops / seconds,
        "p50_ms": percentile(lats, 0.5) * 1e3,
        "p99_ms": percentile(lats, 0.99) * 1e3,
    }


OPEN_CHILD = """
    import json, resource, sys, threading, time
    t0 = time.perf_counter()
    from refcache.actors import open_cache
    t_import = time.perf_counter() - t0
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    cache = open_cache(sys.argv[1], snapshotter="native")
    secs = time.perf_counter() - t0
    records = cache.manager.statistics().get(timeout=600).records
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    threads = threading.active_count()
    cache.close()
    print(json.dumps({"seconds": secs, "records": records, "threads": threads,
                      "rss_kib_before": rss0, "rss_kib_after": rss1}))
"""


def bench_open(n: int, workdir: Path) -> dict[str, float]:
    root = workdir / "open-cache"
    with open_cache(root, snapshotter="native"):
        pass  # creates the layout and records the snapshotter
    env = MetaEnv(root / "meta")
    store = MetadataStore(env)
    now = time.time_ns()
    for lo in range(0, n, 5000):
        items = store.get_many(f"rec{i:020d}" for i in range(lo, min(lo + 5000, n)))
        for item in items:
            item.queue_many(
                {
                    KEY_COMMITTED: True,
                    KEY_CREATED_AT: now,
                    KEY_SNAPSHOT: item.id,
                    KEY_DESCRIPTION: f"[stage] RUN step {item.id}",
                    "snapshot.size": 4096,
                    "cache.parent": f"rec{int(item.id[3:]) - 1:020d}"
                    if item.id[3:] != "0" * 20 and int(item.id[3:]) % 10
                    else None,
                }
            )
        store.commit_many(items)
    env.close()
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(OPEN_CHILD), str(root)],
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["kib_per_record"] = (res["rss_kib_after"] - res["rss_kib_before"]) / max(res["records"], 1)
    return res


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--open-records", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path.cwd())
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    results: dict[str, list[dict[str, float]]] = {}

    def add(name: str, value: dict[str, float]) -> None:
        results.setdefault(name, []).append(value)
        if not args.json:
            print(f"  {name}: {json.dumps({k: round(v, 3) for k, v in value.items()})}", flush=True)

    for rep in range(args.repeat):
        if not args.json:
            print(f"repeat {rep + 1}/{args.repeat}", flush=True)
        work = Path(tempfile.mkdtemp(prefix="bench-refs-", dir=args.dir))
        try:
            add("raw_ask", bench_raw_ask(args.seconds))
            for n in (1, 16, 64):
                add(f"lock_clone_release_{n}", bench_lock_reference(n, args.seconds))
            with open_cache(work / "cache", snapshotter="native") as cache:
                refs = make_committed(cache, args.records)
                for n in (1, 16, 64):
                    add(f"clone_release_{n}", bench_clone_release(refs, n, args.seconds))
                ids = [r.id for r in refs]
                for r in refs:
                    r.release()
                for n in (1, 16):
                    add(
                        f"unreferenced_get_release_{n}",
                        bench_unreferenced(cache, ids, n, args.seconds),
                    )
                for n in (1, 16):
                    add(f"new_commit_release_{n}", bench_new_commit_release(cache, n, args.seconds))
            if rep == 0 and args.open_records:
                add("open", bench_open(args.open_records, work))
        finally:
            shutil.rmtree(work, ignore_errors=True)

    med = {
        name: {k: statistics.median(v[k] for v in vals) for k in vals[0]}
        for name, vals in results.items()
    }
    if args.json:
        print(json.dumps(med))
        return 0
    print("\nmedians")
    for name, vals in med.items():
        print(f"{name:32} " + "  ".join(f"{k}={v:,.3f}" for k, v in vals.items()))
    for n in (1, 16, 64):
        ratio = med[f"lock_clone_release_{n}"]["ops_per_s"] / med[f"clone_release_{n}"]["ops_per_s"]
        print(f"actor overhead at {n} threads: lock-based reference is {ratio:.1f}x faster")
    print(
        "clone+release pairs/s vs raw ask/s: "
        f"{med['clone_release_1']['ops_per_s'] / med['raw_ask']['ops_per_s']:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
