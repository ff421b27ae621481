"""BuildKit's gc-mode deletion order (``sortDeleteRecords``), kept current as records go.

A size-limited prune deletes one record per pass, the lowest score among the candidates of
that pass, where a score adds the record's dense rank by last use and by usage count within
the current candidates. :func:`delete_order` ranks a fixed set once; :class:`GcRanking` gives
the same choice pass after pass as candidates are deleted and freed parents join, without
rescoring everything (:mod:`actors._planning` drives it).
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterable, Mapping

__all__ = ["GcRanking", "delete_order", "gc_score"]


def gc_score(lu_rank: int, max_lu: int, uc_rank: int, max_uc: int) -> float:
    """BuildKit's ``sortDeleteRecords`` score, computed as Go computes it (float64)."""
    return lu_rank / max_lu + uc_rank / max_uc


class _Scorer:
    """Rank tables of one candidate set, for :func:`delete_order` (a single sort).

    Last-used ranks start at 1 for never-used records and go up by one per distinct newer
    time; usage-count ranks start at 1 for a count of 0 and go up per distinct count.
    """

    def __init__(self, stats: Iterable[tuple[int | None, int]]) -> None:
        stats = list(stats)
        self.times = sorted({t for t, _ in stats if t is not None})
        self.counts = sorted({c for _, c in stats if c != 0})
        self.max_lu = 1 + len(self.times)
        self.max_uc = 1 + len(self.counts)

    def score(self, last_used_at: int | None, usage_count: int) -> float:
        lu = 1 if last_used_at is None else 1 + bisect_right(self.times, last_used_at)
        uc = 1 if usage_count == 0 else 1 + bisect_right(self.counts, usage_count)
        return gc_score(lu, self.max_lu, uc, self.max_uc)


def delete_order(stats: Mapping[str, tuple[int | None, int]]) -> list[str]:
    """Ids ordered by one BuildKit ``sortDeleteRecords`` over a fixed candidate set.

    Args:
        stats: ``id -> (last_used_at or None, usage_count)``.

    Returns:
        Lowest score first; ties keep the order of ``stats`` (BuildKit's are arbitrary).
        A size-limited prune re-ranks after every deletion (:class:`GcRanking`).
    """
    scorer = _Scorer(stats.values())
    keyed = [(scorer.score(t, c), i, rid) for i, (rid, (t, c)) in enumerate(stats.items())]
    keyed.sort()
    return [rid for _, _, rid in keyed]


class _Fenwick:
    """Prefix sums over ``size`` slots with point updates, both O(log n)."""

    __slots__ = ("size", "tree")

    def __init__(self, size: int) -> None:
        self.size = size
        self.tree = [0] * (size + 1)

    def add(self, slot: int, delta: int) -> None:
        i = slot + 1
        tree, size = self.tree, self.size
        while i <= size:
            tree[i] += delta
            i += i & -i

    def prefix(self, slot: int) -> int:
        """The sum over slots ``0..slot``."""
        i = slot + 1
        total = 0
        tree = self.tree
        while i > 0:
            total += tree[i]
            i -= i & -i
        return total


_NEVER = -1  #: the time key of a never-used record (before every time)


class GcRanking:
    """The record BuildKit's gc mode deletes next, kept current as candidates come and go.

    BuildKit's ``pruneOnce`` in gc mode rescans every record, calls ``sortDeleteRecords`` on
    the candidates and deletes the first; the ranks are dense ranks *within the current
    candidates*, so each deletion can change every other score. This structure gives the
    same choice without rescoring everything:

    * the rank of a time is one plus the number of distinct times present up to it: a
      Fenwick tree over the times' slots holds one per distinct time present (a removal or
      an addition changes one slot, O(log n)); the rank of a count is its position among
      the distinct counts present (a sorted list of them);
    * among candidates with the same usage count the oldest scores lowest (its time rank is
      lowest, the count rank is shared), so only the oldest of each count group can win:
      each group is a heap by time, and a pass looks at one record per count group, in
      count order, stopping once the count rank alone rules out a lower score. Its cost is
      the number of distinct usage counts (small integers in practice) times O(log n).

    Scores are the float expression Go evaluates, so the minimum is BuildKit's whenever it
    is unique; on a tie (BuildKit's order is undefined) the oldest, then the least used,
    then the lowest id wins, so a live prune and a dry run over the same records agree.

    Args:
        times: Every time a candidate may have (more are added on demand).
    """

    def __init__(self, times: Iterable[int] = ()) -> None:
        self._times = sorted(set(times))
        self._slot = {t: i for i, t in enumerate(self._times)}
        self._fenwick = _Fenwick(len(self._times))
        self._time_mult: dict[int, int] = {}
        self._distinct_times = 0
        self._counts: list[int] = []  # distinct counts present, ascending
        self._groups: dict[int, list[tuple[int, str]]] = {}  # count -> heap by (time, id)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, record_id: str, last_used_at: int | None, usage_count: int) -> None:
        """Makes ``record_id`` a candidate."""
        key = _NEVER if last_used_at is None else last_used_at
        if last_used_at is not None:
            n = self._time_mult.get(key, 0)
            if n == 0:
                if key not in self._slot:
                    self._grow(key)
                self._fenwick.add(self._slot[key], 1)
                self._distinct_times += 1
            self._time_mult[key] = n + 1
        group = self._groups.get(usage_count)
        if group is None:
            group = self._groups[usage_count] = []
            insort(self._counts, usage_count)
        heapq.heappush(group, (key, record_id))
        self._size += 1

    def pop(self) -> str | None:
        """Removes and returns the candidate BuildKit deletes next (None: there is none)."""
        best: tuple[float, int, int, str] | None = None  # (score, time key, count, id)
        max_lu = 1 + self._distinct_times
        zero = 1 if self._counts and self._counts[0] == 0 else 0
        max_uc = 1 + len(self._counts) - zero
        oldest_seen = None  # lowest time key of the groups looked at so far
        for index, count in enumerate(self._counts):
            uc_rank = 1 if count == 0 else 1 + index + 1 - zero
            if best is not None and gc_score(1, max_lu, uc_rank, max_uc) > best[0]:
                break  # every later group has a higher count rank: none can score lower
            key, rid = self._groups[count][0]
            if oldest_seen is not None and key >= oldest_seen:
                continue  # an older-or-equal record of a lower count scores lower already
            oldest_seen = key
            lu_rank = 1 if key == _NEVER else 1 + self._fenwick.prefix(self._slot[key])
            candidate = (gc_score(lu_rank, max_lu, uc_rank, max_uc), key, count, rid)
            if best is None or candidate < best:
                best = candidate
        if best is None:
            return None
        _, key, count, _ = best
        group = self._groups[count]
        _, record_id = heapq.heappop(group)
        if not group:
            del self._groups[count]
            del self._counts[bisect_left(self._counts, count)]
        if key != _NEVER:
            n = self._time_mult[key] - 1
            if n == 0:
                del self._time_mult[key]
                self._fenwick.add(self._slot[key], -1)
                self._distinct_times -= 1
            else:
                self._time_mult[key] = n
        self._size -= 1
        return record_id

    def _grow(self, key: int) -> None:
        """Adds a time the tree has no slot for (a record used since the table was read)."""
        insort(self._times, key)
        self._slot = {t: i for i, t in enumerate(self._times)}
        self._fenwick = _Fenwick(len(self._times))
        for t in self._time_mult:
            self._fenwick.add(self._slot[t], 1)
