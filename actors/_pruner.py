"""Disk usage and prune on the manager's side: the :class:`Pruner` component.

Where BuildKit holds ``cm.mu`` over a scan of every record for each batch of ten deletions
(quadratic: 41-45 s for 10,000 records, with builds stalled meanwhile, #4401), the work is
split so that no manager handler is long and no pass rescans the table:

* **Table scan**: the manager copies its table into immutable
  :class:`~actors._rows.TableRow` values, a thousand rows per message
  (:class:`~actors._messages.TableScan`). Everything else — visibility of equal pairs,
  in-use propagation, shared marking (the external ref checker is foreign code), filters,
  the planning — is computed from those rows by pure functions (:mod:`actors._usage`,
  :mod:`actors._planning`), off the manager's thread, in the jobs of
  :mod:`actors._prune_jobs`.
* **Deletion** of a batch: :class:`~actors._messages.PruneMark` re-checks each record here
  (refs, dead, a use since the scan) and marks it dead — nobody can take it from then on;
  the job measures unknown sizes, then clears the metadata and leases in short
  transactions of whole pairs; :class:`~actors._messages.PruneForget` finally drops the
  records from the table without writing anything (the manager's thread never waits for
  the write lock) and hands back the parents it freed, the next candidates. Handlers are
  bounded by a time budget (:data:`HANDLER_BUDGET_S`) and hand back what they did not get
  to.
* **GC** (``storage.collect``) runs once at the end, as BuildKit's ``GarbageCollect``.

Sizes: unknown sizes are measured by the jobs (never by a handler) and handed here
(:class:`~actors._messages.KnownSizes`), so the table caches them (whether or not the
record's actor is activated), a repeated ``disk_usage`` measures nothing and
``statistics()`` sees what it measured.

One prune runs at a time; later ones wait their turn (BuildKit ``muPrune``). Listeners
(:mod:`actors._listeners`) are told of every deleted record and of the end of each prune.

The :class:`Pruner` is created and owned by the manager; its state and its handlers run on
the manager's thread only.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future
from datetime import timedelta
from typing import Any

import pykka

from ..storage import ClosedError, InvalidError, WriteTxn
from ._core import CacheCore
from ._entry import RecordEntry
from ._messages import (
    Forgotten,
    GcDone,
    KnownSizes,
    Listeners,
    ListenersGone,
    Marked,
    Pair,
    PruneDone,
    PruneForget,
    PruneMark,
    PruneUnmark,
    ScanChunk,
    TableScan,
)
from ._planning import is_after
from ._protocol import handles
from ._prune_jobs import prune_job, usage_job
from ._rows import TableRow, entry_row
from ._table import RecordTable
from ._types import PrunePolicy, UsageInfo
from ._usage import parse_usage_filters

__all__ = ["HANDLER_BUDGET_S", "MAX_OPEN_SCANS", "Pruner"]

logger = logging.getLogger(__name__)

HANDLER_BUDGET_S = 0.005  #: a mark/forget handler hands back what is left after this long
MAX_OPEN_SCANS = 16  #: table scans kept for jobs that have not finished reading them


class Pruner:
    """``disk_usage``, ``prune`` and the listeners of one cache (see the module docstring).

    Runs on the manager's thread; its jobs run on the I/O executor.

    Args:
        core: The services of the cache.
        table: The manager's record table.
    """

    def __init__(self, core: CacheCore, table: RecordTable) -> None:
        self.core = core
        self.table = table
        self.listeners: list[pykka.ActorRef[Any]] = []
        #: Records a prune has marked for removal (disk usage no longer shows them).
        self.pruning: set[str] = set()
        #: parent id -> holds that records marked for removal will release (a batch deletes
        #: a parent after the children it frees, as BuildKit's later passes do)
        self._releasing: dict[str, int] = {}
        self._scans: OrderedDict[int, list[str]] = OrderedDict()
        self._next_scan = 1
        self._running = False
        self._queue: list[tuple[tuple[PrunePolicy, ...], Future[list[UsageInfo]]]] = []
        self.records_total = 0  #: records deleted by prunes since open
        self.bytes_total = 0  #: bytes they released
        self.seconds_total = 0.0  #: time spent pruning
        self.gc_runs = 0  #: garbage collections run
        self.gc_bytes = 0  #: bytes they freed

    # -- listeners ----------------------------------------------------------------------------

    def subscribe(self, listener: pykka.ActorRef[Any]) -> None:
        """``CacheManager.subscribe`` (see there)."""
        if not isinstance(listener, pykka.ActorRef):
            msg = f"listeners must be Pykka actor refs, not {type(listener).__name__}"
            raise InvalidError(msg)
        if listener not in self.listeners:
            self.listeners.append(listener)

    def unsubscribe(self, listener: pykka.ActorRef[Any]) -> None:
        """``CacheManager.unsubscribe`` (see there)."""
        with contextlib.suppress(ValueError):
            self.listeners.remove(listener)

    @handles(Listeners)
    def _listeners(self, m: Listeners) -> tuple[pykka.ActorRef[Any], ...]:
        return tuple(self.listeners)

    @handles(ListenersGone)
    def _listeners_gone(self, m: ListenersGone) -> None:
        for ref in m.gone:
            self.unsubscribe(ref)

    # -- disk usage and prune ---------------------------------------------------------------------

    def disk_usage(
        self, filters: Sequence[str], age_limit: timedelta | None
    ) -> Future[list[UsageInfo]]:
        """``CacheManager.disk_usage`` (see there): checks the request, submits the job."""
        if isinstance(filters, str):
            filters = (filters,)
        if not isinstance(filters, list | tuple):
            msg = f"disk usage filters must be a sequence of strings, not {filters!r}"
            raise InvalidError(msg)
        if age_limit is not None and (
            not isinstance(age_limit, timedelta) or age_limit < timedelta(0)
        ):
            msg = f"disk usage age_limit must be a timedelta >= 0, not {age_limit!r}"
            raise InvalidError(msg)
        flt = parse_usage_filters(*filters)  # a bad filter fails here, before any work
        return self.core.submit(usage_job, self.core, flt if filters else None, age_limit)

    def prune(self, policies: tuple[PrunePolicy, ...]) -> Future[list[UsageInfo]]:
        """``CacheManager.prune`` (see there): checks the policies, starts or queues the job."""
        if not policies:
            policies = (PrunePolicy(all=True),)
        for p in policies:
            if not isinstance(p, PrunePolicy):
                msg = f"prune takes PrunePolicy values, not {type(p).__name__}"
                raise InvalidError(msg)
            parse_usage_filters(*p.filters)
        if self._running:
            waiter: Future[list[UsageInfo]] = Future()
            self._queue.append((policies, waiter))
            return waiter
        future = self.core.submit(prune_job, self.core, policies)
        self._running = True
        return future

    def fail_queued(self) -> None:
        """Fails the prunes waiting for their turn (the manager is stopping)."""
        queued, self._queue = self._queue, []
        for _, waiter in queued:
            waiter.set_exception(self.core.closed_error("run a queued prune"))

    @handles(PruneDone)
    def _prune_done(self, m: PruneDone) -> None:
        """A prune ended: count it, start the next queued one."""
        self.records_total += m.records
        self.bytes_total += m.size
        self.seconds_total += m.seconds
        if not self._queue:
            self._running = False
            return
        policies, waiter = self._queue.pop(0)
        try:
            job = self.core.submit(prune_job, self.core, policies)
        except ClosedError as exc:  # the executor is shut down: the cache is closing
            self._running = False
            waiter.set_exception(self.core.closed_error("run a queued prune"))
            logger.debug("queued prune not started: %s", exc)
            return
        job.add_done_callback(lambda done: _chain(done, waiter))

    @handles(GcDone)
    def _gc_done(self, m: GcDone) -> None:
        self.gc_runs += 1
        self.gc_bytes += m.freed

    # -- table scan ----------------------------------------------------------------------------

    @handles(TableScan)
    def _table_scan(self, m: TableScan) -> ScanChunk:
        """Rows ``start:start+count`` of a copy of the table's ids taken at the first chunk.

        The set of records is the table's at the first chunk (records removed since are
        skipped, records added since are not seen); each row is read when its chunk is. A
        job that needs a record's latest state re-checks it (``PruneMark`` does).
        """
        entries = self.table.entries
        token = m.token
        if token is None or token not in self._scans:
            token = self._next_scan
            self._next_scan += 1
            self._scans[token] = list(entries)
            while len(self._scans) > MAX_OPEN_SCANS:
                self._scans.popitem(last=False)  # a job that died mid-scan
        ids = self._scans[token]
        chunk = [entries[rid] for rid in ids[m.start : m.start + m.count] if rid in entries]
        done = m.start + m.count >= len(ids)
        if done:
            del self._scans[token]
        return ScanChunk(token, self._rows(chunk), done)

    def _rows(self, chunk: Sequence[RecordEntry]) -> tuple[TableRow, ...]:
        """Rows of ``chunk``; open handles are asked of active record actors all at once."""
        counts = self.table.handle_counts(chunk)
        size_snapshot = self.table.size_snapshot
        pruning = self.pruning
        return tuple(
            entry_row(
                e,
                handles=counts.get(e.id, 0),
                # Only an immutable with an equal mutable measures another snapshot.
                size_snapshot=e.snapshot_id if e.equal_mutable is None else size_snapshot(e),
                pruning=e.id in pruning,
            )
            for e in chunk
        )

    @handles(KnownSizes)
    def _known_sizes(self, m: KnownSizes) -> tuple[str, ...]:
        """Caches sizes a job measured (``id -> (size, generation)``); returns the ids taken.

        The table is the one place sizes are read from (disk usage, ``info()``,
        ``statistics()``), whether or not the record's actor is activated; the actor gets
        the size too, for ``size()``. A size reset since the job read the row is refused.
        """
        accepted = []
        for rid, (size, generation) in m.sizes.items():
            e = self.table.entries.get(rid)
            if e is not None and self.table.learn_size(e, size, generation, tell=True):
                accepted.append(rid)
        return tuple(accepted)

    # -- deletion -------------------------------------------------------------------------------

    @handles(PruneMark)
    def _prune_mark(self, m: PruneMark) -> Marked:
        """Marks prune candidates dead after re-checking them (see :class:`Marked`).

        Re-checked here because the scan is older: no refs, not dead or finalizing, its twin
        idle too, and not used since the scan when ``keep_duration`` protects recent records.
        """
        deadline = time.perf_counter() + HANDLER_BUDGET_S
        table = self.table
        marked: list[tuple[TableRow, str | None]] = []
        refused: list[str] = []
        for n, rid in enumerate(m.ids):
            if n and time.perf_counter() > deadline:
                return Marked(tuple(marked), tuple(refused), m.ids[n:])
            e = table.entries.get(rid)
            twin = table.entries.get(e.equal_immutable) if e and e.equal_immutable else None
            if e is None or not self._markable(e, twin, m.cutoff):
                refused.append(rid)
                continue
            if not table.quiesce(e) or (twin is not None and not table.quiesce(twin)):
                refused.append(rid)
                continue
            if is_after(e.last_used_at, m.cutoff):  # settling brought fresher statistics
                refused.append(rid)
                table.drop_view_lease(e)  # the view lease the settle took back
                continue
            for r in (e, twin) if twin is not None else (e,):
                r.dead = True
                self.pruning.add(r.id)
                self._note_release(r, 1)
            row = entry_row(e, handles=0, size_snapshot=table.size_snapshot(e), pruning=True)
            marked.append((row, twin.id if twin is not None else None))
        return Marked(tuple(marked), tuple(refused), ())

    def _markable(self, e: RecordEntry, twin: RecordEntry | None, cutoff: int | None) -> bool:
        """Whether ``e`` (and its equal immutable ``twin``) may still be pruned."""
        if e.dead or self._held(e) or e.finalizing is not None:
            return False
        if e.equal_mutable is not None:
            return False  # a pair goes with its mutable
        if twin is not None and (twin.dead or self._held(twin) or twin.finalizing is not None):
            return False
        return not is_after(e.last_used_at, cutoff)

    def _held(self, e: RecordEntry) -> bool:
        """Whether a child that is not marked for removal holds ``e``."""
        return e.holders > self._releasing.get(e.id, 0)

    def _note_release(self, e: RecordEntry, sign: int) -> None:
        """Counts (``sign`` 1) or uncounts (-1) the holds ``e`` will release."""
        for p in e.parents:
            if p:
                n = self._releasing.get(p, 0) + sign
                if n:
                    self._releasing[p] = n
                else:
                    self._releasing.pop(p, None)

    @handles(PruneUnmark)
    def _prune_unmark(self, m: PruneUnmark) -> None:
        """Gives back records marked by ``PruneMark`` when persisting the mark failed."""
        for pair in m.pairs:
            for rid in pair:
                if rid is None:
                    continue
                e = self.table.entries.get(rid)
                if e is not None and rid in self.pruning:
                    e.dead = False
                    self._note_release(e, -1)
                self.pruning.discard(rid)

    @handles(PruneForget)
    def _prune_forget(self, m: PruneForget) -> Forgotten:
        """Drops marked records from the table (their metadata and leases are already gone).

        Returns the parents left without refs (fresh rows: the next candidates), the
        listeners, and the pairs not handled within the time budget.
        """
        deadline = time.perf_counter() + HANDLER_BUDGET_S
        table = self.table
        parents: dict[str, None] = {}
        rest: tuple[Pair, ...] = ()
        # The job cleared their metadata and leases: nothing to write, and the manager's
        # thread must not wait for the write lock (a ref operation would wait behind it).
        # Only when the job's clearing failed does the removal write, in one transaction.
        with contextlib.ExitStack() as stack:
            txn = None if m.cleared else stack.enter_context(self.core.env.write_txn())
            for n, (rid, twin_id) in enumerate(m.pairs):
                if n and time.perf_counter() > deadline:
                    rest = m.pairs[n:]
                    break
                if twin_id is not None:
                    self._forget(twin_id, remove_snapshot=False, txn=txn, clear=not m.cleared)
                e = self._forget(rid, remove_snapshot=True, txn=txn, clear=not m.cleared)
                if e is not None:
                    parents.update(dict.fromkeys(p for p in e.parents if p))
        entries = table.entries
        freed = [
            entries[p]
            for p in parents
            if p in entries and not entries[p].dead and entries[p].holders == 0
        ]
        return Forgotten(self._rows(freed), tuple(self.listeners), rest)

    def _forget(
        self, rid: str, *, remove_snapshot: bool, txn: WriteTxn | None, clear: bool
    ) -> RecordEntry | None:
        e = self.table.entries.get(rid)
        if e is not None:
            if rid in self.pruning:
                self._note_release(e, -1)
            self.table.remove(e, remove_snapshot=remove_snapshot, txn=txn, clear=clear)
        self.pruning.discard(rid)
        return e


def _chain(done: Future[Any], waiter: Future[Any]) -> None:
    """Copies the outcome of ``done`` to ``waiter`` (a queued prune's reply)."""
    if done.cancelled():
        waiter.set_exception(ClosedError("the prune was cancelled: the cache is closing"))
        return
    exc = done.exception()
    if exc is not None:
        waiter.set_exception(exc)
    else:
        waiter.set_result(done.result())
