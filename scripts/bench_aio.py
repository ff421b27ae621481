"""Benchmark of ``refcache.aio`` against the blocking API, in one run on one cache.

Two workloads, each at every ``--callers`` count (1 and 16 by default), blocking and async
back to back on the same open cache (native snapshotter):

* ``clone_release``: ``clone()`` + ``release()`` of ``--records`` held records (made with
  ``new(retain=True)`` + ``commit()``), BuildKit's hot path;
* ``new_commit_release``: ``new()`` + ``commit()`` + ``release()`` (nothing is left).

Blocking callers are threads (``_bench.run_threads``); async callers are coroutines on one
event loop, with the async cache's executor of ``--workers`` threads. Per workload and
caller count the table shows pairs/s, latencies and the process's CPU time per pair
(``cpu_us_per_pair``, all threads: the cost of a pair whatever share of a loaded machine the
process got) of both, and ``ratio`` = async pairs/s over blocking pairs/s (the goal: at
least 0.8). Each measurement runs ``--repeat`` times
(medians reported), with ``/proc/loadavg``::

    python scripts/bench_aio.py --seconds 2 --repeat 3 --dir /dev/shm
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from _bench import (
    Report,
    add_common_arguments,
    latency_fields,
    parse_ints,
    remove_tree,
    run_threads,
    work_dir,
)
from refcache.actors import Cache, ImmutableRef, open_cache

from refcache.aio import AsyncCache, AsyncImmutableRef

COLUMNS = {
    "clone_release": ["pairs_per_s", "p50_us", "p99_us", "max_us", "cpu_us_per_pair"],
    "new_commit_release": ["pairs_per_s", "p50_us", "p99_us", "max_us", "cpu_us_per_pair"],
    "ratio": ["ratio"],
}


async def run_coroutines(
    n: int, fn: Callable[[int], Awaitable[None]], seconds: float, *, keys: int
) -> dict[str, float]:
    """``run_threads`` for coroutines: ``n`` of them call ``fn(i)`` for ``seconds``."""
    lats: list[list[float]] = [[] for _ in range(n)]
    deadline = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        rng = random.Random(w + 1)
        own = lats[w]
        clock = time.perf_counter
        while clock() < deadline:
            i = rng.randrange(keys)
            t0 = clock()
            await fn(i)
            own.append(clock() - t0)

    start = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(worker(w) for w in range(n))), seconds + 300)
    wall = time.perf_counter() - start
    every = [x for lat in lats for x in lat]
    return {
        "pairs": len(every),
        "wall_s": wall,
        "pairs_per_s": len(every) / wall,
        **latency_fields(every),
    }


def measure(
    cache: Cache, acache: AsyncCache, held: list[ImmutableRef], callers: int, seconds: float
) -> dict[tuple[str, str], dict[str, float]]:
    """Both workloads, blocking then async, at ``callers`` concurrent callers."""
    n = len(held)
    out: dict[tuple[str, str], dict[str, float]] = {}

    def cycle(_i: int) -> None:
        cache.manager.new(description="cycle").get(timeout=600).commit().release()

    out["clone_release", "blocking"] = with_cpu(
        lambda: run_threads(callers, lambda i: held[i].clone().release(), seconds, keys=n)
    )
    out["new_commit_release", "blocking"] = with_cpu(
        lambda: run_threads(callers, cycle, seconds, keys=1)
    )

    aheld = [AsyncImmutableRef(ref, acache) for ref in held]

    async def aclone(i: int) -> None:
        clone = await aheld[i].clone()
        await clone.release()

    async def acycle(_i: int) -> None:
        mutable = await acache.manager.new(description="cycle")
        layer = await mutable.commit()
        await layer.release()

    async def both() -> None:
        cpu = time.process_time()
        got = await run_coroutines(callers, aclone, seconds, keys=n)
        out["clone_release", "async"] = {**got, **cpu_fields(cpu, got)}
        cpu = time.process_time()
        got = await run_coroutines(callers, acycle, seconds, keys=1)
        out["new_commit_release", "async"] = {**got, **cpu_fields(cpu, got)}

    asyncio.run(both())
    return out


def cpu_fields(cpu_start: float, got: dict[str, float]) -> dict[str, float]:
    """CPU time of the whole process per pair (all its threads): what a pair costs,
    whatever share of the machine the process got while others ran."""
    return {"cpu_us_per_pair": (time.process_time() - cpu_start) / max(got["pairs"], 1) * 1e6}


def with_cpu(fn: Callable[[], dict[str, float]]) -> dict[str, float]:
    cpu = time.process_time()
    got = fn()
    return {**got, **cpu_fields(cpu, got)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200, help="held records of clone_release")
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--callers", default="1,16", help="concurrent callers, comma-separated")
    parser.add_argument("--workers", type=int, default=4, help="threads of the async executor")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    report = Report("bench_aio", args, args.dir, columns=COLUMNS)
    work = work_dir(args.dir, "bench-aio-")
    ratios: dict[tuple[str, int], list[float]] = {}
    try:
        for rep in range(args.repeat):
            with open_cache(work / f"rep{rep}", snapshotter="native", timeout=600) as cache:
                held = []
                for _ in range(args.records):
                    mutable = cache.manager.new(retain=True).get(timeout=600)
                    held.append(mutable.commit())
                executor = ThreadPoolExecutor(args.workers, thread_name_prefix="refcache-aio")
                acache = AsyncCache(cache, executor)
                try:
                    for callers in parse_ints(args.callers):
                        got = measure(cache, acache, held, callers, args.seconds)
                        for (bench, mode), values in got.items():
                            params: dict[str, Any] = {"callers": callers, "api": mode}
                            report.add(bench, None, params, values, repeat=rep)
                        for bench in ("clone_release", "new_commit_release"):
                            blocking = got[bench, "blocking"]["pairs_per_s"]
                            ratio = got[bench, "async"]["pairs_per_s"] / blocking
                            ratios.setdefault((bench, callers), []).append(ratio)
                            report.add(
                                "ratio",
                                None,
                                {"workload": bench, "callers": callers},
                                {"ratio": ratio},
                                repeat=rep,
                            )
                finally:
                    executor.shutdown(wait=True)
                    for ref in held:
                        ref.release()
            remove_tree(work / f"rep{rep}")
    finally:
        remove_tree(work)
    for (bench, callers), values in ratios.items():
        low = min(values)
        report.note(
            f"{bench} at {callers} caller(s): async/blocking {sorted(values)} "
            f"({'meets' if low >= 0.8 else 'below'} 0.8 in the worst run)"
        )
    report.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
