"""Sizes and uses: one source of truth, the same numbers wherever they are read.

Every measured size (``ImmutableRef.size()``, a ``disk_usage`` measurement) reaches the
manager's table whether or not the record's actor is activated, and is written to the
metadata (behind, through the statistics writer); resets (extraction, a mutable taken
again) too. ``statistics()``, the Prometheus gauges, the per-record size series, ``du`` and
``refcache inspect`` then agree. A use (BuildKit ``updateLastUsed``) is visible to the next
``disk_usage()`` and ``info()`` at once, for held and unheld records.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from prometheus_client import CollectorRegistry
from refcache.actors import Cache, ImmutableRef, MutableRef, PrunePolicy, UsageInfo, open_cache
from refcache.actors._messages import KnownSizes
from refcache.actors._offline import inspect_record, offline_usage
from refcache.metrics import CacheCollector
from refcache.storage import KEY_SIZE, MetadataStore

WAIT = 30.0


def new(cache: Cache, parent: ImmutableRef | None = None, **kwargs: object) -> MutableRef:
    ref: MutableRef = cache.manager.new(parent, **kwargs).get(timeout=WAIT)
    return ref


def write(ref: MutableRef, name: str, size: int) -> None:
    with ref.mount().local() as path:
        (path / name).write_bytes(b"x" * size)


def layer(cache: Cache, parent: ImmutableRef | None, size: int, **kwargs: object) -> ImmutableRef:
    """New(parent) + a file + Commit + Finalize; the handle stays open."""
    m = new(cache, parent, **kwargs)
    write(m, "data", size)
    ref = m.commit()
    ref.finalize()
    return ref


def usage(cache: Cache, *args: object, **kwargs: object) -> dict[str, UsageInfo]:
    rows: list[UsageInfo] = cache.manager.disk_usage(*args, **kwargs).get(timeout=WAIT)
    return {r.id: r for r in rows}


def gauges(cache: Cache) -> dict[str, float]:
    """The byte gauges of one scrape (a fresh registry)."""
    registry = CollectorRegistry()
    CacheCollector(cache.manager, registry=registry, timeout=WAIT)
    out: dict[str, float] = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == "refcache_usage_bytes":
                out["usage"] = out.get("usage", 0.0) + sample.value
            elif sample.name == "refcache_reclaimable_bytes":
                out["reclaimable"] = sample.value
            elif sample.name == "refcache_record_size_bytes":
                out[sample.labels["record_id"]] = sample.value
    return out


def detail_sizes(cache: Cache) -> dict[str, int]:
    stats = cache.manager.statistics().get(timeout=WAIT)
    return {rid: size for rid, _, size in stats.records_detail}


def stored_size(cache: Cache, record_id: str) -> int:
    cache._core.writer.flush()  # sizes are written behind
    return int(MetadataStore(cache.env).get(record_id).get_int(KEY_SIZE, -1))


def inspect(root: Path, record_id: str) -> dict[str, object]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "refcache.actors._cli",
            "--root",
            str(root),
            "inspect",
            record_id,
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, object] = json.loads(proc.stdout)
    return doc


# -- one source of truth for sizes ---------------------------------------------------------------


class TestSizes:
    def test_gauges_statistics_and_series_add_up_to_disk_usage(self, cache: Cache) -> None:
        # Records of every visibility and state; recently released ones keep an activated
        # actor (the idle LRU), which is where sizes used to go missing.
        base = layer(cache, None, 40_000)
        step = layer(cache, base, 20_000)
        held = layer(cache, None, 10_000)
        leaf = layer(cache, step, 5_000)
        pair_m = new(cache, base, retain=True)
        write(pair_m, "pair", 7_000)
        pair_i = pair_m.commit()  # a lazy-commit pair, never finalized
        scratch = new(cache, retain=True)
        write(scratch, "scratch", 3_000)
        busy = new(cache)  # a mutable in use: size 0 while it changes
        write(busy, "busy", 2_000)
        merged = cache.manager.merge([base, held]).get(timeout=WAIT)
        merged.extract()
        for ref in (base, step, leaf, pair_i, scratch, merged):
            ref.release()

        rows = usage(cache)
        assert pair_i.id not in rows
        assert pair_m.id in rows
        assert rows[busy.id].size == 0
        assert all(r.size > 0 for rid, r in rows.items() if rid != busy.id)
        reclaimable = sum(r.size for r in rows.values() if not r.in_use)
        total = sum(r.size for r in rows.values())
        # Only held and busy are in use: base is held by step, the pair and the merge, which
        # are themselves unreferenced (or held only by unreferenced records).
        assert {rid for rid, r in rows.items() if r.in_use} == {held.id, busy.id}
        stats = cache.manager.statistics().get(timeout=WAIT)
        assert stats.reclaimable_bytes == reclaimable
        assert sum(stats.bytes_by_kind.values()) == total
        shown = {rid: size for rid, _, size in stats.records_detail}
        assert shown == {rid: r.size for rid, r in rows.items()}

        scraped = gauges(cache)
        assert scraped["reclaimable"] == reclaimable
        assert scraped["usage"] == total
        assert {rid: scraped[rid] for rid in rows} == {rid: r.size for rid, r in rows.items()}
        held.release()
        busy.release()

    def test_sizes_reach_the_table_and_the_metadata_with_an_active_actor(
        self, open_cache_at: Callable[[], Cache], cache_root: Path
    ) -> None:
        cache = open_cache_at()
        ref = layer(cache, None, 50_000)
        other = layer(cache, None, 30_000)
        size = ref.size()  # measured by the handle's caller, cached by the record actor
        assert detail_sizes(cache)[ref.id] == size
        assert ref.info().size == size
        assert stored_size(cache, ref.id) == size
        other.release()  # its actor stays activated (idle LRU)
        measured = usage(cache)[other.id].size
        assert detail_sizes(cache)[other.id] == measured
        assert stored_size(cache, other.id) == measured
        ref.release()
        cache.close()
        # Persisted: a reopened cache and the offline readers know both sizes.
        assert {r.id: r.size for r in offline_usage(cache_root)} == {
            ref.id: size,
            other.id: measured,
        }
        details = inspect_record(cache_root, other.id)
        assert details.row.size == measured
        cache = open_cache_at()
        stats = cache.manager.statistics().get(timeout=WAIT)
        assert stats.reclaimable_bytes == size + measured

    def test_a_lazy_commit_pair_has_one_size_in_both_views(self, cache: Cache) -> None:
        base = layer(cache, None, 20_000)
        m = new(cache, base, retain=True)
        write(m, "data", 9_000)
        i = m.commit()
        size = i.size()
        # Shown as its immutable while that is held, as its mutable once released: the
        # same size either way, counted once.
        rows = usage(cache)
        assert (i.id in rows, m.id in rows, rows[i.id].size) == (True, False, size)
        stats = cache.manager.statistics().get(timeout=WAIT)
        assert sum(stats.bytes_by_kind.values()) == rows[base.id].size + size
        i.release()
        base.release()
        rows = usage(cache)
        assert (i.id in rows, m.id in rows, rows[m.id].size) == (False, True, size)
        stats = cache.manager.statistics().get(timeout=WAIT)
        assert stats.reclaimable_bytes == rows[base.id].size + size
        assert stored_size(cache, m.id) == stored_size(cache, i.id) == size
        # refcache inspect (another process, read-only) shows the stored size, for both
        # halves and in the parent tree, instead of "size unknown".
        for rid in (m.id, i.id):
            doc = inspect(cache.root, rid)
            assert (doc["size"], doc["size_cached"]) == (size, True)
            tree = doc["parent_tree"]
            assert isinstance(tree, list)
            assert "size unknown" not in "\n".join(tree)

    def test_a_pairs_size_is_measured_once_until_a_mutable_handle_is_taken(
        self, cache: Cache
    ) -> None:
        # Several released lazy-commit pairs: each is shown as its mutable, measured by the
        # first disk usage and cached (table, metadata, gauges) for the later ones.
        pairs = []
        for n in range(3):
            m = new(cache, retain=True)
            write(m, "data", 5_000 * (n + 1))
            i = m.commit()
            i.release()
            pairs.append((m.id, i.id))
        first = usage(cache)
        assert sorted(first) == sorted(m_id for m_id, _ in pairs)
        assert all(stored_size(cache, m_id) == first[m_id].size for m_id, _ in pairs)
        m_id = pairs[0][0]
        size = first[m_id].size
        # Behind the cache's back: a measurement would see it, the cached size does not.
        snapshot = cache.snapshotter.path(m_id)
        (snapshot / "sneaked").write_bytes(b"y" * 30_000)
        for _ in range(2):
            again = usage(cache)
            assert {rid: r.size for rid, r in again.items()} == {
                rid: r.size for rid, r in first.items()
            }
        assert gauges(cache)["reclaimable"] == sum(r.size for r in first.values())
        # A mutable handle may change the content: the size is forgotten then, and the
        # next disk usage measures what is on disk, the sneaked file included.
        again_m = cache.manager.get_mutable(m_id).get(timeout=WAIT)
        assert usage(cache)[m_id].size == 0  # in use: still changing
        again_m.release()
        after = usage(cache)
        assert after[m_id].size == cache.snapshotter.usage(m_id).size >= size + 30_000
        assert stored_size(cache, m_id) == after[m_id].size
        assert gauges(cache)["reclaimable"] == sum(r.size for r in after.values())
        # The other pairs kept their cached sizes throughout.
        for other_m, _ in pairs[1:]:
            assert after[other_m].size == first[other_m].size

    def test_taking_a_mutable_again_forgets_its_size_durably(self, cache: Cache) -> None:
        scratch = new(cache, retain=True)
        write(scratch, "a", 4_000)
        scratch.release()
        before = usage(cache)[scratch.id].size
        assert stored_size(cache, scratch.id) == before
        again = cache.manager.get_mutable(scratch.id).get(timeout=WAIT)
        # On disk before the caller can write to it (a crash must not keep the old size).
        assert MetadataStore(cache.env).get(scratch.id).get_int(KEY_SIZE, -1) == -1
        assert usage(cache)[scratch.id].size == 0  # in use: still changing
        write(again, "b", 40_000)
        again.release()
        after = usage(cache)[scratch.id].size
        assert after > before
        assert cache.manager.statistics().get(timeout=WAIT).reclaimable_bytes == after

    def test_a_measurement_older_than_a_reset_is_not_cached(self, cache: Cache) -> None:
        scratch = new(cache, retain=True)
        write(scratch, "a", 4_000)
        scratch.release()
        table = cache.manager.disk_usage().get(timeout=WAIT)
        (old,) = table
        # A measurement that began before the mutable was taken again arrives late.
        again = cache.manager.get_mutable(scratch.id).get(timeout=WAIT)
        generation = 0  # the generation the first disk usage read
        taken = cache._core.ask_manager(KnownSizes({scratch.id: (old.size, generation)}))
        assert taken == ()
        again.release()
        assert cache.manager.statistics().get(timeout=WAIT).records_detail[0][2] == -1


# -- uses are visible at once ----------------------------------------------------------------------


class TestUses:
    def test_a_use_of_a_held_record_shows_at_once(self, cache: Cache) -> None:
        ref = new(cache).commit()
        ref.finalize()
        clone = ref.clone()
        ref.release()  # the commit's handle counts a use; the clone still holds the record
        row = usage(cache)[ref.id]
        assert (row.in_use, row.usage_count) == (True, 1)
        assert row.last_used_at is not None
        assert clone.info().usage_count == 1
        assert clone.info().last_used_at == row.last_used_at
        assert ref.id not in usage(cache, age_limit=timedelta(hours=1))
        clone.release()  # a clone counts no use
        assert usage(cache)[ref.id].usage_count == 1

    def test_every_use_of_an_unheld_record_shows_at_once(self, cache: Cache) -> None:
        ref = new(cache).commit()
        ref.finalize()
        ref.release()
        for n in range(2, 12):
            cache.manager.get(ref.id).get(timeout=WAIT).release()
            row = usage(cache)[ref.id]
            assert row.usage_count == n
            again = cache.manager.get(ref.id, update_last_used=False).get(timeout=WAIT)
            assert again.info().usage_count == n
            assert again.info().last_used_at == row.last_used_at
            again.release()

    def test_measuring_a_retained_mutable_counts_no_use(self, cache: Cache) -> None:
        scratch = new(cache, retain=True)
        scratch.release()  # one use: the mutable handle
        assert usage(cache)[scratch.id].usage_count == 1
        assert usage(cache)[scratch.id].usage_count == 1

    def test_an_implicit_commit_counts_a_use_even_without_update(self, cache: Cache) -> None:
        # BuildKit Get on an unreferenced mutable: mref(trigger).commit() returns the
        # commit's handle, which always counts; its release hands the use to the mutable.
        scratch = new(cache, retain=True)
        scratch.release()
        twin = cache.manager.get(scratch.id, update_last_used=False).get(timeout=WAIT)
        assert twin.id != scratch.id
        twin.release()
        assert usage(cache)[scratch.id].usage_count == 2


# -- merges and diffs ------------------------------------------------------------------------------


class TestMergeAndDiffUses:
    def test_a_merge_of_one_merge_is_a_new_merge_of_its_inputs(self, cache: Cache) -> None:
        a, b = layer(cache, None, 1_000), layer(cache, None, 2_000)
        m = cache.manager.merge([a, b]).get(timeout=WAIT)
        again = cache.manager.merge([m]).get(timeout=WAIT)  # flattened first: two inputs
        assert again.id != m.id
        assert again.info().kind == "merge"
        assert again.info().parents == (a.id, b.id)
        same = cache.manager.merge([None, a]).get(timeout=WAIT)  # one input: that input
        assert same.id == a.id
        for ref in (a, b, m, again, same):
            ref.release()
        assert len(cache.manager.prune().get(timeout=WAIT)) == 4

    def test_pieces_of_a_long_diff_are_first_used_when_their_merge_goes(self, cache: Cache) -> None:
        chain: list[ImmutableRef] = []
        for size in (1_000, 2_000, 3_000, 4_000):
            chain.append(layer(cache, chain[-1] if chain else None, size))
        merged = cache.manager.diff(chain[0], chain[-1]).get(timeout=WAIT)
        pieces = merged.info().parents
        assert len(pieces) == 3
        # BuildKit: the merge owns each diff's own handle, which counts uses; while it
        # is there, nobody else's release counts one either.
        for rid in pieces:
            cache.manager.get(rid).get(timeout=WAIT).release()
        rows = usage(cache)
        assert [(rows[p].usage_count, rows[p].last_used_at) for p in pieces] == [(0, None)] * 3
        merged.release()
        for ref in chain:
            ref.release()
        old = set(usage(cache, age_limit=timedelta(hours=1)))
        assert set(pieces) <= old  # never used: not protected by an age limit
        policy = PrunePolicy(filters=(f"id=={merged.id}",))
        gone = cache.manager.prune(policy).get(timeout=WAIT)
        assert [r.id for r in gone] == [merged.id]
        rows = usage(cache)
        assert all(rows[p].usage_count == 1 and rows[p].last_used_at for p in pieces)
        assert not set(pieces) & set(usage(cache, age_limit=timedelta(hours=1)))
        # Then they are ordinary records: a use counts again.
        cache.manager.get(pieces[0]).get(timeout=WAIT).release()
        assert usage(cache)[pieces[0]].usage_count == 2


def test_offline_du_reads_the_sizes_the_live_cache_stored(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    with open_cache(root, snapshotter="native", timeout=WAIT) as cache:
        ref = layer(cache, None, 12_000)
        ref.release()
        rows = usage(cache)
        cache._core.writer.flush()
        stored = {r.id: r.size for r in offline_usage(root)}
        assert stored == {rid: r.size for rid, r in rows.items()}
