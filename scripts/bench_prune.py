"""Benchmark of prune and disk usage at scale, on the disk (BuildKit #4401: prune pauses).

For each size N (default 5,000, 10,000 and 20,000) it builds a cache of N unreferenced
committed records plus ``--held`` records that stay referenced, writing them in bulk through
the storage layer *before* the cache is opened: a lease ``<id>`` holding snapshot ``<id>``,
a real committed snapshot directory (prepared, written, committed by the native snapshotter),
and the record metadata — exactly what ``new`` + ``commit`` + ``finalize`` leave behind, so
prune and the garbage collector really delete them. Then, with the cache open:

* ``prune``: wall time of ``manager.prune()`` (everything unreferenced goes), split into the
  deletion phase (until the last ``record_pruned`` event) and the rest (GC of the snapshot
  directories); the growth from 10,000 to 20,000 records must stay linear (< 2x);
* ref-op latency *during* that prune, from client threads looping on the held records:
  ``clone`` + ``release`` (record actors), ``manager.get`` + ``release`` (a manager round
  trip each), and ``metadata.description = ...`` (a metadata write: it needs the LMDB write
  lock); the maximum is the stall a build would see;
* ``disk_usage`` over 10,000 records: the first call (sizes unknown: measured) and the
  median of repeated calls;
* ``--gc-half N``: BuildKit's gc mode deleting half of N records, twice: records as
  ``new`` + ``commit`` + ``finalize`` leave them, and lazy-commit pairs as
  ``new(retain=True)`` + ``commit()`` + ``release()`` leave them (a mutable with its active
  snapshot and its never-finalized equal immutable). Each record gets a last use within
  the past 30 days (one in ten never used) and a usage count from a long-tailed
  distribution, so the ranks matter. A first ``disk_usage`` measures the sizes (timed
  separately); then ``prune(PrunePolicy(all=True, max_used_space=total // 2))`` is timed,
  and so is a dry run of it (the same planner on the stored records, nothing deleted).

Run it on the disk, not tmpfs (``--dir`` defaults to the current directory)::

    python scripts/bench_prune.py --sizes 5000,10000,20000 --du-records 10000
    python scripts/bench_prune.py --sizes "" --du-records 0 --gc-half 10000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pykka
from refcache.actors import CacheListener, ImmutableRef, PrunePolicy, UsageInfo, open_cache
from refcache.actors._entry import new_id
from refcache.actors._offline import offline_prune_plan
from refcache.storage import (
    KEY_CACHE_POLICY,
    KEY_COMMITTED,
    KEY_CREATED_AT,
    KEY_DESCRIPTION,
    KEY_EQUAL_MUTABLE,
    KEY_LAST_USED_AT,
    KEY_PARENT,
    KEY_SIZE,
    KEY_SNAPSHOT,
    KEY_USAGE_COUNT,
    MetadataStore,
    MetaEnv,
)
from refcache.storage._leases import LmdbLeaseManager, Resource
from refcache.storage._native import NativeSnapshotter

BATCH = 500  #: records per write transaction while building the cache


def filesystem_of(path: Path) -> str:
    """The filesystem type holding ``path`` (from /proc/mounts; longest mount prefix)."""
    best, fstype = "", "unknown"
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                _, mnt, typ, *_ = line.split()
                if str(path).startswith(mnt) and len(mnt) > len(best):
                    best, fstype = mnt, typ
    except OSError:
        pass
    return fstype


def build_cache(
    root: Path, n: int, *, depth: int = 1, extra: int = 0, payload: int = 100
) -> list[str]:
    """Writes ``n`` committed records (chains of ``depth``) and ``extra`` base records in
    bulk; returns their ids (the extra ones last)."""
    with open_cache(root, snapshotter="native"):
        pass  # the layout, and the snapshotter name recorded in the metadata
    env = MetaEnv(root / "meta")
    sn = NativeSnapshotter(root, env)
    leases = LmdbLeaseManager(env)
    store = MetadataStore(env)
    ids = [new_id() for _ in range(n + extra)]
    parent_of = {
        rid: (ids[i - 1] if depth > 1 and i % depth and i < n else "") for i, rid in enumerate(ids)
    }
    now = time.time_ns()
    data = b"x" * payload
    try:
        for lo in range(0, n + extra, BATCH):
            chunk = ids[lo : lo + BATCH]
            # A chain's parent must be committed before its child is prepared on it.
            levels: list[list[str]] = []
            for rid in chunk:
                p = parent_of[rid]
                lvl = 0
                if p in chunk:
                    lvl = next(i for i, level in enumerate(levels) if p in level) + 1
                while len(levels) <= lvl:
                    levels.append([])
                levels[lvl].append(rid)
            for level in levels:
                with env.write_txn() as txn:
                    for rid in level:
                        leases.create(rid, flat=True, txn=txn)
                        leases.add_resource(rid, Resource(rid, f"snapshots/{sn.name}"), txn=txn)
                        sn.prepare("bulk-" + rid, parent_of[rid], txn=txn)
                for rid in level:
                    (sn.path("bulk-" + rid) / f"file-{rid}").write_bytes(data)
                with env.write_txn() as txn:
                    for rid in level:
                        sn.commit(rid, "bulk-" + rid, txn=txn)
                        item = store.get(rid)
                        values: dict[str, Any] = {
                            KEY_COMMITTED: True,
                            KEY_CREATED_AT: now,
                            KEY_SNAPSHOT: rid,
                            KEY_DESCRIPTION: f"[bench] RUN step {rid}",
                        }
                        if parent_of[rid]:
                            values[KEY_PARENT] = parent_of[rid]
                        item.queue_many(values)
                        item.commit(txn=txn)
    finally:
        sn.close()
        env.close()
    return ids


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


def build_pairs(root: Path, n: int, *, payload: int = 100) -> list[tuple[str, str]]:
    """Writes ``n`` lazy-commit pairs in bulk, as ``new(retain=True)`` + ``commit()`` leave
    them: the mutable (lease ``<m>`` holding its active snapshot ``<m>``, with a file) and
    its equal immutable (no lease and no snapshot of its own until finalize)."""
    with open_cache(root, snapshotter="native"):
        pass
    env = MetaEnv(root / "meta")
    sn = NativeSnapshotter(root, env)
    leases = LmdbLeaseManager(env)
    store = MetadataStore(env)
    pairs = [(new_id(), new_id()) for _ in range(n)]
    now = time.time_ns()
    data = b"x" * payload
    try:
        for lo in range(0, n, BATCH):
            chunk = pairs[lo : lo + BATCH]
            with env.write_txn() as txn:
                for m, i in chunk:
                    leases.create(m, flat=True, txn=txn)
                    leases.add_resource(m, Resource(m, f"snapshots/{sn.name}"), txn=txn)
                    sn.prepare(m, txn=txn)
                    m_item = store.get(m)
                    m_item.queue_many(
                        {
                            KEY_CREATED_AT: now,
                            KEY_SNAPSHOT: m,
                            KEY_CACHE_POLICY: 1,
                            KEY_DESCRIPTION: f"[bench] scratch {m}",
                        }
                    )
                    m_item.commit(txn=txn)
                    i_item = store.get(i)
                    i_item.queue_many(
                        {
                            KEY_COMMITTED: True,
                            KEY_CREATED_AT: now,
                            KEY_SNAPSHOT: i,
                            KEY_SIZE: -1,
                            KEY_EQUAL_MUTABLE: m,
                            KEY_DESCRIPTION: f"[bench] scratch {m}",
                        }
                    )
                    i_item.commit(txn=txn)
            for m, _ in chunk:
                (sn.path(m) / f"file-{m}").write_bytes(data)
    finally:
        sn.close()
        env.close()
    return pairs


def bench_gc_half(work: Path, n: int, kind: str, seed: int) -> dict[str, Any]:
    """BuildKit's gc mode deleting half of ``n`` records (``kind``: finalized or pairs)."""
    root = work / f"gc-half-{kind}-{n}"
    rng = random.Random(seed)
    if kind == "pairs":
        pairs = build_pairs(root, n)
        stats = usage_stats(rng, n, time.time_ns())
        # A released pair: both halves count the same use (the mutable inherits it).
        write_stats(
            root, {rid: st for (m, i), st in zip(pairs, stats, strict=True) for rid in (m, i)}
        )
    else:
        ids = build_cache(root, n)
        write_stats(root, dict(zip(ids, usage_stats(rng, n, time.time_ns()), strict=True)))
    os.sync()
    res: dict[str, Any] = {"records": n, "kind": kind}
    with open_cache(root, snapshotter="native") as cache:
        t0 = time.perf_counter()
        rows = cache.manager.disk_usage().get(timeout=600)
        res["du_first_s"] = time.perf_counter() - t0
        assert len(rows) == n, len(rows)
        assert all(r.mutable == (kind == "pairs") for r in rows)
        total = sum(r.size for r in rows)
        policy = PrunePolicy(all=True, max_used_space=total // 2)
        # The sizes the first call measured are written behind: on disk before the dry run
        # reads them (a dry run would otherwise measure them again).
        cache._core.writer.flush()
        t0 = time.perf_counter()
        plan = offline_prune_plan(root, [policy])
        res["dry_run_s"] = time.perf_counter() - t0
        events = _Events.start()
        cache.manager.subscribe(events).get(timeout=60)
        start = time.perf_counter()
        deleted = cache.manager.prune(policy).get(timeout=3600)
        res["prune_s"] = time.perf_counter() - start
        count, _first, last = events.ask("report", timeout=60)
        events.stop()
        res["deleted"] = len(deleted)
        res["delete_phase_s"] = (last - start) if count else 0.0
        res["gc_phase_s"] = res["prune_s"] - res["delete_phase_s"]
        res["same_order_as_plan"] = [r.id for r in deleted] == [r.id for r in plan]
        stats_after = cache.manager.statistics().get(timeout=60)
        left = cache.manager.disk_usage().get(timeout=600)
        res["left_bytes"] = sum(r.size for r in left)
        res["limit_bytes"] = policy.max_used_space
        res["gauge_matches_du"] = sum(stats_after.bytes_by_kind.values()) == res["left_bytes"]
    shutil.rmtree(root, ignore_errors=True)
    return res


class _Events(CacheListener, pykka.ThreadingActor):
    """Counts ``record_pruned`` events and remembers when the first and last came."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.first = 0.0
        self.last = 0.0

    def record_pruned(self, info: UsageInfo) -> None:
        now = time.perf_counter()
        if not self.count:
            self.first = now
        self.count += 1
        self.last = now

    def on_receive(self, message: Any) -> Any:
        if message == "report":
            return self.count, self.first, self.last
        return super().on_receive(message)


class Probe:
    """Client threads looping on held records while something else runs; latencies in s."""

    def __init__(self, cache: Any, refs: list[ImmutableRef]) -> None:
        self.cache = cache
        self.refs = refs
        self.stop = threading.Event()
        self.lat: dict[str, list[float]] = {"clone_release": [], "get_release": [], "md_write": []}
        self.errors: list[BaseException] = []
        self.threads = [
            threading.Thread(target=self._loop, args=(name,), daemon=True) for name in self.lat
        ]

    def _op(self, name: str, i: int) -> None:
        ref = self.refs[i % len(self.refs)]
        if name == "clone_release":
            ref.clone().release()
        elif name == "get_release":
            self.cache.manager.get(ref.id).get(timeout=120).release()
        else:
            ref.metadata.description = f"[bench] held {i}"

    def _loop(self, name: str) -> None:
        i = 0
        try:
            while not self.stop.is_set():
                t0 = time.perf_counter()
                self._op(name, i)
                self.lat[name].append(time.perf_counter() - t0)
                i += 1
                time.sleep(0.002)  # a client doing other work between calls
        except BaseException as exc:  # reported by the caller
            self.errors.append(exc)

    def __enter__(self) -> Probe:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, values in self.lat.items():
            if values:
                out[f"{name}_max_ms"] = max(values) * 1e3
                out[f"{name}_p99_ms"] = sorted(values)[int(len(values) * 0.99)] * 1e3
                out[f"{name}_n"] = len(values)
        return out


def bench_prune(
    work: Path, n: int, held: int, depth: int, policy: PrunePolicy | None
) -> dict[str, float]:
    root = work / f"prune-{n}-{depth}"
    t0 = time.perf_counter()
    ids = build_cache(root, n, depth=depth, extra=held)
    os.sync()  # measure prune on a cache at rest, not against the build's writeback
    built = time.perf_counter() - t0
    held_ids = ids[n:]
    res: dict[str, float] = {"records": n, "build_s": built}
    with open_cache(root, snapshotter="native") as cache:
        refs = [cache.manager.get(rid).get(timeout=60) for rid in held_ids]
        events = _Events.start()
        cache.manager.subscribe(events).get(timeout=60)
        with Probe(cache, refs) as probe:
            time.sleep(0.3)  # the probes' warm-up, outside the measured window
            for lat in probe.lat.values():
                lat.clear()
            start = time.perf_counter()
            args = (policy,) if policy is not None else ()
            deleted = cache.manager.prune(*args).get(timeout=3600)
            res["prune_s"] = time.perf_counter() - start
        count, _first, last = events.ask("report", timeout=60)
        events.stop()
        res["deleted"] = len(deleted)
        res["events"] = count
        res["delete_phase_s"] = (last - start) if count else 0.0
        res["gc_phase_s"] = res["prune_s"] - res["delete_phase_s"]
        res.update(probe.summary())
        if probe.errors:
            raise probe.errors[0]
        for r in refs:
            r.release()
    shutil.rmtree(root, ignore_errors=True)
    return res


def bench_du(work: Path, n: int, repeat: int) -> dict[str, float]:
    root = work / f"du-{n}"
    build_cache(root, n)
    os.sync()
    with open_cache(root, snapshotter="native") as cache:
        t0 = time.perf_counter()
        rows = cache.manager.disk_usage().get(timeout=600)
        first = time.perf_counter() - t0
        assert len(rows) == n, len(rows)
        assert all(r.size > 0 for r in rows)
        again = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            cache.manager.disk_usage().get(timeout=600)
            again.append(time.perf_counter() - t0)
    shutil.rmtree(root, ignore_errors=True)
    return {"records": n, "first_s": first, "repeated_s": statistics.median(again)}


def _rounded(res: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="5000,10000,20000", help="records per prune run")
    parser.add_argument("--held", type=int, default=64, help="referenced records probed")
    parser.add_argument("--depth", type=int, default=1, help="chain depth (1: flat)")
    parser.add_argument("--gc-mode", action="store_true", help="also a max_used_space prune")
    parser.add_argument("--du-records", type=int, default=10_000)
    parser.add_argument(
        "--gc-half", type=int, default=0, help="gc mode deleting half of N records (0: skip)"
    )
    parser.add_argument("--seed", type=int, default=1, help="usage statistics of --gc-half")
    parser.add_argument("--du-repeat", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=Path.cwd())
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-prune-", dir=args.dir))
    fstype = filesystem_of(work.resolve())
    if fstype == "tmpfs" and not args.json:
        print("warning: running on tmpfs; the targets are stated for a disk", flush=True)
    results: dict[str, Any] = {
        "filesystem": fstype,
        "loadavg_start": os.getloadavg()[0],
        "prune": [],
        "du": None,
    }
    try:
        for n in (int(x) for x in args.sizes.split(",") if x):
            res = bench_prune(work, n, args.held, args.depth, None)
            results["prune"].append(res)
            if not args.json:
                print(json.dumps({k: round(v, 3) for k, v in res.items()}), flush=True)
            if args.gc_mode:
                policy = PrunePolicy(all=True, max_used_space=1)
                res = bench_prune(work, n, args.held, args.depth, policy)
                res["gc_mode"] = 1
                results["prune"].append(res)
                if not args.json:
                    print(json.dumps({k: round(v, 3) for k, v in res.items()}), flush=True)
        if args.gc_half:
            results["gc_half"] = []
            for kind in ("finalized", "pairs"):
                res = bench_gc_half(work, args.gc_half, kind, args.seed)
                results["gc_half"].append(res)
                if not args.json:
                    print(json.dumps(_rounded(res)), flush=True)
        if args.du_records:
            results["du"] = bench_du(work, args.du_records, args.du_repeat)
            if not args.json:
                print(json.dumps({k: round(v, 4) for k, v in results["du"].items()}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["loadavg_end"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(results))
        return 0
    print(
        f"filesystem {fstype}; 1-min load average {results['loadavg_start']:.2f} at the start, "
        f"{results['loadavg_end']:.2f} at the end"
    )
    plain = [r for r in results["prune"] if not r.get("gc_mode")]
    by_n = {int(r["records"]): r for r in plain}
    everything = results["prune"]
    if 10_000 in by_n and 20_000 in by_n:
        ratio = by_n[20_000]["prune_s"] / by_n[10_000]["prune_s"]
        print(f"20,000 / 10,000 prune time: {ratio:.2f}x (linear: ~2x or less)")
    stall = max(
        (r.get(f"{k}_max_ms", 0.0) for r in everything for k in ("clone_release", "get_release")),
        default=0.0,
    )
    print(f"max ref-op stall during prune (clone/get + release): {stall:.1f} ms")
    for res in results.get("gc_half", []):
        print(
            f"gc mode, half of {res['records']:,} {res['kind']} records: "
            f"{res['deleted']:,} deleted in {res['prune_s']:.2f} s (target < 5 s; "
            f"dry run {res['dry_run_s']:.2f} s)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
