"""Write-behind of small per-record metadata (last-used, usage count, cached size).

BuildKit writes ``cache.lastUsedAt``/``cache.usageCount`` with one fsync'd bolt update on every
release of a used ref, under the manager lock (1.4-1.6k unreferenced get+release/s measured
here). refcache queues these values instead: a record actor (a use) or the manager (a size)
hands an immutable mapping to :class:`MetadataWriter`, which coalesces them per record and
writes them behind through the group writer (``storage/_groupwrite.py``): they join the next
record write's transaction and fsync, or commit on their own at most a few milliseconds
later. Drains commit in the order they were queued, and :meth:`MetadataWriter.flush` returns
once everything submitted before it is durable.

What is written here is statistics, not structure: records, parents, commits, equal links and
the ``cache.deleted`` flag are written synchronously by their owners. A ``kill -9`` may lose
the last few milliseconds of last-used updates, never a record. Values for a record that was
removed meanwhile are dropped (the write checks that the record still exists in the same
transaction), so a late flush can never resurrect deleted metadata.

Thread ownership: the queue is guarded by a lock; drains run wherever the group writer runs
its batches (its thread, or a caller writing one), :meth:`MetadataWriter.flush` in its
caller's thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any

from ..storage import DB_RECORDS, MetadataStore, RefcacheError, StorageItem, WriteTxn

__all__ = ["MetadataWriter"]

logger = logging.getLogger(__name__)


class MetadataWriter:
    """Coalescing, write-behind writer of per-record statistics, on the group writer.

    Values queued for a record are merged until a *drain* runs: one closure submitted to the
    environment's group writer (:mod:`storage._groupwrite`) that lingers ``delay`` seconds
    for a batch to join (the next record write, whose fsync it shares) before it gets a
    commit of its own. The drain takes whatever is queued when it runs, so values submitted
    while a batch commits coalesce into the next one.

    Args:
        store: The record metadata store.
        delay: Seconds a drain may wait for other writes before it commits alone.
    """

    def __init__(self, store: MetadataStore, *, delay: float = 0.005) -> None:
        self._store = store
        self._delay = delay
        self._lock = threading.Lock()
        self._pending: dict[str, dict[str, Any]] = {}
        self._waiters: list[Future[None]] = []
        self._scheduled = False  # a drain is queued and has not run yet
        self._closed = False
        self.batches = 0
        self.records_written = 0

    def submit(self, record_id: str, values: Mapping[str, Any]) -> Future[None]:
        """Queues ``values`` for ``record_id``; the future completes once they are durable."""
        done: Future[None] = Future()
        with self._lock:
            if self._closed:
                msg = f"metadata writer is closed; cannot write {sorted(values)} of {record_id!r}"
                raise RefcacheError(msg)
            self._pending.setdefault(record_id, {}).update(values)
            self._waiters.append(done)
            schedule = not self._scheduled
            self._scheduled = True
        if schedule:
            self._schedule()
        return done

    def discard(self, record_id: str) -> None:
        """Drops queued values of a record that is being removed."""
        with self._lock:
            self._pending.pop(record_id, None)

    def flush(self) -> None:
        """Writes everything queued now; on return every value submitted before is durable.

        A group write of its own: the group writer commits in submission order, so a drain
        queued earlier commits first, and this one takes whatever is left.
        """
        waiters: list[Future[None]] = []
        try:
            self._store.env.group.write(lambda txn: self._drain(txn, waiters))
        except BaseException as exc:
            self._settle(waiters, exc)
            raise
        self._settle(waiters, None)

    def close(self) -> None:
        """Flushes and refuses further values. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.flush()

    def _schedule(self) -> None:
        waiters: list[Future[None]] = []
        try:
            written = self._store.env.group.submit(
                lambda txn: self._drain(txn, waiters), linger=self._delay
            )
        except RefcacheError as exc:
            with self._lock:
                self._scheduled = False
                waiters, self._waiters = self._waiters, []
                self._pending.clear()
            logger.warning("statistics of the cache cannot be written: %s", exc)
            self._settle(waiters, exc)
            return
        written.add_done_callback(lambda f: self._settle(waiters, f.exception()))

    def _drain(self, txn: WriteTxn, waiters: list[Future[None]]) -> None:
        # On the group writer's thread (or a caller leading a batch), in its transaction.
        with self._lock:
            batch, self._pending = self._pending, {}
            waiters += self._waiters
            self._waiters = []
            self._scheduled = False
        store = self._store
        for record_id, values in batch.items():
            raw = txn.get(DB_RECORDS, record_id.encode())
            if raw is None:
                continue  # removed meanwhile: never resurrect it
            item = StorageItem(store, record_id, raw)
            item.queue_many(values)
            item.commit(txn=txn)
        if batch:
            self.batches += 1
            self.records_written += len(batch)

    @staticmethod
    def _settle(waiters: list[Future[None]], error: BaseException | None) -> None:
        if error is not None and waiters:
            logger.error("writing statistics failed: %s", error)
        for done in waiters:
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)
