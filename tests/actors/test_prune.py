"""Prune (BuildKit ``Prune``/``pruneOnce``) on real caches.

Policies (``all``, filters, ``keep_duration``, the three size limits and BuildKit's
``calculateKeepBytes``), the LRU/usage order of size-limited prunes, leaf-first passes,
shared records through the ref checker, listeners (the ``record_pruned`` events that replace
BuildKit's result channel), crash safety (``cache.deleted``) and the cache staying responsive
while thousands of records are deleted.

Record statistics (last use, usage count) that a test needs in the past are written to the
metadata while the cache is closed, then the cache is reopened: the only way to age a record
without sleeping.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pykka
import pytest
from refcache.actors import (
    Cache,
    CacheListener,
    ImmutableRef,
    InvalidError,
    MutableRef,
    PrunePolicy,
    RefcacheError,
    UsageInfo,
    open_cache,
)
from refcache.actors._entry import new_id
from refcache.actors._gcorder import delete_order
from refcache.actors._offline import offline_prune_plan
from refcache.actors._planning import calculate_keep_bytes
from refcache.storage import (
    KEY_BLOB,
    KEY_COMMITTED,
    KEY_CREATED_AT,
    KEY_DELETED,
    KEY_DESCRIPTION,
    KEY_LAST_USED_AT,
    KEY_SNAPSHOT,
    KEY_USAGE_COUNT,
    MetadataStore,
    MetaEnv,
)
from refcache.storage._leases import LmdbLeaseManager, Resource
from refcache.storage._native import NativeSnapshotter

from refcache import storage

WAIT = 30.0
HOUR_NS = 3600 * 10**9
DAY_NS = 24 * HOUR_NS


# -- helpers ---------------------------------------------------------------------------------------


def new(cache: Cache, parent: ImmutableRef | None = None, **kwargs: Any) -> MutableRef:
    ref: MutableRef = cache.manager.new(parent, **kwargs).get(timeout=WAIT)
    return ref


def layer(
    cache: Cache, parent: ImmutableRef | None = None, *, data: str = "", **kwargs: Any
) -> ImmutableRef:
    """New(parent) [+ write a file] + Commit + Finalize; the handle stays open."""
    m = new(cache, parent, **kwargs)
    if data:
        with m.mount(readonly=False).local() as path:
            (path / "data").write_text(data)
    ref = m.commit()
    ref.finalize()
    return ref


def prune(cache: Cache, *policies: PrunePolicy) -> list[str]:
    return [r.id for r in cache.manager.prune(*policies).get(timeout=WAIT)]


def snapshot_dirs(root: Path) -> int:
    base = root / "snapshots"
    return sum(
        1
        for name in os.listdir(base)
        if (base / name).is_dir() and not name.startswith(("new-", "rm-"))
    )


def set_stats(root: Path, stats: dict[str, tuple[int | None, int]]) -> None:
    """Writes (last_used_at, usage_count) of closed-cache records into their metadata."""
    env = MetaEnv(root / "meta")
    try:
        store = MetadataStore(env)
        for rid, (last_used_at, count) in stats.items():
            item = store.get(rid)
            item.queue_many({KEY_LAST_USED_AT: last_used_at, KEY_USAGE_COUNT: count or None})
            item.commit()
    finally:
        env.close()


def set_values(root: Path, values: dict[str, dict[str, Any]]) -> None:
    env = MetaEnv(root / "meta")
    try:
        store = MetadataStore(env)
        for rid, fields in values.items():
            item = store.get(rid)
            item.queue_many(fields)
            item.commit()
    finally:
        env.close()


def released(*refs: ImmutableRef) -> list[str]:
    ids = [r.id for r in refs]
    for r in refs:
        r.release()
    return ids


class Recorder(CacheListener, pykka.ThreadingActor):
    """Collects cache events into a queue the test reads."""

    def __init__(self, events: queue.Queue[tuple[Any, ...]]) -> None:
        super().__init__()
        self.events = events

    def record_pruned(self, info: UsageInfo) -> None:
        self.events.put(("record_pruned", info))

    def prune_finished(self, records: int, reclaimed: int) -> None:
        self.events.put(("prune_finished", records, reclaimed))


def drain_until_finished(events: queue.Queue[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    out = []
    while True:
        event = events.get(timeout=WAIT)
        out.append(event)
        if event[0] == "prune_finished":
            return out


def bulk_records(root: Path, n: int) -> list[str]:
    """``n`` committed records written through the storage layer, as new+commit+finalize
    leave them (lease ``<id>`` holding a real committed snapshot ``<id>``, metadata)."""
    with open_cache(root, snapshotter="native"):
        pass
    env = MetaEnv(root / "meta")
    sn = NativeSnapshotter(root, env)
    leases = LmdbLeaseManager(env)
    store = MetadataStore(env)
    ids = [new_id() for _ in range(n)]
    try:
        for lo in range(0, n, 500):
            chunk = ids[lo : lo + 500]
            with env.write_txn() as txn:
                for rid in chunk:
                    leases.create(rid, flat=True, txn=txn)
                    leases.add_resource(rid, Resource(rid, f"snapshots/{sn.name}"), txn=txn)
                    sn.prepare("bulk-" + rid, txn=txn)
            with env.write_txn() as txn:
                for rid in chunk:
                    sn.commit(rid, "bulk-" + rid, txn=txn)
                    item = store.get(rid)
                    item.queue_many(
                        {
                            KEY_COMMITTED: True,
                            KEY_CREATED_AT: time.time_ns(),
                            KEY_SNAPSHOT: rid,
                            KEY_DESCRIPTION: f"bulk {rid}",
                        }
                    )
                    item.commit(txn=txn)
    finally:
        sn.close()
        env.close()
    return ids


# -- TestCalculateKeepBytes ------------------------------------------------------------------------


class TestCalculateKeepBytes:
    """BuildKit's TestCalculateKeepBytes table (total disk 10000), every row, and ac123b493."""

    @pytest.mark.parametrize(
        ("total", "free", "max_used", "min_free", "reserved", "expected"),
        [
            pytest.param(1000, 9000, 0, 0, 0, 0, id="empty"),
            pytest.param(1000, 9000, 2000, 0, 0, 2000, id="only max"),
            pytest.param(7000, 3000, 0, 5000, 0, 5000, id="only free"),
            pytest.param(7000, 3000, 0, 5000, 6000, 6000, id="free + reserved"),
            pytest.param(7000, 3000, 4000, 5000, 2000, 4000, id="free all"),
            pytest.param(4000, 2000, 2000, 0, 0, 2000, id="mixed max"),
            pytest.param(4000, 2000, 0, 5000, 0, 1000, id="mixed free"),
            pytest.param(4000, 2000, 0, 5000, 2000, 2000, id="mixed free + reserved"),
            pytest.param(4000, 2000, 4000, 5000, 2000, 2000, id="mixed free all"),
            # ac123b493: enough free space already and no maximum: keep everything.
            pytest.param(7000, 6000, 0, 5000, 0, 7000, id="min free already satisfied"),
            pytest.param(7000, 5000, 0, 5000, 0, 7000, id="min free exactly satisfied"),
            pytest.param(7000, 6000, 3000, 5000, 0, 3000, id="satisfied free keeps the max"),
            pytest.param(7000, 6000, 0, 0, 1000, 1000, id="only reserved"),
            # Freeing more than the cache holds: no limit left, everything may go.
            pytest.param(1000, 0, 0, 5000, 0, 0, id="excess beyond the cache"),
        ],
    )
    def test_keep_bytes(
        self, total: int, free: int, max_used: int, min_free: int, reserved: int, expected: int
    ) -> None:
        policy = PrunePolicy(
            max_used_space=max_used, min_free_space=min_free, reserved_space=reserved
        )
        assert calculate_keep_bytes(total, free, policy) == expected


# -- sortDeleteRecords -----------------------------------------------------------------------------


class TestDeleteOrder:
    """The LRU/usage score of size-limited prunes (BuildKit ``sortDeleteRecords``)."""

    def test_never_used_go_first_then_the_oldest(self) -> None:
        stats = {"new": (300, 1), "never": (None, 0), "old": (100, 1), "mid": (200, 1)}
        assert delete_order(stats) == ["never", "old", "mid", "new"]

    def test_equal_timestamps_share_a_rank(self) -> None:
        # old1 and old2 tie on time; the usage count decides between them.
        stats = {"old1": (100, 2), "old2": (100, 1), "new": (200, 1)}
        assert delete_order(stats) == ["old2", "old1", "new"]

    def test_a_record_used_often_outlives_a_more_recent_one_used_once(self) -> None:
        # ranks: times 100,200,300 -> 2,3,4 of 4; counts 1,5 -> 2,3 of 3.
        # often: 2/4 + 3/3 = 1.5; once: 3/4 + 2/3 = 1.417; newest: 4/4 + 2/3 = 1.667
        stats = {"often": (100, 5), "once": (200, 1), "newest": (300, 1)}
        assert delete_order(stats) == ["once", "often", "newest"]


# -- TestPrune with the result channel (listeners) -------------------------------------------------


class TestPruneEvents:
    """BuildKit's TestPrune reads deleted records from a channel; here listeners get tells."""

    def test_prune_walk_through_reports_every_record_to_listeners(self, cache: Cache) -> None:
        events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        cache.manager.subscribe(Recorder.start(events)).get(timeout=WAIT)

        s = layer(cache)
        a2 = new(cache, s, retain=True)
        s2 = a2.commit()
        assert prune(cache) == []
        assert drain_until_finished(events) == [("prune_finished", 0, 0)]

        s2.release()  # the child pair goes as one unit, reported as its mutable
        deleted = cache.manager.prune().get(timeout=WAIT)
        assert [r.id for r in deleted] == [a2.id]
        got = drain_until_finished(events)
        assert got == [("record_pruned", deleted[0]), ("prune_finished", 1, deleted[0].size)]
        assert deleted[0].mutable
        assert deleted[0].parents == (s.id,)

        s.release()
        a3 = new(cache, s, retain=True)
        s3 = a3.commit()
        s3.release()
        deleted = cache.manager.prune().get(timeout=WAIT)
        assert [r.id for r in deleted] == [a3.id, s.id]  # leaf first
        got = drain_until_finished(events)
        assert [e[1].id for e in got[:-1]] == [a3.id, s.id]
        assert got[-1] == ("prune_finished", 2, sum(r.size for r in deleted))
        assert snapshot_dirs(cache.root) == 0

    def test_unsubscribed_and_dead_listeners_get_nothing_and_break_nothing(
        self, cache: Cache
    ) -> None:
        events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        gone: queue.Queue[tuple[Any, ...]] = queue.Queue()
        kept_ref = Recorder.start(events)
        dropped_ref = Recorder.start(gone)
        dead_ref = Recorder.start(queue.Queue())
        for ref in (kept_ref, dropped_ref, dead_ref):
            cache.manager.subscribe(ref).get(timeout=WAIT)
        cache.manager.subscribe(kept_ref).get(timeout=WAIT)  # twice: still one subscription
        cache.manager.unsubscribe(dropped_ref).get(timeout=WAIT)
        dead_ref.stop()
        a = layer(cache)
        a.release()
        assert prune(cache) == [a.id]
        got = drain_until_finished(events)
        assert [e[0] for e in got] == ["record_pruned", "prune_finished"]
        assert gone.empty()

    def test_subscribe_takes_actor_refs_only(self, cache: Cache) -> None:
        with pytest.raises(InvalidError, match="actor refs"):
            cache.manager.subscribe(lambda info: None).get(timeout=WAIT)


# -- size limits -----------------------------------------------------------------------------------


def _sized(cache: Cache, n: int) -> tuple[list[ImmutableRef], int]:
    refs = [layer(cache, data=f"record {i}") for i in range(n)]
    sizes = {r.size() for r in refs}
    assert len(sizes) == 1
    return refs, sizes.pop()


class TestSizeLimitedPrune:
    """max_used_space / reserved_space / min_free_space: BuildKit's gc mode."""

    def test_usage_count_and_last_use_decide_the_order(
        self, open_cache_at: Callable[[], Cache], cache_root: Path
    ) -> None:
        cache = open_cache_at()
        refs, size = _sized(cache, 4)
        ids = released(*refs)
        cache.close()
        now = time.time_ns()
        # often: used long ago but 5 times; once: more recent, once; never: never used.
        often, once, never, newest = ids
        set_stats(
            cache_root,
            {
                often: (now - 3 * DAY_NS, 5),
                once: (now - 2 * DAY_NS, 1),
                never: (None, 0),
                newest: (now - DAY_NS, 1),
            },
        )
        cache = open_cache_at()
        # Scores (ranks of 4 times and 3 counts): never 1/4+1/3, once 3/4+2/3,
        # often 2/4+3/3, newest 4/4+2/3. Total 4 sizes, keep 2 sizes + 1: two go.
        policy = PrunePolicy(all=True, max_used_space=2 * size + 1)
        assert prune(cache, policy) == [never, once]

    def test_a_parent_freed_during_the_prune_competes_for_the_next_place(
        self, open_cache_at: Callable[[], Cache], cache_root: Path
    ) -> None:
        cache = open_cache_at()
        parent = layer(cache, data="p" * 100)
        child = layer(cache, parent, data="c" * 100)
        newer = layer(cache, data="x" * 100)
        size = newer.size()
        assert parent.size() == child.size() == size
        released(parent, child, newer)
        cache.close()
        now = time.time_ns()
        set_stats(
            cache_root,
            {
                parent.id: (now - 3 * DAY_NS, 1),
                child.id: (now - 2 * DAY_NS, 1),
                newer.id: (now - DAY_NS, 1),
            },
        )
        cache = open_cache_at()
        policy = PrunePolicy(all=True, max_used_space=size + 1)
        # The dry run plans the same order from the stored records alone.
        assert [r.id for r in offline_prune_plan(cache_root, [policy])] == [child.id, parent.id]
        # BuildKit rescans after each deletion: once the child is gone its older parent
        # scores lower than the newer record and goes next.
        assert prune(cache, policy) == [child.id, parent.id]

    def test_at_the_limit_one_more_record_goes(self, cache: Cache) -> None:
        refs, size = _sized(cache, 3)
        ids = released(*refs)  # used in order: ids[0] is the least recently used
        # BuildKit stops only when total < keep: at total == keep one more is deleted.
        assert prune(cache, PrunePolicy(all=True, max_used_space=2 * size)) == ids[:2]

    def test_reserved_space_is_never_pruned_away(self, cache: Cache) -> None:
        refs, size = _sized(cache, 3)
        ids = released(*refs)
        policy = PrunePolicy(all=True, max_used_space=size, reserved_space=2 * size + 1)
        assert prune(cache, policy) == ids[:1]

    def test_records_in_use_count_toward_the_total(self, cache: Cache) -> None:
        refs, size = _sized(cache, 3)
        held = refs[0]
        ids = released(*refs[1:])
        # total = 3 sizes (the held one included): one unreferenced record must go.
        assert prune(cache, PrunePolicy(all=True, max_used_space=2 * size + 1)) == ids[:1]
        held.release()

    def test_satisfied_min_free_space_deletes_nothing(self, cache: Cache) -> None:
        refs, _ = _sized(cache, 2)
        released(*refs)
        assert prune(cache, PrunePolicy(all=True, min_free_space=1)) == []

    def test_min_free_space_beyond_the_cache_deletes_everything_unreferenced(
        self, cache: Cache
    ) -> None:
        refs, _ = _sized(cache, 2)
        ids = released(*refs)
        assert sorted(prune(cache, PrunePolicy(all=True, min_free_space=1 << 62))) == sorted(ids)

    def test_unknown_sizes_are_measured_before_they_count(
        self, open_cache_at: Callable[[], Cache]
    ) -> None:
        cache = open_cache_at()
        refs = [layer(cache, data=f"record {i}") for i in range(3)]
        snapshots = [cache.snapshotter.usage(r.info().snapshot_id).size for r in refs]
        ids = released(*refs)  # sizes never computed: unknown in the metadata
        cache.close()
        cache = open_cache_at()
        detail = cache.manager.statistics().get(timeout=WAIT).records_detail
        assert [size for _, _, size in detail] == [-1, -1, -1]  # unknown (no size sample)
        size = snapshots[0]
        assert size > 0
        deleted = cache.manager.prune(PrunePolicy(all=True, max_used_space=2 * size + 1))
        rows = deleted.get(timeout=WAIT)
        assert [(r.id, r.size) for r in rows] == [(ids[0], size)]


# -- keep_duration and passes ----------------------------------------------------------------------


class TestPasses:
    """Only unreferenced records go; their parents follow in later passes (leaf first)."""

    def test_a_chain_is_pruned_leaf_first(self, cache: Cache) -> None:
        a = layer(cache, data="a")
        b = layer(cache, a, data="b")
        c = layer(cache, b, data="c")
        d = layer(cache, c, data="d")
        ids = released(a, b, c, d)
        assert prune(cache) == list(reversed(ids))
        assert snapshot_dirs(cache.root) == 0
        assert cache.leases.list() == []

    def test_merge_and_diff_inputs_go_after_the_records_that_hold_them(self, cache: Cache) -> None:
        a, b = layer(cache, data="a"), layer(cache, data="b")
        m = cache.manager.merge([a, b]).get(timeout=WAIT)
        d = cache.manager.diff(a, a).get(timeout=WAIT)  # holds a twice
        order = prune_after_release(cache, [a, b, m, d])
        assert order.index(m.id) < min(order.index(a.id), order.index(b.id))
        assert order.index(d.id) < order.index(a.id)
        assert sorted(order) == sorted([a.id, b.id, m.id, d.id])

    def test_a_held_leaf_keeps_its_whole_chain(self, cache: Cache) -> None:
        a = layer(cache)
        b = layer(cache, a)
        other = layer(cache)
        released(a, other)
        assert prune(cache) == [other.id]
        b.release()
        assert prune(cache) == [b.id, a.id]

    def test_keep_duration_removes_an_old_parent_after_its_child(
        self, open_cache_at: Callable[[], Cache], cache_root: Path
    ) -> None:
        # BuildKit #5436 (PR #6887, TestPruneUntilRemovesOldParentAfterChild).
        cache = open_cache_at()
        parent = layer(cache, data="p")
        child = layer(cache, parent, data="c")
        pinned_parent = layer(cache, data="q")
        recent_child = layer(cache, pinned_parent, data="r")
        ids = released(parent, child, pinned_parent, recent_child)
        cache.close()
        old = time.time_ns() - 2 * DAY_NS
        set_stats(
            cache_root,
            {
                parent.id: (old, 1),
                child.id: (old, 1),
                pinned_parent.id: (old, 1),
                recent_child.id: (time.time_ns(), 1),
            },
        )
        cache = open_cache_at()
        policy = PrunePolicy(keep_duration=timedelta(hours=48) - timedelta(minutes=1))
        assert prune(cache, policy) == [child.id, parent.id]
        # The recently used child pins its old parent (mirendev/runtime#879).
        rows = {r.id for r in cache.manager.disk_usage().get(timeout=WAIT)}
        assert rows == {pinned_parent.id, recent_child.id}
        assert sorted(prune(cache, PrunePolicy())) == sorted(ids[2:])


def prune_after_release(cache: Cache, refs: Sequence[ImmutableRef]) -> list[str]:
    released(*refs)
    return prune(cache)


# -- filters ---------------------------------------------------------------------------------------


class TestPruneFilters:
    """Prune matches a UsageInfo without parents and in-use (BuildKit's prune adaptor)."""

    def test_parents_and_inuse_never_match_in_prune(self, cache: Cache) -> None:
        a = layer(cache)
        b = layer(cache, a)
        released(a, b)
        for flt in (f"parents=={a.id}", "parents", f"parents~={a.id}", "inuse"):
            assert prune(cache, PrunePolicy(filters=(flt,))) == [], flt
        assert prune(cache, PrunePolicy(filters=(f"parents!={a.id}",))) == [b.id, a.id]

    def test_fields_and_operators(self, cache: Cache) -> None:
        build = layer(cache, description="build step one")
        other = layer(cache, description="other")
        plain = layer(cache)
        cm = layer(cache, description="cache mount")
        cm.metadata.record_type = "exec.cachemount"
        ids = released(build, other, plain, cm)
        assert ids
        mutable = new(cache, retain=True, description="scratch")
        mutable.release()  # a retained, unreferenced mutable

        def run(*filters: str) -> list[str]:
            return prune(cache, PrunePolicy(filters=filters))

        assert run(f"id=={plain.id}") == [plain.id]
        assert run("description~=^build", f"id=={cm.id}") == [build.id, cm.id]  # OR
        assert run("description!=other,immutable") == []  # AND: no immutable left but other
        assert run("mutable") == [mutable.id]
        assert run("shared") == []  # no ref checker: nothing is shared
        assert run('description=="other",private') == [other.id]

    def test_types_and_ids(self, cache: Cache) -> None:
        a, b, c = layer(cache), layer(cache), layer(cache)
        a.metadata.record_type = "source.local"
        b.metadata.record_type = "source.git.checkout"
        released(a, b, c)
        assert prune(cache, PrunePolicy(filters=("type==regular",))) == [c.id]
        assert prune(cache, PrunePolicy(filters=("type~=^source\\.git",))) == [b.id]
        assert prune(cache, PrunePolicy(filters=(f"id!={b.id}",))) == [a.id]
        assert prune(cache, PrunePolicy(filters=("description",))) == []  # none has one


# -- shared records --------------------------------------------------------------------------------


BLOB_A = "sha256:" + "a" * 64
BLOB_B = "sha256:" + "b" * 64


class TestSharedRecords:
    """The external ref checker (BuildKit PruneRefChecker): shared records need ``all``."""

    def test_shared_records_are_kept_without_all(self, tmp_path: Path) -> None:
        root = tmp_path / "cache"
        with open_cache(root, snapshotter="native") as cache:
            base = layer(cache, data="base")
            top = layer(cache, base, data="top")
            other = layer(cache, data="other")
            released(base, top, other)
        set_values(root, {base.id: {KEY_BLOB: BLOB_A}, top.id: {KEY_BLOB: BLOB_B}})
        calls: list[tuple[str, tuple[str, ...]]] = []

        def checker(record_id: str, chain: Sequence[str]) -> bool:
            calls.append((record_id, tuple(chain)))
            return tuple(chain) == (BLOB_A, BLOB_B)  # an image uses base+top

        with open_cache(root, snapshotter="native", ref_checker=checker) as cache:
            assert prune(cache, PrunePolicy()) == [other.id]
            assert (top.id, (BLOB_A, BLOB_B)) in calls
            calls.clear()
            assert prune(cache, PrunePolicy(all=True, filters=("private",))) == []
            assert prune(cache, PrunePolicy(all=True, filters=("shared",))) == [top.id]
            calls.clear()
            # all without filters: BuildKit does not even build the checker.
            assert prune(cache, PrunePolicy(all=True)) == [base.id]
            assert calls == []

    def test_a_failing_checker_fails_the_prune_and_deletes_nothing(self, tmp_path: Path) -> None:
        def checker(record_id: str, chain: Sequence[str]) -> bool:
            raise OSError("image store unreachable")

        with open_cache(tmp_path / "c", snapshotter="native", ref_checker=checker) as cache:
            a = layer(cache)
            a.release()
            with pytest.raises(RefcacheError, match="ref checker failed"):
                prune(cache, PrunePolicy())
            with pytest.raises(RefcacheError, match="ref checker failed"):
                cache.manager.disk_usage().get(timeout=WAIT)
            # all without filters never asks the checker: the record is still there.
            assert prune(cache, PrunePolicy(all=True)) == [a.id]


# -- crash safety ----------------------------------------------------------------------------------


class TestInterruptedPrune:
    """A record flagged cache.deleted (an interrupted removal) is finished at the next open.

    A prune clears whole pairs in one transaction each (no flag needed); the flag is what
    an interrupted removal of an older version, or BuildKit's, leaves behind."""

    def test_records_flagged_deleted_are_gone_after_reopen_with_nothing_leaked(
        self, open_cache_at: Callable[[], Cache], cache_root: Path
    ) -> None:
        cache = open_cache_at()
        kept = layer(cache, data="kept")
        doomed_parent = layer(cache, data="p")
        doomed_child = layer(cache, doomed_parent, data="c")
        released(kept, doomed_parent, doomed_child)
        # What an interrupted removal leaves behind when the process dies.
        for rid in (doomed_child.id, doomed_parent.id):
            cache.metadata.get(rid).set(KEY_DELETED, True)
        cache.close()
        assert snapshot_dirs(cache_root) == 3

        cache = open_cache_at()
        assert sorted(cache.load_report.finished_deletes) == sorted(
            [doomed_child.id, doomed_parent.id]
        )
        rows = [r.id for r in cache.manager.disk_usage().get(timeout=WAIT)]
        assert rows == [kept.id]
        assert sorted(lease.id for lease in cache.leases.list()) == [kept.id]
        assert prune(cache, PrunePolicy(filters=("id==none",))) == []  # GC only
        assert snapshot_dirs(cache_root) == 1
        cache.close()
        assert storage.check(cache_root) == []


# -- responsiveness --------------------------------------------------------------------------------


class TestPruneDoesNotStallTheCache:
    """BuildKit #4401: builds stalled while prune held the manager lock."""

    def test_ref_operations_keep_answering_while_thousands_of_records_go(
        self, tmp_path: Path
    ) -> None:
        root = tmp_path / "cache"
        n = 1500
        ids = bulk_records(root, n + 4)
        with open_cache(root, snapshotter="native", timeout=WAIT) as cache:
            held = [cache.manager.get(rid).get(timeout=WAIT) for rid in ids[n:]]
            latencies: list[float] = []
            stop = threading.Event()
            errors: list[BaseException] = []

            def client() -> None:
                i = 0
                try:
                    while not stop.is_set():
                        t0 = time.perf_counter()
                        held[i % 4].clone().release()
                        cache.manager.get(held[i % 4].id).get(timeout=WAIT).release()
                        latencies.append(time.perf_counter() - t0)
                        i += 1
                except BaseException as exc:
                    errors.append(exc)

            thread = threading.Thread(target=client)
            thread.start()
            try:
                deleted = cache.manager.prune().get(timeout=120)
            finally:
                stop.set()
                thread.join(timeout=WAIT)
            assert not errors
            assert len(deleted) == n
            assert len(latencies) > 10
            # Generous for loaded CI machines: BuildKit pauses for seconds here.
            assert max(latencies) < 1.0, max(latencies)
            assert sorted(r.id for r in cache.manager.disk_usage().get(timeout=WAIT)) == sorted(
                ids[n:]
            )
            for ref in held:
                ref.release()
        assert snapshot_dirs(root) == 4
