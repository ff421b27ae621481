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
  median of repeated calls.

Run it on the disk, not tmpfs (``--dir`` defaults to the current directory)::

    python scripts/bench_prune.py --sizes 5000,10000,20000 --du-records 10000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pykka
from refcache.actors import ImmutableRef, PrunePolicy, UsageInfo, open_cache
from refcache.actors._entry import new_id
from refcache.actors._prune import CacheListener
from refcache.storage import (
    KEY_COMMITTED,
    KEY_CREATED_AT,
    KEY_DESCRIPTION,
    KEY_PARENT,
    KEY_SNAPSHOT,
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="5000,10000,20000", help="records per prune run")
    parser.add_argument("--held", type=int, default=64, help="referenced records probed")
    parser.add_argument("--depth", type=int, default=1, help="chain depth (1: flat)")
    parser.add_argument("--gc-mode", action="store_true", help="also a max_used_space prune")
    parser.add_argument("--du-records", type=int, default=10_000)
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
