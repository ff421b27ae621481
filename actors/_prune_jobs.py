"""The jobs of ``disk_usage`` and ``prune``, on the I/O executor.

They read the manager's table in chunks (:class:`~actors._messages.TableScan`), compute
with the pure functions of :mod:`actors._usage` and :mod:`actors._planning`, measure unknown
sizes (handing them to the manager, :class:`~actors._messages.KnownSizes`), and delete a
prune's batches in three steps: the manager marks them dead (``PruneMark``), the job
measures them and clears their metadata and leases in short transactions (whole pairs
each, :data:`CLEAR_SECONDS` at most), the manager forgets them without writing (``PruneForget``) and
reports the parents that freed. See :mod:`actors._pruner` for the
manager's side. Everything here talks to the manager through typed asks only (the manager
never waits on a job).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import pykka

from ..storage import Filter, RefcacheError, collect
from ._core import CacheCore
from ._entry import clear_record, lease_ids
from ._listeners import notify
from ._messages import (
    GcDone,
    KnownSizes,
    Listeners,
    ListenersGone,
    Pair,
    PruneDone,
    PruneForget,
    PruneMark,
    PruneUnmark,
    TableScan,
)
from ._planning import PrunePlanner, free_bytes, ns, size_limit
from ._rows import TableRow
from ._types import PrunePolicy, UsageInfo
from ._usage import compute_usage, fill_sizes, measure_live

__all__ = ["SCAN_CHUNK", "SIZES_CHUNK", "prune_job", "scan_table", "usage_job"]

logger = logging.getLogger(__name__)

SCAN_CHUNK = 1000  #: table rows copied per ``TableScan`` message (~1-2 ms)
SIZES_CHUNK = 200  #: measured sizes handed to the manager per ``KnownSizes`` message
#: A clearing transaction takes no more pairs once it has run this long (seconds): bounds
#: how long a prune holds the metadata write lock (a ref operation that writes waits for at
#: most one such transaction), while an idle machine clears a whole batch with one fsync.
CLEAR_SECONDS = 0.02


def scan_table(core: CacheCore) -> dict[str, TableRow]:
    """The whole table, read chunk by chunk."""
    table: dict[str, TableRow] = {}
    token: int | None = None
    start = 0
    while True:
        chunk = core.ask_manager(TableScan(token, start, SCAN_CHUNK))
        token = chunk.token
        for row in chunk.rows:
            table[row.id] = row
        if chunk.done:
            return table
        start += SCAN_CHUNK


class _Measurer:
    """Measures rows in a job; :meth:`flush` hands the sizes to the manager.

    The manager caches them (table, metadata through the statistics writer, the record's
    actor and an equal twin), unless the size was reset since the row was read; the
    handler stays short however many records were measured (a chunk per ask).
    """

    def __init__(self, core: CacheCore) -> None:
        self.core = core
        self.cache: dict[str, tuple[int, int]] = {}

    def __call__(self, row: TableRow) -> int:
        size, cacheable = measure_live(self.core, row)
        # A mutable's size holds while nobody has it (it is reset when someone takes it).
        if cacheable and not (row.mutable and row.handles):
            self.cache[row.id] = (size, row.size_gen)
        return size

    def flush(self) -> None:
        """Hands the measured sizes to the manager, a chunk at a time."""
        items = list(self.cache.items())
        self.cache.clear()
        for lo in range(0, len(items), SIZES_CHUNK):
            chunk = dict(items[lo : lo + SIZES_CHUNK])
            try:
                self.core.ask_manager(KnownSizes(chunk))
            except RefcacheError as exc:  # only a cache of sizes: best effort
                logger.warning("caching %d measured sizes failed: %s", len(chunk), exc)


def usage_job(core: CacheCore, flt: Filter | None, age_limit: timedelta | None) -> list[UsageInfo]:
    """``disk_usage``: one row per visible record, unknown sizes measured (and cached)."""
    with core.timed("disk_usage"):
        table = scan_table(core)
        cutoff = time.time_ns() - ns(age_limit) if age_limit else None
        rows = compute_usage(table, checker=core.ref_checker, flt=flt, cutoff=cutoff)
        measure = _Measurer(core)
        rows = fill_sizes(rows, table, measure)
        measure.flush()
        return rows


def prune_job(core: CacheCore, policies: tuple[PrunePolicy, ...]) -> list[UsageInfo]:
    """``prune``: each policy in turn, then a garbage collection; the deleted records."""
    start = time.perf_counter()
    deleted: list[UsageInfo] = []
    try:
        with core.timed("prune"):
            for policy in policies:
                _run_policy(core, policy, deleted)
            # BuildKit's GarbageCollect: the snapshots and blobs whose leases went.
            stats = collect(
                core.env, content=core.content, snapshotter=core.snapshotter, leases=core.leases
            )
            core.ask_manager(GcDone(stats.bytes_freed))
        reclaimed = sum(max(r.size, 0) for r in deleted)
        listeners = core.ask_manager(Listeners())
        gone = notify(listeners, ("prune_finished", len(deleted), reclaimed))
        if gone:
            core.ask_manager(ListenersGone(tuple(gone)))
    finally:
        with contextlib.suppress(RefcacheError):
            core.ask_manager(
                PruneDone(
                    len(deleted), sum(max(r.size, 0) for r in deleted), time.perf_counter() - start
                )
            )
    return deleted


def _run_policy(core: CacheCore, policy: PrunePolicy, deleted: list[UsageInfo]) -> None:
    """Deletes what one policy selects (BuildKit ``prune``: passes until none deletes)."""
    table = scan_table(core)
    measure = _Measurer(core)
    total, keep, done, table = size_limit(
        table,
        policy,
        checker=core.ref_checker,
        measure=measure,
        free=lambda: free_bytes(core.root),
    )
    measure.flush()
    if done:
        return
    planner = PrunePlanner(
        table,
        policy,
        checker=core.ref_checker,
        now=time.time_ns(),
        measure=lambda row: measure_live(core, row)[0],
        total=total,
        keep=keep,
    )
    while True:
        batch = planner.next_batch()
        if not batch:
            return
        _delete_batch(core, planner, batch, deleted)


def _delete_batch(
    core: CacheCore, planner: PrunePlanner, batch: list[str], deleted: list[UsageInfo]
) -> None:
    """Marks, measures, clears and forgets one batch; notifies listeners."""
    marked, refused = _mark(core, batch, planner.cutoff)
    if not marked:
        planner.done((), refused)
        return
    pairs = [(row.id, twin) for row, twin in marked]
    cleared = 0
    try:
        # Sizes are measured while the snapshots still exist (BuildKit warms them off-lock);
        # they exist until the garbage collection that ends the prune.
        sizes = {row.id: planner.size_of(row) for row, _ in marked}
        # Crash safety: each clearing transaction forgets whole pairs (metadata and leases)
        # at once, so a crash leaves every pair either as it was or gone; no record is ever
        # half removed, and no cache.deleted flag is needed to finish one at the next open.
        while cleared < len(pairs):
            cleared += _clear(core, pairs[cleared:])
    except BaseException:
        with contextlib.suppress(RefcacheError):
            if cleared:
                _forget(core, pairs[:cleared])
            core.ask_manager(PruneUnmark(tuple(pairs[cleared:])))
        raise
    freed, listeners = _forget(core, pairs)
    infos = [_deleted_info(planner, row, sizes[row.id]) for row, _ in marked]
    planner.done(sizes, refused, freed)
    deleted.extend(infos)
    gone: list[Any] = []
    for info in infos:
        gone.extend(g for g in notify(listeners, ("record_pruned", info)) if g not in gone)
    if gone:
        core.ask_manager(ListenersGone(tuple(gone)))


def _mark(
    core: CacheCore, batch: Sequence[str], cutoff: int | None
) -> tuple[list[tuple[TableRow, str | None]], list[str]]:
    """Has the manager mark ``batch`` dead; ``(marked pairs, refused ids)``."""
    marked: list[tuple[TableRow, str | None]] = []
    refused: list[str] = []
    pending = tuple(batch)
    while pending:
        reply = core.ask_manager(PruneMark(pending, cutoff))
        marked.extend(reply.marked)
        refused.extend(reply.refused)
        pending = reply.rest
    return marked, refused


def _clear(core: CacheCore, pairs: Sequence[Pair]) -> int:
    """Clears the metadata and leases of the first marked pairs in one transaction (as the
    manager's removal would: a record's ``<id>``, ``-variants`` and ``-view`` leases, a
    twin's ``<id>`` and ``-view``), for at most :data:`CLEAR_SECONDS`; returns how many."""
    done = 0
    with core.env.write_txn() as txn:
        deadline = time.perf_counter() + CLEAR_SECONDS
        for rid, twin in pairs:
            clear_record(core.store, core.leases, txn, rid, lease_ids(rid))
            if twin is not None:
                own, _, view = lease_ids(twin)
                clear_record(core.store, core.leases, txn, twin, (own, view))
            done += 1
            if time.perf_counter() > deadline:
                break
    return done


def _forget(
    core: CacheCore, pairs: Sequence[Pair], *, cleared: bool = True
) -> tuple[list[TableRow], tuple[pykka.ActorRef[Any], ...]]:
    freed: list[TableRow] = []
    listeners: tuple[pykka.ActorRef[Any], ...] = ()
    rest: tuple[Pair, ...] = tuple(pairs)
    while rest:
        reply = core.ask_manager(PruneForget(rest, cleared))
        freed.extend(reply.freed)
        listeners, rest = reply.listeners, reply.rest
    return freed, listeners


def _deleted_info(planner: PrunePlanner, row: TableRow, size: int) -> UsageInfo:
    """The row a prune reports (and tells listeners) for a deleted record."""
    return UsageInfo(
        id=row.id,
        mutable=row.mutable,
        in_use=False,
        size=max(size, 0),
        created_at=row.created_at,
        last_used_at=row.last_used_at,
        usage_count=row.usage_count,
        parents=row.parent_ids(),
        description=row.description,
        record_type=row.record_type or "regular",
        shared=planner.infos[row.id].shared if row.id in planner.infos else False,
    )
