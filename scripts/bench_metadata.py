"""Benchmark of the LMDB + msgpack record metadata store, per record shape.

Measures, for N records (``--records``) of each shape (``--shapes``):

* batched write rate: records/s when writes are committed in batches (one fsync per batch):
  through the bulk ``MetadataStore.write_many`` (the headline number) and through
  ``StorageItem`` (``get_many`` + ``queue_many`` + ``commit_many``), with an unbatched baseline
  (``StorageItem``, one commit, so one fsync, per record) in the same run;
* full load: reading every record and decoding every field (what opening a cache does);
* single-record read latency: ``store.get(id)`` + decode, p50/p99 over random ids;
* the time CPython's cyclic garbage collector took inside the batched write and the load.

Shapes: ``layer``, a BuildKit layer record of 20 fields (~1 KB of msgpack: blob, diff and
chain ids, media type...) with two indexed fields (``chainid:``, ``blobchainid:``, random
digests); ``pairs``, the two records a lazy-commit pair is (``new(retain=True)`` +
``commit()`` + ``release()``: a mutable of 6 fields and its equal immutable of 8, no
index), so N pairs are 2N records (table entries); ``finalized``, the one 7-field record the
same step leaves after ``finalize()``. The ``pairs`` and ``finalized`` fields are the ones
``scripts/_bench.py`` writes (the same as the API's, which its tests verify). Rates count
records (table entries): a pair is two.

Field values are generated before each clock starts: only the store is timed.

Run on the disk, not tmpfs (``--dir`` defaults to a temp dir under the current directory)::

    python scripts/bench_metadata.py --records 100000 --repeat 5
"""

from __future__ import annotations

import argparse
import gc
import random
import shutil
import sys
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import Report, add_common_arguments, shape_records

SHAPES = ("layer", "pairs", "finalized")
#: What the table shows (``--json`` has every field).
COLUMNS = {
    "metadata": [
        "batched_write_records_per_s",
        "batched_item_write_records_per_s",
        "unbatched_write_records_per_s",
        "batched_over_unbatched",
        "full_load_s",
        "read_p50_us",
        "read_p99_us",
        "gc_in_batched_write_s",
        "gc_in_full_load_s",
    ]
}


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


def make_work(shape: str, rng: random.Random, start: int, n: int) -> Work:
    """Records ``start..start+n`` of ``shape`` with their fields (generated outside any
    clock); a pair gives two records."""
    if shape == "layer":
        return [(f"rec{i:08d}", fields(rng, i)) for i in range(start, start + n)]
    now = time.time_ns()
    work: Work = []
    for i in range(start, start + n):
        m, imm = f"rec{i:08d}m", f"rec{i:08d}i"
        for rid, values in shape_records(shape, i, m, imm, now).items():
            work.append((rid, [(k, v, None) for k, v in values.items()]))
    return work


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


def read_latencies(store: MetadataStore, ids: list[str], samples: int) -> list[float]:
    rng = random.Random(7)
    out = []
    for _ in range(samples):
        rid = ids[rng.randrange(len(ids))]
        t0 = time.perf_counter()
        store.get(rid).get_int(KEY_SIZE)
        out.append(time.perf_counter() - t0)
    return out


def measure(
    tmp: Path, shape: str, args: argparse.Namespace, rep: int
) -> tuple[int, dict[str, float]]:
    """One repetition for one shape; returns (records written, measurements)."""
    rng = random.Random(rep)
    work = make_work(shape, rng, 0, args.records)
    baseline = make_work(shape, rng, args.records, args.unbatched)
    out: dict[str, float] = {}
    if not args.no_items:
        # The same records through StorageItem, into an environment of their own.
        env = MetaEnv(tmp / "meta-items")
        secs = write_items(MetadataStore(env), work, args.batch)
        out["batched_item_write_records_per_s"] = len(work) / secs
        env.close()
        shutil.rmtree(tmp / "meta-items")

    env = MetaEnv(tmp / "meta")
    store = MetadataStore(env)
    secs = write_bulk(store, work, args.batch)
    out["gc_in_batched_write_s"] = GC_CLOCK.seconds
    out["batched_write_records_per_s"] = len(work) / secs
    secs = write_items(store, baseline, 1)
    out["unbatched_write_records_per_s"] = len(baseline) / secs
    env.close()
    ids = [rid for rid, _ in work]
    written = len(work) + len(baseline)
    del work, baseline

    env = MetaEnv(tmp / "meta")  # a cold-ish reopen, as at cache open
    store = MetadataStore(env)
    secs, count = load(store)
    out["gc_in_full_load_s"] = GC_CLOCK.seconds
    if count != written:
        raise SystemExit(f"loaded {count} records, wrote {written}")
    out["full_load_s"] = secs
    lat = sorted(read_latencies(store, ids, 20_000))
    out["read_p50_us"] = lat[len(lat) // 2] * 1e6
    out["read_p99_us"] = lat[int(len(lat) * 0.99)] * 1e6
    out["batched_over_unbatched"] = (
        out["batched_write_records_per_s"] / out["unbatched_write_records_per_s"]
    )
    env.close()
    return len(ids), out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--records", type=int, default=100_000, help="records (pairs) of each shape"
    )
    parser.add_argument(
        "--shapes", default=",".join(SHAPES), help="layer, pairs, finalized (comma-separated)"
    )
    parser.add_argument("--batch", type=int, default=1000, help="records per commit")
    parser.add_argument("--unbatched", type=int, default=500, help="records for the baseline")
    parser.add_argument(
        "--no-items", action="store_true", help="skip the batched StorageItem write path"
    )
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    shapes = [x.strip() for x in args.shapes.split(",") if x.strip()]
    if set(shapes) - set(SHAPES):
        parser.error(f"unknown shapes {sorted(set(shapes) - set(SHAPES))}; shapes are {SHAPES}")

    report = Report("bench_metadata", args, args.dir, columns=COLUMNS)
    args.dir.mkdir(parents=True, exist_ok=True)
    for rep in range(args.repeat):
        for shape in shapes:
            tmp = Path(tempfile.mkdtemp(prefix="bench-meta-", dir=args.dir))
            try:
                entries, res = measure(tmp, shape, args, rep)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            params = {"records": args.records, "entries": entries, "batch": args.batch}
            report.add("metadata", shape, params, res, repeat=rep)
    report.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
