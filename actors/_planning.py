"""Which records a prune deletes, and in which order (BuildKit ``prune``/``pruneOnce``).

Pure planning over a snapshot of :class:`~actors._rows.TableRow` values: the bytes a
size-limited policy keeps (:func:`calculate_keep_bytes`), the candidates of a policy and the
order of their deletion (:class:`PrunePlanner`), and a whole dry run
(:func:`simulate_prune`). The live prune (:mod:`actors._prune_jobs`) deletes what the planner
hands out and reports back the parents each batch freed; a dry run simulates the removals
(:func:`simulate_removal`), so ``refcache prune --dry-run`` shows what a prune would do.

Candidates are found once per policy, in one O(n) walk over the rows. A record that a
deleted child was holding becomes a candidate when its last hold goes, so the passes of
BuildKit's loop (leaves first, their parents next) cost work proportional to what they
delete, not to the table. Size-limited policies keep BuildKit's arithmetic, stop rule
(``total < keep``) and order: one record per pass, ranked among the candidates of that pass
(:class:`~actors._gcorder.GcRanking`).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import timedelta

from ..storage import RefcacheError
from ._gcorder import GcRanking
from ._rows import TableRow
from ._types import SIZE_UNKNOWN, PrunePolicy, UsageInfo
from ._usage import compute_usage, fill_sizes, parse_usage_filters, usage_adaptor
from ._walk import RefChecker, check_shared, layer_digest_chain

__all__ = [
    "PRUNE_BATCH",
    "PrunePlanner",
    "calculate_keep_bytes",
    "free_bytes",
    "is_after",
    "ns",
    "simulate_prune",
    "simulate_removal",
    "size_limit",
]

PRUNE_BATCH = 200  #: records per mark/persist/clear round (bounds each write transaction)

#: Record types pruned only with ``all`` (BuildKit ``UsageRecordTypeInternal``/``Frontend``).
PROTECTED_TYPES = frozenset({"internal", "frontend"})


# -- keep bytes ------------------------------------------------------------------------------------


def calculate_keep_bytes(total_size: int, free: int, policy: PrunePolicy) -> int:
    """Bytes a size-limited prune keeps (BuildKit ``calculateKeepBytes``); 0 = no size limit.

    Args:
        total_size: Bytes the cache uses (records not shared, in use or not).
        free: Free bytes of the disk holding the cache (read only with ``min_free_space``).
        policy: The policy (``max_used_space``, ``min_free_space``, ``reserved_space``).

    Returns:
        ``max_used_space``, lowered so that ``min_free_space`` becomes free; when the disk
        already has that much free and no maximum is set, the whole ``total_size`` (nothing
        to delete, ``ac123b493``); never below ``reserved_space``.
    """
    if not (policy.max_used_space or policy.min_free_space or policy.reserved_space):
        return 0
    keep = policy.max_used_space
    excess = policy.min_free_space - free
    if excess > 0:
        keep = total_size - excess if keep == 0 else min(keep, total_size - excess)
    elif policy.min_free_space != 0 and keep == 0:
        keep = total_size
    return max(keep, policy.reserved_space)


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Free bytes (for unprivileged users) of the filesystem holding ``path``.

    Raises:
        RefcacheError: ``statvfs`` failed (naming the path).
    """
    try:
        st = os.statvfs(path)
    except OSError as exc:
        msg = f"cannot read the free space of {path}: {exc}"
        raise RefcacheError(msg) from exc
    return st.f_bavail * st.f_frsize


# -- planning ----------------------------------------------------------------------------------


def simulate_removal(table: dict[str, TableRow], ids: Iterable[str]) -> list[TableRow]:
    """Removes ``ids`` (with their equal immutables) from ``table``; returns freed parents.

    What the manager's removal does to the holds, for a dry run: each removed record drops
    one hold per parent slot; a parent left with no refs is returned (once, in order).
    """
    touched: dict[str, None] = {}
    for rid in ids:
        row = table.pop(rid, None)
        if row is None:
            continue
        removed = [row]
        if row.equal_immutable is not None and row.equal_immutable in table:
            removed.append(table.pop(row.equal_immutable))
        for r in removed:
            for p in r.parents:
                parent = table.get(p) if p else None
                if parent is not None:
                    table[p] = parent._replace(holders=parent.holders - 1)
                    touched[p] = None
    return [table[p] for p in touched if p in table and table[p].refs == 0]


class PrunePlanner:
    """Which records one policy deletes, and in which order (BuildKit ``prune``/``pruneOnce``).

    Works on a table snapshot; the caller deletes what :meth:`next_batch` returns and reports
    back with :meth:`done` (what went, what was refused, which parents that freed). The live
    prune gets the freed parents from the manager; a dry run from :func:`simulate_removal`.

    Candidates (§4.2): no refs, not dead, not the hidden half of an equal pair (a pair goes
    with its mutable), internal/frontend and shared records only with ``all``, not used within
    ``keep_duration`` (never-used records are not protected), and matching the filters as a
    ``UsageInfo`` without parents or in-use (so ``parents==`` and ``inuse`` never match).

    Size-limited (BuildKit's gc mode): :meth:`next_batch` plays BuildKit's passes one by one
    — stop once the total is below the bytes to keep, else delete the lowest
    ``sortDeleteRecords`` score among the *current* candidates (:class:`GcRanking`), count
    its size off the total, and let the parents it frees compete from the next pass on (a
    parent whose hold counted uses is stamped as used first, as BuildKit's release does).
    A batch is a run of such passes, deleted together.

    Args:
        table: The rows (the planner keeps and updates its own copy).
        policy: The policy.
        checker: The external ref checker; consulted only when ``not all`` or filters are set
            (BuildKit builds it only then).
        now: The time of the prune (ns), for ``keep_duration``.
        measure: Measures a row whose size is unknown (I/O, in the caller's thread).
        total: Bytes counted against the limit (size-limited mode only).
        keep: Bytes to keep (:func:`calculate_keep_bytes`); 0 = no size limit.
    """

    def __init__(
        self,
        table: Mapping[str, TableRow],
        policy: PrunePolicy,
        *,
        checker: RefChecker | None,
        now: int,
        measure: Callable[[TableRow], int],
        total: int = 0,
        keep: int = 0,
    ) -> None:
        self.table = dict(table)
        self.policy = policy
        self.flt = parse_usage_filters(*policy.filters)
        self.checker = checker if (not policy.all or policy.filters) else None
        self.now = now
        self.cutoff: int | None = None
        if policy.keep_duration:
            self.cutoff = now - ns(policy.keep_duration)
        self.measure = measure
        self.total = total
        self.keep = keep
        self.size_limited = keep != 0
        self.infos: dict[str, UsageInfo] = {}
        self.sizes: dict[str, int] = {}
        self._memo: dict[str, tuple[str, ...]] = {}
        self._queue: deque[str] = deque()
        # Uses this plan stamps (BuildKit: time.Now() at each release, later ones newer).
        stamps = sum(len(r.trigger_parents) for r in self.table.values())
        self._next_stamp = itertools.count(now)
        self._ranking = GcRanking(
            [r.last_used_at for r in self.table.values() if r.last_used_at is not None]
            + list(range(now, now + stamps))
        )
        self._pending_holds: dict[str, int] = {}
        self._pending_triggers: dict[str, int] = {}
        self._stamped: dict[str, int] = {}  # parent -> time of the use its counting hold gave
        self._freed: set[str] = set()  # parents this plan freed (their rows are decided)
        self._taken: dict[str, int] = {}  # size-limited: id -> size counted off the total
        for rid, row in self.table.items():
            if self._admit(row):
                self._push(rid)

    @property
    def candidates(self) -> int:
        """Candidates waiting to be deleted."""
        return len(self._ranking) if self.size_limited else len(self._queue)

    def evaluate(self, row: TableRow) -> UsageInfo | None:
        """The candidate info of ``row`` (``shared`` filled in), or None if it is kept.

        Raises:
            RefcacheError: the ref checker failed.
        """
        if row.dead or row.pruning or row.busy or row.refs > 0 or row.equal_mutable is not None:
            return None
        if row.equal_immutable is not None:
            twin = self.table.get(row.equal_immutable)
            if twin is not None and (twin.refs > 0 or twin.dead or twin.busy):
                return None
        if not self.policy.all and row.record_type in PROTECTED_TYPES:
            return None
        if is_after(row.last_used_at, self.cutoff):
            return None
        shared = False
        if self.checker is not None:
            chain = layer_digest_chain(self.table, row.id, self._memo)
            shared = check_shared(self.checker, row.id, chain)
            if shared and not self.policy.all:
                return None
        info = UsageInfo(
            id=row.id,
            mutable=row.mutable,
            in_use=False,
            size=row.size,
            created_at=row.created_at,
            last_used_at=row.last_used_at,
            usage_count=row.usage_count,
            parents=(),
            description=row.description,
            record_type=row.record_type or "regular",
            shared=shared,
        )
        if not self.flt.match(usage_adaptor(info)):
            return None
        return info

    def _admit(self, row: TableRow) -> bool:
        info = self.evaluate(row)
        if info is None:
            return False
        self.infos[row.id] = info
        return True

    def _push(self, rid: str) -> None:
        if self.size_limited:
            info = self.infos[rid]
            self._ranking.add(rid, info.last_used_at, info.usage_count)
        else:
            self._queue.append(rid)

    def size_of(self, row: TableRow) -> int:
        """The size to report and count for ``row`` (measured once when unknown).

        An equal pair's mutable uses its own size, else its twin's, else a measurement
        (BuildKit warms sizes the same way before it deletes).
        """
        known = self.sizes.get(row.id)
        if known is not None:
            return known
        size = row.size
        if size == SIZE_UNKNOWN and row.equal_immutable is not None:
            twin = self.table.get(row.equal_immutable)
            if twin is not None:
                size = twin.size
        if size == SIZE_UNKNOWN:
            size = self.measure(row)
        self.sizes[row.id] = size
        return size

    def _release_parents(self, row: TableRow) -> list[TableRow]:
        """What deleting ``row`` (and its twin) does to its parents, by the holds counted so
        far in this plan: the rows of those left with no refs, as BuildKit's next pass sees
        them (a parent whose last counting hold went has a use stamped, ``updateLastUsed``)."""
        slots = [p for p in row.parents if p]
        if row.equal_immutable is not None and row.equal_immutable in self.table:
            slots *= 2  # the twin holds the same parents
        freed = []
        for p in slots:
            parent = self.table.get(p)
            if parent is None:
                continue
            if p in row.trigger_parents:
                left_triggers = self._pending_triggers.get(p, parent.trigger_holds) - 1
                self._pending_triggers[p] = left_triggers
                if left_triggers == 0 and parent.handles == 0:
                    self._stamped[p] = next(self._next_stamp)
            left = self._pending_holds.get(p, parent.holders) - 1
            self._pending_holds[p] = left
            if left == 0 and parent.handles == 0:
                freed.append(p)
        out = []
        for p in freed:
            parent = self.table[p]._replace(holders=0)
            stamp = self._stamped.pop(p, None)
            if stamp is not None:
                parent = parent._replace(usage_count=parent.usage_count + 1, last_used_at=stamp)
            self.table[p] = parent
            self._freed.add(p)
            out.append(parent)
        return out

    def next_batch(self, limit: int = PRUNE_BATCH) -> list[str]:
        """The next records to delete (empty: this policy is done).

        Size-limited: BuildKit's gc-mode passes, one record each, while the total is at least
        the bytes to keep (its stop test is ``total < keep``); parents freed by a pass are
        candidates in the next one. Otherwise: up to ``limit`` candidates.
        """
        out: list[str] = []
        if not self.size_limited:
            while self._queue and len(out) < limit:
                rid = self._queue.popleft()
                if rid in self.infos:
                    out.append(rid)
            return out
        while len(out) < limit and self.total >= self.keep:
            chosen = self._ranking.pop()
            if chosen is None:
                break
            row = self.table.get(chosen)
            if chosen not in self.infos or row is None:
                continue
            rid = chosen
            size = self.size_of(row)
            self.total -= size
            self._taken[rid] = size
            out.append(rid)
            for parent in self._release_parents(row):
                if parent.id not in self.infos and self._admit(parent):
                    self._push(parent.id)
        return out

    def done(
        self,
        removed: Iterable[str],
        refused: Iterable[str] = (),
        freed: Iterable[TableRow] = (),
    ) -> None:
        """Takes back the outcome of a batch.

        Args:
            removed: Ids deleted.
            refused: Ids the manager would not delete (taken or used since the scan); their
                bytes count again.
            freed: Parents left without refs (fresh rows); those the plan did not free
                itself and that qualify become candidates.

        Raises:
            RefcacheError: the ref checker failed.
        """
        for rid in refused:
            self.infos.pop(rid, None)
            self.total += self._taken.pop(rid, 0)
        for rid in removed:
            self.infos.pop(rid, None)
            self._taken.pop(rid, None)
            row = self.table.pop(rid, None)
            if row is not None and row.equal_immutable is not None:
                self.table.pop(row.equal_immutable, None)
        for row in freed:
            if row.id in self._freed:
                continue  # the plan played this release already, as BuildKit's pass would
            self.table[row.id] = row
            self._pending_holds.pop(row.id, None)
            if row.id not in self.infos and self._admit(row):
                self._push(row.id)


def size_limit(
    table: Mapping[str, TableRow],
    policy: PrunePolicy,
    *,
    checker: RefChecker | None,
    measure: Callable[[TableRow], int],
    free: Callable[[], int],
) -> tuple[int, int, bool, dict[str, TableRow]]:
    """``(total, keep, done, table with sizes filled)`` for a policy (zeros without limits).

    BuildKit: the total is the disk usage of every record that is not shared, in use or not,
    with unknown sizes measured first; ``free`` is read only for ``min_free_space``. ``done``
    says that nothing is to be deleted: the total is below the bytes to keep, or
    ``min_free_space`` is already free and no maximum is set. (BuildKit sets keep = total in
    that last case, ``ac123b493``, "delete nothing", but its stop test ``total < keep`` then
    still deletes one record per run; this port deletes nothing, as the commit intends.)
    """
    if not (policy.max_used_space or policy.reserved_space or policy.min_free_space):
        return 0, 0, False, dict(table)
    usage = fill_sizes(compute_usage(table, checker=checker), table, measure)
    total = sum(max(r.size, 0) for r in usage if not r.shared)
    free_now = free() if policy.min_free_space else 0
    keep = calculate_keep_bytes(total, free_now, policy)
    satisfied = (
        policy.min_free_space != 0
        and policy.min_free_space <= free_now
        and policy.max_used_space == 0
    )
    done = keep != 0 and (total < keep or (satisfied and total <= keep))
    known = {r.id: r.size for r in usage}
    filled = {
        rid: row._replace(size=known[rid]) if rid in known and row.size == SIZE_UNKNOWN else row
        for rid, row in table.items()
    }
    return total, keep, done, filled


def simulate_prune(
    table: Mapping[str, TableRow],
    policies: Sequence[PrunePolicy],
    *,
    checker: RefChecker | None,
    now: int,
    measure: Callable[[TableRow], int],
    free: Callable[[], int],
) -> list[UsageInfo]:
    """What a prune with ``policies`` would delete from ``table``, in order (a dry run).

    The same planning as the live prune; removals are simulated with
    :func:`simulate_removal`. Nothing is changed.
    """
    sim = dict(table)
    out: list[UsageInfo] = []
    for policy in policies:
        total, keep, done, filled = size_limit(
            sim, policy, checker=checker, measure=measure, free=free
        )
        if done:
            continue
        planner = PrunePlanner(
            filled, policy, checker=checker, now=now, measure=measure, total=total, keep=keep
        )
        while batch := planner.next_batch():
            rows = [planner.table[rid] for rid in batch]
            out.extend(
                dataclasses.replace(
                    planner.infos[row.id], size=planner.size_of(row), parents=row.parent_ids()
                )
                for row in rows
            )
            freed = simulate_removal(sim, batch)
            planner.done(batch, (), freed)
    return out


def ns(delta: timedelta) -> int:
    """``delta`` in nanoseconds."""
    return int(delta.total_seconds() * 1e9)


def is_after(last_used_at: int | None, cutoff: int | None) -> bool:
    """Whether a record used at ``last_used_at`` is protected by ``cutoff`` (never used: no)."""
    return cutoff is not None and last_used_at is not None and last_used_at > cutoff
