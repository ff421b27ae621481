"""Benchmark of the LMDB + msgpack record metadata store.

Measures, for N records of about 20 BuildKit-shaped fields each:

* batched write rate: records/s when writes are committed in batches (one fsync per batch):
  through the bulk ``MetadataStore.write_many`` (the headline number) and through
  ``StorageItem`` (``get_many`` + ``queue_many`` + ``commit_many``), with an unbatched baseline
  (``StorageItem``, one commit, so one fsync, per record) in the same run;
* full load: reading every record and decoding every field (what opening a cache does);
* single-record read latency: ``store.get(id)`` + decode, p50/p99 over random ids;
* the time CPython's cyclic garbage collector took inside the batched write and the load.

Field values are generated before each clock starts: only the store is timed.

Run on the disk, not tmpfs (``--dir`` defaults to a temp dir under the current directory)::

    python scripts/bench_metadata.py --records 100000 --repeat 5
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from refcache.storage._env import MetaEnv
from refcache.storage._metadata import (
    INDEX_BLOB_CHAIN,
    INDEX_CHAIN,
    KEY_BLOB,
    KEY_BLOB_CHAIN_ID,
    KEY_BLOB_ONLY,
    KEY_BLOB_SIZE,
    KEY_CACHE_POLICY,
    KEY_CHAIN_ID,
    KEY_COMMITTED,
    KEY_CREATED_AT,
    KEY_DESCRIPTION,
    KEY_DIFF_ID,
    KEY_IMAGE_REFS,
    KEY_LAST_USED_AT,
    KEY_MEDIA_TYPE,
    KEY_PARENT,
    KEY_RECORD_TYPE,
    KEY_SIZE,
    KEY_SNAPSHOT,
    KEY_USAGE_COUNT,
    MetadataStore,
)


def digest(rng: random.Random) -> str:
    return "sha256:" + rng.randbytes(32).hex()


def fields(rng: random.Random, i: int) -> list[tuple[str, object, str | None]]:
    chain, blob_chain = digest(rng), digest(rng)
    now = time.time_ns()
    return [
        (KEY_SIZE, rng.randrange(1 << 30), None),
        (KEY_COMMITTED, True, None),
        (KEY_CACHE_POLICY, 0, None),
        (KEY_DESCRIPTION, f"[stage-{i % 7}] RUN make step {i}", None),
        (KEY_CREATED_AT, now, None),
        (KEY_LAST_USED_AT, now, None),
        (KEY_USAGE_COUNT, rng.randrange(100), None),
        (KEY_RECORD_TYPE, "regular", None),
        (KEY_PARENT, f"rec{max(i - 1, 0):08d}", None),
        (KEY_DIFF_ID, digest(rng), None),
        (KEY_CHAIN_ID, chain, INDEX_CHAIN + chain),
        (KEY_BLOB_CHAIN_ID, blob_chain, INDEX_BLOB_CHAIN + blob_chain),
        (KEY_BLOB, digest(rng), None),
        (KEY_SNAPSHOT, f"rec{i:08d}", None),
        (KEY_BLOB_ONLY, False, None),
        (KEY_MEDIA_TYPE, "application/vnd.oci.image.layer.v1.tar+gzip", None),
        (KEY_BLOB_SIZE, rng.randrange(1 << 28), None),
        (KEY_IMAGE_REFS, ["docker.io/library/alpine:latest"], None),
        ("cache.layer.urls", [], None),
        ("local.sharedKey", f"context-{i % 13}", None),
    ]


Work = list[tuple[str, list[tuple[str, object, str | None]]]]


def make_work(rng: random.Random, start: int, n: int) -> Work:
    """The records ``start..start+n`` with their fields (generated outside any clock)."""
    return [(f"rec{i:08d}", fields(rng, i)) for i in range(start, start + n)]


class GcClock:
    """Time CPython's cyclic collector spends while it is running (part of any timed section)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._t0 = 0.0
        gc.callbacks.append(self._event)

    def _event(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._t0

    def reset(self) -> None:
        self.seconds = 0.0


GC_CLOCK = GcClock()


def settle_gc() -> None:
    """Collects now, so that the garbage collector's debt for the setup (millions of freshly
    generated field values still in the young generations) is not paid inside the clock, and
    starts :data:`GC_CLOCK` afresh."""
    gc.collect()
    GC_CLOCK.reset()


def write_bulk(store: MetadataStore, work: Work, batch: int) -> float:
    """Writes ``work`` with ``MetadataStore.write_many``, ``batch`` records per commit.

    The per-batch ``{id: {key: value}}`` maps are built before the clock starts: only the
    store is timed. Returns seconds spent.
    """
    batches = []
    for lo in range(0, len(work), batch):
        chunk = work[lo : lo + batch]
        records = {rid: {key: value for key, value, _ in values} for rid, values in chunk}
        indexes = {
            rid: {key: index for key, _, index in values if index is not None}
            for rid, values in chunk
        }
        batches.append((records, indexes))
    settle_gc()
    t0 = time.perf_counter()
    for records, indexes in batches:
        store.write_many(records, indexes)
    return time.perf_counter() - t0


def write_items(store: MetadataStore, work: Work, batch: int) -> float:
    """Writes ``work`` through ``StorageItem`` (get_many, queue_many, commit_many).

    ``batch`` records per commit; ``batch=1`` is the unbatched baseline (one fsync per record).
    The per-record ``{key: value}`` maps are built before the clock starts. Returns seconds.
    """
    batches = []
    for lo in range(0, len(work), batch):
        chunk = work[lo : lo + batch]
        ids = [rid for rid, _ in chunk]
        maps = [
            (
                {key: value for key, value, _ in values},
                {key: index for key, _, index in values if index is not None},
            )
            for _, values in chunk
        ]
        batches.append((ids, maps))
    settle_gc()
    t0 = time.perf_counter()
    for ids, maps in batches:
        items = store.get_many(ids)
        for item, (values, indexes) in zip(items, maps, strict=True):
            item.queue_many(values, indexes)
        store.commit_many(items)
    return time.perf_counter() - t0


def load(store: MetadataStore) -> tuple[float, int]:
    """Loads and decodes every record; returns seconds spent and how many."""
    settle_gc()
    t0 = time.perf_counter()
    items = store.all()
    for item in items:
        item.decode()
    return time.perf_counter() - t0, len(items)


def read_latencies(store: MetadataStore, n_records: int, samples: int) -> list[float]:
    rng = random.Random(7)
    out = []
    for _ in range(samples):
        rid = f"rec{rng.randrange(n_records):08d}"
        t0 = time.perf_counter()
        store.get(rid).get_int(KEY_SIZE)
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000, help="records per commit")
    parser.add_argument("--unbatched", type=int, default=500, help="records for the baseline")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path.cwd())
    parser.add_argument(
        "--no-items", action="store_true", help="skip the batched StorageItem write path"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    runs: dict[str, list[float]] = {
        "batched_write_records_per_s": [],
        "batched_item_write_records_per_s": [],
        "unbatched_write_records_per_s": [],
        "full_load_s": [],
        "read_p50_us": [],
        "read_p99_us": [],
        "gc_in_batched_write_s": [],
        "gc_in_full_load_s": [],
    }
    if args.no_items:
        del runs["batched_item_write_records_per_s"]
    for rep in range(args.repeat):
        tmp = Path(tempfile.mkdtemp(prefix="bench-meta-", dir=args.dir))
        try:
            rng = random.Random(rep)
            work = make_work(rng, 0, args.records)
            baseline = make_work(rng, args.records, args.unbatched)

            if not args.no_items:
                # The same records through StorageItem, into an environment of their own.
                env = MetaEnv(tmp / "meta-items")
                secs = write_items(MetadataStore(env), work, args.batch)
                runs["batched_item_write_records_per_s"].append(args.records / secs)
                env.close()
                shutil.rmtree(tmp / "meta-items")

            env = MetaEnv(tmp / "meta")
            store = MetadataStore(env)
            secs = write_bulk(store, work, args.batch)
            runs["gc_in_batched_write_s"].append(GC_CLOCK.seconds)
            runs["batched_write_records_per_s"].append(args.records / secs)
            secs = write_items(store, baseline, 1)
            runs["unbatched_write_records_per_s"].append(args.unbatched / secs)
            env.close()
            del work, baseline

            env = MetaEnv(tmp / "meta")  # a cold-ish reopen, as at cache open
            store = MetadataStore(env)
            secs, count = load(store)
            runs["gc_in_full_load_s"].append(GC_CLOCK.seconds)
            if count != args.records + args.unbatched:
                msg = f"loaded {count} records, wrote {args.records + args.unbatched}"
                raise SystemExit(msg)
            runs["full_load_s"].append(secs)
            lat = sorted(read_latencies(store, args.records, 20_000))
            runs["read_p50_us"].append(lat[len(lat) // 2] * 1e6)
            runs["read_p99_us"].append(lat[int(len(lat) * 0.99)] * 1e6)
            env.close()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    medians = {k: statistics.median(v) for k, v in runs.items()}
    ratio = medians["batched_write_records_per_s"] / medians["unbatched_write_records_per_s"]
    if args.json:
        out = {
            "records": args.records,
            "batch": args.batch,
            "median": medians,
            "runs": runs,
            "batched_over_unbatched": ratio,
        }
        print(json.dumps(out))
        return 0
    print(f"records={args.records} fields/record=20 batch={args.batch} repeat={args.repeat}")
    print(f"{'metric':34} {'median':>12} {'min':>12} {'max':>12}")
    for key, value in medians.items():
        row = [value, min(runs[key]), max(runs[key])]
        print(f"{key:34} " + " ".join(f"{v:12.1f}" if value >= 10 else f"{v:12.3f}" for v in row))
    print(f"batched (write_many) / unbatched write rate: {ratio:.0f}x")
    if "batched_item_write_records_per_s" in medians:
        item_ratio = (
            medians["batched_item_write_records_per_s"] / medians["unbatched_write_records_per_s"]
        )
        print(f"batched (StorageItem) / unbatched write rate: {item_ratio:.0f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
