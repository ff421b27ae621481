"""Benchmark of prune and disk usage at scale, on both record shapes (BuildKit #4401).

The workloads are those of BuildKit's cache benchmark (``TestBenchPrune`` and
``TestBenchDU``), with the same parameters and output fields where they exist, on both
record shapes (``--shapes``, see ``scripts/_bench.py``): ``pairs``, N released lazy-commit
pairs as ``new(retain=True)`` + ``commit()`` + ``release()`` leave them (2N table entries:
a mutable with its active snapshot and its never-finalized equal immutable), and
``finalized`` (the same finalized: N records, each with a committed snapshot).

For each shape and size, a dataset is built once (in bulk through the storage layer; the
same records the API makes, ``--build api`` to use the API) and each run works on a fresh
``cp -a`` copy of it, flushed to its disk (``syncfs``):

* (e) ``e_prune``: opens the copy, makes ``--held`` held records through the API, starts
  ``--prune-g`` threads looping ``clone()`` + ``release()`` on them (no pause, as BuildKit's
  goroutines), measures a ``--baseline-s`` window, waits 200 ms, then times
  ``prune(PrunePolicy(all=True))``. Fields as BuildKit's: ``prune_s``, the baseline and
  during-prune pairs/s and p50/p99/max of a clone+release, ``max_completion_gap_ms`` (the
  longest time no clone+release completed while prune ran); and ours: the deletion phase
  (until the last ``record_pruned`` event) and the rest (GC of the snapshot directories),
  and, from one thread each pausing 2 ms between calls, the longest single ``get`` (+
  release), ``new``, ``commit`` (+ release, default policy) and metadata write
  (``ref.metadata.description = ...``) during the prune, with when it started
  (``*_max_at_s``, from the start of the prune); ``max_wait_ms`` is the longest of every
  single call above. ``e_prune_growth`` is the prune time of each size over the
  previous one (20,000 / 10,000 by default: linear is ~2x).
* ``--gc-mode``: also ``prune(PrunePolicy(all=True, max_used_space=1))`` (BuildKit's gc
  mode: LRU/usage order) the same way (``e_prune_gc_mode``).
* (f) ``f_du``: ``disk_usage()`` of ``--du-records`` records: the first call (sizes unknown:
  measured) and the median of ``--du-repeat`` calls after it.
* ``--gc-half N``: gc mode deleting half of N records with usage statistics that make the
  ranks matter (a last use within 30 days, one in ten never used; long-tailed usage counts):
  a first ``disk_usage`` (timed), then ``prune(PrunePolicy(all=True, max_used_space=total //
  2))`` timed, and a dry run of it (the same planner on the stored records).

Run it on the disk (``--dir`` defaults to the current directory)::

    python scripts/bench_prune.py --sizes 10000,20000 --du-records 10000 --repeat 3
    python scripts/bench_prune.py --sizes "" --du-records 0 --gc-half 10000
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pykka
from refcache.actors import CacheListener, ImmutableRef, PrunePolicy, UsageInfo, open_cache
from refcache.actors._offline import offline_prune_plan
from refcache.storage import KEY_LAST_USED_AT, KEY_USAGE_COUNT, MetadataStore, MetaEnv
from refcache.storage._snapshotter import sync_filesystem

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import (
    Report,
    add_common_arguments,
    add_dataset_arguments,
    add_shape_argument,
    build_dataset,
    copy_dataset,
    dataset,
    filesystem_of,
    latency_fields,
    make_held,
    parse_ints,
    parse_shapes,
    remove_tree,
    work_dir,
)

BATCH = 1000  #: records per write transaction of the usage statistics
_PRUNE = [
    "prune_s",
    "delete_phase_s",
    "gc_phase_s",
    "during_pairs_per_s",
    "during_p99_us",
    "max_completion_gap_ms",
    "during_max_ms",
    "get_max_ms",
    "new_max_ms",
    "commit_max_ms",
    "metadata_write_max_ms",
    "max_wait_ms",
]
#: What the table shows (``--json`` has every field).
COLUMNS = {
    "e_prune": _PRUNE,
    "e_prune_gc_mode": _PRUNE,
    "f_du": ["entries", "first_s", "repeated_s", "repeated_max_s"],
    "gc_half": [
        "deleted",
        "du_first_s",
        "prune_s",
        "delete_phase_s",
        "gc_phase_s",
        "dry_run_s",
        "same_order_as_plan",
    ],
}


class _Events(CacheListener, pykka.ThreadingActor):
    """Counts ``record_pruned`` events and remembers when the last came."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.last = 0.0

    def record_pruned(self, info: UsageInfo) -> None:
        self.count += 1
        self.last = time.perf_counter()

    def on_receive(self, message: Any) -> Any:
        if message == "report":
            return self.count, self.last
        return super().on_receive(message)


Sample = tuple[float, float]  #: (start, end) of one call, perf_counter seconds


class Probe:
    """Client threads calling the cache while a prune runs (BuildKit's ``TestBenchPrune``).

    ``goroutines`` threads loop clone+release on the held records without pausing; with
    ``extra``, one thread each loops get+release, new+commit+release and a metadata write,
    pausing 2 ms between calls (a client doing other work), every call timed on its own.
    """

    def __init__(self, cache: Any, refs: list[ImmutableRef], goroutines: int, extra: bool) -> None:
        self.cache = cache
        self.refs = refs
        self.stop = threading.Event()
        self.recording = threading.Event()
        self.samples: dict[str, list[list[Sample]]] = {"clone_release": []}
        self.errors: list[BaseException] = []
        self.threads = []
        for w in range(goroutines):
            own: list[Sample] = []
            self.samples["clone_release"].append(own)
            self.threads.append(threading.Thread(target=self._clones, args=(w, own), daemon=True))
        if extra:
            for target in (self._gets, self._news, self._writes):
                self.threads.append(threading.Thread(target=target, daemon=True))
            for op in ("get", "new", "commit", "metadata_write"):
                self.samples[op] = [[]]

    def _timed(self, op: str, fn: Any) -> Any:
        t0 = time.perf_counter()
        value = fn()
        t1 = time.perf_counter()
        if self.recording.is_set():
            self.samples[op][0].append((t0, t1))
        return value

    def _guard(self, loop: Any) -> None:
        try:
            loop()
        except BaseException as exc:  # reported by the caller
            self.errors.append(exc)
            self.stop.set()

    def _clones(self, w: int, own: list[Sample]) -> None:
        rng = random.Random(w + 1)
        refs = self.refs
        clock = time.perf_counter

        def loop() -> None:
            while not self.stop.is_set():
                ref = refs[rng.randrange(len(refs))]
                t0 = clock()
                ref.clone().release()
                t1 = clock()
                if self.recording.is_set():
                    own.append((t0, t1))

        self._guard(loop)

    def _gets(self) -> None:
        def loop() -> None:
            i = 0
            while not self.stop.wait(0.002):
                rid = self.refs[i % len(self.refs)].id
                ref = self._timed(
                    "get", lambda rid=rid: self.cache.manager.get(rid).get(timeout=600)
                )
                ref.release()
                i += 1

        self._guard(loop)

    def _news(self) -> None:
        def loop() -> None:
            while not self.stop.wait(0.002):
                m = self._timed(
                    "new", lambda: self.cache.manager.new(description="probe").get(timeout=600)
                )
                ref = self._timed("commit", m.commit)
                ref.release()  # default policy: the pair goes with its last release

        self._guard(loop)

    def _writes(self) -> None:
        def loop() -> None:
            i = 0
            while not self.stop.wait(0.002):
                ref = self.refs[i % len(self.refs)]

                def write(ref: ImmutableRef = ref, i: int = i) -> None:
                    ref.metadata.description = f"[bench] held {i}"

                self._timed("metadata_write", write)
                i += 1

        self._guard(loop)

    def __enter__(self) -> Probe:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=600)


def prune_fields(probe: Probe, base: tuple[float, float], ps: float, pe: float) -> dict[str, Any]:
    """BuildKit's ``e_prune`` fields from the probe's samples, plus the single-call maxima."""
    clones = [s for own in probe.samples["clone_release"] for s in own]
    base_lat = sorted(b - a for a, b in clones if a >= base[0] and b <= base[1])
    during = sorted(b - a for a, b in clones if b >= ps and a <= pe)
    ends = sorted(b for _, b in clones if ps <= b <= pe)
    gap, prev = 0.0, ps
    for e in ends:
        gap = max(gap, e - prev)
        prev = e
    gap = max(gap, pe - prev)
    prune_s = pe - ps
    out: dict[str, Any] = {
        "prune_s": prune_s,
        "baseline_pairs_per_s": len(base_lat) / max(base[1] - base[0], 1e-9),
        **latency_fields(base_lat, "baseline_"),
        "during_pairs_per_s": len(ends) / max(prune_s, 1e-9),
        **latency_fields(during, "during_"),
        "during_max_ms": (during[-1] if during else 0.0) * 1e3,
        "during_over_10ms": sum(x > 0.010 for x in during),
        "during_over_100ms": sum(x > 0.100 for x in during),
        "max_completion_gap_ms": gap * 1e3,
    }
    # When the longest call of each kind started, from the start of the prune (compare with
    # delete_phase_s: a stall in the deletion or in the garbage collection after it).
    worst = max(((b - a, a) for a, b in clones if b >= ps and a <= pe), default=(0.0, ps))
    out["during_max_at_s"] = worst[1] - ps
    waits = [out["during_max_ms"]]
    for op, lists in probe.samples.items():
        if op == "clone_release":
            continue
        calls = [(b - a, a) for a, b in lists[0] if b >= ps and a <= pe]
        longest = max(calls, default=(0.0, ps))
        out[f"{op}_max_ms"] = longest[0] * 1e3
        out[f"{op}_max_at_s"] = longest[1] - ps
        out[f"{op}_n"] = len(calls)
        waits.append(out[f"{op}_max_ms"])
    out["max_wait_ms"] = max(waits)
    return out


def bench_prune(
    src: Path, run_root: Path, shape: str, args: argparse.Namespace, policy: PrunePolicy
) -> dict[str, Any]:
    """One (e) run on a fresh copy of the dataset ``src``."""
    copy_dataset(src, run_root)
    t0 = time.perf_counter()
    with open_cache(run_root, snapshotter="native", timeout=3600) as cache:
        open_s = time.perf_counter() - t0
        held = make_held(cache, args.held, shape)
        before = cache.manager.statistics().get(timeout=600).records
        events = _Events.start()
        try:
            cache.manager.subscribe(events).get(timeout=60)
            with Probe(cache, held, args.prune_g, args.extra_probes) as probe:
                probe.stop.wait(0.1)  # warm-up, not recorded
                probe.recording.set()
                b0 = time.perf_counter()
                probe.stop.wait(args.baseline_s)
                b1 = time.perf_counter()
                probe.stop.wait(0.2)  # BuildKit's BKBENCH_PRUNE_DELAY_MS
                ps = time.perf_counter()
                deleted = cache.manager.prune(policy).get(timeout=3600)
                pe = time.perf_counter()
                probe.stop.wait(0.1)
            if probe.errors:
                raise probe.errors[0]
            count, last = events.ask("report", timeout=60)
        finally:
            events.stop()
        res = prune_fields(probe, (b0, b1), ps, pe)
        after = cache.manager.statistics().get(timeout=600).records
        for r in held:
            r.release()
    delete_s = (last - ps) if count else 0.0
    remove_tree(run_root)
    return {
        "open_s": open_s,
        "cm_records_before": before,
        "cm_records_after": after,
        "pruned_reported": len(deleted),
        "events": count,
        **res,
        "delete_phase_s": delete_s,
        "gc_phase_s": res["prune_s"] - delete_s,
    }


def bench_du(src: Path, run_root: Path, repeat: int) -> dict[str, Any]:
    """One (f) run on a fresh copy of the dataset ``src``: the first call and repeated calls."""
    copy_dataset(src, run_root)
    with open_cache(run_root, snapshotter="native", timeout=3600) as cache:
        calls = []
        entries = 0
        for _ in range(repeat + 1):
            t0 = time.perf_counter()
            rows = cache.manager.disk_usage().get(timeout=3600)
            calls.append(time.perf_counter() - t0)
            entries = len(rows)
    remove_tree(run_root)
    again = calls[1:] or calls
    return {
        "entries": entries,
        "first_s": calls[0],
        "repeated_s": statistics.median(again),
        "repeated_max_s": max(again),
        "calls_s": calls,
    }


def usage_stats(rng: random.Random, n: int, now: int) -> list[tuple[int | None, int]]:
    """``n`` (last_used_at, usage_count): a use within 30 days, one in ten never used;
    counts long-tailed (most records used a few times, some hundreds)."""
    out: list[tuple[int | None, int]] = []
    for _ in range(n):
        if rng.random() < 0.1:
            out.append((None, 0))
            continue
        age = rng.randrange(1, 30 * 86400 * 10**9)
        out.append((now - age, min(int(rng.paretovariate(1.2)), 500)))
    return out


def write_stats(root: Path, stats: dict[str, tuple[int | None, int]]) -> None:
    env = MetaEnv(root / "meta")
    try:
        store = MetadataStore(env)
        items = list(stats.items())
        for lo in range(0, len(items), BATCH):
            with env.write_txn() as txn:
                for rid, (last_used_at, count) in items[lo : lo + BATCH]:
                    item = store.get(rid)
                    item.queue_many(
                        {KEY_LAST_USED_AT: last_used_at, KEY_USAGE_COUNT: count or None}
                    )
                    item.commit(txn=txn)
    finally:
        env.close()


def bench_gc_half(root: Path, n: int, shape: str, seed: int, how: str) -> dict[str, Any]:
    """BuildKit's gc mode deleting half of ``n`` records of ``shape``."""
    rng = random.Random(seed)
    built = build_dataset(root, n, shape, how)
    stats = usage_stats(rng, n, time.time_ns())
    # A released pair: both halves count the same use (the mutable inherits it).
    write_stats(
        root,
        {rid: st for ids, st in zip(built, stats, strict=True) for rid in ids if rid},
    )
    sync_filesystem(root)
    res: dict[str, Any] = {}
    with open_cache(root, snapshotter="native", timeout=3600) as cache:
        t0 = time.perf_counter()
        rows = cache.manager.disk_usage().get(timeout=3600)
        res["du_first_s"] = time.perf_counter() - t0
        if len(rows) != n or not all(r.mutable == (shape == "pairs") for r in rows):
            raise RuntimeError(f"disk_usage shows {len(rows)} rows for {n} {shape} records")
        total = sum(r.size for r in rows)
        policy = PrunePolicy(all=True, max_used_space=total // 2)
        # The sizes the first call measured are written behind: on disk before the dry run
        # reads them (a dry run would otherwise measure them again).
        cache._core.writer.flush()
        t0 = time.perf_counter()
        plan = offline_prune_plan(root, [policy])
        res["dry_run_s"] = time.perf_counter() - t0
        events = _Events.start()
        try:
            cache.manager.subscribe(events).get(timeout=60)
            start = time.perf_counter()
            deleted = cache.manager.prune(policy).get(timeout=3600)
            res["prune_s"] = time.perf_counter() - start
            count, last = events.ask("report", timeout=60)
        finally:
            events.stop()
        res["deleted"] = len(deleted)
        res["delete_phase_s"] = (last - start) if count else 0.0
        res["gc_phase_s"] = res["prune_s"] - res["delete_phase_s"]
        res["same_order_as_plan"] = [r.id for r in deleted] == [r.id for r in plan]
        stats_after = cache.manager.statistics().get(timeout=60)
        left = cache.manager.disk_usage().get(timeout=3600)
        res["left_bytes"] = sum(r.size for r in left)
        res["limit_bytes"] = policy.max_used_space
        res["gauge_matches_du"] = sum(stats_after.bytes_by_kind.values()) == res["left_bytes"]
    remove_tree(root)
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_argument(parser)
    parser.add_argument("--sizes", default="10000,20000", help="records per prune run (e)")
    parser.add_argument("--held", type=int, default=100, help="held records probed (e)")
    parser.add_argument("--prune-g", type=int, default=4, help="clone+release threads (e)")
    parser.add_argument("--baseline-s", type=float, default=1.0, help="probe window before (e)")
    parser.add_argument(
        "--no-extra-probes",
        dest="extra_probes",
        action="store_false",
        help="(e) without the get, new+commit and metadata-write probe threads",
    )
    parser.add_argument("--gc-mode", action="store_true", help="also a max_used_space prune")
    parser.add_argument("--du-records", type=int, default=10_000, help="records of (f)")
    parser.add_argument("--du-repeat", type=int, default=5, help="calls after the first (f)")
    parser.add_argument(
        "--gc-half", type=int, default=0, help="gc mode deleting half of N records (0: skip)"
    )
    parser.add_argument("--seed", type=int, default=1, help="usage statistics of --gc-half")
    add_dataset_arguments(parser)
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    shapes = parse_shapes(args.shapes)
    sizes = parse_ints(args.sizes)

    report = Report("bench_prune", args, args.dir, columns=COLUMNS)
    if filesystem_of(args.dir) == "tmpfs":
        report.note("on tmpfs: the targets are stated for a disk")
    work = work_dir(args.dir, "bench-prune-")
    try:
        datasets: dict[tuple[str, int], Path] = {}
        store = args.datasets or work / "datasets"
        for shape in shapes:
            for n in sorted({*sizes, *([args.du_records] if args.du_records else [])}):
                t0 = time.perf_counter()
                datasets[shape, n] = dataset(store, n, shape, args.build)
                report.note(
                    f"dataset: {n:,} {shape} records ({args.build}), ready in "
                    f"{time.perf_counter() - t0:.1f} s"
                )
        policies = [("e_prune", PrunePolicy(all=True))]
        if args.gc_mode:
            policies.append(("e_prune_gc_mode", PrunePolicy(all=True, max_used_space=1)))
        for rep in range(args.repeat):
            for shape in shapes:
                for bench, policy in policies:
                    times: dict[int, float] = {}
                    for n in sizes:
                        res = bench_prune(datasets[shape, n], work / "run", shape, args, policy)
                        params = {"records": n, "held": args.held, "goroutines": args.prune_g}
                        report.add(bench, shape, params, res, repeat=rep)
                        times[n] = res["prune_s"]
                    for a, b in itertools.pairwise(sizes):
                        report.add(
                            f"{bench}_growth",
                            shape,
                            {"sizes": f"{b}/{a}"},
                            {"ratio": times[b] / times[a]},
                            repeat=rep,
                        )
                if args.du_records:
                    res = bench_du(datasets[shape, args.du_records], work / "run", args.du_repeat)
                    report.add("f_du", shape, {"records": args.du_records}, res, repeat=rep)
                if args.gc_half:
                    res = bench_gc_half(
                        work / "gc-half", args.gc_half, shape, args.seed + rep, args.build
                    )
                    report.add("gc_half", shape, {"records": args.gc_half}, res, repeat=rep)
    finally:
        remove_tree(work)
    for shape in shapes:
        rows = [r for r in report.medians() if r["shape"] == shape and r["bench"] == "e_prune"]
        if rows:
            worst = max(r["max_wait_ms"] for r in rows)
            report.note(
                f"{shape}: longest single ref operation during a prune (median of runs): "
                f"{worst:.1f} ms (target < 100 ms)"
            )
    report.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
