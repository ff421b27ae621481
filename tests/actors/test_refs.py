"""Ref handles: bad input, released and consumed handles, metadata, layer chains.

Bad input gets a clear error naming the offending value and changes nothing: every such test
compares ``disk_usage`` and the handle statistics before and after.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from refcache.actors import (
    Cache,
    ImmutableRef,
    InvalidError,
    MutableRef,
    NotFoundError,
    PrunePolicy,
    RefList,
    UsageInfo,
    open_cache,
)
from refcache.actors._core import LATENCY_BUCKETS
from refcache.actors._record import CacheRecord
from refcache.actors._record_messages import CloneHandle, CountHandles, Release
from refcache.actors._runtime import NOT_RUN, current_pool, run_here

from refcache import storage

WAIT = 30.0


# -- helpers --------------------------------------------------------------------------------------


def new(cache: Cache, parent: ImmutableRef | None = None, **kwargs: Any) -> MutableRef:
    ref: MutableRef = cache.manager.new(parent, **kwargs).get(timeout=WAIT)
    return ref


def committed(cache: Cache, parent: ImmutableRef | None = None, **kwargs: Any) -> ImmutableRef:
    """New(parent) + Commit."""
    return new(cache, parent, **kwargs).commit()


def usage(cache: Cache) -> list[UsageInfo]:
    rows: list[UsageInfo] = cache.manager.disk_usage().get(timeout=WAIT)
    return sorted(rows, key=lambda r: r.id)


def state(cache: Cache) -> tuple[list[UsageInfo], int, int, tuple[tuple[str, int, int], ...]]:
    """Everything a failed call must leave unchanged."""
    rows = usage(cache)  # first: it measures unknown sizes, which statistics then show
    stats = cache.manager.statistics().get(timeout=WAIT)
    return rows, stats.records, stats.open_handles, stats.records_detail


def double_releases(cache: Cache) -> int:
    return int(cache.manager.statistics().get(timeout=WAIT).double_releases_total)


def prune_all(cache: Cache) -> list[str]:
    return [r.id for r in cache.manager.prune().get(timeout=WAIT)]


def record_count(cache: Cache) -> int:
    return int(cache.manager.statistics().get(timeout=WAIT).records)


# -- bad input ------------------------------------------------------------------------------------


class TestBadInput:
    """Unknown ids, wrong types and foreign handles: a clear error, nothing changed."""

    def test_unknown_id_is_not_found_naming_the_id(self, cache: Cache) -> None:
        kept = committed(cache)
        before = state(cache)
        with pytest.raises(NotFoundError, match="no-such-record"):
            cache.manager.get("no-such-record").get(timeout=WAIT)
        with pytest.raises(NotFoundError, match="no-such-mutable"):
            cache.manager.get_mutable("no-such-mutable").get(timeout=WAIT)
        assert state(cache) == before
        kept.release()

    @pytest.mark.parametrize(
        "call",
        [
            pytest.param(lambda m: m.get(123), id="get-int"),
            pytest.param(lambda m: m.get(None), id="get-none"),
            pytest.param(lambda m: m.get_mutable(b"abc"), id="get_mutable-bytes"),
            pytest.param(lambda m: m.new("parent-id"), id="new-str-parent"),
            pytest.param(lambda m: m.new(retain="yes"), id="new-retain-str"),
            pytest.param(lambda m: m.new(description=5), id="new-description-int"),
            pytest.param(lambda m: m.new(record_type=b"x"), id="new-record-type-bytes"),
            pytest.param(lambda m: m.new(created_at=-1), id="new-created-at-negative"),
            pytest.param(lambda m: m.merge("abc"), id="merge-str"),
            pytest.param(lambda m: m.merge([1, 2]), id="merge-ints"),
            pytest.param(lambda m: m.merge(7), id="merge-int"),
            pytest.param(lambda m: m.diff("a", None), id="diff-str"),
            pytest.param(lambda m: m.diff(None, None), id="diff-no-lower"),
            pytest.param(lambda m: m.prune("all"), id="prune-str"),
            pytest.param(lambda m: m.prune(PrunePolicy(filters=("id~=(",))), id="prune-regex"),
            pytest.param(lambda m: m.disk_usage(["id~=("]), id="du-filter-regex"),
            pytest.param(lambda m: m.disk_usage([5]), id="du-filter-int"),
            pytest.param(lambda m: m.disk_usage(5), id="du-filters-int"),
            pytest.param(
                lambda m: m.disk_usage(age_limit=timedelta(seconds=-1)), id="du-age-negative"
            ),
            pytest.param(lambda m: m.disk_usage(age_limit="1h"), id="du-age-limit-str"),
            pytest.param(lambda m: m.search(5), id="search-int"),
        ],
    )
    def test_wrong_types_are_invalid_and_change_nothing(
        self, cache: Cache, call: Callable[[Any], Any]
    ) -> None:
        kept = committed(cache)
        before = state(cache)
        with pytest.raises(InvalidError):
            call(cache.manager).get(timeout=WAIT)
        assert state(cache) == before
        kept.release()

    def test_mutable_handle_as_parent_is_invalid(self, cache: Cache) -> None:
        m = new(cache)
        before = state(cache)
        with pytest.raises(InvalidError, match="ImmutableRef"):
            cache.manager.new(m).get(timeout=WAIT)
        with pytest.raises(InvalidError, match="ImmutableRef"):
            cache.manager.merge([m, m]).get(timeout=WAIT)
        assert state(cache) == before
        m.release()

    def test_handle_of_another_cache_is_invalid_as_parent(
        self, cache: Cache, tmp_path: Path
    ) -> None:
        other = open_cache(tmp_path / "other", snapshotter="native", timeout=WAIT)
        try:
            foreign = committed(other)
            mine = committed(cache)
            before = state(cache)
            with pytest.raises(InvalidError, match="another cache"):
                cache.manager.new(foreign).get(timeout=WAIT)
            with pytest.raises(InvalidError, match="another cache"):
                cache.manager.merge([mine, foreign]).get(timeout=WAIT)
            with pytest.raises(InvalidError, match="another cache"):
                cache.manager.diff(mine, foreign).get(timeout=WAIT)
            with pytest.raises(InvalidError, match="another cache"):
                cache.manager.diff(foreign, mine).get(timeout=WAIT)
            assert state(cache) == before
            foreign.release()
            mine.release()
        finally:
            other.close()

    def test_commit_twice_is_invalid(self, cache: Cache) -> None:
        m = new(cache)
        i = m.commit()
        before = state(cache)
        with pytest.raises(InvalidError, match=m.id):
            m.commit()
        assert state(cache) == before
        i.release()

    def test_commit_of_released_mutable_is_invalid(self, cache: Cache) -> None:
        m = new(cache, retain=True)
        m.release()
        before = state(cache)
        with pytest.raises(InvalidError, match=m.id):
            m.commit()
        assert state(cache) == before


# -- released and consumed handles ----------------------------------------------------------------


class TestReleasedHandles:
    """Use of a released handle is invalid; releasing twice is a counted no-op."""

    @pytest.mark.parametrize(
        "use",
        [
            pytest.param(lambda r: r.mount(), id="mount"),
            pytest.param(lambda r: r.size(), id="size"),
            pytest.param(lambda r: r.info(), id="info"),
            pytest.param(lambda r: r.finalize(), id="finalize"),
            pytest.param(lambda r: r.extract(), id="extract"),
            pytest.param(lambda r: r.layer_chain(), id="layer_chain"),
            pytest.param(lambda r: r.metadata.description, id="metadata-read"),
            pytest.param(lambda r: r.metadata.set_string("k", "v"), id="metadata-write"),
            pytest.param(
                lambda r: setattr(r.metadata, "cache_policy", "retain"), id="metadata-policy"
            ),
            pytest.param(lambda r: r.metadata.get_external("k"), id="metadata-external"),
            pytest.param(lambda r: r.walk_ancestors(), id="walk_ancestors"),
        ],
    )
    def test_released_immutable_handle_cannot_be_used(
        self, cache: Cache, use: Callable[[ImmutableRef], Any]
    ) -> None:
        ref = committed(cache, retain=True)
        keep = ref.clone()
        ref.release()
        before = state(cache)
        with pytest.raises(InvalidError, match="released"):
            use(ref)
        assert state(cache) == before
        keep.release()

    @pytest.mark.parametrize(
        "use",
        [
            pytest.param(lambda r: r.mount(), id="mount"),
            pytest.param(lambda r: r.commit(), id="commit"),
            pytest.param(lambda r: r.info(), id="info"),
            pytest.param(lambda r: r.metadata.description, id="metadata-read"),
        ],
    )
    def test_released_or_consumed_mutable_handle_cannot_be_used(
        self, cache: Cache, use: Callable[[MutableRef], Any]
    ) -> None:
        released = new(cache, retain=True)
        released.release()
        consumed = new(cache, retain=True)
        kept = consumed.commit()
        before = state(cache)
        for ref in (released, consumed):
            with pytest.raises(InvalidError, match=ref.id):
                use(ref)
        assert state(cache) == before
        kept.release()

    def test_clone_of_released_handle_works_while_the_record_lives(self, cache: Cache) -> None:
        ref = committed(cache)
        ref.finalize()
        ref.release()
        again = ref.clone()  # BuildKit relies on this (TestPrune step 4)
        assert again.id == ref.id
        assert again.info().id == ref.id
        again.release()
        assert prune_all(cache) == [ref.id]
        before = state(cache)
        with pytest.raises(NotFoundError, match=ref.id):
            ref.clone()
        assert state(cache) == before

    def test_clone_of_released_handle_while_other_handles_are_open(self, cache: Cache) -> None:
        ref = committed(cache)
        other = ref.clone()
        ref.release()
        again = ref.clone()
        stats = cache.manager.statistics().get(timeout=WAIT)
        assert stats.records_detail[0][:2] == (ref.id, 2)
        other.release()
        again.release()
        stats = cache.manager.statistics().get(timeout=WAIT)
        assert stats.open_handles == 0

    def test_double_release_is_a_counted_no_op(self, cache: Cache) -> None:
        ref = committed(cache)
        other = ref.clone()
        ref.release()
        before, count = state(cache), double_releases(cache)
        ref.release()
        ref.release()
        assert double_releases(cache) == count + 2
        assert state(cache) == before
        other.release()

    def test_release_of_consumed_mutable_is_a_counted_no_op(self, cache: Cache) -> None:
        m = new(cache)
        i = m.commit()
        before, count = state(cache), double_releases(cache)
        m.release()
        assert double_releases(cache) == count + 1
        assert state(cache) == before
        # The immutable still works: the mutable handle belongs to it now.
        assert i.info().equal_mutable == m.id
        i.release()

    def test_with_block_around_commit_is_safe(self, cache: Cache) -> None:
        with cache.manager.new(description="scratch").get(timeout=WAIT) as m:
            i = m.commit()
        assert m.released
        rows = usage(cache)
        assert [(r.id, r.in_use, r.mutable) for r in rows] == [(i.id, True, False)]
        assert i.metadata.description == "scratch"
        i.release()
        assert [(r.id, r.in_use) for r in usage(cache)] == []  # default policy: pair gone

    def test_ref_list_release_is_idempotent(self, cache: Cache) -> None:
        a = committed(cache)
        refs = RefList([a.clone(), a.clone()])
        refs.release()
        count = double_releases(cache)
        refs.release()
        assert double_releases(cache) == count  # released entries are skipped silently
        a.release()


# -- metadata -------------------------------------------------------------------------------------


class TestRefMetadata:
    """RefMetadata getters and setters round-trip, are seen at once, and persist."""

    def test_properties_round_trip_and_persist(self, open_cache_at: Callable[[], Cache]) -> None:
        cache = open_cache_at()
        ref = committed(cache, description="first")
        md = ref.metadata
        assert md.id == ref.id
        assert md.description == "first"
        assert md.record_type == "regular"
        assert md.cache_policy == "default"
        md.description = "second"
        md.record_type = "internal"
        md.layer_type = "windows"
        md.created_at = 1_000_000_000
        md.cache_policy = "retain"
        md.set_string("user.key", "value", index="user.index:abc")
        md.set_external("user.blob", b"\x00\x01data")
        md.set_string("gone", "soon")
        md.clear("gone")
        expected = {
            "description": "second",
            "record_type": "internal",
            "layer_type": "windows",
            "created_at": 1_000_000_000,
            "cache_policy": "retain",
        }
        assert {k: getattr(md, k) for k in expected} == expected
        assert md.get_string("user.key") == "value"
        assert md.get_string("gone") == ""
        assert md.get_external("user.blob") == b"\x00\x01data"
        ref_id = ref.id
        ref.release()
        cache.close()

        cache = open_cache_at()
        ref = cache.manager.get(ref_id).get(timeout=WAIT)
        md = ref.metadata
        assert {k: getattr(md, k) for k in expected} == expected
        assert md.get_string("user.key") == "value"
        assert md.get_string("gone") == ""
        assert md.get_external("user.blob") == b"\x00\x01data"
        found = cache.manager.search("user.index:abc").get(timeout=WAIT)
        assert [r.id for r in found] == [ref_id]
        ref.release()

    def test_setters_are_seen_by_info_and_disk_usage_at_once(self, cache: Cache) -> None:
        ref = committed(cache, description="before")
        ref.metadata.description = "after"
        ref.metadata.record_type = "frontend"
        ref.metadata.created_at = 42
        info = ref.info()
        assert (info.description, info.record_type, info.created_at) == ("after", "frontend", 42)
        rows = cache.manager.disk_usage(("description==after",)).get(timeout=WAIT)
        assert [(r.id, r.record_type, r.created_at) for r in rows] == [(ref.id, "frontend", 42)]

    def test_cache_policy_setter_is_seen_by_the_getter_after_a_read(self, cache: Cache) -> None:
        ref = committed(cache)
        assert ref.metadata.cache_policy == "default"  # the record has read its metadata
        ref.metadata.cache_policy = "retain"
        assert ref.metadata.cache_policy == "retain"
        assert ref.info().cache_policy == "retain"
        ref.metadata.cache_policy = "default"
        assert ref.metadata.cache_policy == "default"
        ref.release()

    def test_retain_set_later_keeps_the_pair_on_release(self, cache: Cache) -> None:
        m = new(cache)
        m.metadata.cache_policy = "retain"
        i = m.commit()
        i.release()
        rows = usage(cache)
        assert [(r.id, r.mutable, r.in_use) for r in rows] == [(m.id, True, False)]

    def test_a_retained_pair_settles_its_last_releases_and_follows_policy_changes(
        self, cache: Cache
    ) -> None:
        # The last release of a retained pair's immutable is settled by its actor (as for a
        # plain immutable); the manager still counts the mutable's use, and a pair whose
        # policy went back to default goes at its next last release.
        m = new(cache)
        i = m.commit()
        i.metadata.cache_policy = "retain"
        i.release()
        for expected in (2, 3):
            cache.manager.get(i.id).get(timeout=WAIT).release()
            assert [(r.id, r.usage_count) for r in usage(cache)] == [(m.id, expected)]
            with cache.manager.get(i.id, update_last_used=False).get(timeout=WAIT) as quiet:
                assert quiet.info().usage_count == expected
        again = cache.manager.get(i.id).get(timeout=WAIT)
        again.metadata.cache_policy = "default"
        again.release()
        for rid in (i.id, m.id):
            with pytest.raises(NotFoundError):
                cache.manager.get(rid).get(timeout=WAIT)
        assert usage(cache) == []

    def test_bad_metadata_values_are_invalid_and_change_nothing(self, cache: Cache) -> None:
        ref = committed(cache, description="d")
        before = state(cache)
        md = ref.metadata
        with pytest.raises(InvalidError):
            md.set_string("k", 5)  # type: ignore[arg-type]
        with pytest.raises(InvalidError):
            md.set_string("", "v")
        with pytest.raises(InvalidError):
            md.created_at = -5
        with pytest.raises(InvalidError):
            md.cache_policy = "forever"
        with pytest.raises(NotFoundError):
            md.get_external("missing")
        assert md.description == "d"
        assert md.get_string("k") == ""
        assert state(cache) == before
        ref.release()


class TestReservedMetadata:
    """The cache's own keys, indexes and external values are refused by the public setters."""

    RESERVED = sorted(
        getattr(storage, name)
        for name in dir(storage)
        if name.startswith("KEY_")
        and getattr(storage, name)
        not in (storage.KEY_DESCRIPTION, storage.KEY_RECORD_TYPE, storage.KEY_LAYER_TYPE)
    )

    def test_every_structure_key_is_reserved(self) -> None:
        # Every key refcache defines lives in the reserved namespaces; the only ones a user
        # sets as strings are description, record type and layer type.
        keys = [name for name in dir(storage) if name.startswith("KEY_")]
        assert len(keys) >= 25
        assert len(self.RESERVED) == len(keys) - 3
        assert all(key.startswith(("cache.", "snapshot.")) for key in self.RESERVED)
        assert storage.KEY_CREATED_AT in self.RESERVED  # typed: through its property
        assert storage.KEY_CACHE_POLICY in self.RESERVED  # typed: through its property

    def test_the_attack_on_a_base_record_with_retained_descendants_is_refused(
        self, open_cache_at: Callable[[], Cache]
    ) -> None:
        cache = open_cache_at()
        base = committed(cache, retain=True, description="base")
        chain = [base]
        for i in range(5):
            chain.append(committed(cache, chain[-1], retain=True, description=f"child {i}"))
        ids = {ref.id for ref in chain}
        before = state(cache)
        md = base.metadata
        attacks: list[Callable[[], object]] = [
            lambda: md.set_string(storage.KEY_COMMITTED, ""),
            lambda: md.set_string(storage.KEY_PARENT, "x"),
            lambda: md.set_string(storage.KEY_MERGE_PARENTS, "x"),
            lambda: md.set_string(storage.KEY_DELETED, "1"),
            lambda: md.clear(storage.KEY_COMMITTED),
            lambda: md.clear(storage.KEY_SNAPSHOT),
            lambda: md.set_string("cache.somethingNew", "x"),  # the namespace, not a list
            lambda: md.set_external(storage.EXTERNAL_FILELIST, b'["etc/passwd"]'),
            lambda: md.set_string("user.k", "v", index=storage.INDEX_CHAIN + "sha256:00"),
            lambda: md.set_string("user.k", "v", index=storage.INDEX_BLOB_CHAIN + "sha256:0"),
        ]
        for attack in attacks:
            with pytest.raises(InvalidError, match="reserved"):
                attack()
        with pytest.raises(InvalidError, match=repr(storage.KEY_COMMITTED)):
            md.set_string(storage.KEY_COMMITTED, "")
        assert state(cache) == before
        for ref in chain:
            ref.release()
        cache.close()

        cache = open_cache_at()
        assert cache.load_report.cleared == []
        rows = usage(cache)
        assert len(rows) == 6  # the tip is an equal pair, listed once
        assert ids - {row.id for row in rows} == {chain[-1].id}  # (by its mutable's id)
        for ref in chain:
            cache.manager.get(ref.id).get(timeout=WAIT).release()
        assert cache.manager.search(storage.INDEX_CHAIN, prefix=True).get(timeout=WAIT) == []
        with pytest.raises(NotFoundError):
            cache.manager.get(base.id).get(timeout=WAIT).metadata.get_external(
                storage.EXTERNAL_FILELIST
            )

    @pytest.mark.parametrize("key", RESERVED)
    def test_each_reserved_key_is_refused_by_set_string_and_clear(
        self, cache: Cache, key: str
    ) -> None:
        ref = committed(cache, description="d")
        md = ref.metadata
        stored = md._get(key)
        with pytest.raises(InvalidError, match=f"{key!r}.*reserved"):
            md.set_string(key, "x")
        with pytest.raises(InvalidError, match=f"{key!r}.*reserved"):
            md.clear(key)
        assert md._get(key) == stored
        ref.release()

    def test_user_settable_keys_stay_settable(self, cache: Cache) -> None:
        ref = committed(cache)
        md = ref.metadata
        md.set_string(storage.KEY_DESCRIPTION, "by key")
        assert md.description == "by key"
        md.description = "by property"
        md.record_type = "internal"
        md.layer_type = "windows"
        md.created_at = 7
        md.cache_policy = "retain"
        md.clear(storage.KEY_LAYER_TYPE)
        info = ref.info()
        assert (info.description, info.record_type, info.created_at, info.cache_policy) == (
            "by property",
            "internal",
            7,
            "retain",
        )
        assert md.layer_type == ""
        ref.release()

    @pytest.mark.parametrize(
        "call",
        [
            pytest.param(lambda md: md.set_string(["k"], "v"), id="set-string-list-key"),
            pytest.param(lambda md: md.set_string(5, "v"), id="set-string-int-key"),
            pytest.param(lambda md: md.set_string("k", ["v"]), id="set-string-list-value"),
            pytest.param(lambda md: md.set_string("k", "v", index=5), id="set-string-int-index"),
            pytest.param(lambda md: md.set_string("k\x00", "v"), id="set-string-nul-key"),
            pytest.param(lambda md: md.get_string(["k"]), id="get-string-list-key"),
            pytest.param(lambda md: md.clear(["k"]), id="clear-list-key"),
            pytest.param(lambda md: md.clear("k", index_prefix=3), id="clear-int-prefix"),
            pytest.param(lambda md: md.set_external("k", "text"), id="external-str-data"),
            pytest.param(lambda md: md.set_external("k", None), id="external-none-data"),
            pytest.param(lambda md: md.set_external(b"k", b"v"), id="external-bytes-key"),
            pytest.param(lambda md: md.get_external({"k": 1}), id="get-external-dict-key"),
        ],
    )
    def test_wrong_types_are_invalid_and_write_nothing(
        self, cache: Cache, call: Callable[[Any], Any]
    ) -> None:
        ref = committed(cache, description="d")
        before = state(cache)
        with pytest.raises(InvalidError):
            call(ref.metadata)
        assert state(cache) == before
        assert ref.metadata.get_string("k") == ""
        with pytest.raises(NotFoundError):
            ref.metadata.get_external("k")
        ref.release()


# -- chains and walks ----------------------------------------------------------------------------


class TestLayerChain:
    """layer_chain clones the image layers (root first); walk_ancestors visits every parent."""

    def test_layer_chain_of_a_layer_stack(self, cache: Cache) -> None:
        a = committed(cache)
        b = committed(cache, a)
        c = committed(cache, b)
        with c.layer_chain() as chain:
            assert [r.id for r in chain] == [a.id, b.id, c.id]
            stats = cache.manager.statistics().get(timeout=WAIT)
            held = {rid: n for rid, n, _ in stats.records_detail if n}
            assert held == {a.id: 2, b.id: 2, c.id: 2}
        stats = cache.manager.statistics().get(timeout=WAIT)
        assert {rid: n for rid, n, _ in stats.records_detail if n} == {a.id: 1, b.id: 1, c.id: 1}
        assert c.walk_ancestors() == [c.id, b.id, a.id]
        for ref in (a, b, c):
            ref.release()

    def test_layer_chain_of_merges_and_diffs(self, cache: Cache) -> None:
        a = committed(cache)
        b = committed(cache, a)
        x = committed(cache)
        merged = cache.manager.merge([b, x]).get(timeout=WAIT)
        with merged.layer_chain() as chain:
            assert [r.id for r in chain] == [a.id, b.id, x.id]
        # walkAncestors: depth first, the last merge input first (BuildKit's stack order)
        assert merged.walk_ancestors() == [merged.id, x.id, b.id, a.id]

        on_top = cache.manager.diff(a, b).get(timeout=WAIT)  # b is one layer on a: reuse b
        with on_top.layer_chain() as chain:
            assert [r.id for r in chain] == [b.id]
        from_scratch = cache.manager.diff(a, None).get(timeout=WAIT)  # its own layer
        with from_scratch.layer_chain() as chain:
            assert [r.id for r in chain] == [from_scratch.id]
        assert from_scratch.walk_ancestors() == [from_scratch.id, a.id]
        for ref in (a, b, x, merged, on_top, from_scratch):
            ref.release()
        assert len(prune_all(cache)) == 6
        assert record_count(cache) == 0

    def test_diff_of_a_ref_with_itself_releases_cleanly(self, cache: Cache) -> None:
        a = committed(cache)
        d = cache.manager.diff(a, a).get(timeout=WAIT)
        assert d.info().parents == (a.id, a.id)
        assert d.walk_ancestors() == [d.id, a.id, a.id]
        with d.mount().local() as path:
            assert os.listdir(path) == []
        a.release()
        rows = usage(cache)
        assert sorted((r.id, r.in_use) for r in rows) == sorted([(a.id, True), (d.id, True)])
        d.release()
        assert sorted(r.in_use for r in usage(cache)) == [False, False]
        assert prune_all(cache) == [d.id, a.id]
        assert record_count(cache) == 0
        snapshots = cache.root / "snapshots"
        assert [n for n in os.listdir(snapshots) if not n.startswith(("new-", "rm-"))] == []


class TestDiskUsageArguments:
    """disk_usage filters and age limits."""

    def test_age_limit_hides_recently_used_records(self, cache: Cache) -> None:
        used = committed(cache)
        used.finalize()
        used.release()  # counted as a use now
        held = committed(cache)  # never released: never used
        held.finalize()
        rows = cache.manager.disk_usage(age_limit=timedelta(hours=1)).get(timeout=WAIT)
        assert [r.id for r in rows] == [held.id]
        rows = cache.manager.disk_usage(age_limit=timedelta(0)).get(timeout=WAIT)
        assert sorted(r.id for r in rows) == sorted([used.id, held.id])
        held.release()

    def test_releasing_a_used_retained_pair_counts_a_use_of_its_mutable(self, cache: Cache) -> None:
        m = new(cache, retain=True)
        i = m.commit()
        i.release()  # BuildKit: the equal mutable inherits the use (triggerLastUsed)
        rows = usage(cache)
        assert [(r.id, r.usage_count) for r in rows] == [(m.id, 1)]
        assert rows[0].last_used_at is not None


class TestLastUsed:
    """Which releases count as a use (BuildKit's ``updateLastUsed`` on release)."""

    def test_clones_and_no_update_handles_do_not_count_concurrent_users_count_once(
        self, cache: Cache
    ) -> None:
        ref = committed(cache)
        ref.finalize()
        ref.release()  # 1: the commit's handle counts

        def usage_count() -> int:
            (row,) = usage(cache)
            return row.usage_count

        assert usage_count() == 1
        quiet = cache.manager.get(ref.id, update_last_used=False).get(timeout=WAIT)
        quiet.clone().release()
        quiet.release()
        assert usage_count() == 1
        a = cache.manager.get(ref.id).get(timeout=WAIT)
        b = cache.manager.get(ref.id).get(timeout=WAIT)
        a.release()
        b.release()  # two concurrent users: one use, when the last of them goes
        assert usage_count() == 2
        with cache.manager.get(ref.id).get(timeout=WAIT) as c:
            c.clone().release()
        assert usage_count() == 3

    def test_a_child_release_does_not_count_a_use_of_its_parent(self, cache: Cache) -> None:
        parent = committed(cache)
        parent.finalize()
        parent.release()
        child = new(cache, parent)
        child.release()  # default policy: the child goes, and releases its hold
        rows = usage(cache)
        assert [(r.id, r.usage_count) for r in rows] == [(parent.id, 1)]


# -- the hot path: clone and release of held records ---------------------------------------------


@pytest.fixture
def handler_threads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """``(message class, ran on a pool worker)`` for each clone and release handled."""
    seen: list[tuple[str, bool]] = []
    for message in (CloneHandle, Release):
        original = CacheRecord._handlers[message]

        def traced(actor: Any, m: Any, original: Any = original) -> Any:
            seen.append((type(m).__name__, current_pool() is not None))
            return original(actor, m)

        monkeypatch.setitem(CacheRecord._handlers, message, traced)
    return seen


def wait_idle(ref: ImmutableRef) -> None:
    """Until the record actor has handled what the manager told it and is idle."""
    deadline = time.monotonic() + WAIT
    while run_here(ref._actor, CountHandles()) is NOT_RUN:
        assert time.monotonic() < deadline, "the record actor never became idle"
        time.sleep(0.001)  # sleep-ok: polling an actor's state with a deadline


class TestHotPath:
    """``clone()`` and a non-last ``release()`` are one message to the record actor, handled
    in the caller's thread when the actor is idle; refcounts stay exact."""

    @pytest.mark.parametrize("finalized", [False, True], ids=["pair", "finalized"])
    def test_clone_and_release_of_a_held_record_run_in_the_callers_thread(
        self, cache: Cache, handler_threads: list[tuple[str, bool]], finalized: bool
    ) -> None:
        held = committed(cache, retain=True)
        if finalized:
            held.finalize()
        wait_idle(held)
        handler_threads.clear()

        clones = [held.clone() for _ in range(20)]
        assert handle_counts(cache)[held.id] == 21
        for ref in clones:
            ref.release()

        assert handler_threads == [("CloneHandle", False)] * 20 + [("Release", False)] * 20
        assert handle_counts(cache)[held.id] == 1
        with pytest.raises(InvalidError, match=f"ref {held.id!r} was released"):
            clones[0].mount()
        held.release()
        assert held.id not in handle_counts(cache)

    def test_threads_cloning_and_releasing_keep_refcounts_exact(self, cache: Cache) -> None:
        held = [committed(cache, retain=True) for _ in range(4)]
        threads, rounds = 8, 300
        kept: list[list[ImmutableRef]] = [[] for _ in range(threads)]
        errors: list[BaseException] = []
        start = threading.Barrier(threads)

        def work(t: int) -> None:
            try:
                start.wait(WAIT)
                for i in range(rounds):
                    ref = held[(t + i) % len(held)].clone()
                    if i % 3 == 0:
                        kept[t].append(ref)  # still open at the end
                    else:
                        ref.release()
            except BaseException as exc:  # reported below
                errors.append(exc)

        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:  # the watchdog: every wait inside is bounded
            w.join(WAIT * 2)

        assert not any(w.is_alive() for w in workers)
        assert errors == []
        expected = {r.id: 1 for r in held}
        for refs in kept:
            for ref in refs:
                expected[ref.id] += 1
        assert handle_counts(cache) == expected
        for refs in kept:
            RefList(refs).release()
        RefList(held).release()
        assert handle_counts(cache) == {}

    def test_operation_counters_of_many_threads_add_up_exactly(self, cache: Cache) -> None:
        held = committed(cache, retain=True)
        before = cache.manager.statistics().get(timeout=WAIT)
        threads, rounds = 6, 200

        def work() -> None:
            for _ in range(rounds):
                held.clone().release()

        workers = [threading.Thread(target=work) for _ in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(WAIT)
        assert not any(w.is_alive() for w in workers)
        work()  # and this thread, which lives on

        n = (threads + 1) * rounds
        for _ in range(2):  # the ended threads' counts are folded in once, not twice
            stats = cache.manager.statistics().get(timeout=WAIT)
            for op in ("clone", "release"):
                count = stats.operations[(op, "ok")] - before.operations.get((op, "ok"), 0)
                assert count == n
                buckets = stats.latency_buckets[op]
                assert len(buckets) == len(LATENCY_BUCKETS)
                assert list(buckets) == sorted(buckets)  # cumulative
                assert buckets[-1] == stats.operations[(op, "ok")]  # none took 10 s
                assert stats.latency_sum_seconds[op] > 0
        held.release()

    def test_a_latency_on_a_bucket_bound_counts_in_that_bucket(self, cache: Cache) -> None:
        core = cache._core
        for seconds in (0.0005, 0.00051, 0.001, 10.0, 20.0):
            core.observe("probe", "ok", seconds)

        stats = cache.manager.statistics().get(timeout=WAIT)
        buckets = dict(zip(LATENCY_BUCKETS, stats.latency_buckets["probe"], strict=True))
        assert (buckets[0.0005], buckets[0.001], buckets[0.0025]) == (1, 3, 3)
        assert buckets[10.0] == 4  # 20 s is above every bound: only in the count
        assert stats.operations[("probe", "ok")] == 5
        assert stats.latency_sum_seconds["probe"] == pytest.approx(30.00201)


def handle_counts(cache: Cache) -> dict[str, int]:
    stats = cache.manager.statistics().get(timeout=WAIT)
    return {rid: n for rid, n, _ in stats.records_detail if n}
