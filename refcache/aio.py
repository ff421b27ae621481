"""``refcache.aio``: the cache for asyncio programs, without blocking the event loop.

The same names and meanings as the blocking API, as awaitables::

    async with open_cache_async(root) as cache:
        mutable = await cache.manager.new(description="step")
        async with mutable.mount().local() as path:
            (path / "out").write_text("built")
        layer = await mutable.commit()
        await layer.release()

Where the work runs:

* Manager calls (``new``, ``get``, ``merge``, ``prune``...) are sent to the manager actor at
  once; the reply reaches the loop through ``loop.call_soon_threadsafe`` from a done
  callback on the thread that completes it (:meth:`ManagerFuture.add_done_callback`): no
  thread waits for a pending call.
* ``clone``, ``release`` and ``commit`` of handles are asks chained on the actors' reply
  callbacks (``start_clone``, ``start_release``, ``start_commit``): no thread waits either.
* Handle methods that do slow I/O in their caller's thread by design (mounts, ``size``,
  ``extract``, ``get_remotes``, ``finalize``, metadata...) run on the async cache's
  executor: a bounded pool of ``workers`` threads of its own (not the cache's I/O executor,
  whose jobs those methods may wait for). Their completion reaches the loop the same way.
  However many coroutines await, at most ``workers`` threads work for them.
* Opening and closing run on that executor too.
* Replies for a loop are handed over in batches (one wake-up of the loop per batch), and a
  cache's calls step aside (``asyncio.sleep(0)``) once they have held the loop for
  :data:`SLICE` seconds in one go.

A cancelled await never leaks: a handle (or a mount) that arrives after its awaiting
coroutine was cancelled is released (unmounted) on the executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable, Mapping
from collections.abc import Sequence as Seq
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import pykka

from ._open import open_cache
from .actors import (
    Cache,
    CacheListener,
    CacheManagerProxy,
    CacheStatistics,
    ClosedError,
    DescHandler,
    Descriptor,
    ImmutableRef,
    InvalidError,
    ManagerFuture,
    Mount,
    Mountable,
    MutableRef,
    PooledActor,
    PrunePolicy,
    RecordInfo,
    RefList,
    RefMetadata,
    Remote,
    UsageInfo,
)

__all__ = [
    "AsyncCache",
    "AsyncImmutableRef",
    "AsyncManager",
    "AsyncMountable",
    "AsyncMutableRef",
    "AsyncRefList",
    "AsyncRefMetadata",
    "PruneEvent",
    "open_cache_async",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Default number of executor threads of an :class:`AsyncCache`.
DEFAULT_WORKERS = 4
#: Seconds of one loop iteration the cache's calls may take before they step aside.
SLICE = 0.005


def _discard(value: Any) -> None:
    """Releases whatever handles ``value`` holds (a call's result nobody will receive)."""
    if isinstance(value, (ImmutableRef | MutableRef, RefList)):
        value.release()
    elif isinstance(value, Mapping):
        for item in value.values():
            _discard(item)
    elif isinstance(value, list | tuple):
        for item in value:
            _discard(item)


class _LoopInbox:
    """Replies for one loop from other threads, handed over with one wake-up per batch.

    ``loop.call_soon_threadsafe`` per reply writes to the loop's self-pipe each time; with
    many calls in flight the replies that come while the loop has not run yet ride on the
    wake-up already asked for.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[Callable[[], None], Callable[[], None]]] = []
        self._scheduled = False
        self._closed = False

    def post(self, arrived: Callable[[], None], orphaned: Callable[[], None]) -> None:
        """Runs ``arrived()`` on the loop soon; ``orphaned()`` here if the loop is closed."""
        with self._lock:
            if not self._closed:
                self._items.append((arrived, orphaned))
                if self._scheduled:
                    return
                self._scheduled = True
        if self._closed:
            orphaned()
            return
        try:
            self._loop.call_soon_threadsafe(self._run)
        except RuntimeError:  # the loop is closed
            with self._lock:
                self._closed = True
                items, self._items = self._items, []
            for _, gone in items:
                gone()

    def _run(self) -> None:  # on the loop
        with self._lock:
            items, self._items = self._items, []
            self._scheduled = False
        for arrived, _ in items:
            try:
                arrived()
            except Exception:
                logger.exception("delivering a reply to the loop failed")


class AsyncCache:
    """An open cache for asyncio code (see :func:`open_cache_async`); an async context manager.

    Attributes:
        cache: The blocking :class:`~refcache.Cache` underneath (its stores, ``root``,
            ``metrics_server``; call nothing blocking on it from the loop).
        manager: The :class:`AsyncManager`.
        executor: The bounded thread pool that runs handle methods, opening and closing.
    """

    def __init__(self, cache: Cache, executor: ThreadPoolExecutor) -> None:
        self.cache = cache
        self.executor = executor
        self.manager = AsyncManager(self)
        self._closing = False
        #: Releases of results whose await was cancelled, still running on the executor.
        self._abandoned: set[Future[None]] = set()
        #: Awaits cancelled before their call's result arrived (released when it does).
        self._orphans: set[asyncio.Future[None]] = set()
        #: Where replies for each loop arrive (one wake-up of the loop per batch).
        self._inboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopInbox] = (
            weakref.WeakKeyDictionary()
        )
        #: The loop time slice of this cache's calls (see fair_share).
        self._slice_loop: asyncio.AbstractEventLoop | None = None
        self._slice_start = 0.0
        self._slice_ending = False

    def __repr__(self) -> str:
        return f"<AsyncCache at {self.cache.root}>"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def root(self) -> Path:
        """The cache directory."""
        return self.cache.root

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` began."""
        return self._closing or self.cache.closed

    async def close(self) -> None:
        """Closes the cache (as :meth:`Cache.close`) on the executor, then stops the executor.

        Work already submitted (releases of abandoned handles among it) runs first.
        Idempotent; calls made afterwards raise :class:`ClosedError`.
        """
        if self._closing:
            return
        self._closing = True
        loop = asyncio.get_running_loop()
        # Releases of abandoned results may still be under way: they end before the close.
        await self.drain()
        try:
            await loop.run_in_executor(self.executor, self.cache.close)
        finally:
            await loop.run_in_executor(None, self.executor.shutdown, True)

    # -- the two ways results reach the loop ---------------------------------------------------

    def _submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        if self._closing:
            raise self.cache_closed(getattr(fn, "__name__", "call"))
        try:
            return self.executor.submit(fn, *args)
        except RuntimeError as exc:  # shut down
            raise self.cache_closed(getattr(fn, "__name__", "call")) from exc

    async def fair_share(self) -> None:
        """Yields to the loop when this cache's calls have had it for ``SLICE`` seconds.

        A thousand coroutines started at once all take their first step in one iteration
        of the loop; each call's own work is short, but together they would hold the loop
        for as long as they take. Past the slice, the next calls step aside
        (``asyncio.sleep(0)``) until the loop has run everything else that was ready.
        """
        loop = asyncio.get_running_loop()
        if self._slice_loop is not loop:
            self._slice_loop, self._slice_start, self._slice_ending = (
                loop,
                time.perf_counter(),
                False,
            )
        while time.perf_counter() - self._slice_start >= SLICE:
            if not self._slice_ending:
                # Runs in the next iteration, before the calls that step aside now.
                self._slice_ending = True
                loop.call_soon(self._new_slice)
            await asyncio.sleep(0)

    def _new_slice(self) -> None:
        self._slice_start = time.perf_counter()
        self._slice_ending = False

    def cache_closed(self, what: str) -> ClosedError:
        """The :class:`ClosedError` for ``what`` (an operation), naming the cache."""
        return ClosedError(f"cannot {what}(): the cache at {self.cache.root} is closed")

    async def run(
        self, fn: Callable[..., T], *args: Any, discard: Callable[[T], None] | None = _discard
    ) -> T:
        """Runs blocking ``fn(*args)`` on the executor and returns its result.

        The await is cancellable; a result that arrives after the cancel is passed to
        ``discard`` on the executor (by default: its handles are released).
        """
        await self.fair_share()
        return await self.result_of(self._submit(fn, *args), discard)

    async def result_of(
        self, future: Future[T], discard: Callable[[T], None] | None = _discard
    ) -> T:
        """Awaits a ``concurrent.futures.Future`` (its done callback wakes the loop).

        The await is cancellable; a result that arrives after the cancel goes to
        ``discard`` on the executor.
        """
        if future.done():
            # Answered already (an idle record answers a clone or a release on this very
            # thread): nothing to wait for, and no await that a cancel could interrupt.
            return future.result()
        return await self._deliver(
            lambda cb: future.add_done_callback(lambda _f: cb()), future.result, discard
        )

    async def reply(self, future: ManagerFuture[Any], discard: Callable[[Any], None]) -> Any:
        """Awaits a manager call's reply (a done callback, no waiting thread)."""
        return await self._deliver(future.add_done_callback, future.get, discard)

    async def _deliver(
        self,
        on_done: Callable[[Callable[[], None]], None],
        result: Callable[[], T],
        discard: Callable[[T], None] | None,
    ) -> T:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()

        # A completed future keeps its callbacks, and the callbacks refer to the future (to
        # take the result): the cell is emptied once used, so that no reference cycle is
        # left for the collector (thousands of calls would otherwise mean long
        # stop-the-world collections on the loop's thread).
        cell: list[Any] = []

        def arrived() -> None:  # on the loop
            take = cell[1]
            cell.clear()
            if waiter.done():  # the awaiting coroutine was cancelled
                self._orphans.discard(waiter)
                self._abandon(take, discard)
            else:
                waiter.set_result(None)

        cell.extend((arrived, result))

        def orphaned() -> None:  # the loop is closed: nobody will take the result
            take = cell[1]
            cell.clear()
            self._abandon(take, discard)

        inbox = self._inbox(loop)

        def done() -> None:  # on the thread that completed the call: never block here
            inbox.post(cell[0], orphaned)

        on_done(done)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.cancelled() and cell:
                self._orphans.add(waiter)  # its result is still to come (see drain)
            elif waiter.done() and not waiter.cancelled():
                # The result was there, but the task was cancelled before it resumed.
                self._abandon(result, discard)
            raise
        return result()

    def _inbox(self, loop: asyncio.AbstractEventLoop) -> _LoopInbox:
        inbox = self._inboxes.get(loop)
        if inbox is None:
            inbox = self._inboxes[loop] = _LoopInbox(loop)
        return inbox

    def _abandon(self, result: Callable[[], T], discard: Callable[[T], None] | None) -> None:
        """Discards the result of a call whose awaiting coroutine is gone (on the executor)."""
        if discard is None:
            return

        def job() -> None:
            try:
                value = result()
            except Exception:  # the call failed: nothing to release
                return
            try:
                discard(value)
            except Exception:
                logger.exception("cannot release %r after its await was cancelled", value)

        try:
            future = self.executor.submit(job)
        except RuntimeError:  # the executor is shut down: the cache is closing
            logger.warning("a result that arrived after a cancel was not released: closing")
            return
        self._abandoned.add(future)
        future.add_done_callback(self._abandoned.discard)

    async def drain(self) -> None:
        """Waits until the results of cancelled awaits that arrived so far are released.

        They are released on the executor as they arrive; :meth:`close` drains first.
        """
        while self._orphans or self._abandoned:
            if self._abandoned:
                await asyncio.wait([asyncio.wrap_future(f) for f in list(self._abandoned)])
            else:
                # A cancelled call's result has yet to arrive (each call is bounded by the
                # cache's timeout); look again shortly.
                await asyncio.sleep(0.005)

    # -- wrappers ----------------------------------------------------------------------------

    def wrap(self, value: Any) -> Any:
        """The async face of a value a blocking call returned (handles are wrapped)."""
        if isinstance(value, ImmutableRef):
            return AsyncImmutableRef(value, self)
        if isinstance(value, MutableRef):
            return AsyncMutableRef(value, self)
        return value

    async def push(self, target: str, refs: Mapping[str, AsyncImmutableRef], **options: Any) -> Any:
        """:meth:`Cache.push` on the executor (same options and errors)."""
        plain = {name: _plain(ref) for name, ref in refs.items()}
        return await self.run(self.cache.push, target, plain, **options)

    async def pull(self, source: str, **options: Any) -> dict[str, AsyncImmutableRef]:
        """:meth:`Cache.pull` on the executor; a handle per name (release each)."""
        pulled = await self.run(lambda: self.cache.pull(source, **options))
        return {name: AsyncImmutableRef(ref, self) for name, ref in pulled.items()}


def _plain(ref: Any) -> Any:
    """The blocking handle of an async one (``None`` and blocking handles pass through)."""
    if isinstance(ref, _AsyncRef):
        return ref.ref
    return ref


class _Opening:
    """What :func:`open_cache_async` returns: awaitable, and an async context manager."""

    def __init__(self, opener: Callable[[], Awaitable[AsyncCache]]) -> None:
        self._opener = opener
        self._cache: AsyncCache | None = None

    def __await__(self) -> Generator[Any, None, AsyncCache]:
        return self._opener().__await__()

    async def __aenter__(self) -> AsyncCache:
        self._cache = await self._opener()
        return self._cache

    async def __aexit__(self, *exc_info: object) -> None:
        if self._cache is not None:
            await self._cache.close()


def open_cache_async(
    root: str | os.PathLike[str], *, workers: int = DEFAULT_WORKERS, **options: Any
) -> _Opening:
    """Opens the cache under ``root`` for asyncio code: ``await`` it, or ``async with`` it.

    The open itself (which blocks for the table load) runs on the new cache's executor.

    Args:
        root: The cache directory.
        workers: Threads of the executor that runs handle methods (at least 1).
        **options: Those of :func:`refcache.open_cache` (``metrics_port``, ``timeout``,
            ``io_workers``, ...).

    Returns:
        An awaitable giving the open :class:`AsyncCache`, which as ``async with`` closes it
        on exit.

    Raises:
        InvalidError: ``workers`` is not a positive int (at once); bad options (on await).
        The errors of :func:`refcache.open_cache` on await.
    """
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        msg = f"open_cache_async workers must be a positive int, not {workers!r}"
        raise InvalidError(msg)

    async def opener() -> AsyncCache:
        executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="refcache-aio")
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(executor, lambda: open_cache(root, **options))
        try:
            cache = await asyncio.shield(future)
        except asyncio.CancelledError:
            # The open goes on in its thread: close what it opens.
            future.add_done_callback(
                lambda f: None if f.cancelled() or f.exception() else f.result().close()
            )
            executor.shutdown(wait=False)
            raise
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return AsyncCache(cache, executor)

    return _Opening(opener)


# -- the manager ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PruneEvent:
    """One step of a prune, as :meth:`AsyncManager.prune_progress` yields it.

    Attributes:
        kind: ``"record_pruned"`` (one deleted record, ``record``) or ``"prune_finished"``
            (the last event: ``records`` deleted, ``reclaimed`` bytes, ``deleted`` rows).
        record: The deleted record's row (``record_pruned``).
        records: How many records the prune deleted (``prune_finished``).
        reclaimed: Bytes reclaimed by their sizes (``prune_finished``).
        deleted: Every deleted row, in order (``prune_finished``).
    """

    kind: str
    record: UsageInfo | None = None
    records: int = 0
    reclaimed: int = 0
    deleted: tuple[UsageInfo, ...] = ()


class _LoopListener(CacheListener, PooledActor):
    """A listener actor (on the actor pool) that hands cache events to an asyncio queue."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[tuple[Any, ...]]
    ) -> None:
        super().__init__()
        self._loop = loop
        self._queue = queue

    def _put(self, item: tuple[Any, ...]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def on_event(self, event: str, *args: Any) -> None:
        """Passes the event tuple on to the loop."""
        self._put((event, *args))

    def on_receive(self, message: Any) -> Any:
        """Events (see :class:`CacheListener`), and the end marker after the last one."""
        if message == ("drained",):
            self._put(message)
            return None
        return super().on_receive(message)


class AsyncManager:
    """The async face of :class:`CacheManagerProxy` (``AsyncCache.manager``).

    Same methods, arguments, results and errors as the blocking proxy (API.md), as
    coroutines; handles come and go as :class:`AsyncImmutableRef`/:class:`AsyncMutableRef`
    (blocking handles are accepted as inputs too). Inputs are not consumed.
    """

    def __init__(self, owner: AsyncCache) -> None:
        self._owner = owner

    def __repr__(self) -> str:
        return f"<AsyncManager of the cache at {self._owner.cache.root}>"

    @property
    def proxy(self) -> CacheManagerProxy:
        """The blocking proxy underneath (its calls return futures at once)."""
        return self._owner.cache.manager

    async def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if self._owner._closing:
            raise self._owner.cache_closed(name)
        await self._owner.fair_share()
        future = getattr(self.proxy, name)(*args, **kwargs)
        value = await self._owner.reply(future, _discard)
        return self._owner.wrap(value)

    async def get(
        self,
        id: str,
        *,
        update_last_used: bool = True,
        desc_handlers: Mapping[str, DescHandler] | None = None,
    ) -> AsyncImmutableRef:
        """A new handle on an immutable record (:meth:`CacheManagerProxy.get`)."""
        ref: AsyncImmutableRef = await self._call(
            "get", id, update_last_used=update_last_used, desc_handlers=desc_handlers
        )
        return ref

    async def get_mutable(self, id: str) -> AsyncMutableRef:
        """The exclusive handle on a mutable record (:meth:`CacheManagerProxy.get_mutable`)."""
        ref: AsyncMutableRef = await self._call("get_mutable", id)
        return ref

    async def new(
        self,
        parent: AsyncImmutableRef | ImmutableRef | None = None,
        *,
        retain: bool = False,
        description: str | None = None,
        record_type: str | None = None,
        created_at: int | None = None,
    ) -> AsyncMutableRef:
        """A new mutable record on ``parent`` (:meth:`CacheManagerProxy.new`)."""
        ref: AsyncMutableRef = await self._call(
            "new",
            _plain(parent),
            retain=retain,
            description=description,
            record_type=record_type,
            created_at=created_at,
        )
        return ref

    async def get_by_blob(
        self,
        desc: Descriptor,
        parent: AsyncImmutableRef | ImmutableRef | None = None,
        *,
        desc_handlers: Mapping[str, DescHandler] | None = None,
        extract: bool = False,
        retain: bool = False,
        description: str | None = None,
    ) -> AsyncImmutableRef:
        """The lazy record of a layer blob (:meth:`CacheManagerProxy.get_by_blob`)."""
        ref: AsyncImmutableRef = await self._call(
            "get_by_blob",
            desc,
            _plain(parent),
            desc_handlers=desc_handlers,
            extract=extract,
            retain=retain,
            description=description,
        )
        return ref

    async def merge(
        self, parents: Seq[AsyncImmutableRef | ImmutableRef | None]
    ) -> AsyncImmutableRef | None:
        """Merges refs (:meth:`CacheManagerProxy.merge`); ``None`` for no input."""
        ref: AsyncImmutableRef | None = await self._call("merge", [_plain(p) for p in parents])
        return ref

    async def diff(
        self,
        lower: AsyncImmutableRef | ImmutableRef | None,
        upper: AsyncImmutableRef | ImmutableRef | None,
    ) -> AsyncImmutableRef:
        """The changes from ``lower`` to ``upper`` (:meth:`CacheManagerProxy.diff`)."""
        ref: AsyncImmutableRef = await self._call("diff", _plain(lower), _plain(upper))
        return ref

    async def search(self, index: str, *, prefix: bool = False) -> list[RecordInfo]:
        """Records in a metadata index (:meth:`CacheManagerProxy.search`)."""
        rows: list[RecordInfo] = await self._call("search", index, prefix=prefix)
        return rows

    async def disk_usage(
        self, filters: Seq[str] = (), *, age_limit: timedelta | None = None
    ) -> list[UsageInfo]:
        """One row per visible record (:meth:`CacheManagerProxy.disk_usage`)."""
        rows: list[UsageInfo] = await self._call("disk_usage", filters, age_limit=age_limit)
        return rows

    async def prune(self, *policies: PrunePolicy) -> list[UsageInfo]:
        """Deletes unreferenced records by each policy (:meth:`CacheManagerProxy.prune`)."""
        rows: list[UsageInfo] = await self._call("prune", *policies)
        return rows

    async def statistics(self) -> CacheStatistics:
        """One consistent snapshot of the cache (:meth:`CacheManagerProxy.statistics`)."""
        stats: CacheStatistics = await self._call("statistics")
        return stats

    async def subscribe(self, listener: pykka.ActorRef[Any]) -> None:
        """Subscribes a listener actor to cache events (:meth:`CacheManagerProxy.subscribe`)."""
        await self._call("subscribe", listener)

    async def unsubscribe(self, listener: pykka.ActorRef[Any]) -> None:
        """Ends a subscription (:meth:`CacheManagerProxy.unsubscribe`)."""
        await self._call("unsubscribe", listener)

    async def prune_progress(self, *policies: PrunePolicy) -> AsyncIterator[PruneEvent]:
        """Runs :meth:`prune` and yields its progress as it happens.

        One ``record_pruned`` :class:`PruneEvent` per deleted record (prunes run one at a
        time: one that was already running when this began reports here too), then one
        ``prune_finished`` built from this prune's result, and the iteration ends. Leaving
        the ``async for`` early does not stop the prune; it goes on in the cache.

        Raises:
            The errors of :meth:`prune` (``InvalidError``, ``ClosedError``).
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        listener = _LoopListener.start(loop, queue)
        try:
            await self.subscribe(listener)
            prune = asyncio.ensure_future(self.prune(*policies))
            try:
                getter: asyncio.Future[tuple[Any, ...]] | None = None
                while True:
                    if getter is None:
                        getter = asyncio.ensure_future(queue.get())
                    pending: set[asyncio.Future[Any]] = {getter, prune}
                    await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    if getter.done():
                        event = getter.result()
                        getter = None
                        if event[0] == "record_pruned":
                            yield PruneEvent("record_pruned", record=event[1])
                        continue
                    break
                if getter is not None:
                    getter.cancel()
                deleted = prune.result()
                # Tells already queued at the listener come before the end marker.
                await self.unsubscribe(listener)
                listener.tell(("drained",))
                while True:
                    event = await queue.get()
                    if event[0] == "drained":
                        break
                    if event[0] == "record_pruned":
                        yield PruneEvent("record_pruned", record=event[1])
                yield PruneEvent(
                    "prune_finished",
                    records=len(deleted),
                    reclaimed=sum(max(row.size, 0) for row in deleted),
                    deleted=tuple(deleted),
                )
            finally:
                if not prune.done():
                    prune.cancel()  # only the await: the prune itself goes on
        finally:
            if not self._owner._closing:
                with contextlib.suppress(ClosedError):
                    self.proxy.unsubscribe(listener)  # a tell at heart: no wait
            listener.stop(block=False)


# -- handles -------------------------------------------------------------------------------------


class AsyncRefMetadata:
    """The async face of :class:`RefMetadata` (each access runs on the executor).

    The properties of the blocking class are coroutine methods here: ``await
    md.description()``; they are set with ``await md.set("description", value)``.
    """

    def __init__(self, metadata: RefMetadata, owner: AsyncCache) -> None:
        self._md = metadata
        self._owner = owner

    @property
    def id(self) -> str:
        """The record id."""
        return self._md.id

    async def get_string(self, key: str) -> str:
        """:meth:`RefMetadata.get_string`."""
        return await self._owner.run(self._md.get_string, key)

    async def set_string(self, key: str, value: str, index: str | None = None) -> None:
        """:meth:`RefMetadata.set_string` (durable on return)."""
        await self._owner.run(self._md.set_string, key, value, index)

    async def clear(self, key: str, index_prefix: str | None = None) -> None:
        """:meth:`RefMetadata.clear`."""
        await self._owner.run(self._md.clear, key, index_prefix)

    async def get_external(self, key: str) -> bytes:
        """:meth:`RefMetadata.get_external`."""
        return await self._owner.run(self._md.get_external, key)

    async def set_external(self, key: str, data: bytes) -> None:
        """:meth:`RefMetadata.set_external`."""
        await self._owner.run(self._md.set_external, key, data)

    async def description(self) -> str:
        """The description property."""
        return await self._owner.run(lambda: self._md.description)

    async def record_type(self) -> str:
        """The record type property (``regular`` when unset)."""
        return await self._owner.run(lambda: self._md.record_type)

    async def layer_type(self) -> str:
        """The layer type property."""
        return await self._owner.run(lambda: self._md.layer_type)

    async def created_at(self) -> int:
        """The creation time property (ns)."""
        return await self._owner.run(lambda: self._md.created_at)

    async def cache_policy(self) -> str:
        """The cache policy property (``"default"``/``"retain"``)."""
        return await self._owner.run(lambda: self._md.cache_policy)

    async def set(self, name: str, value: Any) -> None:
        """Sets one of the properties (``description``, ``record_type``, ``layer_type``,
        ``created_at``, ``cache_policy``) as the blocking setter does.

        Raises:
            InvalidError: ``name`` is not one of them, or the setter refuses ``value``.
        """
        if name not in ("description", "record_type", "layer_type", "created_at", "cache_policy"):
            msg = f"metadata of record {self.id!r} has no settable property {name!r}"
            raise InvalidError(msg)
        await self._owner.run(setattr, self._md, name, value)


class AsyncMountable:
    """The async face of :class:`Mountable`: ``readonly``, ``mounts``, ``async local()``."""

    def __init__(self, mountable: Mountable, owner: AsyncCache) -> None:
        self.mountable = mountable
        self._owner = owner

    @property
    def readonly(self) -> bool:
        """Whether the mounts are read-only."""
        return self.mountable.readonly

    @property
    def mounts(self) -> tuple[Mount, ...]:
        """The mount descriptions."""
        return self.mountable.mounts

    @contextlib.asynccontextmanager
    async def local(self) -> AsyncIterator[Path]:
        """Yields a local directory (mounted and unmounted on the executor)."""
        cm = self.mountable.local()

        def unmount(_path: Path) -> None:
            cm.__exit__(None, None, None)

        path = await self._owner.run(cm.__enter__, discard=unmount)
        try:
            yield path
        finally:
            await asyncio.shield(self._owner.run(cm.__exit__, None, None, None, discard=None))


class _MountCall:
    """``ref.mount()``: awaitable (an :class:`AsyncMountable`), or ``.local()`` straight away."""

    def __init__(self, ref: _AsyncRef, readonly: bool) -> None:
        self._ref = ref
        self._readonly = readonly

    async def _mountable(self) -> AsyncMountable:
        mountable = await self._ref._owner.run(self._ref.ref.mount, self._readonly, discard=None)
        return AsyncMountable(mountable, self._ref._owner)

    def __await__(self) -> Generator[Any, None, AsyncMountable]:
        return self._mountable().__await__()

    @contextlib.asynccontextmanager
    async def local(self) -> AsyncIterator[Path]:
        """``async with ref.mount().local() as path``: mount, then a local directory."""
        mountable = await self._mountable()
        async with mountable.local() as path:
            yield path


R = TypeVar("R", ImmutableRef, MutableRef)


class _AsyncRef(Generic[R]):
    """Common part of the async handles: the blocking handle plus its cache's executor."""

    def __init__(self, ref: R, owner: AsyncCache) -> None:
        self.ref: R = ref
        self._owner = owner

    def __repr__(self) -> str:
        return f"Async{self.ref!r}"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.release()

    @property
    def id(self) -> str:
        """The record id."""
        return self.ref.id

    @property
    def released(self) -> bool:
        """Whether this handle was released (or consumed by a commit)."""
        return self.ref.released

    @property
    def metadata(self) -> AsyncRefMetadata:
        """The record's metadata (async accessors)."""
        return AsyncRefMetadata(self.ref.metadata, self._owner)

    @property
    def desc_handlers(self) -> Mapping[str, DescHandler]:
        """The descriptor handlers this handle carries (read-only)."""
        return self.ref.desc_handlers

    def desc_handler(self, digest: str) -> DescHandler | None:
        """The handler for blob ``digest``, if any."""
        return self.ref.desc_handler(digest)

    async def info(self) -> RecordInfo:
        """Everything known about the record."""
        return await self._owner.run(self.ref.info)

    async def release(self) -> None:
        """Releases this handle (a cancelled await still releases it)."""
        # Chained on the actors' reply callbacks: no executor thread waits for it. A cancel
        # while stepping aside for other coroutines still releases the handle.
        try:
            await self._owner.fair_share()
        finally:
            released = self.ref.start_release()
        await self._owner.result_of(released, None)


class AsyncImmutableRef(_AsyncRef[ImmutableRef]):
    """The async face of :class:`ImmutableRef` (methods run on the executor)."""

    async def clone(self) -> AsyncImmutableRef:
        """A new handle on the same record."""
        if self._owner._closing:
            raise self._owner.cache_closed("clone")
        # Chained on the actors' reply callbacks: no executor thread waits for it.
        await self._owner.fair_share()
        ref = await self._owner.result_of(self.ref.start_clone())
        return AsyncImmutableRef(ref, self._owner)

    async def finalize(self) -> None:
        """Commits the snapshot of an equal pair (lazy commit)."""
        await self._owner.run(self.ref.finalize)

    def mount(self, readonly: bool = True) -> _MountCall:
        """``await ref.mount()`` gives an :class:`AsyncMountable`; ``async with
        ref.mount().local() as path`` mounts and unmounts."""
        return _MountCall(self, readonly)

    async def extract(self, desc_handlers: Mapping[str, DescHandler] | None = None) -> None:
        """Materialises the snapshot (:meth:`ImmutableRef.extract`)."""
        await self._owner.run(self.ref.extract, desc_handlers)

    async def size(self) -> int:
        """Disk usage in bytes (measured once, cached)."""
        return await self._owner.run(self.ref.size)

    async def layer_chain(self) -> AsyncRefList:
        """Clones of the layer chain's refs, root first; release the list."""
        refs = await self._owner.run(self.ref.layer_chain)
        return AsyncRefList(AsyncImmutableRef(r, self._owner) for r in refs)

    async def walk_ancestors(self) -> list[str]:
        """Ids of the record and every ancestor, depth first."""
        return await self._owner.run(self.ref.walk_ancestors)

    async def get_remotes(self, compression: str = "gzip", **options: bool) -> list[Remote]:
        """The layers as descriptors plus a provider (:meth:`ImmutableRef.get_remotes`)."""
        return await self._owner.run(lambda: self.ref.get_remotes(compression, **options))

    async def file_list(self) -> list[str]:
        """Sorted paths of the record's layer tarball."""
        return await self._owner.run(self.ref.file_list)


class AsyncMutableRef(_AsyncRef[MutableRef]):
    """The async face of :class:`MutableRef` (methods run on the executor)."""

    async def commit(self) -> AsyncImmutableRef:
        """Creates the equal immutable record and consumes this handle.

        A commit whose await is cancelled may still happen; its immutable handle is then
        released.
        """
        if self._owner._closing:
            raise self._owner.cache_closed("commit")
        # Chained on the manager's reply callback: no executor thread waits for it.
        await self._owner.fair_share()
        ref = await self._owner.result_of(self.ref.start_commit())
        return AsyncImmutableRef(ref, self._owner)

    def mount(self, readonly: bool = False) -> _MountCall:
        """``await ref.mount()`` or ``async with ref.mount().local() as path``."""
        return _MountCall(self, readonly)


class AsyncRefList(list[AsyncImmutableRef]):
    """A list of async immutable refs whose :meth:`release` releases each."""

    def __init__(self, refs: Iterable[AsyncImmutableRef] = ()) -> None:
        super().__init__(refs)

    async def release(self) -> None:
        """Releases every ref (already released ones are skipped)."""
        for ref in self:
            if not ref.released:
                await ref.release()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.release()
