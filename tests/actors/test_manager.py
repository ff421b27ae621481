"""The cache manager against BuildKit's ``cache/manager_test.go``.

Every test runs on a real cache in ``tmp_path`` (LMDB, content store, native snapshotter).
Counts are exact: ``check_disk_usage`` counts ``disk_usage`` rows in use and unused, and
``snapshot_dirs`` counts the physical snapshot directories left after prune or close.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from datetime import timedelta
from pathlib import Path

import pytest
from refcache.actors import (
    Cache,
    ClosedError,
    ImmutableRef,
    InvalidError,
    LockedError,
    MutableRef,
    NotFoundError,
    PrunePolicy,
    open_cache,
)
from refcache.actors._entry import RecordEntry
from refcache.storage import KEY_DELETED, Kind
from refcache.storage._leases import Resource

from refcache import storage

WAIT = 30.0


# -- helpers -------------------------------------------------------------------------------------


def item_fields(item: storage.StorageItem) -> dict[str, object]:
    """The stored field map of ``item`` (what the bulk load decodes)."""
    return {key: item.get(key) for key in item.keys()}  # noqa: SIM118 (not a dict)


def check_disk_usage(cache: Cache, inuse: int, unused: int) -> None:
    """Asserts that ``disk_usage`` shows exactly ``inuse`` records in use and ``unused`` not."""
    rows = cache.manager.disk_usage().get(timeout=WAIT)
    got = (sum(1 for r in rows if r.in_use), sum(1 for r in rows if not r.in_use))
    assert got == (inuse, unused), rows


def snapshot_dirs(cache_or_root: Cache | Path) -> int:
    """Physical snapshot directories under ``<root>/snapshots/`` (temporaries excluded)."""
    root = cache_or_root.root if isinstance(cache_or_root, Cache) else cache_or_root
    base = root / "snapshots"
    return sum(
        1
        for name in os.listdir(base)
        if (base / name).is_dir() and not name.startswith(("new-", "rm-"))
    )


def prune(cache: Cache, *policies: PrunePolicy) -> list[str]:
    """Runs a prune and returns the ids it reported."""
    return [r.id for r in cache.manager.prune(*policies).get(timeout=WAIT)]


def new(cache: Cache, parent: ImmutableRef | None = None, **kwargs: object) -> MutableRef:
    ref: MutableRef = cache.manager.new(parent, **kwargs).get(timeout=WAIT)
    return ref


def get(cache: Cache, record_id: str) -> ImmutableRef:
    ref: ImmutableRef = cache.manager.get(record_id).get(timeout=WAIT)
    return ref


def get_mutable(cache: Cache, record_id: str) -> MutableRef:
    ref: MutableRef = cache.manager.get_mutable(record_id).get(timeout=WAIT)
    return ref


def committed_with_file(
    cache: Cache, name: str, parent: ImmutableRef | None = None
) -> ImmutableRef:
    """New + write file ``name`` (content ``name``) + Commit."""
    m = new(cache, parent)
    with m.mount(readonly=False).local() as path:
        (path / name).write_text(name)
    return m.commit()


def usage_of(*paths: Path) -> int:
    """The filesystem's own block accounting of ``paths`` (as containerd's DiskUsage)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for p in paths:
        st = os.lstat(p)
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def tree_usage(root: Path) -> int:
    """Block usage of ``root`` and everything under it, each inode once."""
    paths = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        paths += [Path(dirpath) / n for n in dirnames + filenames]
    return usage_of(*paths)


def snapshot_path(cache: Cache, ref: ImmutableRef) -> Path:
    return cache.snapshotter.path(ref.info().snapshot_id)


# -- TestManager ----------------------------------------------------------------------------------


class TestManager:
    """The full refcount walk-through of BuildKit's TestManager, step by step."""

    def test_refcount_walk_through(self, cache: Cache) -> None:
        manager = cache.manager
        # 1. unknown id
        with pytest.raises(NotFoundError, match="foobar"):
            manager.get("foobar").get(timeout=WAIT)
        check_disk_usage(cache, 0, 0)

        # 2. a retained mutable; a writable mount is a directory; it is exclusive
        a = new(cache, retain=True)
        mountable = a.mount(readonly=False)
        assert not mountable.readonly
        with mountable.local() as path:
            assert path.is_dir()
        with pytest.raises(LockedError):
            get_mutable(cache, a.id)
        check_disk_usage(cache, 1, 0)

        # 3. commit: the pair is shown once (as the immutable); the mutable stays locked
        s = a.commit()
        check_disk_usage(cache, 1, 0)
        with pytest.raises(LockedError):
            get_mutable(cache, a.id)

        # 4. releasing the immutable shows the pair as the unused mutable
        s.release()
        check_disk_usage(cache, 0, 1)

        # 5. the mutable can be taken again (the unreferenced twin is dropped)
        a = get_mutable(cache, a.id)
        check_disk_usage(cache, 1, 0)
        with pytest.raises(NotFoundError):
            get(cache, s.id)

        # 6. commit + finalize: the mutable is gone; the immutable is not mutable
        s = a.commit()
        check_disk_usage(cache, 1, 0)
        s.finalize()
        s.release()
        with pytest.raises(NotFoundError):
            get_mutable(cache, a.id)
        with pytest.raises(InvalidError):
            get_mutable(cache, s.id)

        # 7. several handles on one immutable
        s = get(cache, s.id)
        s2 = get(cache, s.id)
        check_disk_usage(cache, 1, 0)
        s.release()

        # 8. a child holds its parent
        a2 = new(cache, s2, retain=True)
        check_disk_usage(cache, 2, 0)
        s3 = a2.commit()
        s2.release()
        check_disk_usage(cache, 2, 0)
        s3.release()
        check_disk_usage(cache, 0, 2)

        # 9. prune: a2 (with s3) in the first pass, s in the second
        reported = prune(cache)
        assert sorted(reported) == sorted([a2.id, s.id])
        check_disk_usage(cache, 0, 0)

        # 10. nothing is left on disk
        assert cache.leases.list() == []
        cache.close()
        assert snapshot_dirs(cache.root) == 0
        assert storage.check(cache.root) == []


# -- TestLazyCommit -------------------------------------------------------------------------------


class TestLazyCommit:
    """Equal pairs before finalize, and across restarts (BuildKit TestLazyCommit)."""

    def test_equal_pair_keeps_mutable_locked_until_its_immutable_is_unreferenced(
        self, cache: Cache
    ) -> None:
        a = new(cache, retain=True)
        s = a.commit()
        with pytest.raises(LockedError):
            get_mutable(cache, a.id)
        s2 = get(cache, s.id)
        assert s2.id == s.id
        s.release()
        s2.release()

        s = get(cache, s.id)  # still there after its handles went
        with pytest.raises(LockedError):
            get_mutable(cache, a.id)
        s.release()

        a2 = get_mutable(cache, a.id)
        assert a2.id == a.id
        with pytest.raises(NotFoundError, match=s.id):
            get(cache, s.id)

        # finalize: the mutable goes, the immutable stays
        s = a2.commit()
        s.finalize()
        s.release()
        with pytest.raises(NotFoundError):
            get_mutable(cache, a.id)
        s = get(cache, s.id)
        assert s.info().equal_mutable is None
        assert cache.snapshotter.stat(s.info().snapshot_id).kind == Kind.COMMITTED
        s.release()
        check_disk_usage(cache, 0, 1)

    def test_equal_pair_survives_restarts(self, open_cache_at: Callable[[], Cache]) -> None:
        # Restart A: an unfinalized pair with an open immutable handle at close.
        cache = open_cache_at()
        a = new(cache, retain=True)
        s = a.commit()
        a_id, s_id = a.id, s.id
        cache.close()

        cache = open_cache_at()
        s = get(cache, s_id)
        s.release()
        a = get_mutable(cache, a_id)
        with pytest.raises(NotFoundError):
            get(cache, s_id)
        s = a.commit()
        s_id = s.id
        cache.close()

        # Restart B: finalize after the restart removes the mutable.
        cache = open_cache_at()
        s = get(cache, s_id)
        s.finalize()
        s.release()
        with pytest.raises(NotFoundError):
            get_mutable(cache, a_id)
        check_disk_usage(cache, 0, 1)
        assert prune(cache) == [s_id]
        cache.close()
        assert snapshot_dirs(cache.root) == 0


# -- TestMergeOp ----------------------------------------------------------------------------------


class TestMergeOp:
    """Merges: flattening, hardlinked sizes, holds on inputs (BuildKit TestMergeOp)."""

    def test_merge_of_nothing_is_none(self, cache: Cache) -> None:
        assert cache.manager.merge([]).get(timeout=WAIT) is None
        assert cache.manager.merge([None]).get(timeout=WAIT) is None
        check_disk_usage(cache, 0, 0)

    def test_merge_holds_inputs_and_counts_only_its_own_blocks(self, cache: Cache) -> None:
        manager = cache.manager
        bases = [committed_with_file(cache, str(i)) for i in range(6)]
        for i, b in enumerate(bases):
            with b.mount().local() as path:
                expected = usage_of(path, path / str(i))
            assert b.size() == expected
            assert expected > 0

        # a merge of one input is that input itself (a new handle, no new record)
        single = manager.merge(bases[:1]).get(timeout=WAIT)
        assert single.id == bases[0].id
        mountable = single.mount(readonly=True)
        assert len(mountable.mounts) == 1
        assert mountable.mounts[0].type == "bind"
        with mountable.local() as path:
            assert sorted(os.listdir(path)) == ["0"]
        single.release()
        assert prune(cache, PrunePolicy(filters=(f"id=={single.id}",))) == []
        check_disk_usage(cache, 6, 0)

        m1 = manager.merge(bases[:3]).get(timeout=WAIT)
        assert not m1.info().mutable
        assert m1.info().kind == "merge"
        with m1.mount().local() as path:
            assert sorted(os.listdir(path)) == ["0", "1", "2"]
            # hardlinks to the inputs' files: only the merge's own directory is its usage
            base_file = snapshot_path(cache, bases[1]) / "1"
            assert os.lstat(path / "1").st_ino == os.lstat(base_file).st_ino
        assert m1.size() == usage_of(snapshot_path(cache, m1))
        check_disk_usage(cache, 7, 0)

        m2 = manager.merge(bases[3:]).get(timeout=WAIT)
        m2.mount()
        assert m2.size() == usage_of(snapshot_path(cache, m2))
        check_disk_usage(cache, 8, 0)

        for b in bases:
            b.release()
        check_disk_usage(cache, 8, 0)  # held by the merges

        m3 = manager.merge([m1, m2]).get(timeout=WAIT)
        assert m3.info().parents == tuple(b.id for b in bases)  # flattened
        m1.release()
        m2.release()
        m3.mount()
        assert m3.size() == usage_of(snapshot_path(cache, m3))
        check_disk_usage(cache, 7, 2)

        m3.release()
        check_disk_usage(cache, 0, 9)
        assert len(prune(cache)) == 9
        check_disk_usage(cache, 0, 0)
        assert snapshot_dirs(cache) == 0

    def test_new_on_a_merge_starts_from_the_merged_files(self, cache: Cache) -> None:
        a = committed_with_file(cache, "a")
        b = committed_with_file(cache, "b")
        merged = cache.manager.merge([a, b]).get(timeout=WAIT)
        child = new(cache, merged)  # BuildKit New extracts the parent first
        with child.mount().local() as path:
            assert sorted(os.listdir(path)) == ["a", "b"]
        child.release()
        for ref in (a, b, merged):
            ref.release()
        assert len(prune(cache)) == 3
        assert snapshot_dirs(cache) == 0

    def test_size_of_a_merge_before_extraction_is_not_cached(self, cache: Cache) -> None:
        a = committed_with_file(cache, "a")
        b = committed_with_file(cache, "b")
        merged = cache.manager.merge([a, b]).get(timeout=WAIT)
        assert merged.size() == 0  # nothing on disk yet
        rows = {r.id: r.size for r in cache.manager.disk_usage().get(timeout=WAIT)}
        assert rows[merged.id] == 0
        with merged.mount().local() as path:
            expected = usage_of(path)
        assert expected > 0
        assert merged.size() == expected
        rows = {r.id: r.size for r in cache.manager.disk_usage().get(timeout=WAIT)}
        assert rows[merged.id] == expected
        for ref in (a, b, merged):
            ref.release()


# -- TestDiffOp -----------------------------------------------------------------------------------


def committed(cache: Cache, parent: ImmutableRef | None = None, **kwargs: object) -> ImmutableRef:
    """New(parent) + Commit, nothing written."""
    return new(cache, parent, **kwargs).commit()


class TestDiffOp:
    """Diffs hold clones of their inputs; long diffs become merges (BuildKit TestDiffOp)."""

    def test_diff_holds_its_inputs_until_released(self, cache: Cache) -> None:
        lower, upper = committed(cache), committed(cache)
        d = cache.manager.diff(lower, upper).get(timeout=WAIT)
        assert d.info().kind == "diff"
        assert d.info().parents == (lower.id, upper.id)
        check_disk_usage(cache, 3, 0)
        lower.release()
        upper.release()
        check_disk_usage(cache, 3, 0)
        assert prune(cache) == []
        check_disk_usage(cache, 3, 0)
        mountable = d.mount(readonly=True)
        assert len(mountable.mounts) == 1
        d.release()
        check_disk_usage(cache, 0, 3)
        assert len(prune(cache)) == 3
        check_disk_usage(cache, 0, 0)
        assert snapshot_dirs(cache) == 0

    def test_diff_over_several_layers_is_a_merge_of_single_layer_diffs(self, cache: Cache) -> None:
        chain: list[ImmutableRef] = []
        for name in "abcde":
            chain.append(committed_with_file(cache, name, chain[-1] if chain else None))
        _, _, c, d, e = chain
        diff = cache.manager.diff(c, e).get(timeout=WAIT)
        info = diff.info()
        assert info.kind == "merge"
        assert len(info.parents) == 2
        pieces = [cache.manager.get(p).get(timeout=WAIT) for p in info.parents]
        assert [p.info().parents for p in pieces] == [(c.id, d.id), (d.id, e.id)]
        assert [p.info().description for p in pieces] == [
            f'diff "{c.id}" -> "{d.id}"',
            f'diff "{d.id}" -> "{e.id}"',
        ]
        for p in pieces:
            p.release()
        check_disk_usage(cache, 8, 0)  # 5 layers + 2 diffs + 1 merge
        for ref in chain:
            ref.release()
        check_disk_usage(cache, 8, 0)
        assert prune(cache) == []
        check_disk_usage(cache, 8, 0)
        with diff.mount(readonly=True).local() as path:
            assert sorted(os.listdir(path)) == ["d", "e"]
        diff.release()
        check_disk_usage(cache, 0, 8)
        assert len(prune(cache)) == 8
        check_disk_usage(cache, 0, 0)
        assert snapshot_dirs(cache) == 0

    def test_diff_with_no_upper(self, cache: Cache) -> None:
        lower = committed(cache)
        d = cache.manager.diff(lower, None).get(timeout=WAIT)
        assert d.info().parents == (lower.id,)
        check_disk_usage(cache, 2, 0)
        lower.release()
        d.release()
        check_disk_usage(cache, 0, 2)
        assert len(prune(cache)) == 2
        check_disk_usage(cache, 0, 0)

    def test_diff_without_lower_is_invalid_and_changes_nothing(self, cache: Cache) -> None:
        upper = committed(cache)
        with pytest.raises(InvalidError, match="lower"):
            cache.manager.diff(None, upper).get(timeout=WAIT)
        check_disk_usage(cache, 1, 0)
        upper.release()  # the last ref of a default-policy pair: both records go (BuildKit)
        check_disk_usage(cache, 0, 0)


# -- TestLoadHalfFinalizedRef ---------------------------------------------------------------------


class TestLoadHalfFinalizedRef:
    """A crash between the snapshot commit and the metadata update of a finalize."""

    def test_half_finalized_pair_falls_back_to_its_immutable(
        self, open_cache_at: Callable[[], Cache]
    ) -> None:
        cache = open_cache_at()
        m = new(cache, retain=True)
        m_id, m_snapshot = m.id, m.info().snapshot_id
        i = m.commit()
        m.release()  # consumed by the commit: a counted no-op (docs/API.md)
        i_snapshot = i.info().snapshot_id
        assert cache.snapshotter.stat(m_snapshot).kind == Kind.ACTIVE

        # By hand, what finalize does before its metadata update: lease, snapshot commit.
        cache.leases.create(i.id, flat=True)
        cache.leases.add_resource(i.id, Resource(i_snapshot, f"snapshots/{cache.snapshotter.name}"))
        cache.snapshotter.commit(i_snapshot, m_snapshot)
        with pytest.raises(NotFoundError):
            cache.snapshotter.stat(m_snapshot)
        i.release()
        cache.close()

        cache = open_cache_at()
        assert cache.load_report.recovered_half_finalized == [i.id]
        with pytest.raises(NotFoundError):
            get_mutable(cache, m_id)
        i = get(cache, i.id)
        assert i.info().equal_mutable is None
        i.finalize()
        assert cache.snapshotter.stat(i.info().snapshot_id).kind == Kind.COMMITTED
        i.release()
        check_disk_usage(cache, 0, 1)
        assert prune(cache) == [i.id]
        cache.close()
        assert snapshot_dirs(cache.root) == 0


# -- TestLoadBrokenParents ------------------------------------------------------------------------


class TestLoadBrokenParents:
    """A record whose parent cannot load is cleared, leaking no hold on other parents."""

    def test_deleted_parent_clears_its_children_and_leaks_no_holds(
        self, open_cache_at: Callable[[], Cache]
    ) -> None:
        cache = open_cache_at()
        ref_a = committed(cache)
        ref_b = committed(cache)
        merged = cache.manager.merge([ref_a, ref_b]).get(timeout=WAIT)
        check_disk_usage(cache, 3, 0)
        item = cache.metadata.get(ref_b.id)
        item.set(KEY_DELETED, True)
        a_id, b_id, merged_id = ref_a.id, ref_b.id, merged.id
        cache.close()  # with the three handles still open

        cache = open_cache_at()
        assert cache.load_report.finished_deletes == [b_id]
        assert [rid for rid, _ in cache.load_report.cleared] == [merged_id]
        check_disk_usage(cache, 0, 1)
        ref_a = get(cache, a_id)
        stats = cache.manager.statistics().get(timeout=WAIT)
        assert stats.records == 1
        assert stats.open_handles == 1
        assert [(rid, n) for rid, n, _ in stats.records_detail] == [(a_id, 1)]
        for rid in (b_id, merged_id):
            with pytest.raises(NotFoundError, match=rid):
                get(cache, rid)
        ref_a.release()
        # refA is held by nothing: the failed merge load left no hold on it.
        assert prune(cache) == [a_id]
        check_disk_usage(cache, 0, 0)
        cache.close()
        assert snapshot_dirs(cache.root) == 0

    def test_descendants_of_a_broken_record_are_cleared_with_their_leases(
        self, open_cache_at: Callable[[], Cache]
    ) -> None:
        cache = open_cache_at()
        a = committed(cache)
        b = committed(cache, a)
        c = committed(cache, b)
        c.finalize()
        other = committed(cache)
        other.finalize()
        cache.metadata.get(a.id).set(KEY_DELETED, True)
        for ref in (a, b, c, other):
            ref.release()
        cache.close()

        cache = open_cache_at()
        assert cache.load_report.finished_deletes == [a.id]
        assert sorted(rid for rid, _ in cache.load_report.cleared) == sorted([b.id, c.id])
        check_disk_usage(cache, 0, 1)
        assert [lease.id for lease in cache.leases.list()] == [other.id]
        assert prune(cache) == [other.id]
        cache.close()
        assert snapshot_dirs(cache.root) == 0
        assert storage.check(cache.root) == []


# -- TestMountReadOnly ----------------------------------------------------------------------------


class TestMountReadOnly:
    """Mount options: ro/rw for mutables; an immutable mount is always read-only."""

    def test_read_only_mounts(self, cache: Cache) -> None:
        mutable = new(cache)
        for _ in range(2):
            rw = mutable.mount(readonly=False)
            assert len(rw.mounts) == 1
            assert not rw.readonly
            assert "rw" in rw.mounts[0].options
            assert "ro" not in rw.mounts[0].options

            ro = mutable.mount(readonly=True)
            assert len(ro.mounts) == 1
            assert ro.readonly
            assert "ro" in ro.mounts[0].options
            assert "rw" not in ro.mounts[0].options

            immutable = mutable.commit()
            ro = immutable.mount(readonly=True)
            assert len(ro.mounts) == 1
            assert ro.readonly
            assert "ro" in ro.mounts[0].options

            rw = immutable.mount(readonly=False)  # still read-only once immutable
            assert len(rw.mounts) == 1
            assert rw.readonly
            assert "ro" in rw.mounts[0].options
            assert "rw" not in rw.mounts[0].options

            # repeat with a ref that has a parent
            mutable = new(cache, immutable)
            immutable.release()
        mutable.release()


# -- TestPrune ------------------------------------------------------------------------------------


class TestPrune:
    """Prune deletes leaves first, and only what nobody holds (BuildKit TestPrune)."""

    def test_prune_walk_through(self, cache: Cache) -> None:
        # 1. a finalized parent and a retained child pair
        s = committed(cache)
        a2 = new(cache, s, retain=True)  # finalizes s
        s2 = a2.commit()
        check_disk_usage(cache, 2, 0)
        assert snapshot_dirs(cache) == 2

        # 2. nothing is unreferenced
        assert prune(cache) == []
        check_disk_usage(cache, 2, 0)
        assert snapshot_dirs(cache) == 2

        # 3. the child pair goes as one unit
        s2.release()
        check_disk_usage(cache, 1, 1)
        assert prune(cache) == [a2.id]
        check_disk_usage(cache, 1, 0)
        assert snapshot_dirs(cache) == 1

        # 4. a released handle still names a live record: New on it works
        s.release()
        a3 = new(cache, s, retain=True)
        s2 = a3.commit()
        before = cache.manager.statistics().get(timeout=WAIT).double_releases_total
        s.release()  # again: a counted no-op
        after = cache.manager.statistics().get(timeout=WAIT).double_releases_total
        assert after == before + 1
        check_disk_usage(cache, 2, 0)
        assert prune(cache) == []

        # 5. everything goes, leaf first
        s2.release()
        check_disk_usage(cache, 0, 2)
        assert prune(cache) == [a3.id, s.id]
        check_disk_usage(cache, 0, 0)
        assert snapshot_dirs(cache) == 0

    def test_internal_and_frontend_records_are_pruned_only_with_all(self, cache: Cache) -> None:
        kept = []
        for record_type in ("internal", "frontend"):
            ref = committed(cache)
            ref.finalize()
            ref.metadata.record_type = record_type  # seen by prune at once
            ref.release()
            kept.append(ref.id)
        regular = committed(cache)
        regular.finalize()
        regular.release()
        assert prune(cache, PrunePolicy()) == [regular.id]
        assert sorted(prune(cache, PrunePolicy(all=True))) == sorted(kept)

    def test_keep_duration_protects_recently_used_records(self, cache: Cache) -> None:
        used = committed(cache)
        used.finalize()
        used.release()  # a counted use, just now
        assert prune(cache, PrunePolicy(keep_duration=timedelta(hours=1))) == []
        assert prune(cache, PrunePolicy(keep_duration=timedelta(0))) == [used.id]

    def test_keep_duration_does_not_protect_never_used_records(
        self, open_cache_at: Callable[[], Cache]
    ) -> None:
        cache = open_cache_at()
        never = committed(cache)
        never.finalize()
        cache.close()  # held at close: never released with a counted use

        cache = open_cache_at()
        assert prune(cache, PrunePolicy(keep_duration=timedelta(hours=1))) == [never.id]

    def test_prune_filters_select_records(self, cache: Cache) -> None:
        a = committed(cache, description="build step a")
        b = committed(cache, description="other")
        for ref in (a, b):
            ref.finalize()
            ref.release()
        assert prune(cache, PrunePolicy(filters=("description~=^build",))) == [a.id]
        assert prune(cache, PrunePolicy(filters=(f"id=={a.id}",))) == []
        assert prune(cache, PrunePolicy(filters=("inuse",))) == []  # prune never sets inuse
        assert prune(cache, PrunePolicy(filters=("description==other",))) == [b.id]

    def test_max_used_space_deletes_least_recently_used_first(self, cache: Cache) -> None:
        refs = [committed_with_file(cache, name) for name in "abc"]
        for ref in refs:  # used in order: a is the least recently used
            ref.finalize()
            ref.release()
        sizes = {r.id: r.size for r in cache.manager.disk_usage().get(timeout=WAIT)}
        assert len(set(sizes.values())) == 1
        size = sizes[refs[0].id]
        policy = PrunePolicy(all=True, max_used_space=2 * size + 1)
        assert prune(cache, policy) == [refs[0].id]
        check_disk_usage(cache, 0, 2)


class TestDiskUsage:
    """In-use propagation from unreferenced children (BuildKit's ``DiskUsage``)."""

    def test_parent_held_only_by_an_unused_retained_pair_is_not_in_use(self, cache: Cache) -> None:
        parent = committed(cache)
        child = new(cache, parent, retain=True)
        twin = child.commit()
        twin.release()  # the pair is kept (retain) and shown as its unused mutable
        parent.release()
        rows = {r.id: (r.mutable, r.in_use) for r in cache.manager.disk_usage().get(timeout=WAIT)}
        # The pair holds the parent twice (mutable and twin): doubleRef subtracts both.
        assert rows == {parent.id: (False, False), child.id: (True, False)}
        assert prune(cache) == [child.id, parent.id]


class TestRestart:
    """What survives a close and reopen of the same root (BuildKit's ``init``)."""

    def test_usage_statistics_and_open_records_survive_a_restart(
        self, open_cache_at: Callable[[], Cache], caplog: pytest.LogCaptureFixture
    ) -> None:
        cache = open_cache_at()
        used = committed(cache)
        used.finalize()
        used.release()
        used = get(cache, used.id)
        used.release()  # two uses
        before = {
            r.id: (r.usage_count, r.last_used_at)
            for r in cache.manager.disk_usage().get(timeout=WAIT)
        }
        scratch = new(cache)  # default policy, still open at close: kept, unused after
        with caplog.at_level("WARNING", logger="refcache.actors._cache"):
            cache.close()
        assert "with 1 open handles" in caplog.text

        cache = open_cache_at()
        rows = {r.id: r for r in cache.manager.disk_usage().get(timeout=WAIT)}
        assert sorted(rows) == sorted([used.id, scratch.id])
        assert (rows[used.id].usage_count, rows[used.id].last_used_at) == before[used.id]
        assert rows[used.id].usage_count == 2
        assert (rows[scratch.id].mutable, rows[scratch.id].in_use) == (True, False)
        assert sorted(prune(cache)) == sorted([used.id, scratch.id])

    def test_mutable_without_its_snapshot_is_cleared_at_open(
        self, open_cache_at: Callable[[], Cache]
    ) -> None:
        cache = open_cache_at()
        m = new(cache, retain=True)
        child_of_nothing = committed(cache)
        child_of_nothing.finalize()
        m_id = m.id
        cache.snapshotter.remove(m.info().snapshot_id)  # lost behind the manager's back
        m.release()  # retained: kept
        child_of_nothing.release()
        cache.close()

        cache = open_cache_at()
        assert [rid for rid, _ in cache.load_report.cleared] == [m_id]
        with pytest.raises(NotFoundError, match=m_id):
            get_mutable(cache, m_id)
        check_disk_usage(cache, 0, 1)
        # its lease went with it; the other record keeps its own
        assert [lease.id for lease in cache.leases.list()] == [child_of_nothing.id]

    def test_open_reads_snapshots_in_one_batch_and_clears_the_broken(
        self, cache_root: Path
    ) -> None:
        """Open checks every mutable's active snapshot in one batched read, no stat per
        record, and still clears exactly the pairs whose snapshot is gone or not active."""
        cache = open_cache(cache_root, snapshotter="native", timeout=WAIT)
        pairs = []
        for _ in range(6):
            m = new(cache, retain=True)
            i = m.commit()
            pairs.append((m.id, i.id))
            i.release()
        lost_m, lost_i = pairs[0]
        committed_m, committed_i = pairs[1]
        # Lost behind the manager's back; and one made a committed snapshot under the same key.
        cache.snapshotter.remove(lost_m)
        cache.snapshotter.remove(committed_m)
        cache.snapshotter.prepare("scratch-" + committed_m)
        cache.snapshotter.commit(committed_m, "scratch-" + committed_m)
        cache.close()

        calls: dict[str, int] = {"stat": 0, "kinds": 0}

        class Counting(storage.NativeSnapshotter):
            def stat(self, key: str) -> storage.SnapshotInfo:
                calls["stat"] += 1
                return super().stat(key)

            def kinds(self, keys: Iterable[str]) -> dict[str, Kind]:
                calls["kinds"] += 1
                return super().kinds(keys)

        cache = open_cache(cache_root, snapshotter=Counting, timeout=WAIT)
        try:
            # One batch for all; a stat only for each broken pair's immutable (was the pair
            # finalized half-way? Its own snapshot says).
            assert calls == {"stat": 2, "kinds": 1}
            cleared = dict(cache.load_report.cleared)
            assert sorted(cleared) == sorted([lost_m, lost_i, committed_m, committed_i])
            assert "no active snapshot" in cleared[lost_m]
            assert "no active snapshot" in cleared[committed_m]
            assert "equal mutable" in cleared[lost_i]
            assert cache.load_report.loaded == 8
            check_disk_usage(cache, 0, 4)
            for rid in (lost_m, lost_i, committed_m, committed_i):
                with pytest.raises(NotFoundError, match=rid):
                    get(cache, rid)
            for m_id, i_id in pairs[2:]:
                get(cache, i_id).release()
                get_mutable(cache, m_id).release()
        finally:
            cache.close()

    def test_open_builds_the_entries_a_stored_item_gives(
        self, open_cache_at: Callable[[], Cache], cache_root: Path
    ) -> None:
        """The bulk load (fields straight into entries) and ``from_item`` agree on every
        kind of record: layers, a merge, a diff, a lazy-commit pair, a described one."""
        cache = open_cache_at()
        a = committed(cache)
        a.finalize()
        b = committed(cache, a)
        b.finalize()
        merged = cache.manager.merge([a, b]).get(timeout=WAIT)
        diffed = cache.manager.diff(a, b).get(timeout=WAIT)
        m = new(cache, b, retain=True, description="a pair")
        i = m.commit()
        for ref in (a, b, merged, diffed, i):
            ref.release()
        cache.close()
        env = storage.MetaEnv(cache_root / "meta")
        try:
            items = storage.MetadataStore(env).all()
        finally:
            env.close()
        assert len(items) == 6
        shared: dict[str, str] = {}
        for item in items:
            built = RecordEntry.from_fields(
                item.id, item_fields(item), lambda text: shared.setdefault(text, text)
            )
            assert built is not None
            fast, deleted = built
            slow = RecordEntry.from_item(item)
            assert deleted is False
            assert {k: getattr(fast, k) for k in RecordEntry.__slots__} == {
                k: getattr(slow, k) for k in RecordEntry.__slots__
            }

    def test_a_value_of_the_wrong_type_clears_the_record_naming_the_key(
        self, open_cache_at: Callable[[], Cache]
    ) -> None:
        cache = open_cache_at()
        bad = committed(cache)
        bad.finalize()
        good = committed(cache)
        good.finalize()
        bad_id, good_id = bad.id, good.id
        bad.release()
        good.release()
        cache.metadata.get(bad_id).set("cache.description", 5)  # the store checks no types
        cache.close()

        cache = open_cache_at()
        cleared = dict(cache.load_report.cleared)
        assert list(cleared) == [bad_id]
        assert "corrupt metadata" in cleared[bad_id]
        assert "cache.description" in cleared[bad_id]
        get(cache, good_id).release()
        with pytest.raises(NotFoundError, match=bad_id):
            get(cache, bad_id)

    def test_handles_of_a_closed_cache_fail_clearly(self, cache: Cache) -> None:
        ref = committed(cache)
        cache.close()
        with pytest.raises(ClosedError, match="closed"):
            ref.info()
        with pytest.raises(ClosedError, match="closed"):
            ref.release()
        with pytest.raises(ClosedError, match="closed"):
            ref.clone()


# TestSharableMountPoolCleanup is not ported: refcache has no mount pool (yet).
