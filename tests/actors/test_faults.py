"""Fault injection: a failing backend leaves the cache consistent and usable.

Faults are injected at the boundaries refcache does not own: a snapshotter (through
``open_cache(snapshotter=factory)``, the embedder's hook) that fails on its Nth call, the OS
(``ENOSPC`` from ``os.write`` on the content store's ingest files), LMDB (a map that may not
grow), and a remote provider that hangs past the cache's timeout. After each fault:

* the caller got the error (the injected one, or the error class BuildKit would give);
* ``storage.check`` is empty and the handle counts are exact;
* the cache keeps working (the same work succeeds once the fault is gone);
* releasing everything and pruning leaves nothing, and a reopen finds nothing wrong.
"""

from __future__ import annotations

import errno
import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from refcache.actors import (
    Cache,
    CacheManager,
    DescHandler,
    ImmutableRef,
    MutableRef,
    PrunePolicy,
    RefcacheError,
    StoreFullError,
    open_cache,
)
from refcache.actors import TimeoutError as RefcacheTimeoutError
from refcache.actors._demo import generate_layer
from refcache.storage import MetaEnv, NativeSnapshotter, NotFoundError

from refcache import storage

WAIT = 30.0
HAS_GET_BY_BLOB = hasattr(CacheManager, "get_by_blob")
needs_get_by_blob = pytest.mark.skipif(
    not HAS_GET_BY_BLOB, reason="manager.get_by_blob is not implemented in this checkout yet"
)


# -- helpers --------------------------------------------------------------------------------


class InjectedFaultError(StoreFullError):
    """The error a faulty backend raises (a disk-full, as a real backend would report it)."""


class FaultySnapshotter(NativeSnapshotter):
    """The real native snapshotter, failing on the Nth call of one method (before any work).

    ``calls`` counts every call of every method, so a test can also see what ran.
    """

    METHODS = ("prepare", "view", "commit", "remove", "merge", "usage", "mounts")

    def __init__(self, root: Path, env: MetaEnv) -> None:
        super().__init__(root, env)
        self.calls: Counter[str] = Counter()
        self.fail_method = ""
        self.fail_on = 0
        self.fired = 0
        self._lock = threading.Lock()

    def arm(self, method: str, nth: int) -> None:
        with self._lock:
            self.fail_method, self.fail_on, self.fired = method, self.calls[method] + nth, 0

    def disarm(self) -> None:
        with self._lock:
            self.fail_method = ""

    def _count(self, method: str) -> None:
        with self._lock:
            self.calls[method] += 1
            if method == self.fail_method and self.calls[method] == self.fail_on:
                self.fired += 1
                msg = f"injected fault: {method} call {self.fail_on} (no space left on device)"
                raise InjectedFaultError(msg)

    def prepare(self, key: str, parent: str = "", **kw: Any) -> Any:
        self._count("prepare")
        return super().prepare(key, parent, **kw)

    def stage_prepare(self, key: str, parent: str = "", **kw: Any) -> Any:
        self._count("prepare")  # new's prepare, split for its group write
        return super().stage_prepare(key, parent, **kw)

    def view(self, key: str, parent: str = "", **kw: Any) -> Any:
        self._count("view")
        return super().view(key, parent, **kw)

    def commit(self, name: str, key: str, **kw: Any) -> Any:
        self._count("commit")
        return super().commit(name, key, **kw)

    def remove(self, key: str, **kw: Any) -> Any:
        self._count("remove")
        return super().remove(key, **kw)

    def merge(self, key: str, diffs: Sequence[tuple[str, str]], **kw: Any) -> Any:
        self._count("merge")
        return super().merge(key, diffs, **kw)

    def usage(self, key: str) -> Any:
        self._count("usage")
        return super().usage(key)

    def mounts(self, key: str) -> Any:
        self._count("mounts")
        return super().mounts(key)


def handle_counts(cache: Cache) -> dict[str, int]:
    stats = cache.manager.statistics().get(timeout=WAIT)
    return {rid: n for rid, n, _ in stats.records_detail if n}


def snapshot_dirs(root: Path) -> list[str]:
    base = root / "snapshots"
    return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []


def blob_files(root: Path) -> list[str]:
    base = root / "content" / "blobs"
    return sorted(str(p) for p in base.rglob("*") if p.is_file()) if base.is_dir() else []


def assert_consistent(cache: Cache, held: Sequence[ImmutableRef | MutableRef]) -> None:
    """check() is empty and every open handle is counted exactly."""
    assert storage.check(cache.root) == []
    expected = Counter(r.id for r in held if not r.released)
    assert handle_counts(cache) == dict(expected)


def assert_empties(cache: Cache, held: Sequence[ImmutableRef | MutableRef]) -> None:
    """Releasing everything and pruning leaves nothing (records, dirs, blobs, leases)."""
    for ref in held:
        ref.release()
    rows = cache.manager.disk_usage().get(timeout=WAIT)
    assert [r.id for r in rows if r.in_use] == []
    cache.manager.prune(PrunePolicy(all=True)).get(timeout=WAIT)
    stats = cache.manager.statistics().get(timeout=WAIT)
    assert (stats.records, stats.open_handles) == (0, 0)
    assert snapshot_dirs(cache.root) == []
    assert blob_files(cache.root) == []
    assert cache.leases.list() == []
    assert storage.check(cache.root) == []


class Scenario:
    """A fixed build: every snapshotter method is used; a failed step is reported, not fatal.

    Steps whose input failed are skipped. ``errors`` lists ``(step, exception)``.
    """

    def __init__(self, cache: Cache) -> None:
        self.cache = cache
        self.held: list[ImmutableRef | MutableRef] = []
        self.errors: list[tuple[str, BaseException]] = []

    def _step(self, name: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except RefcacheError as exc:
            self.errors.append((name, exc))
            return None

    def _keep(self, ref: Any) -> Any:
        if ref is not None:
            self.held.append(ref)
        return ref

    def _layer(self, name: str, parent: ImmutableRef | None) -> ImmutableRef | None:
        m = self._keep(
            self._step(f"new {name}", lambda: self.cache.manager.new(parent).get(timeout=WAIT))
        )
        if m is None:
            return None

        def write() -> bool:
            with m.mount().local() as path:
                (path / f"{name}.txt").write_text(name)
            return True

        if not self._step(f"write {name}", write):
            return None
        ref = self._step(f"commit {name}", m.commit)
        if ref is None:
            return None
        self.held.remove(m)
        self._keep(ref)
        self._step(f"finalize {name}", ref.finalize)
        return ref

    def run(self) -> None:
        manager = self.cache.manager
        a = self._layer("a", None)
        if a is not None:

            def view() -> None:
                with a.mount().local() as path:
                    assert (path / "a.txt").read_text() == "a"

            self._step("mount a", view)
        b = self._layer("b", a)
        if b is not None:
            self._step("size b", b.size)
        c = self._layer("c", None)
        if b is not None and c is not None:
            merged = self._keep(
                self._step("merge", lambda: manager.merge([b, c]).get(timeout=WAIT))
            )
            if merged is not None:
                self._step("extract merge", merged.extract)
        if a is not None and b is not None:
            diffed = self._keep(self._step("diff", lambda: manager.diff(a, b).get(timeout=WAIT)))
            if diffed is not None:
                self._step("extract diff", diffed.extract)
        # Prune what nobody needs any more (a default mutable's twin, view leases).
        released = [r for r in self.held if isinstance(r, ImmutableRef)][:1]
        for ref in released:
            ref.release()
            self.held.remove(ref)
        self._step("prune", lambda: manager.prune().get(timeout=WAIT))


# -- a snapshotter that fails on its Nth call --------------------------------------------


@pytest.fixture
def faulty(tmp_path: Path) -> Iterator[tuple[Callable[[], Cache], list[FaultySnapshotter]]]:
    """Opens (and reopens) a cache at ``tmp_path/cache`` on a :class:`FaultySnapshotter`."""
    made: list[FaultySnapshotter] = []
    opened: list[Cache] = []

    def factory(root: Path, env: MetaEnv) -> FaultySnapshotter:
        sn = FaultySnapshotter(root, env)
        made.append(sn)
        return sn

    def _open() -> Cache:
        cache = open_cache(tmp_path / "cache", snapshotter=factory, timeout=WAIT)
        opened.append(cache)
        return cache

    yield _open, made
    for cache in reversed(opened):
        cache.close()


def test_the_scenario_uses_every_snapshotter_method(
    faulty: tuple[Callable[[], Cache], list[FaultySnapshotter]],
) -> None:
    open_, made = faulty
    cache = open_()
    scenario = Scenario(cache)
    scenario.run()
    assert scenario.errors == []
    calls = made[0].calls
    assert {m: calls[m] > 0 for m in FaultySnapshotter.METHODS} == dict.fromkeys(
        FaultySnapshotter.METHODS, True
    )
    assert_consistent(cache, scenario.held)
    assert_empties(cache, scenario.held)


FAULTS = [
    ("prepare", 1),
    ("prepare", 2),
    ("prepare", 3),
    ("view", 1),
    ("commit", 1),
    ("commit", 2),
    ("commit", 3),
    ("merge", 1),
    ("merge", 2),
    ("usage", 1),
    ("mounts", 1),
    ("mounts", 3),
    ("remove", 1),
    ("remove", 2),
]


@pytest.mark.parametrize(("method", "nth"), FAULTS, ids=[f"{m}-{n}" for m, n in FAULTS])
def test_a_snapshotter_failing_on_its_nth_call_leaves_the_cache_consistent_and_usable(
    faulty: tuple[Callable[[], Cache], list[FaultySnapshotter]], method: str, nth: int
) -> None:
    open_, made = faulty
    cache = open_()
    sn = made[0]
    sn.arm(method, nth)
    scenario = Scenario(cache)
    scenario.run()
    if method == "remove":
        # Snapshot removal runs in the prune's garbage collection: nothing to report before
        # it, so release everything to give the prune something to remove.
        for ref in scenario.held:
            ref.release()
        scenario.held.clear()
        try:
            cache.manager.prune(PrunePolicy(all=True)).get(timeout=WAIT)
        except RefcacheError as exc:
            scenario.errors.append(("prune all", exc))
    sn.disarm()

    # The fault fired once and its error reached a caller.
    assert sn.fired == 1
    injected = [(step, e) for step, e in scenario.errors if isinstance(e, InjectedFaultError)]
    assert len(injected) >= 1, scenario.errors
    assert all(
        isinstance(e, InjectedFaultError) or "injected fault" in str(e) for _, e in scenario.errors
    ), scenario.errors

    # Consistent now, usable now, empty after releasing and pruning, and after a reopen.
    assert_consistent(cache, scenario.held)
    again = Scenario(cache)
    again.run()
    assert again.errors == []
    assert_consistent(cache, [*scenario.held, *again.held])
    assert_empties(cache, [*scenario.held, *again.held])
    cache.close()
    cache = open_()
    assert storage.check(cache.root) == []
    assert cache.manager.statistics().get(timeout=WAIT).records == 0


# -- ENOSPC while writing a blob ---------------------------------------------------------------


class DiskFull:
    """Makes ``os.write`` fail with ``ENOSPC`` on files under one directory (the OS boundary)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.under: str | None = None
        self.hits = 0
        real_write = os.write

        def write(fd: int, data: Any) -> int:
            under = self.under
            if under is not None:
                try:
                    path = os.readlink(f"/proc/self/fd/{fd}")
                except OSError:
                    path = ""
                if path.startswith(under):
                    self.hits += 1
                    raise OSError(errno.ENOSPC, "No space left on device (injected)", path)
            return real_write(fd, data)

        monkeypatch.setattr(os, "write", write)

    def on(self, directory: Path) -> None:
        self.under = str(directory.resolve())

    def off(self) -> None:
        self.under = None


@pytest.fixture
def disk_full(monkeypatch: pytest.MonkeyPatch) -> DiskFull:
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd to tell which file a write goes to")
    return DiskFull(monkeypatch)


LAYER = generate_layer("fault/layer", 7, files=8, file_size=4096)


def test_enospc_on_blob_write_keeps_nothing_and_the_store_stays_usable(
    cache: Cache, disk_full: DiskFull
) -> None:
    disk_full.on(cache.root / "content")
    with pytest.raises(StoreFullError):
        cache.content.write_blob(LAYER.blob, LAYER.desc)
    assert disk_full.hits >= 1
    disk_full.off()
    assert list(cache.content.walk()) == []
    assert cache.content.list_statuses() == []
    assert blob_files(cache.root) == []
    assert storage.check(cache.root) == []

    desc = cache.content.write_blob(LAYER.blob, LAYER.desc)
    assert (desc.digest, desc.size) == (LAYER.digest, len(LAYER.blob))
    with cache.content.reader_at(desc) as reader:
        assert reader.read() == LAYER.blob
    assert_empties(cache, [])


@needs_get_by_blob
def test_enospc_while_a_lazy_blob_is_pulled_is_reported_and_leaves_the_cache_usable(
    cache: Cache, disk_full: DiskFull
) -> None:
    pulls: list[str] = []

    def provider(desc: storage.Descriptor) -> Any:
        pulls.append(desc.digest)
        return io.BytesIO(LAYER.blob)

    handlers = {LAYER.digest: DescHandler(provider)}
    disk_full.on(cache.root / "content")
    with pytest.raises(StoreFullError):
        cache.manager.get_by_blob(LAYER.desc, desc_handlers=handlers, extract=True).get(
            timeout=WAIT
        )
    assert disk_full.hits >= 1
    disk_full.off()
    assert pulls != []
    assert_consistent(cache, [])
    assert cache.content.list_statuses() == []

    ref = cache.manager.get_by_blob(LAYER.desc, desc_handlers=handlers, extract=True).get(
        timeout=WAIT
    )
    with ref.mount().local() as path:
        assert sorted(str(p.relative_to(path)) for p in path.rglob("*.bin")) == sorted(LAYER.files)
    assert_consistent(cache, [ref])
    assert_empties(cache, [ref])


# -- LMDB map full --------------------------------------------------------------------------------


def fill_map(ref: MutableRef) -> int:
    """Fills the metadata map with external values on ``ref`` until not even 16 bytes fit."""
    stored = 0
    for size in (16384, 4096, 1024, 256, 64, 16):
        for _ in range(10_000):  # bounded: the map is a few hundred kB here
            try:
                ref.metadata.set_external(f"ballast-{stored}", b"x" * size)
            except StoreFullError:
                break
            stored += 1
    return stored


def test_a_metadata_map_that_cannot_grow_fails_transactions_whole(tmp_path: Path) -> None:
    cache = open_cache(tmp_path / "cache", snapshotter="native", map_size=256 * 1024, timeout=WAIT)
    try:
        env = cache.env
        env._max_map_size = env.map_info()[0]  # growth is what would happen; forbid it
        ballast = cache.manager.new(description="ballast").get(timeout=WAIT)
        assert fill_map(ballast) > 0
        with pytest.raises(NotFoundError):
            ballast.metadata.get_external(f"ballast-{10**6}")

        # Every operation that writes metadata now fails somewhere inside its transaction:
        # the caller gets StoreFullError, nothing half-written stays.
        leases_before = sorted(lease.id for lease in cache.leases.list())
        failed = Scenario(cache)
        failed.run()
        assert failed.errors != []
        assert [type(e) for _, e in failed.errors] == [StoreFullError] * len(failed.errors)
        assert_consistent(cache, [ballast, *failed.held])
        records = {r.id for r in cache.manager.disk_usage().get(timeout=WAIT)}
        leases = {lease.id for lease in cache.leases.list()}
        # No lease without its record, no record without its lease.
        assert {lid for lid in leases if not lid.endswith("-view")} <= records | set(leases_before)

        # A multi-key transaction that fills the map part-way commits none of its keys.
        with pytest.raises(StoreFullError), env.write_txn() as txn:
            for i in range(64):
                txn.put(storage.DB_INFO, f"fault-{i}".encode(), b"y" * 512)
        with env.read_txn() as rtxn:
            assert list(rtxn.keys(storage.DB_INFO, b"fault-")) == []

        # Room again: the same work succeeds and everything can be emptied.
        env._max_map_size = 1 << 32
        ballast.metadata.set_external("after", b"z" * 65536)
        assert ballast.metadata.get_external("after") == b"z" * 65536
        ok = Scenario(cache)
        ok.run()
        assert ok.errors == []
        assert_consistent(cache, [ballast, *failed.held, *ok.held])
        assert_empties(cache, [ballast, *failed.held, *ok.held])
    finally:
        cache.close()
    with open_cache(tmp_path / "cache", snapshotter="native", timeout=WAIT) as again:
        assert storage.check(again.root) == []
        assert again.manager.statistics().get(timeout=WAIT).records == 0


# -- a provider that hangs ------------------------------------------------------------------------


@needs_get_by_blob
def test_a_provider_that_hangs_past_the_timeout_fails_the_pull_not_the_cache(
    tmp_path: Path,
) -> None:
    timeout = 2.0
    started = threading.Event()
    unblock = threading.Event()

    def hanging(desc: storage.Descriptor) -> Any:
        started.set()
        unblock.wait(WAIT)  # a remote that never answers (until the test lets it go)
        return io.BytesIO(LAYER.blob)

    cache = open_cache(tmp_path / "cache", snapshotter="native", timeout=timeout)
    outcome: list[BaseException | None] = []
    done = threading.Event()
    try:
        handlers = {LAYER.digest: DescHandler(hanging)}
        lazy = cache.manager.get_by_blob(LAYER.desc, desc_handlers=handlers).get(timeout=WAIT)

        def pull() -> None:
            try:
                lazy.extract(handlers)
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)
            finally:
                done.set()

        t0 = time.monotonic()
        threading.Thread(target=pull, daemon=True).start()
        assert started.wait(WAIT)

        # The cache serves other work while the provider hangs.
        m = cache.manager.new(description="while hung").get(timeout=WAIT)
        other = m.commit()
        other.finalize()
        assert handle_counts(cache) == {lazy.id: 1, other.id: 1}

        # The pull fails with the cache's timeout, reported to its caller.
        finished = done.wait(timeout + 3.0)
        elapsed = time.monotonic() - t0
        assert finished, f"extract still blocked {elapsed:.1f} s into a hung provider"
        # refcache's TimeoutError (a RefcacheError), never pykka.Timeout.
        assert isinstance(outcome[0], RefcacheTimeoutError), outcome
        assert isinstance(outcome[0], RefcacheError), outcome
        assert storage.check(cache.root) == []

        unblock.set()  # the remote answers at last: the same pull now works
        lazy.extract(handlers)
        with lazy.mount().local() as path:
            assert (path / LAYER.files[0]).is_file()
        assert_empties(cache, [lazy, other])
    finally:
        unblock.set()
        done.wait(WAIT)  # the hung pull ends before the cache closes
        cache.close()


# -- leases of a finalize that did not happen -------------------------------------------------
#
# finalize creates the immutable's flat '<id>' lease before the snapshot commit (BuildKit's
# order). When the commit fails, or the process dies inside it, that lease must not outlive
# the pair (found by crashtest.py: a lease without a record after prune(all)).


def test_a_failed_finalize_leaves_no_lease_behind(
    faulty: tuple[Callable[[], Cache], list[FaultySnapshotter]],
) -> None:
    open_, made = faulty
    cache = open_()
    m = cache.manager.new().get(timeout=WAIT)
    ref = m.commit()
    made[0].arm("commit", 1)
    with pytest.raises(InjectedFaultError):
        ref.finalize()
    made[0].disarm()
    assert_consistent(cache, [ref])
    assert_empties(cache, [ref])  # the pair goes without a retried finalize


CRASH_IN_FINALIZE = """
import os, signal, sys
from refcache.storage import NativeSnapshotter
from refcache.actors import open_cache

class DiesInCommit(NativeSnapshotter):
    def commit(self, name, key, **kw):
        os.kill(os.getpid(), signal.SIGKILL)  # the crash: after finalize's lease, before commit

cache = open_cache({cache!r}, snapshotter=DiesInCommit, timeout=30)
ref = cache.manager.new().get(timeout=30).commit()
print(ref.id, flush=True)
ref.finalize()
"""


def test_a_crash_inside_finalize_leaves_no_lease_behind(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    code = CRASH_IN_FINALIZE.format(root=str(Path(__file__).resolve().parents[2]), cache=str(root))
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    record_id = proc.stdout.strip()
    with open_cache(root, snapshotter="native", timeout=WAIT) as cache:
        assert storage.check(cache.root) == []
        ref = cache.manager.get(record_id).get(timeout=WAIT)  # the pair survived the crash
        assert_empties(cache, [ref])
