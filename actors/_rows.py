"""Table rows: immutable copies of the manager's record entries, for disk usage and prune.

Disk usage and prune compute everything off the manager's thread from these rows
(:mod:`actors._usage`, :mod:`actors._planning`); ``refcache du`` builds the same rows from
LMDB (:mod:`actors._offline`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from ._entry import RecordEntry

__all__ = ["TableRow", "entry_row"]


class TableRow(NamedTuple):
    """An immutable copy of one record table entry, as prune and disk usage need it.

    ``handles`` is the number of open user handles (0 in an offline view); ``holders`` the
    counted holds of child records (one per parent slot). ``size_snapshot`` is the snapshot
    whose usage is the record's size (its equal mutable's until finalize). ``dead`` is set
    while a record is being removed; ``pruning`` when a prune is removing it; ``busy`` while a
    finalize of it runs. ``size_gen`` is the generation of ``size`` (a measurement is cached
    only if no reset happened since). ``trigger_holds`` counts the holds on the record that
    count a use when they go; ``trigger_parents`` are the parents this record holds so.
    """

    id: str
    kind: str
    parents: tuple[str, ...]
    mutable: bool
    size: int
    created_at: int
    last_used_at: int | None
    usage_count: int
    description: str
    record_type: str
    equal_mutable: str | None
    equal_immutable: str | None
    holders: int
    handles: int
    blob: str
    blob_only: bool
    snapshot_id: str
    size_snapshot: str
    dead: bool = False
    pruning: bool = False
    busy: bool = False
    size_gen: int = 0
    trigger_holds: int = 0
    trigger_parents: frozenset[str] = frozenset()

    @property
    def refs(self) -> int:
        """BuildKit's refcount: user handles plus holds of child records."""
        return self.handles + self.holders

    def parent_ids(self) -> tuple[str, ...]:
        """Parent ids without empty diff slots."""
        return tuple(p for p in self.parents if p)


def entry_row(
    e: RecordEntry, *, handles: int, size_snapshot: str, pruning: bool = False
) -> TableRow:
    """The :class:`TableRow` of a manager table entry."""
    # tuple.__new__ directly: the named tuple's own __new__ is a Python function, and disk
    # usage makes a row of every record on every call.
    return _new_tuple(
        TableRow,
        (
            e.id,
            e.kind,
            e.parents,
            e.mutable,
            e.size,
            e.created_at,
            e.last_used_at,
            e.usage_count,
            e.description,
            e.record_type,
            e.equal_mutable,
            e.equal_immutable,
            e.holders,
            handles,
            e.blob,
            e.blob_only,
            e.snapshot_id,
            size_snapshot,
            e.dead,
            pruning,
            e.finalizing is not None,
            e.size_gen,
            e.trigger_holds,
            e.trigger_parents,
        ),
    )


_new_tuple = tuple.__new__
