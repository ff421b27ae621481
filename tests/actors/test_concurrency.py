"""Many threads on shared records: no deadlock, exact refcounts, everything prunable after.

Every wait has a timeout, and a watchdog dumps all stacks (faulthandler) and fails the run
when it exceeds its bound, so a deadlock shows where every thread was blocked.
"""

from __future__ import annotations

import faulthandler
import os
import random
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from refcache.actors import (
    Cache,
    ImmutableRef,
    InvalidError,
    LockedError,
    MutableRef,
    NotFoundError,
    open_cache,
)
from refcache.actors._messages import Unreferenced
from refcache.actors._record_messages import Release

from refcache import storage

WAIT = 30.0
THREADS = 12
OPS_PER_THREAD = 40
RUN_BOUND = 90.0  #: seconds the whole threaded run may take before the watchdog fires


def snapshot_dirs(root: Path) -> int:
    base = root / "snapshots"
    return sum(
        1
        for name in os.listdir(base)
        if (base / name).is_dir() and not name.startswith(("new-", "rm-"))
    )


def handle_counts(cache: Cache) -> dict[str, int]:
    stats = cache.manager.statistics().get(timeout=WAIT)
    return {rid: n for rid, n, _ in stats.records_detail if n}


#: The operations of the brief: handle and record creation on shared records.
BASIC_OPS = ("clone", "get", "get", "new", "commit", "merge", "diff", "release", "release")
#: Plus everything that races with them: finalize, size, mount, prune, disk usage,
#: get_mutable of published mutables, clones of released handles, layer chains, metadata.
EXTENDED_OPS = (
    *BASIC_OPS,
    "finalize",
    "size",
    "mount",
    "prune",
    "du",
    "get_mutable",
    "clone_released",
    "layer_chain",
    "metadata",
)


@dataclass
class Worker:
    """One thread's handles and what went wrong (owned by that thread until it is joined)."""

    seed: int
    immutables: list[ImmutableRef] = field(default_factory=list)
    mutables: list[MutableRef] = field(default_factory=list)
    released: list[ImmutableRef] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    ops: Counter[str] = field(default_factory=Counter)


class SharedIds:
    """Ids of records every thread may ``get`` (guarded by a lock: it lives outside actors)."""

    def __init__(self, seeds: list[str]) -> None:
        self._lock = threading.Lock()
        self.seeds = list(seeds)
        self._published: list[str] = []

    def publish(self, record_id: str) -> None:
        with self._lock:
            self._published.append(record_id)

    def pick(self, rng: random.Random) -> tuple[str, bool]:
        """Returns ``(id, is_seed)``."""
        with self._lock:
            published = list(self._published)
        if published and rng.random() < 0.5:
            return rng.choice(published), False
        return rng.choice(self.seeds), True


def run_worker(cache: Cache, worker: Worker, shared: SharedIds, ops: tuple[str, ...]) -> None:
    """Runs ``OPS_PER_THREAD`` random operations; stops at the first unexpected error."""
    rng = random.Random(worker.seed)
    for _ in range(OPS_PER_THREAD):
        op = rng.choice(ops)
        try:
            done = apply_op(cache, worker, shared, rng, op)
        except BaseException:  # reported by the test thread, with where it happened
            worker.errors.append(f"{op}:\n{traceback.format_exc()}")
            return
        worker.ops[done] += 1


def apply_op(cache: Cache, w: Worker, shared: SharedIds, rng: random.Random, op: str) -> str:
    """Applies one operation; returns its name as counted (``skip`` when not applicable)."""
    manager = cache.manager
    if op == "clone" and w.immutables:
        w.immutables.append(rng.choice(w.immutables).clone())
    elif op == "get":
        rid, is_seed = shared.pick(rng)
        try:
            w.immutables.append(manager.get(rid).get(timeout=WAIT))
        except LockedError:
            return "get-locked"  # a published mutable that someone holds
        except NotFoundError:
            # A published default-policy pair goes with its last handle, or is pruned
            # (BuildKit); a seed (retained, finalized, held by the fixture) never does.
            if is_seed:
                raise
            return "get-gone"
    elif op == "new":
        parent = rng.choice(w.immutables) if w.immutables and rng.random() < 0.7 else None
        m = manager.new(parent, retain=rng.random() < 0.5).get(timeout=WAIT)
        w.mutables.append(m)
        shared.publish(m.id)
    elif op == "commit" and w.mutables:
        i = w.mutables.pop(rng.randrange(len(w.mutables))).commit()
        w.immutables.append(i)
        shared.publish(i.id)
    elif op == "merge" and len(w.immutables) >= 2:
        inputs = rng.sample(w.immutables, rng.choice([1, 2, 3][: len(w.immutables)]))
        w.immutables.append(manager.merge(inputs).get(timeout=WAIT))
    elif op == "diff" and w.immutables:
        lower = rng.choice(w.immutables)
        upper = rng.choice([*w.immutables, None])
        w.immutables.append(manager.diff(lower, upper).get(timeout=WAIT))
    elif op == "release" and (w.immutables or w.mutables):
        pool: list[ImmutableRef | MutableRef] = [*w.immutables, *w.mutables]
        ref = rng.choice(pool)
        ref.release()
        if isinstance(ref, ImmutableRef):
            w.immutables.remove(ref)
            w.released.append(ref)
        else:
            w.mutables.remove(ref)
    elif op == "finalize" and w.immutables:
        rng.choice(w.immutables).finalize()
    elif op == "size" and w.immutables:
        assert rng.choice(w.immutables).size() >= 0
    elif op == "mount" and w.immutables:
        with rng.choice(w.immutables).mount().local() as path:
            assert path.is_dir()
    elif op == "prune":
        manager.prune().get(timeout=WAIT)
    elif op == "du":
        manager.disk_usage().get(timeout=WAIT)
    elif op == "get_mutable":
        rid, _ = shared.pick(rng)
        try:
            w.mutables.append(manager.get_mutable(rid).get(timeout=WAIT))
        except (NotFoundError, LockedError, InvalidError):
            return "get_mutable-refused"
    elif op == "clone_released" and w.released:
        try:
            w.immutables.append(rng.choice(w.released).clone())
        except NotFoundError:
            return "clone_released-gone"  # pruned meanwhile
    elif op == "layer_chain" and w.immutables:
        with rng.choice(w.immutables).layer_chain() as chain:
            assert chain
    elif op == "metadata" and w.immutables:
        ref = rng.choice(w.immutables)
        ref.metadata.set_string("test.key", f"v{rng.random()}")
        assert ref.metadata.get_string("test.key").startswith("v")
    else:
        return "skip"
    return op


@pytest.fixture
def seeded_cache(cache: Cache) -> Iterator[tuple[Cache, list[ImmutableRef]]]:
    """A cache with a few retained, finalized records that are never removed during a run."""
    seeds: list[ImmutableRef] = []
    parent: ImmutableRef | None = None
    for i in range(4):
        m = cache.manager.new(parent if i % 2 else None, retain=True).get(timeout=WAIT)
        with m.mount(readonly=False).local() as path:
            (path / f"seed{i}").write_text(str(i))
        ref = m.commit()
        ref.finalize()
        seeds.append(ref)
        parent = ref
    yield cache, seeds
    for ref in seeds:
        if not ref.released:
            ref.release()


class TestManyThreads:
    """12 threads doing random operations on shared records."""

    @pytest.mark.parametrize(
        ("ops", "seed"),
        [
            pytest.param(BASIC_OPS, 1, id="basic-1"),
            pytest.param(BASIC_OPS, 2, id="basic-2"),
            pytest.param(BASIC_OPS, 3, id="basic-3"),
            pytest.param(EXTENDED_OPS, 4, id="extended-4"),
            pytest.param(EXTENDED_OPS, 5, id="extended-5"),
            pytest.param(EXTENDED_OPS, 6, id="extended-6"),
        ],
    )
    def test_random_operations_keep_exact_refcounts(
        self,
        seeded_cache: tuple[Cache, list[ImmutableRef]],
        ops: tuple[str, ...],
        seed: int,
    ) -> None:
        cache, seeds = seeded_cache
        shared = SharedIds([s.id for s in seeds])
        workers = [Worker(seed * 1000 + n) for n in range(THREADS)]
        threads = [
            threading.Thread(
                target=run_worker, args=(cache, w, shared, ops), name=f"worker-{n}", daemon=True
            )
            for n, w in enumerate(workers)
        ]
        fired = threading.Event()

        def watchdog() -> None:
            fired.set()
            sys.stderr.write(f"watchdog: the run took more than {RUN_BOUND} s; stacks:\n")
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)

        timer = threading.Timer(RUN_BOUND, watchdog)
        timer.daemon = True
        timer.start()
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=RUN_BOUND + 5)
        finally:
            timer.cancel()
        if fired.is_set() or any(t.is_alive() for t in threads):
            pytest.fail(f"the threaded run did not finish within {RUN_BOUND} s (stacks above)")
        errors = [e for w in workers for e in w.errors]
        assert not errors, errors[0]
        assert sum(sum(w.ops.values()) for w in workers) == THREADS * OPS_PER_THREAD

        # Exact refcounts: every handle a thread still holds is counted, and nothing else.
        held: Counter[str] = Counter()
        for ref in seeds:
            held[ref.id] += 1
        for w in workers:
            for r in [*w.immutables, *w.mutables]:
                held[r.id] += 1
        assert handle_counts(cache) == dict(held)
        stats = cache.manager.statistics().get(timeout=WAIT)
        assert stats.open_handles == sum(held.values())

        # Release everything: prune leaves nothing, on disk either.
        for w in workers:
            for r in [*w.immutables, *w.mutables]:
                r.release()
        for ref in seeds:
            ref.release()
        assert handle_counts(cache) == {}
        rows = cache.manager.disk_usage().get(timeout=WAIT)
        assert [r.id for r in rows if r.in_use] == []
        cache.manager.prune().get(timeout=WAIT)
        stats = cache.manager.statistics().get(timeout=WAIT)
        assert (stats.records, stats.open_handles) == (0, 0)
        assert cache.manager.disk_usage().get(timeout=WAIT) == []
        assert snapshot_dirs(cache.root) == 0
        assert cache.leases.list() == []
        assert storage.check(cache.root) == []

    def test_concurrent_clone_and_release_of_one_record(self, cache: Cache) -> None:
        m = cache.manager.new().get(timeout=WAIT)
        base = m.commit()
        base.finalize()
        start = threading.Barrier(THREADS)
        errors: list[BaseException] = []

        def churn() -> None:
            try:
                start.wait(timeout=WAIT)
                for _ in range(50):
                    ref = base.clone()
                    again = cache.manager.get(base.id).get(timeout=WAIT)
                    ref.release()
                    again.release()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=churn, daemon=True) for _ in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=WAIT * 2)
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        assert handle_counts(cache) == {base.id: 1}
        info = base.info()
        assert info.usage_count == 0  # still held: uses count when the last user ref goes
        base.release()
        assert cache.manager.statistics().get(timeout=WAIT).open_handles == 0

    def test_concurrent_prunes_are_serialised(self, cache: Cache) -> None:
        refs = []
        for _ in range(6):
            ref = cache.manager.new().get(timeout=WAIT).commit()
            ref.finalize()
            refs.append(ref)
        for ref in refs:
            ref.release()
        futures = [cache.manager.prune() for _ in range(4)]
        reported = [r.id for f in futures for r in f.get(timeout=WAIT)]
        assert sorted(reported) == sorted(r.id for r in refs)
        assert cache.manager.statistics().get(timeout=WAIT).records == 0


class Gate:
    """Keeps a cache's only I/O worker busy until :meth:`open` (the jobs queue behind it)."""

    def __init__(self, cache: Cache) -> None:
        self._cache = cache
        self._event = threading.Event()

    def close(self) -> None:
        self._cache._core.executor.submit(self._event.wait, WAIT)

    def open(self) -> None:
        self._event.set()


class TestRacesWithSlowJobs:
    """Releases racing a job that is still queued on the I/O executor."""

    @pytest.fixture
    def slow_cache(self, tmp_path: Path) -> Iterator[tuple[Cache, Gate]]:
        """A cache with one I/O worker, and a gate that keeps that worker busy."""
        cache = open_cache(tmp_path / "slow", snapshotter="native", io_workers=1, timeout=WAIT)
        gate = Gate(cache)
        try:
            yield cache, gate
        finally:
            gate.open()
            cache.close()

    def test_new_on_a_pair_whose_last_handle_goes_before_the_job_runs(
        self, slow_cache: tuple[Cache, Gate]
    ) -> None:
        cache, gate = slow_cache
        parent = cache.manager.new().get(timeout=WAIT).commit()  # default policy, lazy commit
        mutable_id = parent.info().equal_mutable
        assert mutable_id is not None
        gate.close()
        future = cache.manager.new(parent)
        cache.manager.statistics().get(timeout=WAIT)  # the manager has taken its hold
        parent.release()  # the caller's own handle: new() does not consume it
        with pytest.raises(LockedError):  # the pair is held by the child being created
            cache.manager.get_mutable(mutable_id).get(timeout=WAIT)
        gate.open()
        child = future.get(timeout=WAIT)
        assert child.info().parents == (parent.id,)
        parent_again = cache.manager.get(parent.id).get(timeout=WAIT)
        assert parent_again.info().equal_mutable is None  # finalized by the child's job
        with pytest.raises(NotFoundError):
            cache.manager.get_mutable(mutable_id).get(timeout=WAIT)
        parent_again.release()
        child.release()  # a default-policy mutable: removed on release
        assert [r.id for r in cache.manager.prune().get(timeout=WAIT)] == [parent.id]
        assert cache.manager.statistics().get(timeout=WAIT).records == 0

    def test_merge_of_pairs_whose_last_handles_go_before_the_job_runs(
        self, slow_cache: tuple[Cache, Gate]
    ) -> None:
        cache, gate = slow_cache
        a = cache.manager.new().get(timeout=WAIT).commit()
        b = cache.manager.new().get(timeout=WAIT).commit()
        gate.close()
        future = cache.manager.merge([a, b])
        cache.manager.statistics().get(timeout=WAIT)
        a.release()
        b.release()
        gate.open()
        merged = future.get(timeout=WAIT)
        assert merged.info().parents == (a.id, b.id)
        merged.release()
        assert len(cache.manager.prune().get(timeout=WAIT)) == 3
        assert cache.manager.statistics().get(timeout=WAIT).records == 0


class TestInterleavings:
    """Exact interleavings of a release with other operations.

    A release is two steps: the record actor drops the handle, then the manager decides
    what happens to the record (BuildKit does both under ``cm.mu``). These tests run other
    operations between the two steps, through the same private calls ``release()`` makes.
    """

    def test_get_between_the_two_steps_of_a_mutable_release_keeps_its_twin(
        self, cache: Cache
    ) -> None:
        m = cache.manager.new().get(timeout=WAIT)  # default policy: removed on release
        found, last = m._ask_actor(Release(m._hid), "release")  # step 1
        assert (found, last) == (True, True)
        m._released = True
        twin = cache.manager.get(m.id).get(timeout=WAIT)  # implicit commit of the idle mutable
        assert twin.info().equal_mutable == m.id
        cache._core.ask_manager(Unreferenced(m.id))  # step 2, late
        assert twin.info().equal_mutable == m.id  # still there: it is held
        with twin.mount().local() as path:
            assert path.is_dir()
        twin.release()  # now the pair's last ref goes: both records go (default policy)
        stats = cache.manager.statistics().get(timeout=WAIT)
        assert (stats.records, stats.open_handles) == (0, 0)

    @pytest.mark.parametrize("use", ["mount", "size"])
    def test_first_use_right_after_a_concurrent_finalize_commits_the_snapshot(
        self, cache: Cache, use: str
    ) -> None:
        """The twin's first mount/size is planned on the mutable's snapshot; a finalize in
        another thread commits that snapshot away before the twin's actor hears of it."""
        for _ in range(5):
            m = cache.manager.new().get(timeout=WAIT)
            mutable_snapshot = m.info().snapshot_id
            with m.mount(readonly=False).local() as path:
                for n in range(200):  # a commit that takes a moment (it walks the tree)
                    (path / f"f{n}").write_text("x" * 100)
            pair = m.commit()
            other = pair.clone()
            errors: list[str] = []
            finalizer = threading.Thread(
                target=_after, args=(None, other.finalize, errors), daemon=True
            )
            finalizer.start()
            # Start the first use as soon as the mutable's snapshot is committed away, while
            # the finalize is still updating metadata (bounded: no sleeping).
            deadline = time.monotonic() + WAIT
            while _snapshot_exists(cache, mutable_snapshot) and time.monotonic() < deadline:
                pass
            if use == "mount":
                _mount_and_read(pair, "f0")
            else:
                assert pair.size() > 200 * 100
            finalizer.join(timeout=WAIT)
            assert not finalizer.is_alive()
            assert errors == [], errors[0]
            pair.release()
            other.release()
        assert len(cache.manager.prune().get(timeout=WAIT)) == 5


def _snapshot_exists(cache: Cache, key: str) -> bool:
    try:
        cache.snapshotter.stat(key)
    except NotFoundError:
        return False
    return True


def _after(start: threading.Barrier | None, job: Callable[[], object], errors: list[str]) -> None:
    """Runs ``job`` (once every thread is at ``start``); records a failure's traceback."""
    try:
        if start is not None:
            start.wait(timeout=WAIT)
        job()
    except BaseException:
        errors.append(traceback.format_exc())


def _mount_and_read(ref: ImmutableRef, name: str = "f") -> None:
    with ref.mount().local() as path:
        assert (path / name).read_text().startswith("x")
