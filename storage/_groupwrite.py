"""Group commit: small metadata writes of concurrent operations share one transaction.

Every LMDB commit of the environment flushes its pages (``sync=True``: one ``fsync``), so a
writer that commits alone pays a whole ``fsync`` for a few hundred bytes, and concurrent
writers queue on the write lock to pay one each. :class:`GroupWriter` is one thread that
drains a queue of *write closures* (``fn(txn) -> value``): it runs every closure queued at
that moment in one write transaction, in the order they were submitted, commits once (one
``fsync``), and only then answers each caller. While it commits, new closures queue up and
form the next batch, so a lone caller waits for one commit and many callers share theirs.

Rules:

* **Nothing is answered before it is durable.** A caller's future completes after the commit
  that holds its write (and the transaction's :meth:`~WriteTxn.after_commit` callbacks).
* **A failing closure fails only its caller.** Each closure runs behind a savepoint
  (``WriteTxn._mark``): when it raises, its writes are undone (its
  :meth:`~WriteTxn.after_rollback` callbacks run) and the batch goes on without it; it leaves
  nothing half-written. A commit that fails fails every caller of the batch (nothing of it
  was written).
* **Closures are short and use only the transaction they are given.** They run on the
  writer's thread with the write lock held: no slow I/O (build directories before, register
  a keyed :meth:`~WriteTxn.before_commit` for an ``fsync`` the batch may share), no other
  transaction, and never a wait on another thread that could be waiting for this writer.
  Slow cleanup registered with :meth:`~WriteTxn.after_unlock` runs in the caller's thread
  (:meth:`GroupWriter.write`), after the writer moved on.
* :meth:`GroupWriter.close` refuses new closures (:class:`ClosedError`) and drains the queue:
  everything submitted before it is written (or fails) before it returns.

The writer is plain synchronous code with a thread of its own (no actors): any thread may
submit, including an actor's, which then answers its caller with the future.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar

from ._errors import CacheTimeoutError, ClosedError, RefcacheError

if TYPE_CHECKING:
    from ._env import MetaEnv, WriteTxn

__all__ = ["GroupWriter"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Closures per transaction at most: bounds the latency of a batch (and of its replay).
MAX_BATCH = 512


class _Item:
    """One queued closure, its caller's future and its after-unlock callbacks."""

    __slots__ = ("fn", "future", "unlock", "unlock_here", "urgent")

    def __init__(self, fn: Callable[[WriteTxn], Any], unlock_here: bool, urgent: bool) -> None:
        self.fn = fn
        self.future: Future[Any] = Future()
        self.unlock: list[Callable[[], object]] = []
        self.unlock_here = unlock_here
        self.urgent = urgent


class GroupWriter:
    """The group-commit writer of one :class:`MetaEnv` (see the module docstring).

    Args:
        env: The environment written.
        max_batch: Closures per transaction at most.
    """

    def __init__(self, env: MetaEnv, *, max_batch: int = MAX_BATCH) -> None:
        self._env = env
        self._max_batch = max_batch
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[_Item] = deque()
        self._closed = False
        self._busy = False  # a batch is being written (by the writer's thread or a caller)
        self._urgent = 0  # queued writes that do not linger
        self._deadline: float | None = None  # when the first lingering write is due
        self._thread: threading.Thread | None = None
        #: Transactions committed, and closures they held (for metrics and tests).
        self.commits = 0
        self.writes = 0

    # -- callers ------------------------------------------------------------------------------

    def submit(self, fn: Callable[[WriteTxn], T], *, linger: float = 0.0) -> Future[T]:
        """Queues ``fn``; the future has its value once the commit holding it is durable.

        ``fn``'s :meth:`~WriteTxn.after_unlock` callbacks run on the writer's thread after
        the batch is answered.

        Args:
            fn: The write closure.
            linger: Seconds the write may wait for a batch to join before it gets one of its
                own (write-behind statistics ride along with other writes this way).

        Raises:
            ClosedError: the writer is closed.
        """
        item, _ = self._enqueue(fn, sync=False, linger=linger)
        return item.future

    def write(self, fn: Callable[[WriteTxn], T], timeout: float | None = None) -> T:
        """Runs ``fn`` in the next group transaction and returns its value once durable.

        When no batch is being written, the calling thread writes the queue itself (as the
        writer's thread would: the same order, one transaction): a lone writer saves two
        thread switches. ``fn``'s :meth:`~WriteTxn.after_unlock` callbacks run in this thread.

        Raises:
            ClosedError: the writer is closed.
            TimeoutError: (refcache's) no answer within ``timeout`` seconds (the write
                may still happen).
            RefcacheError: the commit failed, or called from a closure or while this
                thread holds a write transaction (either would wait for itself).
            Exception: whatever ``fn`` raised (nothing of it was written).
        """
        item, batch = self._enqueue(fn, sync=True, linger=0.0)
        if batch:
            self._write_batch(batch)
        try:
            value: T = item.future.result(timeout)
        except TimeoutError as exc:  # the builtin: concurrent.futures' wait ran out
            msg = f"a metadata write did not commit within {timeout:g} s"
            raise CacheTimeoutError(msg) from exc
        for callback in item.unlock:
            try:
                callback()
            except Exception:
                logger.exception("after-unlock callback %r failed", callback)
        return value

    def _enqueue(
        self, fn: Callable[[WriteTxn], Any], *, sync: bool, linger: float
    ) -> tuple[_Item, list[_Item] | None]:
        """Queues ``fn``; for a synchronous caller who finds no batch being written, takes
        the next batch for it to write."""
        if sync and self._env._write_lock._is_owned():  # type: ignore[attr-defined]
            msg = (
                "a group write closure may not wait for another, nor a thread in a write "
                "transaction (it would wait for itself)"
            )
            raise RefcacheError(msg)
        item = _Item(fn, sync, linger <= 0)
        with self._cond:
            if self._closed:
                msg = f"the metadata writer of {self._env.path} is closed"
                raise ClosedError(msg)
            self._queue.append(item)
            if linger > 0:
                deadline = time.monotonic() + linger
                if self._deadline is None or deadline < self._deadline:
                    self._deadline = deadline
            else:
                self._urgent += 1
            if sync and not self._busy:
                return item, self._take()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="refcache-group-commit", daemon=True
                )
                self._thread.start()
            elif not self._busy and (linger <= 0 or len(self._queue) == 1):
                self._cond.notify()
        return item, None

    def _take(self) -> list[_Item]:
        """The next batch (called with the lock held); marks a batch as being written."""
        n = min(len(self._queue), self._max_batch)
        batch = [self._queue.popleft() for _ in range(n)]
        self._urgent = sum(1 for item in self._queue if item.urgent)
        if not self._queue:
            self._deadline = None
        self._busy = True
        return batch

    def close(self, timeout: float = 60.0) -> None:
        """Refuses new writes and drains the queue (everything queued is written or fails).

        Safe to call twice.
        """
        with self._cond:
            self._closed = True
            if self._queue and self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="refcache-group-commit", daemon=True
                )
                self._thread.start()
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    # -- the writer's thread ------------------------------------------------------------------

    def _ready(self) -> bool:
        # With the lock held: a batch is due (an urgent write, or a lingering one's time).
        if self._busy or not self._queue:
            return False
        if self._urgent or self._closed:
            return True
        return self._deadline is not None and time.monotonic() >= self._deadline

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._ready():
                    if self._closed and not self._queue and not self._busy:
                        return  # closed and drained
                    wait = None
                    if not self._busy and self._queue and self._deadline is not None:
                        wait = max(self._deadline - time.monotonic(), 0.0)
                    self._cond.wait(wait)
                batch = self._take()
            self._write_batch(batch)

    def _write_batch(self, batch: list[_Item]) -> None:
        try:
            self._write(batch)
        except BaseException as exc:  # never leave callers waiting
            logger.exception("group commit of %d writes failed", len(batch))
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
        finally:
            with self._cond:
                self._busy = False
                if self._queue or self._closed:
                    if self._thread is None:
                        self._thread = threading.Thread(
                            target=self._run, name="refcache-group-commit", daemon=True
                        )
                        self._thread.start()
                    self._cond.notify()

    def _write(self, batch: list[_Item]) -> None:
        env = self._env
        done: list[tuple[_Item, Any, int, int]] = []
        with env._write_lock:
            wtxn = env._new_write_txn()
            try:
                for item in batch:
                    mark = wtxn._mark()
                    try:
                        value = item.fn(wtxn)
                    except BaseException as exc:
                        # Only this caller fails: undo its writes, keep the others'.
                        wtxn._rollback_to(mark)
                        item.future.set_exception(exc)
                        continue
                    done.append((item, value, mark[2], len(wtxn._after_unlock)))
                if not done:
                    wtxn._txn.abort()
                    return
                wtxn._run_before()
                env._commit(wtxn)
            except BaseException as exc:
                wtxn._txn.abort()
                wtxn._rolled_back()
                error = exc if isinstance(exc, RefcacheError) else _commit_error(env, exc)
                if error is not exc:
                    logger.exception("group commit of %d writes failed", len(done))
                for item, *_ in done:
                    item.future.set_exception(error)
                return
            self.commits += 1
            self.writes += len(done)
            for callback in wtxn._after:
                try:
                    callback()
                except Exception:
                    logger.exception("after-commit callback %r failed", callback)
        later: list[Callable[[], object]] = []
        for item, value, start, end in done:
            if item.unlock_here:
                item.unlock = wtxn._after_unlock[start:end]
            else:
                later += wtxn._after_unlock[start:end]
            item.future.set_result(value)
        for callback in later:
            try:
                callback()
            except Exception:
                logger.exception("after-unlock callback %r failed", callback)


def _commit_error(env: MetaEnv, exc: BaseException) -> RefcacheError:
    error = RefcacheError(f"group commit of metadata in {env.path} failed: {exc!r}")
    error.__cause__ = exc
    return error
