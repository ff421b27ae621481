"""Write-behind of small per-record metadata (last-used, usage count, cached size).

BuildKit writes ``cache.lastUsedAt``/``cache.usageCount`` with one fsync'd bolt update on every
release of a used ref, under the manager lock (1.4-1.6k unreferenced get+release/s measured
here). refcache queues these values instead: a record actor (a use) or the manager (a size)
hands an immutable mapping to :class:`MetadataWriter`, which coalesces them per record and
commits them as one group write per batch, a few milliseconds later (sharing the transaction
and fsync of whatever else is being written then: ``storage/_groupwrite.py``).
Batches commit in the order they were taken, and :meth:`MetadataWriter.flush` returns once
everything submitted before it is durable.

What is written here is statistics, not structure: records, parents, commits, equal links and
the ``cache.deleted`` flag are written synchronously by their owners. A ``kill -9`` may lose
the last few milliseconds of last-used updates, never a record. Values for a record that was
removed meanwhile are dropped (the write checks that the record still exists in the same
transaction), so a late flush can never resurrect deleted metadata.

Thread ownership: the writer's queue is guarded by its condition variable; the flush runs on
the writer's own thread (or on the caller of :meth:`flush`).
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
    """Coalescing, batching writer of per-record statistics.

    Args:
        store: The record metadata store.
        delay: Seconds to wait for more writes after the first one of a batch.
        max_batch: Flush at once when this many records are pending.
    """

    def __init__(self, store: MetadataStore, *, delay: float = 0.005, max_batch: int = 512) -> None:
        self._store = store
        self._delay = delay
        self._max_batch = max_batch
        self._cond = threading.Condition()
        self._pending: dict[str, dict[str, Any]] = {}
        self._waiters: list[Future[None]] = []
        self._closed = False
        self._flush_lock = threading.Lock()
        self.batches = 0
        self.records_written = 0
        self._thread = threading.Thread(target=self._run, name="refcache-md-writer", daemon=True)
        self._thread.start()

    def submit(self, record_id: str, values: Mapping[str, Any]) -> Future[None]:
        """Queues ``values`` for ``record_id``; the future completes once they are durable."""
        done: Future[None] = Future()
        with self._cond:
            if self._closed:
                msg = f"metadata writer is closed; cannot write {sorted(values)} of {record_id!r}"
                raise RefcacheError(msg)
            self._pending.setdefault(record_id, {}).update(values)
            self._waiters.append(done)
            if len(self._pending) == 1 or len(self._pending) >= self._max_batch:
                self._cond.notify()
        return done

    def discard(self, record_id: str) -> None:
        """Drops queued values of a record that is being removed."""
        with self._cond:
            self._pending.pop(record_id, None)

    def flush(self) -> None:
        """Writes everything queued now, in the calling thread.

        On return, every value submitted before the call is durable: a batch the writer
        thread took earlier is committed first (batches are taken and written under one
        lock, so they commit in the order they were taken).
        """
        with self._flush_lock:
            with self._cond:
                batch, waiters = self._pending, self._waiters
                self._pending, self._waiters = {}, []
            self._write(batch, waiters)

    def close(self) -> None:
        """Flushes and stops the writer thread. Safe to call twice."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)
        self.flush()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                if len(self._pending) < self._max_batch:
                    # Coalesce: give concurrent releases a moment to join this fsync.
                    self._cond.wait(timeout=self._delay)
            with self._flush_lock:
                with self._cond:
                    batch, waiters = self._pending, self._waiters
                    self._pending, self._waiters = {}, []
                self._write(batch, waiters)

    def _write(self, batch: dict[str, dict[str, Any]], waiters: list[Future[None]]) -> None:
        # Called with _flush_lock held: batches commit in the order they were taken.
        if not batch:
            for done in waiters:
                done.set_result(None)
            return
        store = self._store

        def write(txn: WriteTxn) -> None:
            for record_id, values in batch.items():
                raw = txn.get(DB_RECORDS, record_id.encode())
                if raw is None:
                    continue  # removed meanwhile: never resurrect it
                item = StorageItem(store, record_id, raw)
                item.queue_many(values)
                item.commit(txn=txn)

        try:
            # A group write: the statistics share the fsync of concurrent record writes.
            store.env.group.write(write)
            self.batches += 1
            self.records_written += len(batch)
        except Exception as exc:
            logger.exception("writing statistics of %d records failed", len(batch))
            for done in waiters:
                done.set_exception(exc)
            return
        for done in waiters:
            done.set_result(None)
