"""No foreign exception reaches a caller: ClosedError, refcache's TimeoutError, typed inputs.

After ``close()`` every manager call and every handle method raises :class:`ClosedError`;
calls that close cuts short get it too; a wait that runs out (a ``get(timeout=...)``, a hung
descriptor provider, a hung ``ref_checker``) raises refcache's :class:`TimeoutError`. Never
``pykka.ActorDeadError``, ``pykka.Timeout`` or ``concurrent.futures.CancelledError``.
"""

from __future__ import annotations

import builtins
import concurrent.futures
import io
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pykka
import pytest
from refcache.actors import (
    Cache,
    ClosedError,
    DescHandler,
    ImmutableRef,
    InvalidError,
    ManagerFuture,
    MutableRef,
    NotFoundError,
    PrunePolicy,
    RefcacheError,
    TimeoutError,
    open_cache,
)
from refcache.actors._core import BoundedCalls
from refcache.actors._demo import generate_layer
from refcache.storage import Descriptor, MetaEnv, NativeSnapshotter

import refcache
from refcache import storage

WAIT = 30.0
LAYER = generate_layer("errors/layer", 11, files=4, file_size=1024)

#: Exceptions of the libraries refcache uses that must never reach a caller.
FOREIGN = (pykka.ActorDeadError, pykka.Timeout, concurrent.futures.CancelledError)


def new(cache: Cache, parent: ImmutableRef | None = None, **kwargs: Any) -> MutableRef:
    ref: MutableRef = cache.manager.new(parent, **kwargs).get(timeout=WAIT)
    return ref


def committed(cache: Cache, parent: ImmutableRef | None = None, **kwargs: Any) -> ImmutableRef:
    return new(cache, parent, **kwargs).commit()


def raises_refcache(error: type[RefcacheError], call: Callable[[], object]) -> RefcacheError:
    """Runs ``call``; returns the ``error`` it raised (never a foreign exception)."""
    try:
        call()
    except FOREIGN as exc:  # pragma: no cover - the defect this file is about
        pytest.fail(f"a foreign exception reached the caller: {exc!r}")
    except error as exc:
        return exc
    pytest.fail(f"{error.__name__} was not raised")


class GatedSnapshotter(NativeSnapshotter):
    """The real native snapshotter; ``prepare`` (and ``new``'s ``stage_prepare``) waits for
    ``gate`` once ``armed``."""

    def __init__(self, root: Path, env: MetaEnv) -> None:
        super().__init__(root, env)
        self.armed = False
        self.entered = threading.Event()
        self.gate = threading.Event()

    def prepare(self, key: str, parent: str = "", **kwargs: Any) -> Any:
        if self.armed:
            self.entered.set()
            self.gate.wait(WAIT)
        return super().prepare(key, parent, **kwargs)

    def stage_prepare(self, key: str, parent: str = "", **kwargs: Any) -> Any:
        if self.armed:
            self.entered.set()
            self.gate.wait(WAIT)
        return super().stage_prepare(key, parent, **kwargs)


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[tuple[Cache, GatedSnapshotter]]:
    made: list[GatedSnapshotter] = []

    def factory(root: Path, env: MetaEnv) -> GatedSnapshotter:
        made.append(GatedSnapshotter(root, env))
        return made[0]

    cache = open_cache(tmp_path / "cache", snapshotter=factory, io_workers=1, timeout=WAIT)
    try:
        yield cache, made[0]
    finally:
        made[0].gate.set()
        cache.close()


# -- the error classes --------------------------------------------------------------------------


def test_closed_and_timeout_errors_are_refcache_errors_exported_everywhere() -> None:
    assert issubclass(ClosedError, RefcacheError)
    assert issubclass(TimeoutError, RefcacheError)
    # Not the builtin: code that catches OSError (or the builtin) does not swallow it.
    assert not issubclass(TimeoutError, builtins.TimeoutError)
    assert TimeoutError is not builtins.TimeoutError
    assert TimeoutError.__name__ == "TimeoutError"
    for module in (refcache, refcache.actors, storage):
        assert module.ClosedError is ClosedError
        assert module.TimeoutError is TimeoutError
        assert {"ClosedError", "TimeoutError"} <= set(module.__all__)


# -- after close --------------------------------------------------------------------------------


def manager_calls(ref: ImmutableRef) -> dict[str, Callable[[Any], object]]:
    return {
        "get": lambda m: m.get(ref.id),
        "get_mutable": lambda m: m.get_mutable(ref.id),
        "new": lambda m: m.new(),
        "get_by_blob": lambda m: m.get_by_blob(LAYER.desc),
        "merge": lambda m: m.merge([ref, ref]),
        "diff": lambda m: m.diff(ref, None),
        "search": lambda m: m.search("x"),
        "disk_usage": lambda m: m.disk_usage(),
        "prune": lambda m: m.prune(),
        "statistics": lambda m: m.statistics(),
        "subscribe": lambda m: m.subscribe(m.actor_ref),
        "unsubscribe": lambda m: m.unsubscribe(m.actor_ref),
    }


def test_every_manager_call_after_close_raises_closed_error(cache: Cache) -> None:
    ref = committed(cache)
    calls = manager_calls(ref)
    cache.close()

    for name, call in calls.items():
        error = raises_refcache(
            ClosedError, lambda call=call: call(cache.manager).get(timeout=WAIT)
        )
        assert str(cache.root) in str(error), name
        assert f"{name}()" in str(error), name


def test_every_handle_method_after_close_raises_closed_error(cache: Cache) -> None:
    ref = committed(cache, description="kept")
    m = new(cache)
    cache.close()

    calls: dict[str, Callable[[], object]] = {
        "release": ref.release,
        "clone": ref.clone,
        "size": ref.size,
        "mount": ref.mount,
        "extract": ref.extract,
        "finalize": ref.finalize,
        "info": ref.info,
        "layer_chain": ref.layer_chain,
        "walk_ancestors": ref.walk_ancestors,
        "file_list": ref.file_list,
        "get_remotes": ref.get_remotes,
        "metadata.description": lambda: ref.metadata.description,
        "metadata.set_string": lambda: ref.metadata.set_string("user.k", "v"),
        "metadata.get_external": lambda: ref.metadata.get_external("user.k"),
        "metadata.set_external": lambda: ref.metadata.set_external("user.k", b"v"),
        "metadata.cache_policy=": lambda: setattr(ref.metadata, "cache_policy", "retain"),
        "mutable.commit": m.commit,
        "mutable.mount": m.mount,
        "mutable.info": m.info,
        "mutable.release": m.release,
    }
    for name, call in calls.items():
        error = raises_refcache(ClosedError, call)
        assert ref.id in str(error) or m.id in str(error), name
    # Nothing was released: the handles are as they were when the cache closed.
    assert not ref.released
    assert not m.released


def test_a_released_handle_stays_a_no_op_to_release_after_close(cache: Cache) -> None:
    ref = committed(cache)
    ref.release()
    cache.close()
    ref.release()  # releasing twice is a no-op, open cache or not
    assert ref.released


def test_calls_in_flight_during_close_get_closed_error(
    gated: tuple[Cache, GatedSnapshotter],
) -> None:
    cache, sn = gated
    sn.armed = True
    running = cache.manager.new(description="running")  # its job waits in prepare
    assert sn.entered.wait(WAIT)
    queued = cache.manager.new(description="queued")  # behind it (one I/O worker)
    closer = threading.Thread(target=cache.close, name="test-close")
    closer.start()
    try:
        # close cancels the queued job at once and waits for the running one.
        raises_refcache(ClosedError, lambda: queued.get(timeout=WAIT))
        assert closer.is_alive()
        sn.gate.set()  # the running job finishes its prepare and finds the cache closed
        raises_refcache(ClosedError, lambda: running.get(timeout=WAIT))
    finally:
        sn.gate.set()
        closer.join(WAIT)
    assert not closer.is_alive()
    assert cache.closed


# -- timeouts -----------------------------------------------------------------------------------


def test_a_get_timeout_raises_refcache_timeout_error(
    gated: tuple[Cache, GatedSnapshotter],
) -> None:
    cache, sn = gated
    sn.armed = True
    future = cache.manager.new()
    assert isinstance(future, ManagerFuture)
    assert isinstance(future, pykka.Future)
    error = raises_refcache(TimeoutError, lambda: future.get(timeout=0.2))
    assert "new()" in str(error)
    sn.armed = False
    sn.gate.set()
    m = future.get(timeout=WAIT)  # the call itself went on and completed
    assert isinstance(m, MutableRef)
    m.release()


def test_a_hung_descriptor_provider_raises_timeout_error_after_the_cache_timeout(
    tmp_path: Path,
) -> None:
    unblock = threading.Event()

    def hanging(desc: Descriptor) -> Any:
        unblock.wait(WAIT)
        return io.BytesIO(LAYER.blob)

    cache = open_cache(tmp_path / "cache", snapshotter="native", timeout=1.0)
    try:
        handlers = {LAYER.digest: DescHandler(hanging)}
        started = time.monotonic()
        future = cache.manager.get_by_blob(LAYER.desc, desc_handlers=handlers, extract=True)
        error = raises_refcache(TimeoutError, lambda: future.get(timeout=WAIT))
        assert time.monotonic() - started < WAIT / 2
        assert LAYER.digest in str(error)
        # The cache goes on serving meanwhile.
        committed(cache).release()
    finally:
        unblock.set()
        cache.close()


def test_a_hung_ref_checker_is_bounded_and_does_not_block_the_prune_queue(
    tmp_path: Path,
) -> None:
    unblock = threading.Event()
    hung = threading.Event()
    calls: list[str] = []

    def checker(record_id: str, chain: Sequence[str]) -> bool:
        calls.append(record_id)
        if not unblock.is_set():
            hung.set()
            unblock.wait(WAIT)
        return False

    cache = open_cache(tmp_path / "cache", snapshotter="native", timeout=1.0, ref_checker=checker)
    try:
        ref = committed(cache, description="unreferenced")
        ref.finalize()  # a plain immutable: it stays after its release, for prune to find
        rid = ref.id
        ref.release()
        started = time.monotonic()
        first = cache.manager.prune(PrunePolicy())
        assert hung.wait(WAIT)
        second = cache.manager.prune(PrunePolicy())  # queued behind the first
        # The manager keeps answering while the checker hangs (it runs on its own thread).
        held = committed(cache, description="while the checker hangs")
        held.release()  # an unfinalized pair: gone at its release, nothing left to prune
        error = raises_refcache(TimeoutError, lambda: first.get(timeout=WAIT))
        assert rid in str(error) or "ref checker" in str(error)
        # The queued prune ran in turn: the checker hung again for it, and it timed out too.
        raises_refcache(TimeoutError, lambda: second.get(timeout=WAIT))
        raises_refcache(TimeoutError, lambda: cache.manager.disk_usage().get(timeout=WAIT))
        assert time.monotonic() - started < WAIT

        unblock.set()  # the checker answers again: prune and disk usage work as before
        pruned = cache.manager.prune(PrunePolicy()).get(timeout=WAIT)
        assert rid in {r.id for r in pruned}
        assert cache.manager.disk_usage().get(timeout=WAIT) == []
    finally:
        unblock.set()
        cache.close()


# -- typed inputs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"filters": None}, id="filters-none"),
        pytest.param({"filters": 5}, id="filters-int"),
        pytest.param({"filters": [b"id==x"]}, id="filters-bytes"),
        pytest.param({"filters": {"id": "x"}}, id="filters-mapping"),
        pytest.param({"all": "yes"}, id="all-str"),
        pytest.param({"all": 1}, id="all-int"),
        pytest.param({"keep_duration": 5}, id="keep-duration-int"),
        pytest.param({"max_used_space": "1G"}, id="max-used-str"),
        pytest.param({"reserved_space": True}, id="reserved-bool"),
    ],
)
def test_prune_policy_refuses_wrong_types_at_construction(kwargs: dict[str, Any]) -> None:
    name = next(iter(kwargs))
    with pytest.raises(InvalidError, match=name):
        PrunePolicy(**kwargs)


def test_prune_policy_accepts_a_single_string_and_any_sequence_of_strings() -> None:
    assert PrunePolicy(filters="id==a").filters == ("id==a",)
    assert PrunePolicy(filters=["id==a", "id==b"]).filters == ("id==a", "id==b")
    assert PrunePolicy(keep_duration=timedelta(hours=1)).all is False


@pytest.mark.parametrize("flag", [b"x", "no", 1, 0, None])
def test_bool_parameters_refuse_non_bools_and_change_nothing(cache: Cache, flag: Any) -> None:
    ref = committed(cache)
    m = new(cache)
    before = cache.manager.statistics().get(timeout=WAIT).records_detail
    calls: dict[str, Callable[[], object]] = {
        "mount readonly": lambda: ref.mount(readonly=flag),
        "mount readonly ": lambda: m.mount(readonly=flag),  # a MutableRef (the key differs)
        "get update_last_used": lambda: cache.manager.get(ref.id, update_last_used=flag).get(
            timeout=WAIT
        ),
        "new retain": lambda: cache.manager.new(retain=flag).get(timeout=WAIT),
        "search prefix": lambda: cache.manager.search("x", prefix=flag).get(timeout=WAIT),
        "get_by_blob extract": lambda: cache.manager.get_by_blob(LAYER.desc, extract=flag).get(
            timeout=WAIT
        ),
        "get_remotes all": lambda: ref.get_remotes(all=flag),
        "get_remotes create_if_needed": lambda: ref.get_remotes(create_if_needed=flag),
    }
    for name, call in calls.items():
        with pytest.raises(InvalidError, match=f"{name.strip()} must be a bool, not {flag!r}"):
            call()
    assert cache.manager.statistics().get(timeout=WAIT).records_detail == before
    ref.release()
    m.release()


# -- a snapshot directory removed behind the cache's back ---------------------------------------


def test_mount_of_a_vanished_snapshot_is_not_found_and_commit_makes_no_empty_snapshot(
    cache: Cache,
) -> None:
    m = new(cache, description="victim")
    with m.mount().local() as path:
        (path / "file").write_text("content")
        directory = path
    snapshot_id = m.info().snapshot_id
    shutil.rmtree(directory)

    error = raises_refcache(NotFoundError, m.mount)
    assert m.id in str(error)
    assert str(directory) in str(error)

    i = m.commit()  # lazy: no snapshot work yet
    error = raises_refcache(NotFoundError, i.mount)
    assert i.id in str(error)
    raises_refcache(NotFoundError, i.finalize)
    # Nothing was committed: no empty snapshot under the immutable's id, the pair remains.
    assert i.info().equal_mutable == m.id
    with pytest.raises(NotFoundError):
        cache.snapshotter.stat(i.info().snapshot_id)
    assert cache.snapshotter.stat(snapshot_id).kind.value == "active"
    i.release()


def test_mount_of_a_vanished_committed_snapshot_is_not_found(cache: Cache) -> None:
    ref = committed(cache)
    ref.finalize()
    with ref.mount().local() as path:
        pass
    ref.release()
    again = cache.manager.get(ref.id).get(timeout=WAIT)
    shutil.rmtree(path)
    error = raises_refcache(NotFoundError, again.mount)
    assert again.id in str(error)
    again.release()


def test_bounded_calls_retire_a_stuck_worker_and_end_at_close() -> None:
    calls = BoundedCalls("test-bounded", 0.3)
    unblock = threading.Event()

    def workers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "test-bounded"]

    try:
        assert calls.call("add", lambda a, b: a + b, 2, 3) == 5
        with pytest.raises(ValueError, match="boom"):
            calls.call("fail", lambda: (_ for _ in ()).throw(ValueError("boom")))
        error = raises_refcache(TimeoutError, lambda: calls.call("hang", unblock.wait, WAIT))
        assert "hang did not return within 0.3 s" in str(error)
        # A fresh worker answers while the stuck one still waits.
        assert calls.call("after", lambda: "fresh") == "fresh"
        assert len(workers()) == 2
    finally:
        unblock.set()
        calls.close()
    assert wait_for(lambda: not workers())


def wait_for(predicate: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)  # sleep-ok: polling for threads to end
    return True
