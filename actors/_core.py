"""Services shared by the manager, the record actors and the ref handles of one cache.

A :class:`CacheCore` holds no record state: only the stores (thread-safe), the record actor
pool, the I/O executor, the statistics writer, single-flight groups and a few counters. The
counters are the only mutable state here (they live outside every actor, as Pykka's
``ActorRegistry`` does): each is guarded by its own lock, except the operation counters,
which every ref operation bumps and so are kept per thread without a lock (see
:meth:`CacheCore.observe`).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pykka

from ..storage import (
    MAX_LAYER_ENTRIES,
    MAX_LAYER_SIZE,
    MOUNTS_DIR,
    Applier,
    CacheTimeoutError,
    ClosedError,
    InvalidError,
    MetadataStore,
    MetaEnv,
    TarApplier,
)
from ._protocol import Message, ask, run_slow
from ._runtime import ActorPool
from ._writer import MetadataWriter

if TYPE_CHECKING:
    from ..storage import LmdbLeaseManager, LocalContentStore, Snapshotter

__all__ = [
    "LATENCY_BUCKETS",
    "BoundedCalls",
    "CacheCore",
    "RegistryCounters",
    "SingleFlight",
    "get_result",
]

T = TypeVar("T")
R = TypeVar("R")

#: Upper bounds (seconds) of the operation latency histogram buckets (Prometheus style).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


def get_result(future: Any, timeout: float, what: str) -> Any:
    """Waits for a Pykka or concurrent future, unwrapping nested futures.

    Pykka's ``ActorDeadError`` passes through (callers use it to re-activate a passivated
    record); the public boundaries (:mod:`actors._proxy`, the handles) turn it into
    :class:`ClosedError`.

    Raises:
        TimeoutError: the answer did not come within ``timeout`` (naming ``what``); the
            refcache class (``CacheTimeoutError`` here), not the builtin.
        ClosedError: the job was cancelled: the cache is closing.
    """
    deadline = time.monotonic() + timeout
    value = future
    while isinstance(value, pykka.Future | Future):
        remaining = max(deadline - time.monotonic(), 0.0)
        try:
            if isinstance(value, pykka.Future):
                value = value.get(timeout=remaining)
            else:
                value = value.result(timeout=remaining)
        except (pykka.Timeout, TimeoutError) as exc:
            msg = f"{what} did not finish within {timeout:g} s"
            raise CacheTimeoutError(msg) from exc
        except CancelledError as exc:
            # Only Cache.close cancels jobs (executor shutdown with cancel_futures).
            msg = f"{what} was cancelled: the cache is closing"
            raise ClosedError(msg) from exc
    return value


K = TypeVar("K")


def _observe(sums: dict[K, float], buckets: dict[K, list[int]], key: K, seconds: float) -> None:
    """Adds one latency to the histogram of ``key`` (the caller holds the counters' lock)."""
    sums[key] = sums.get(key, 0.0) + seconds
    counts = buckets.get(key)
    if counts is None:
        counts = buckets[key] = [0] * len(LATENCY_BUCKETS)
    for i, bound in enumerate(LATENCY_BUCKETS):
        if seconds <= bound:
            counts[i] += 1


#: One call for a :class:`BoundedCalls` worker: its reply, the callable, the arguments.
_Job = tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]


class BoundedCalls:
    """Runs foreign callables (the ``ref_checker``) on a thread of their own, each call
    bounded by a timeout.

    A call that does not return in time fails with :class:`TimeoutError` (refcache's) in the
    caller, and the worker thread stuck in it is retired: Python cannot interrupt it, so it
    is left to finish on its own (a daemon thread, it never holds up the process's exit) and
    the next call starts a fresh worker. A hung callable can thus cost a waiting caller the
    timeout, never the cache its prune queue or its manager.

    Args:
        name: Worker thread name.
        timeout: Seconds each call may take.
    """

    def __init__(self, name: str, timeout: float) -> None:
        self._name = name
        self._timeout = timeout
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None

    def call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """Returns ``fn(*args)`` run on the worker thread; its exceptions propagate.

        Raises:
            TimeoutError: ``fn`` did not return within the timeout (naming ``what``).
        """
        done: Future[T] = Future()
        with self._lock:
            jobs = self._jobs
            if self._worker is None:
                self._worker = threading.Thread(
                    target=self._run, args=(jobs,), name=self._name, daemon=True
                )
                self._worker.start()
            jobs.put((done, fn, args))
        try:
            return done.result(timeout=self._timeout)
        except TimeoutError as exc:
            with self._lock:
                if self._jobs is jobs:
                    # Retire the stuck worker: a sentinel ends it should the call return.
                    # Calls queued behind it time out on their own.
                    jobs.put(None)
                    self._jobs = queue.SimpleQueue()
                    self._worker = None
            msg = f"{what} did not return within {self._timeout:g} s"
            raise CacheTimeoutError(msg) from exc

    def close(self) -> None:
        """Ends the worker once it is idle (calls made afterwards start a new one)."""
        with self._lock:
            if self._worker is not None:
                self._jobs.put(None)
                self._jobs = queue.SimpleQueue()
                self._worker = None

    @staticmethod
    def _run(jobs: queue.SimpleQueue[_Job | None]) -> None:
        while True:
            job = jobs.get()
            if job is None:
                return
            done, fn, args = job
            if not done.set_running_or_notify_cancel():
                continue
            try:
                done.set_result(fn(*args))
            except BaseException as exc:
                done.set_exception(exc)


class SingleFlight:
    """Concurrent calls with the same key share one computation (BuildKit ``flightcontrol``).

    The computation runs in the thread of the first caller; the others wait for its result.
    The table lives outside every actor and is guarded by a lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[str, Future[Any]] = {}

    def do(self, key: str, fn: Callable[[], T], *, timeout: float = 3600.0) -> T:
        """Runs ``fn`` once for all concurrent callers with ``key``; returns its result."""
        with self._lock:
            call = self._calls.get(key)
            leader = call is None
            if call is None:
                call = Future()
                self._calls[key] = call
        if not leader:
            return get_result(call, timeout, f"waiting for {key}")
        try:
            result = fn()
        except BaseException as exc:
            with self._lock:
                self._calls.pop(key, None)
            call.set_exception(exc)
            raise
        with self._lock:
            self._calls.pop(key, None)
        call.set_result(result)
        return result


class _OpCounters:
    """Operation outcomes and latencies; ``latency_counts`` per bucket, not cumulative.

    ``latency_counts[op][i]`` counts latencies in bucket ``i`` of ``LATENCY_BUCKETS`` (the
    last slot: above every bound), so recording one is a single increment.
    """

    __slots__ = ("latency_counts", "latency_sum", "operations")

    def __init__(self) -> None:
        self.operations: dict[tuple[str, str], int] = {}
        self.latency_sum: dict[str, float] = {}
        self.latency_counts: dict[str, list[int]] = {}

    def add(self, other: _OpCounters) -> None:
        """Adds a copy of ``other`` (each dict and list copied at once, see ``snapshot``)."""
        for key, n in other.operations.items():
            self.operations[key] = self.operations.get(key, 0) + n
        for op, seconds in other.latency_sum.items():
            self.latency_sum[op] = self.latency_sum.get(op, 0.0) + seconds
        for op, counts in other.latency_counts.items():
            mine = self.latency_counts.setdefault(op, [0] * (len(LATENCY_BUCKETS) + 1))
            for i, n in enumerate(counts):
                mine[i] += n

    def snapshot(self) -> _OpCounters:
        """A copy, safe while the owning thread goes on counting.

        Each ``dict(...)``/``list(...)`` copy runs in C under the GIL, so it is consistent
        in itself; an operation being counted meanwhile may show in one dict and not yet in
        another (statistics, not accounting).
        """
        copy = _OpCounters()
        copy.operations = dict(self.operations)
        copy.latency_sum = dict(self.latency_sum)
        copy.latency_counts = {op: list(c) for op, c in list(self.latency_counts.items())}
        return copy


class _ThreadOpCounters(_OpCounters):
    """One thread's operation counters: written only by that thread, so no lock is needed
    and no update is lost; readers copy them (``snapshot``)."""

    __slots__ = ("thread",)

    def __init__(self, thread: threading.Thread) -> None:
        super().__init__()
        self.thread = thread


@dataclass
class _Counters:
    lock: threading.Lock = field(default_factory=threading.Lock)
    double_releases: int = 0
    #: Counts of threads that have ended (folded in by ``CacheCore.counters``).
    ended: _OpCounters = field(default_factory=_OpCounters)
    #: Per-thread counts of threads alive at the last read (the list is guarded by ``lock``).
    threads: list[_ThreadOpCounters] = field(default_factory=list)


class _Timed(AbstractContextManager[None]):
    """``CacheCore.timed``: a plain context manager (a generator-based one costs several
    allocations per ref operation)."""

    __slots__ = ("_core", "_operation", "_start")

    def __init__(self, core: CacheCore, operation: str) -> None:
        self._core = core
        self._operation = operation
        self._start = 0.0

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, exc_type: type[BaseException] | None, *_rest: object) -> None:
        result = "ok" if exc_type is None else exc_type.__name__
        self._core.observe(self._operation, result, time.perf_counter() - self._start)


@dataclass
class RegistryCounters:
    """Transfers to and from registries and OCI layouts since open (copies, for statistics).

    Attributes:
        bytes: Bytes per direction (``push``: uploaded; ``pull``: fetched).
        blobs: Blobs per ``(direction, result)``: ``push`` ``uploaded``/``skipped``/
            ``mounted``, ``pull`` ``fetched``.
        requests: HTTP exchanges per ``(operation, status)``.
        latency_sum: Summed latency (to the response headers) per ``(operation, status)``.
        latency_buckets: Cumulative counts per ``(operation, status)`` over
            :data:`LATENCY_BUCKETS`.
    """

    bytes: dict[str, int] = field(default_factory=dict)
    blobs: dict[tuple[str, str], int] = field(default_factory=dict)
    requests: dict[tuple[str, str], int] = field(default_factory=dict)
    latency_sum: dict[tuple[str, str], float] = field(default_factory=dict)
    latency_buckets: dict[tuple[str, str], list[int]] = field(default_factory=dict)


class CacheCore:
    """The services of one open cache (see the module docstring).

    Args:
        root: The cache root directory.
        env: The metadata environment.
        snapshotter: The snapshotter.
        content: The content store.
        leases: The lease manager.
        pool: Record actor pool (owned by the cache).
        io_workers: Threads of the I/O executor.
        timeout: Default timeout of every wait on an actor or a job.
        max_layer_size: Cap on a layer's uncompressed size when it is applied.
        max_layer_entries: Cap on a layer's number of tar entries when it is applied.
    """

    def __init__(
        self,
        *,
        root: Path,
        env: MetaEnv,
        snapshotter: Snapshotter,
        content: LocalContentStore,
        leases: LmdbLeaseManager,
        pool: ActorPool,
        io_workers: int = 4,
        timeout: float = 300.0,
        max_layer_size: int = MAX_LAYER_SIZE,
        max_layer_entries: int = MAX_LAYER_ENTRIES,
    ) -> None:
        self.root = root
        #: Where temporary mount points go (found and removed at open after a crash).
        self.mount_root = root / MOUNTS_DIR
        self.env = env
        self.store = MetadataStore(env)
        self.snapshotter = snapshotter
        self.content = content
        self.leases = leases
        #: Unpacks layer blobs into snapshots (extraction of lazy records). Replaceable, e.g.
        #: by a counting subclass in tests or a baseline in benchmarks.
        self.applier: Applier = TarApplier(
            content,
            mount_root=self.mount_root,
            max_size=max_layer_size,
            max_entries=max_layer_entries,
        )
        self.pool = pool
        self.timeout = timeout
        self.writer = MetadataWriter(self.store)
        self.executor = ThreadPoolExecutor(max_workers=io_workers, thread_name_prefix="refcache-io")
        self.flights = SingleFlight()
        self.manager: pykka.ActorRef[Any] | None = None
        #: Set when :meth:`Cache.close` begins: from then on the public API refuses calls
        #: with :class:`ClosedError` (jobs in flight still reach the manager until it stops).
        self.closed = False
        self._handle_ids = itertools.count(1)
        self._counters = _Counters()
        self._thread_counters = threading.local()
        self._registry = RegistryCounters()
        #: Descriptor handlers of pulled sources, by blob digest, for as long as the cache
        #: is open (see :meth:`register_handlers`); guarded by ``_handlers_lock``.
        self._remote_handlers: dict[str, Any] = {}
        self._handlers_lock = threading.Lock()
        #: Things to close with the cache (registry connection pools of pulled sources).
        self.closers: list[Callable[[], None]] = []
        #: Registry clients by (host, insecure, CA file, credentials): one connection pool
        #: and one token table per registry and identity, reused by every push and pull of
        #: this cache (guarded by ``_handlers_lock``; closed with the cache).
        self.registry_clients: dict[tuple[Any, ...], Any] = {}
        self.token = object()  # identifies handles of this cache
        self._foreign = BoundedCalls("refcache-ref-checker", timeout)
        self._ref_checker: Callable[[str, Sequence[str]], bool] | None = None

    # -- foreign code --------------------------------------------------------------------------

    @property
    def ref_checker(self) -> Callable[[str, Sequence[str]], bool] | None:
        """BuildKit's PruneRefChecker, ``(record id, layer digest chain) -> used elsewhere?``,
        wrapped so that each call runs off the calling thread, bounded by the cache timeout
        (it is foreign code: a hung checker fails a disk usage or prune with
        :class:`TimeoutError` and never blocks the prune queue)."""
        checker = self._ref_checker
        if checker is None:
            return None

        def bounded(record_id: str, chain: Sequence[str]) -> bool:
            what = f"the ref checker for record {record_id}"
            return bool(self._foreign.call(what, checker, record_id, chain))

        return bounded

    @ref_checker.setter
    def ref_checker(self, checker: Callable[[str, Sequence[str]], bool] | None) -> None:
        if checker is not None and not callable(checker):
            msg = f"ref_checker must be callable, not {checker!r}"
            raise InvalidError(msg)
        self._ref_checker = checker

    def close_foreign(self) -> None:
        """Ends the thread that runs the ``ref_checker`` (at :meth:`Cache.close`)."""
        self._foreign.close()

    # -- ids and counters --------------------------------------------------------------------

    def next_handle_id(self) -> int:
        """A process-unique handle id (``itertools.count`` is atomic under the GIL)."""
        return next(self._handle_ids)

    def count_double_release(self) -> None:
        """Counts a release of an already released (or consumed) handle."""
        with self._counters.lock:
            self._counters.double_releases += 1

    def observe(self, operation: str, result: str, seconds: float) -> None:
        """Records one operation outcome and its latency for :class:`CacheStatistics`.

        Every ref operation comes here, from any number of threads: the counts go to the
        calling thread's own counters, without a lock (a shared lock would make threads
        queue behind one preempted while holding it); :meth:`counters` adds them up.
        """
        mine: _OpCounters | None = getattr(self._thread_counters, "counters", None)
        if mine is None:
            mine = self._new_thread_counters()
        key = (operation, result)
        ops = mine.operations
        ops[key] = ops.get(key, 0) + 1
        sums = mine.latency_sum
        sums[operation] = sums.get(operation, 0.0) + seconds
        counts = mine.latency_counts.get(operation)
        if counts is None:
            counts = mine.latency_counts[operation] = [0] * (len(LATENCY_BUCKETS) + 1)
        counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1

    def _new_thread_counters(self) -> _ThreadOpCounters:
        mine = _ThreadOpCounters(threading.current_thread())
        self._thread_counters.counters = mine
        with self._counters.lock:
            self._counters.threads.append(mine)
        return mine

    def timed(self, operation: str) -> AbstractContextManager[None]:
        """Times the block as ``operation`` with result ``ok`` or the error class name."""
        return _Timed(self, operation)

    def counters(
        self,
    ) -> tuple[int, dict[tuple[str, str], int], dict[str, float], dict[str, tuple[int, ...]]]:
        """Returns copies of (double releases, operations, latency sums, latency buckets).

        The latency buckets are cumulative (``LATENCY_BUCKETS``' upper bounds, Prometheus
        style). The counters of threads that have ended are folded into one total here.
        """
        c = self._counters
        with c.lock:
            total = _OpCounters()
            total.add(c.ended)
            alive = []
            for counters in c.threads:
                # A thread that has ended counts nothing more: fold it in and forget it.
                ended = not counters.thread.is_alive()
                copy = counters.snapshot()
                total.add(copy)
                if ended:
                    c.ended.add(copy)
                else:
                    alive.append(counters)
            c.threads = alive
            doubles = c.double_releases
        buckets = {
            op: tuple(itertools.accumulate(counts[: len(LATENCY_BUCKETS)]))
            for op, counts in total.latency_counts.items()
        }
        return doubles, total.operations, total.latency_sum, buckets

    # -- registries ----------------------------------------------------------------------

    def observe_registry(self, operation: str, status: str, seconds: float) -> None:
        """Records one registry HTTP exchange (latency until the response headers)."""
        c, r = self._counters, self._registry
        key = (operation, status)
        with c.lock:
            r.requests[key] = r.requests.get(key, 0) + 1
            _observe(r.latency_sum, r.latency_buckets, key, seconds)

    def count_transfer(self, direction: str, result: str, nbytes: int = 0, blobs: int = 1) -> None:
        """Counts blobs (and bytes) moved to (``push``) or from (``pull``) a registry."""
        c, r = self._counters, self._registry
        with c.lock:
            if blobs:
                key = (direction, result)
                r.blobs[key] = r.blobs.get(key, 0) + blobs
            if nbytes:
                r.bytes[direction] = r.bytes.get(direction, 0) + nbytes

    def registry_counters(self) -> RegistryCounters:
        """A copy of the registry counters."""
        c, r = self._counters, self._registry
        with c.lock:
            return RegistryCounters(
                dict(r.bytes),
                dict(r.blobs),
                dict(r.requests),
                dict(r.latency_sum),
                {k: list(v) for k, v in r.latency_buckets.items()},
            )

    def register_handlers(self, handlers: Mapping[str, Any]) -> None:
        """Keeps a pulled source's descriptor handlers for the life of the open cache.

        A later ``get`` of a pulled lazy record (or of one built on it) finds its handler
        here when the caller's handle did not carry one: a pulled record never raises
        ``NeedsRemoteProviderError`` while the cache that pulled it is open. The newest
        pull of a digest wins.
        """
        with self._handlers_lock:
            self._remote_handlers.update(handlers)

    def registry_client(self, key: tuple[Any, ...], make: Callable[[], Any]) -> Any:
        """The registry client for ``key``, made (and closed with the cache) once."""
        with self._handlers_lock:
            client = self.registry_clients.get(key)
            if client is None:
                client = self.registry_clients[key] = make()
                self.closers.append(client.close)
            return client

    def remote_handlers_for(self, digests: Sequence[str]) -> dict[str, Any]:
        """The registered handlers of ``digests`` (those that have one)."""
        with self._handlers_lock:
            return {d: self._remote_handlers[d] for d in digests if d in self._remote_handlers}

    # -- waiting -----------------------------------------------------------------------------

    def closed_error(self, what: str = "") -> ClosedError:
        """The :class:`ClosedError` for ``what`` (an operation), naming the cache."""
        doing = f"cannot {what}: " if what else ""
        return ClosedError(f"{doing}the cache at {self.root} is closed")

    def check_open(self, what: str) -> None:
        """Raises :class:`ClosedError` once :meth:`Cache.close` has begun."""
        if self.closed:
            raise self.closed_error(what)

    def manager_ref(self) -> pykka.ActorRef[Any]:
        """The manager actor, or :class:`ClosedError` once it has stopped."""
        ref = self.manager
        if ref is None or not ref.is_alive():
            raise self.closed_error()
        return ref

    def ask_manager(self, message: Message[R]) -> R:
        """Asks the manager actor (with this cache's timeout); returns the message's reply.

        Works while :meth:`Cache.close` drains the manager's mailbox (jobs in flight finish
        or fail cleanly); fails with :class:`ClosedError` once the manager has stopped.
        """
        ref = self.manager_ref()
        try:
            return ask(ref, message, self.timeout)
        except pykka.ActorDeadError as exc:
            raise self.closed_error() from exc

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Runs ``fn(*args)`` on the I/O executor.

        Raises:
            ClosedError: the executor is shut down (the cache is closing).
        """
        try:
            return self.executor.submit(run_slow, fn, *args)
        except RuntimeError as exc:
            raise self.closed_error() from exc

    def check_owner(self, token: object, what: str) -> None:
        """Raises :class:`InvalidError` when a handle belongs to another cache."""
        if token is not self.token:
            msg = f"{what} belongs to another cache than {self.root}"
            raise InvalidError(msg)
