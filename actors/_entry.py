"""Records at rest: the manager's table entry, and the metadata and lease a new record gets.

A record at rest is only a :class:`RecordEntry` in the manager's table plus its LMDB metadata
and its flat lease; :func:`write_new_record` is the one transaction step that creates the
latter two, whoever creates the record (the manager, or a job on the I/O executor).
"""

from __future__ import annotations

import contextlib
import secrets
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import pykka

from ..storage import (
    KEY_BLOB,
    KEY_BLOB_CHAIN_ID,
    KEY_BLOB_ONLY,
    KEY_CACHE_POLICY,
    KEY_CHAIN_ID,
    KEY_COMMITTED,
    KEY_CREATED_AT,
    KEY_DELETED,
    KEY_DESCRIPTION,
    KEY_DIFF_ID,
    KEY_EQUAL_MUTABLE,
    KEY_LAST_USED_AT,
    KEY_LOWER_DIFF_PARENT,
    KEY_MEDIA_TYPE,
    KEY_MERGE_PARENTS,
    KEY_PARENT,
    KEY_RECORD_TYPE,
    KEY_SIZE,
    KEY_SNAPSHOT,
    KEY_UPPER_DIFF_PARENT,
    KEY_USAGE_COUNT,
    RESOURCE_CONTENT,
    LmdbLeaseManager,
    MetadataStore,
    NotFoundError,
    Resource,
    StorageItem,
    WriteTxn,
    frozen_map,
)
from ._types import SIZE_UNKNOWN, RecordKind

if TYPE_CHECKING:
    from ._core import CacheCore

__all__ = [
    "MIRRORED_KEYS",
    "RecordEntry",
    "clear_record",
    "delete_leases",
    "lease_ids",
    "mirrored",
    "new_id",
    "parent_fields",
    "write_new_record",
]

#: The metadata keys the table mirrors in :class:`RecordEntry` fields (all scalars).
MIRRORED_KEYS = (
    KEY_COMMITTED,
    KEY_EQUAL_MUTABLE,
    KEY_CACHE_POLICY,
    KEY_SNAPSHOT,
    KEY_DESCRIPTION,
    KEY_CREATED_AT,
    KEY_RECORD_TYPE,
    KEY_SIZE,
    KEY_BLOB,
    KEY_BLOB_ONLY,
    KEY_DIFF_ID,
    KEY_CHAIN_ID,
    KEY_BLOB_CHAIN_ID,
    KEY_MEDIA_TYPE,
)

_ID_ALPHABET = string.digits + string.ascii_lowercase


def new_id() -> str:
    """A random 25-character record id, as BuildKit's ``identity.NewID``: 128 random bits
    in base 36, zero-padded (one ``urandom`` call: a pull makes thousands at a time)."""
    n = int.from_bytes(secrets.token_bytes(16), "big")
    out = ["0"] * 25
    i = 24
    while n:
        n, r = divmod(n, 36)
        out[i] = _ID_ALPHABET[r]
        i -= 1
    return "".join(out)


class RecordEntry:
    """One record of the table (manager-owned; records at rest are only this and LMDB)."""

    __slots__ = (
        "acquires",
        "actor",
        "blob",
        "blob_chain_id",
        "blob_only",
        "chain_id",
        "created_at",
        "dead",
        "description",
        "diff_id",
        "equal_immutable",
        "equal_mutable",
        "finalizing",
        "holders",
        "id",
        "kind",
        "last_used_at",
        "media_type",
        "mutable",
        "parents",
        "poisoned",
        "record_type",
        "retain",
        "size",
        "size_gen",
        "snapshot_id",
        "trigger_holds",
        "trigger_parents",
        "usage_count",
    )

    def __init__(self, record_id: str, kind: RecordKind, parents: tuple[str, ...]) -> None:
        self.id = record_id
        self.kind: RecordKind = kind
        self.parents = parents  # layer: (p,); merge: inputs; diff: (lower or "", upper or "")
        self.mutable = False
        self.holders = 0
        self.equal_mutable: str | None = None
        self.equal_immutable: str | None = None
        self.dead = False
        self.retain = False
        self.snapshot_id = record_id
        self.description = ""
        self.created_at = 0
        self.last_used_at: int | None = None
        self.usage_count = 0
        self.record_type = ""
        self.size = SIZE_UNKNOWN
        # Bumped by every reset of the size (extraction, a new blob variant, a mutable taken
        # again): a measurement begun before the reset is not cached.
        self.size_gen = 0
        # Holds whose release counts a use of this record (BuildKit's parent handles with
        # triggerLastUsed: the pieces a multi-layer diff merges). In memory only, as in
        # BuildKit, whose parent handles are loaded without it.
        self.trigger_holds = 0
        self.trigger_parents: frozenset[str] = frozenset()  # our holds of that kind
        self.blob = ""
        self.blob_only = False
        self.diff_id = ""
        self.chain_id = ""
        self.blob_chain_id = ""
        self.media_type = ""
        #: Its blob was found to lie about its diffID: never found, extracted or exported
        #: again (in memory only: the blob is gone, so the next open clears the record).
        self.poisoned = False
        self.actor: pykka.ActorRef[Any] | None = None
        self.acquires = 0  # manager acquires sent to the current actor (stale idle tells)
        #: The finalize in flight (its waiters share it; a concurrent future wakes them all).
        self.finalizing: Future[None] | None = None

    def parent_ids(self) -> tuple[str, ...]:
        """Parent ids without empty diff slots (for display and walks)."""
        return tuple(p for p in self.parents if p)

    @classmethod
    def from_values(
        cls, record_id: str, kind: RecordKind, parents: tuple[str, ...], values: Mapping[str, Any]
    ) -> RecordEntry:
        """Builds the entry of a record just written with metadata ``values``."""
        e = cls(record_id, kind, parents)
        e.mutable = not values.get(KEY_COMMITTED, False)
        e.equal_mutable = values.get(KEY_EQUAL_MUTABLE)
        e.retain = values.get(KEY_CACHE_POLICY) == 1
        e.snapshot_id = values.get(KEY_SNAPSHOT) or record_id
        e.description = values.get(KEY_DESCRIPTION) or ""
        e.created_at = values.get(KEY_CREATED_AT, 0)
        e.record_type = values.get(KEY_RECORD_TYPE) or ""
        e.size = values.get(KEY_SIZE, SIZE_UNKNOWN)
        e.blob = values.get(KEY_BLOB) or ""
        e.blob_only = bool(values.get(KEY_BLOB_ONLY, False))
        e.diff_id = values.get(KEY_DIFF_ID) or ""
        e.chain_id = values.get(KEY_CHAIN_ID) or ""
        e.blob_chain_id = values.get(KEY_BLOB_CHAIN_ID) or ""
        e.media_type = values.get(KEY_MEDIA_TYPE) or ""
        return e

    @classmethod
    def from_item(cls, item: StorageItem) -> RecordEntry:
        """Builds an entry from stored metadata (typed reads: corrupt values raise)."""
        merge = item.get_str_list(KEY_MERGE_PARENTS)
        lower = item.get_str(KEY_LOWER_DIFF_PARENT)
        upper = item.get_str(KEY_UPPER_DIFF_PARENT)
        parent = item.get_str(KEY_PARENT)
        kind: RecordKind
        if merge:
            kind, parents = "merge", tuple(merge)
        elif lower or upper:
            kind, parents = "diff", (lower, upper)
        elif parent:
            kind, parents = "layer", (parent,)
        else:
            kind, parents = "base", ()
        e = cls(item.id, kind, parents)
        # Merge and diff records are always immutable (BuildKit #2740 workaround).
        e.mutable = not item.get_bool(KEY_COMMITTED) and kind in ("base", "layer")
        e.equal_mutable = item.get_str(KEY_EQUAL_MUTABLE) or None
        e.retain = item.get_int(KEY_CACHE_POLICY) == 1
        e.snapshot_id = item.get_str(KEY_SNAPSHOT) or item.id
        e.description = item.get_str(KEY_DESCRIPTION)
        e.created_at = item.get_int(KEY_CREATED_AT)
        e.last_used_at = item.get_int(KEY_LAST_USED_AT) or None
        e.usage_count = item.get_int(KEY_USAGE_COUNT)
        e.record_type = item.get_str(KEY_RECORD_TYPE)
        e.size = item.get_int(KEY_SIZE, SIZE_UNKNOWN)
        e.blob = item.get_str(KEY_BLOB)
        e.blob_only = item.get_bool(KEY_BLOB_ONLY)
        e.diff_id = item.get_str(KEY_DIFF_ID)
        e.chain_id = item.get_str(KEY_CHAIN_ID)
        e.blob_chain_id = item.get_str(KEY_BLOB_CHAIN_ID)
        e.media_type = item.get_str(KEY_MEDIA_TYPE)
        return e

    @classmethod
    def from_fields(
        cls, record_id: str, f: Mapping[str, Any], canon: Callable[[str], str]
    ) -> tuple[RecordEntry, bool] | None:
        """:meth:`from_item` on a decoded field map, and its ``cache.deleted`` flag: the
        bulk load of open, without a :class:`StorageItem` per record.

        Returns ``None`` when a value has an unexpected type (:meth:`from_item` on the
        stored item then names it). ``canon`` returns one shared string object for equal
        strings that many entries repeat (parent ids, descriptions): the table is kept at
        rest for every record, so it is not stored once per entry. Only the keys a record
        has are visited (most have a handful of the ~20 the table mirrors).
        """
        e = cls(record_id, "base", ())
        committed = deleted = False
        merge: list[str] = _EMPTY_LIST
        lower = upper = parent = ""
        for key, value in f.items():
            field = _FIELDS.get(key)
            if field is None:
                continue  # not mirrored (kept in LMDB only)
            name, kind = field
            found = type(value)  # compared apart: mypy would narrow ``value`` to ``object``
            if found is not kind:
                return None
            if name is _COPY:
                setattr(e, _COPIED[key], value)
            elif name is _SHARED:
                setattr(e, _COPIED[key], canon(value))
            elif key == KEY_COMMITTED:
                committed = value
            elif key == KEY_DELETED:
                deleted = value
            elif key == KEY_EQUAL_MUTABLE:
                e.equal_mutable = canon(value) if value else None
            elif key == KEY_SNAPSHOT:
                if value and value != record_id:
                    e.snapshot_id = value
            elif key == KEY_CACHE_POLICY:
                e.retain = value == 1
            elif key == KEY_LAST_USED_AT:
                e.last_used_at = value or None
            elif key == KEY_MERGE_PARENTS:
                if not all(type(p) is str for p in value):
                    return None
                merge = value
            elif key == KEY_LOWER_DIFF_PARENT:
                lower = value
            elif key == KEY_UPPER_DIFF_PARENT:
                upper = value
            else:  # KEY_PARENT
                parent = value
        if merge:
            e.kind, e.parents = "merge", tuple(map(canon, merge))
        elif lower or upper:
            e.kind, e.parents = "diff", (canon(lower), canon(upper))
        elif parent:
            e.kind, e.parents = "layer", (canon(parent),)
        # Merge and diff records are always immutable (BuildKit #2740 workaround).
        e.mutable = not committed and e.kind in ("base", "layer")
        return e, deleted


_EMPTY_LIST: list[str] = []
_COPY = "copy"  # stored as it is, under the attribute _COPIED names
_SHARED = "shared"  # likewise, through ``canon`` (strings many records repeat)
_COPIED = {
    KEY_CREATED_AT: "created_at",
    KEY_USAGE_COUNT: "usage_count",
    KEY_SIZE: "size",
    KEY_BLOB: "blob",
    KEY_BLOB_ONLY: "blob_only",
    KEY_DIFF_ID: "diff_id",
    KEY_CHAIN_ID: "chain_id",
    KEY_BLOB_CHAIN_ID: "blob_chain_id",
    KEY_DESCRIPTION: "description",
    KEY_RECORD_TYPE: "record_type",
    KEY_MEDIA_TYPE: "media_type",
}
#: The keys :meth:`RecordEntry.from_fields` reads: how, and the type they must have.
_FIELDS: dict[str, tuple[str, type]] = {
    KEY_CREATED_AT: (_COPY, int),
    KEY_USAGE_COUNT: (_COPY, int),
    KEY_SIZE: (_COPY, int),
    KEY_BLOB: (_COPY, str),
    KEY_BLOB_ONLY: (_COPY, bool),
    KEY_DIFF_ID: (_COPY, str),
    KEY_CHAIN_ID: (_COPY, str),
    KEY_BLOB_CHAIN_ID: (_COPY, str),
    KEY_DESCRIPTION: (_SHARED, str),
    KEY_RECORD_TYPE: (_SHARED, str),
    KEY_MEDIA_TYPE: (_SHARED, str),
    KEY_COMMITTED: ("", bool),
    KEY_DELETED: ("", bool),
    KEY_EQUAL_MUTABLE: ("", str),
    KEY_SNAPSHOT: ("", str),
    KEY_CACHE_POLICY: ("", int),
    KEY_LAST_USED_AT: ("", int),
    KEY_MERGE_PARENTS: ("", list),
    KEY_LOWER_DIFF_PARENT: ("", str),
    KEY_UPPER_DIFF_PARENT: ("", str),
    KEY_PARENT: ("", str),
}


def parent_fields(kind: RecordKind, parents: Sequence[str]) -> dict[str, Any]:
    """The metadata keys that store ``parents`` for a record of ``kind``."""
    if kind == "merge":
        return {KEY_MERGE_PARENTS: list(parents)}
    if kind == "diff":
        return {
            KEY_LOWER_DIFF_PARENT: parents[0] or None,
            KEY_UPPER_DIFF_PARENT: parents[1] or None,
        }
    if kind == "layer":
        return {KEY_PARENT: parents[0]}
    return {}


def mirrored(values: Mapping[str, Any]) -> Mapping[str, Any]:
    """The :data:`MIRRORED_KEYS` of ``values``, read-only: what crosses to the manager when a
    record is written outside its thread."""
    return frozen_map({k: values[k] for k in MIRRORED_KEYS if k in values})


def write_new_record(
    core: CacheCore,
    txn: WriteTxn,
    record_id: str,
    values: Mapping[str, Any],
    *,
    snapshot_id: str,
    blob: str = "",
    indexes: Mapping[str, str] | None = None,
) -> None:
    """Creates a record's flat lease and its metadata in ``txn`` (one step, one commit).

    The lease holds the record's snapshot (and its blob) before either exists, as BuildKit's
    does, so the collector never sees them unheld. ``None`` values are left out.

    Raises:
        AlreadyExistsError: the lease exists already.
        InvalidError: a bad metadata value (nothing is written: the caller's transaction
            rolls back).
    """
    leases = core.leases
    leases.create(record_id, flat=True, txn=txn)
    leases.add_resource(
        record_id, Resource(snapshot_id, f"snapshots/{core.snapshotter.name}"), txn=txn
    )
    if blob:
        leases.add_resource(record_id, Resource(blob, RESOURCE_CONTENT), txn=txn)
    item = core.store.get(record_id)
    item.queue_many({k: v for k, v in values.items() if v is not None}, indexes)
    item.commit(txn=txn)


def lease_ids(record_id: str) -> tuple[str, str, str]:
    """The leases a record may own: ``<id>`` (its snapshot and blob), ``<id>-variants`` (its
    blob's compression variants) and ``<id>-view`` (the read-only view of its mounts)."""
    return record_id, record_id + "-variants", record_id + "-view"


def delete_leases(leases: LmdbLeaseManager, txn: WriteTxn, ids: Iterable[str]) -> None:
    """Deletes the leases ``ids`` in ``txn`` (missing ones are fine)."""
    for lease_id in ids:
        with contextlib.suppress(NotFoundError):
            leases.delete(lease_id, txn=txn)


def clear_record(
    store: MetadataStore,
    leases: LmdbLeaseManager,
    txn: WriteTxn,
    record_id: str,
    lease_names: Iterable[str],
) -> None:
    """Forgets a record at rest in ``txn``: its metadata, and the leases ``lease_names``
    (some of :func:`lease_ids`); what they held is collected once they are gone."""
    store.clear(record_id, txn=txn)
    delete_leases(leases, txn, lease_names)
