"""Benchmark of the LMDB + msgpack record metadata store.

Measures, for N records of about 20 BuildKit-shaped fields each:

* batched write rate: records/s when writes are committed in batches (one fsync per batch),
  with an unbatched baseline (one commit, so one fsync, per record) in the same run;
* full load: reading every record and decoding every field (what opening a cache does);
* single-record read latency: ``store.get(id)`` + decode, p50/p99 over random ids.

Run on the disk, not tmpfs (``--dir`` defaults to a temp dir under the current directory)::

    python scripts/bench_metadata.py --records 100000 --repeat 5
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from storage._env import MetaEnv
from storage._metadata import (
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


def write(store: MetadataStore, rng: random.Random, start: int, n: int, batch: int) -> float:
    """Writes records ``start..start+n`` in commits of ``batch``; returns seconds spent.

    The field values are generated before the clock starts: only the store is timed.
    """
    work = [(f"rec{i:08d}", fields(rng, i)) for i in range(start, start + n)]
    t0 = time.perf_counter()
    for lo in range(0, n, batch):
        chunk = work[lo : lo + batch]
        items = store.get_many(rid for rid, _ in chunk)
        for item, (_, values) in zip(items, chunk, strict=True):
            item.queue_many(
                {key: value for key, value, _ in values},
                {key: index for key, _, index in values if index is not None},
            )
        store.commit_many(items)
    return time.perf_counter() - t0


def load(store: MetadataStore) -> tuple[float, int]:
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
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    runs: dict[str, list[float]] = {
        "batched_write_records_per_s": [],
        "unbatched_write_records_per_s": [],
        "full_load_s": [],
        "read_p50_us": [],
        "read_p99_us": [],
    }
    for rep in range(args.repeat):
        tmp = Path(tempfile.mkdtemp(prefix="bench-meta-", dir=args.dir))
        try:
            env = MetaEnv(tmp / "meta")
            store = MetadataStore(env)
            rng = random.Random(rep)
            secs = write(store, rng, 0, args.records, args.batch)
            runs["batched_write_records_per_s"].append(args.records / secs)
            secs = write(store, rng, args.records, args.unbatched, 1)
            runs["unbatched_write_records_per_s"].append(args.unbatched / secs)
            env.close()

            env = MetaEnv(tmp / "meta")  # a cold-ish reopen, as at cache open
            store = MetadataStore(env)
            secs, count = load(store)
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
    if args.json:
        print(json.dumps({"records": args.records, "batch": args.batch, "median": medians}))
        return 0
    print(f"records={args.records} fields/record=20 batch={args.batch} repeat={args.repeat}")
    print(f"{'metric':34} {'median':>12}")
    for key, value in medians.items():
        print(f"{key:34} {value:12.1f}" if value >= 10 else f"{key:34} {value:12.3f}")
    ratio = medians["batched_write_records_per_s"] / medians["unbatched_write_records_per_s"]
    print(f"batched / unbatched write rate: {ratio:.0f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
