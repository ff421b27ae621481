"""Disk usage and prune (BuildKit ``DiskUsage``/``Prune``, reference §4), as a manager mixin.

Every method here runs on the manager actor's thread, except the ``*_job`` methods, which run
on the I/O executor and talk to the manager with asks (the manager never waits on them).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from actors._entry import RecordEntry
from actors._record import SIZE_UNKNOWN
from actors._refs import snapshot_usage
from actors._types import PrunePolicy, UsageInfo
from storage import KEY_DELETED, InvalidError, RefcacheError
from storage._filters import parse_filters
from storage._gc import collect

if TYPE_CHECKING:
    from actors._core import CacheCore

__all__ = ["PruneMixin"]

logger = logging.getLogger(__name__)

PRUNE_BATCH = 256  #: records marked dead per prune message (bounds the manager's pause)


class PruneMixin:
    """``disk_usage`` and ``prune`` of :class:`~actors._manager.CacheManager`."""

    if TYPE_CHECKING:
        core: CacheCore
        entries: dict[str, RecordEntry]
        _prune_running: bool
        _prune_queue: list[tuple[tuple[PrunePolicy, ...], Future[list[UsageInfo]]]]
        _prune_stats: list[Any]
        _gc_stats: list[int]

        def _handle_counts(self) -> dict[str, int]: ...
        def _size_snapshot(self, e: RecordEntry) -> str: ...
        def _remove(self, e: RecordEntry, *, remove_snapshot: bool) -> None: ...
        def _quiesce(self, e: RecordEntry) -> bool: ...

    def disk_usage(
        self, filters: Sequence[str] = (), *, age_limit: timedelta | None = None
    ) -> list[UsageInfo] | Future[list[UsageInfo]]:
        """One row per visible record (BuildKit ``DiskUsage``); unknown sizes computed off-thread.

        Raises:
            InvalidError: a malformed filter.
        """
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
        flt = parse_filters(*filters)
        rows = self._usage_rows()
        cutoff = time.time_ns() - int(age_limit.total_seconds() * 1e9) if age_limit else None
        selected = []
        for row in rows:
            if not flt.match(_usage_adaptor(row)):
                continue
            if cutoff is not None and row.last_used_at is not None and row.last_used_at > cutoff:
                continue
            selected.append(row)
        unknown = [r.id for r in selected if r.size == SIZE_UNKNOWN]
        if not unknown:
            return selected
        sids = {rid: self._size_snapshot(self.entries[rid]) for rid in unknown}
        return self.core.executor.submit(self._usage_sizes_job, selected, sids)

    def _usage_sizes_job(self, rows: list[UsageInfo], sids: dict[str, str]) -> list[UsageInfo]:
        measured = {rid: snapshot_usage(self.core, sid) for rid, sid in sids.items()}
        # Only sizes of existing snapshots are cached; a missing one shows 0 for now.
        self.core.ask_manager(
            ("sizes", {rid: size for rid, size in measured.items() if size is not None})
        )
        out = []
        for r in rows:
            if r.id in measured:
                size = measured[r.id] or 0
                r = UsageInfo(**{**_row_dict(r), "size": size})  # noqa: PLW2901
            out.append(r)
        return out

    def _usage_rows(self) -> list[UsageInfo]:
        counts = self._handle_counts()
        refs = {rid: counts.get(rid, 0) + e.holders for rid, e in self.entries.items()}
        visible: dict[str, RecordEntry] = {}
        for rid, e in self.entries.items():
            if e.equal_immutable is not None and refs.get(e.equal_immutable, 0) > 0:
                continue
            if e.equal_mutable is not None and refs[rid] == 0:
                continue
            visible[rid] = e
        # In use: propagate from unreferenced children (a chain held only by unreferenced
        # records is reclaimable). Parents missing from the table are skipped (#7154).
        adjusted = {rid: refs[rid] for rid in visible}
        work = list(visible)
        while work:
            rid = work.pop()
            if adjusted.get(rid, 1) != 0:
                continue
            e = visible[rid]
            adjusted[rid] = -1  # processed
            step = 2 if e.equal_immutable is not None else 1
            for p in e.parents:
                if p in adjusted and adjusted[p] > 0:
                    adjusted[p] = max(adjusted[p] - step, 0)
                    if adjusted[p] == 0:
                        work.append(p)
        rows = []
        for rid, e in visible.items():
            in_use = adjusted[rid] > 0
            size = e.size
            if e.mutable and counts.get(rid, 0) > 0:
                size = 0  # still changing
            elif e.mutable and e.size == SIZE_UNKNOWN:
                size = SIZE_UNKNOWN
            rows.append(
                UsageInfo(
                    id=rid,
                    mutable=e.mutable,
                    in_use=in_use,
                    size=size,
                    created_at=e.created_at,
                    last_used_at=e.last_used_at,
                    usage_count=e.usage_count,
                    parents=e.parent_ids(),
                    description=e.description,
                    record_type=e.record_type or "regular",
                    shared=False,
                )
            )
        return rows

    def prune(self, *policies: PrunePolicy) -> Future[list[UsageInfo]]:
        """Deletes unreferenced records by each policy in turn, then collects garbage.

        No policy means one that deletes everything unreferenced. Records are marked dead and
        ``cache.deleted`` is persisted before any file work; deletions and GC run off the
        manager's thread, in batches, so other operations keep being served.

        Raises:
            InvalidError: a malformed policy or filter.
        """
        if not policies:
            policies = (PrunePolicy(all=True),)
        for p in policies:
            if not isinstance(p, PrunePolicy):
                msg = f"prune takes PrunePolicy values, not {type(p).__name__}"
                raise InvalidError(msg)
            parse_filters(*p.filters)
        if self._prune_running:
            # BuildKit's muPrune: one prune at a time; later ones wait their turn.
            waiter: Future[list[UsageInfo]] = Future()
            self._prune_queue.append((policies, waiter))
            return waiter
        self._prune_running = True
        return self.core.executor.submit(self._prune_job, policies)

    def _prune_job(self, policies: tuple[PrunePolicy, ...]) -> list[UsageInfo]:
        core = self.core
        start = time.perf_counter()
        deleted: list[UsageInfo] = []
        try:
            with core.timed("prune"):
                for policy in policies:
                    while True:
                        batch = core.ask_manager(("prune_select", policy))
                        if not batch:
                            break
                        deleted.extend(batch)
                stats = collect(
                    core.env, content=core.content, snapshotter=core.snapshotter, leases=core.leases
                )
                core.ask_manager(("gc_done", stats.bytes_freed))
        finally:
            core.ask_manager(
                (
                    "prune_done",
                    len(deleted),
                    sum(max(r.size, 0) for r in deleted),
                    time.perf_counter() - start,
                )
            )
        return deleted

    def _op_prune_select(self, policy: PrunePolicy) -> list[UsageInfo]:
        """One prune pass: mark a batch dead, persist ``cache.deleted``, remove them."""
        counts = self._handle_counts()
        flt = parse_filters(*policy.filters)
        cutoff = None
        if policy.keep_duration:
            cutoff = time.time_ns() - int(policy.keep_duration.total_seconds() * 1e9)
        refs = {rid: counts.get(rid, 0) + e.holders for rid, e in self.entries.items()}
        batch: list[RecordEntry] = []
        for rid, e in self.entries.items():
            if e.dead or refs[rid] > 0 or e.finalizing is not None:
                continue
            if e.equal_immutable is not None and refs.get(e.equal_immutable, 0) > 0:
                continue
            if e.equal_mutable is not None:
                continue  # pruned together with its mutable
            if not policy.all and e.record_type in ("internal", "frontend"):
                continue
            if cutoff is not None and e.last_used_at is not None and e.last_used_at > cutoff:
                continue
            row = UsageInfo(
                id=rid,
                mutable=e.mutable,
                in_use=False,
                size=e.size,
                created_at=e.created_at,
                last_used_at=e.last_used_at,
                usage_count=e.usage_count,
                parents=(),
                description=e.description,
                record_type=e.record_type or "regular",
                shared=False,
            )
            if not flt.match(_usage_adaptor(row)):
                continue
            twin = self.entries.get(e.equal_immutable) if e.equal_immutable else None
            if not self._quiesce(e) or (twin is not None and not self._quiesce(twin)):
                continue  # a released handle cloned it since the counts were taken
            batch.append(e)
            if len(batch) >= PRUNE_BATCH:
                break
        if not batch:
            return []
        with self.core.env.write_txn() as txn:
            for e in batch:
                e.dead = True
                item = self.core.store.get(e.id)
                if item.exists:
                    item.queue(KEY_DELETED, True)
                    item.commit(txn=txn)
        out = []
        for e in batch:
            out.append(
                UsageInfo(
                    id=e.id,
                    mutable=e.mutable,
                    in_use=False,
                    size=max(e.size, 0),
                    created_at=e.created_at,
                    last_used_at=e.last_used_at,
                    usage_count=e.usage_count,
                    parents=e.parent_ids(),
                    description=e.description,
                    record_type=e.record_type or "regular",
                    shared=False,
                )
            )
            if e.equal_immutable is not None and e.equal_immutable in self.entries:
                self._remove(self.entries[e.equal_immutable], remove_snapshot=False)
            e.dead = False
            self._remove(e, remove_snapshot=True)
        return out

    def _op_prune_done(self, records: int, size: int, seconds: float) -> None:
        self._prune_stats[0] += records
        self._prune_stats[1] += size
        self._prune_stats[2] += seconds
        if not self._prune_queue:
            self._prune_running = False
            return
        policies, waiter = self._prune_queue.pop(0)
        try:
            job = self.core.executor.submit(self._prune_job, policies)
        except RuntimeError as exc:  # the executor is shut down: the cache is closing
            self._prune_running = False
            msg = f"cache at {self.core.root} closed before a queued prune ran"
            waiter.set_exception(RefcacheError(msg))
            logger.debug("queued prune not started: %s", exc)
            return
        job.add_done_callback(lambda done: _chain(done, waiter))

    def _op_gc_done(self, freed: int) -> None:
        self._gc_stats[0] += 1
        self._gc_stats[1] += freed


def _chain(done: Future[Any], waiter: Future[Any]) -> None:
    """Copies the outcome of ``done`` to ``waiter`` (a queued prune's reply)."""
    if done.cancelled():
        waiter.set_exception(RefcacheError("the prune was cancelled: the cache is closing"))
        return
    exc = done.exception()
    if exc is not None:
        waiter.set_exception(exc)
    else:
        waiter.set_result(done.result())


def _row_dict(row: UsageInfo) -> dict[str, Any]:
    return {name: getattr(row, name) for name in UsageInfo.__slots__}


def _usage_adaptor(row: UsageInfo) -> Any:
    """containerd filter fields of a usage row (BuildKit ``adaptUsageInfo``)."""

    def adapt(fieldpath: Sequence[str]) -> tuple[str, bool]:
        if not fieldpath:
            return "", False
        name = fieldpath[0]
        if name == "id":
            return row.id, bool(row.id)
        if name == "parents":
            return ";".join(row.parents), bool(row.parents)
        if name == "description":
            return row.description, bool(row.description)
        if name == "type":
            return row.record_type, bool(row.record_type)
        flags = {
            "inuse": row.in_use,
            "mutable": row.mutable,
            "immutable": not row.mutable,
            "shared": row.shared,
            "private": not row.shared,
        }
        if name in flags:
            return "", flags[name]
        return "", False

    return adapt
