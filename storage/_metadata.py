"""Record metadata on LMDB + msgpack: the counterpart of BuildKit's ``cache/metadata``.

Layout in the shared :class:`~storage._env.MetaEnv`:

* ``records``: ``<id>`` -> msgpack ``{"f": {key: value}, "i": {key: index}}``. One value per
  record (not one per key as BuildKit's bolt buckets): loading 100k records is one cursor walk
  and one ``unpackb`` each. Keys this version does not know are kept as they are.
* ``index``: ``<index>::<id>`` -> ``b""``; :meth:`MetadataStore.search` is a prefix scan.
* ``external``: ``<id>\\0<key>`` -> raw bytes, for large values (file lists, content hashes).

A :class:`StorageItem` is BuildKit's ``StorageItem``: reads see queued writes at once; writes
are queued and flushed by :meth:`StorageItem.commit` in one write transaction that re-reads the
stored map and applies only the queued keys, so two items of one record never undo each
other's keys. An empty commit touches nothing (BuildKit ``0bb8505e8``: 26k-record startup
from 46 s to 2 s). :meth:`MetadataStore.commit_many` flushes many items in one transaction and
:meth:`MetadataStore.write_many` writes many records without items (the same merge, for batch
writers); both hand LMDB sorted batches (``WriteTxn.put_many``).

Speed (``scripts/bench_metadata.py``, docs/BENCHMARKS.md): :meth:`MetadataStore.all` decodes
straight from LMDB's map with the cyclic garbage collector paused, and the write paths avoid
allocating a tracked container per key, because on a heap holding 100k records CPython's full
collections, not the decoding or packing, were the largest cost.

Thread ownership: a :class:`MetadataStore` is thread-safe (it holds no mutable state of its
own). A :class:`StorageItem` belongs to one owner at a time (in refcache: the record actor, or
the manager before the record is activated).
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Final

import msgpack

from ._env import DB_EXTERNAL, DB_INDEX, DB_RECORDS, MetaEnv, ReadTxn, WriteTxn
from ._errors import CorruptMetadataError, InvalidError, NotFoundError

__all__ = [
    "EXTERNAL_FILELIST",
    "INDEX_BLOB_CHAIN",
    "INDEX_CHAIN",
    "KEY_BLOB",
    "KEY_BLOB_CHAIN_ID",
    "KEY_BLOB_ONLY",
    "KEY_BLOB_SIZE",
    "KEY_CACHE_POLICY",
    "KEY_CHAIN_ID",
    "KEY_COMMITTED",
    "KEY_CREATED_AT",
    "KEY_DELETED",
    "KEY_DESCRIPTION",
    "KEY_DIFF_ID",
    "KEY_EQUAL_MUTABLE",
    "KEY_IMAGE_REFS",
    "KEY_LAST_USED_AT",
    "KEY_LAYER_TYPE",
    "KEY_LAYER_URLS",
    "KEY_LOWER_DIFF_PARENT",
    "KEY_MEDIA_TYPE",
    "KEY_MERGE_PARENTS",
    "KEY_PARENT",
    "KEY_RECORD_TYPE",
    "KEY_SIZE",
    "KEY_SNAPSHOT",
    "KEY_UPPER_DIFF_PARENT",
    "KEY_USAGE_COUNT",
    "RESERVED_EXTERNAL_KEYS",
    "RESERVED_INDEX_PREFIXES",
    "RESERVED_KEY_PREFIXES",
    "USER_STRING_KEYS",
    "MetadataStore",
    "StorageItem",
    "reserved_index",
    "reserved_key",
    "validate_record_id",
]

# BuildKit's metadata keys (cache/metadata.go), kept verbatim so that the stored records read
# the same way BuildKit's did.
KEY_SIZE: Final = "snapshot.size"  #: int; cached size in bytes, -1 or missing = unknown
KEY_COMMITTED: Final = "snapshot.committed"  #: bool; immutable record (missing = mutable)
KEY_EQUAL_MUTABLE: Final = "cache.equalMutable"  #: str; on I: its equal mutable's id
KEY_CACHE_POLICY: Final = "cache.cachePolicy"  #: int; 0 default, 1 retain
KEY_DESCRIPTION: Final = "cache.description"  #: str
KEY_CREATED_AT: Final = "cache.createdAt"  #: int ns; also the "initialised" marker
KEY_LAST_USED_AT: Final = "cache.lastUsedAt"  #: int ns; 0/missing = never
KEY_USAGE_COUNT: Final = "cache.usageCount"  #: int
KEY_LAYER_TYPE: Final = "cache.layerType"  #: str; "windows" for Windows layers
KEY_RECORD_TYPE: Final = "cache.recordType"  #: str; empty is shown as "regular"
KEY_PARENT: Final = "cache.parent"  #: str; layer parent id
KEY_MERGE_PARENTS: Final = "cache.mergeParents"  #: list[str]; merge inputs in order
KEY_LOWER_DIFF_PARENT: Final = "cache.lowerDiffParent"  #: str
KEY_UPPER_DIFF_PARENT: Final = "cache.upperDiffParent"  #: str
KEY_DIFF_ID: Final = "cache.diffID"  #: digest; uncompressed layer digest
KEY_CHAIN_ID: Final = "cache.chainID"  #: digest; indexed as chainid:<d>
KEY_BLOB_CHAIN_ID: Final = "cache.blobChainID"  #: digest; indexed as blobchainid:<d>
KEY_BLOB: Final = "cache.blob"  #: digest; compressed blob
KEY_SNAPSHOT: Final = "cache.snapshot"  #: str; snapshotter key (empty: the record id)
KEY_BLOB_ONLY: Final = "cache.blobonly"  #: bool; lazy, snapshot not extracted
KEY_MEDIA_TYPE: Final = "cache.mediatype"  #: str; blob media type
KEY_BLOB_SIZE: Final = "cache.blobsize"  #: int; blob size from the descriptor
KEY_LAYER_URLS: Final = "cache.layer.urls"  #: list[str]; foreign-layer URLs (appended)
KEY_IMAGE_REFS: Final = "cache.imageRefs"  #: list[str]; image references (appended)
KEY_DELETED: Final = "cache.deleted"  #: bool; prune started deleting (crash safety)

INDEX_CHAIN: Final = "chainid:"
INDEX_BLOB_CHAIN: Final = "blobchainid:"
EXTERNAL_FILELIST: Final = "filelist"

#: Key namespaces the cache manages itself (every ``KEY_*`` above lives in one): the record
#: structure (committed, parents, equal links, snapshot, blob, chain IDs, deleted) and the
#: statistics. Public setters (``RefMetadata``) refuse them: ``snapshot.committed`` set to
#: ``""`` on a base record made the next open delete it and every descendant.
RESERVED_KEY_PREFIXES: Final = ("cache.", "snapshot.")
#: Keys in those namespaces that users set as strings (BuildKit's ``SetDescription``,
#: ``SetRecordType``, ``SetLayerType``). Creation time and cache policy are not strings:
#: they have typed setters of their own.
USER_STRING_KEYS: Final = frozenset({KEY_DESCRIPTION, KEY_RECORD_TYPE, KEY_LAYER_TYPE})
#: External values the cache computes and trusts (``file_list()``'s cache).
RESERVED_EXTERNAL_KEYS: Final = frozenset({EXTERNAL_FILELIST})
#: Indexes the cache searches to share snapshots and blobs (``get_by_blob``): a record
#: added to one by hand would be handed out for another layer's chain.
RESERVED_INDEX_PREFIXES: Final = (INDEX_CHAIN, INDEX_BLOB_CHAIN)


def reserved_key(key: str) -> bool:
    """Whether ``key`` is one the cache manages (refused by the public setters)."""
    return key.startswith(RESERVED_KEY_PREFIXES) and key not in USER_STRING_KEYS


def reserved_index(index: str) -> bool:
    """Whether ``index`` is one the cache maintains itself (chain and blob-chain IDs)."""
    return index.startswith(RESERVED_INDEX_PREFIXES)


_INDEX_SEP = b"::"
_EXTERNAL_SEP = b"\x00"
_MAX_ID_LEN = 512

_TYPE_NAMES: dict[type | tuple[type, ...], str] = {
    str: "string",
    bool: "bool",
    int: "integer",
    bytes: "bytes",
    list: "list",
}


def validate_record_id(record_id: object) -> str:
    """Returns ``record_id`` if usable as a record id.

    Raises:
        InvalidError: naming the value, when it is not a non-empty string without NUL or
            ``::`` of at most 512 characters.
    """
    if (
        not isinstance(record_id, str)
        or not record_id
        or len(record_id) > _MAX_ID_LEN
        or "\x00" in record_id
        or "::" in record_id
    ):
        msg = f"invalid record id {record_id!r}: expected a non-empty string without NUL or '::'"
        raise InvalidError(msg)
    return record_id


def _validate_key(key: object) -> str:
    if not isinstance(key, str) or not key or "\x00" in key:
        msg = f"invalid metadata key {key!r}: expected a non-empty string without NUL"
        raise InvalidError(msg)
    return key


def _validate_index(index: object) -> str:
    if not isinstance(index, str) or not index or "\x00" in index:
        msg = f"invalid index {index!r}: expected a non-empty string without NUL"
        raise InvalidError(msg)
    return index


_MISSING = object()
_SCALARS = frozenset({str, bool, float, bytes})
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 64) - 1


def _storable(value: object) -> bool:
    """Whether msgpack can store ``value`` (a cheap structural check, no packing)."""
    kind = type(value)
    if kind in _SCALARS or value is None:
        return True
    if kind is int:
        return _INT_MIN <= value <= _INT_MAX  # type: ignore[operator]
    if kind is list or kind is tuple:
        if set(map(type, value)) <= _SCALARS:  # type: ignore[call-overload]
            return True  # the usual list of strings, checked in C
        return all(_storable(v) for v in value)  # type: ignore[attr-defined]
    if kind is dict:
        return all(
            type(k) is str and _storable(v)
            for k, v in value.items()  # type: ignore[attr-defined]
        )
    return False


#: Metadata keys already validated. Batches name the same few keys (BuildKit's ~25 plus the
#: callers' own) on every record: checking each distinct key once keeps key validation out
#: of the per-record cost. Bounded, so that ever-new keys cannot grow it without limit.
_KNOWN_KEYS: set[str] = set()
_MAX_KNOWN_KEYS = 4096


def _check_keys(values: Mapping[str, Any]) -> None:
    """Raises :class:`InvalidError` naming the first bad key of ``values``."""
    if _KNOWN_KEYS.issuperset(values):
        return
    for key in values:
        if key not in _KNOWN_KEYS:
            _validate_key(key)
            if type(key) is str and len(_KNOWN_KEYS) < _MAX_KNOWN_KEYS:
                _KNOWN_KEYS.add(key)


def _check_storable(record_id: str, key: str, value: object) -> None:
    if not _storable(value):
        msg = (
            f"value for {key!r} of record {record_id!r} cannot be stored: {value!r} is not made "
            "of str, int (64-bit), float, bool, bytes, None, lists and str-keyed maps"
        )
        raise InvalidError(msg)


#: Value types stored as they are; ints are range-checked by msgpack itself (OverflowError).
_PLAIN_KINDS: frozenset[type] = frozenset({str, bool, float, bytes, int})


def _check_values(record_id: str, values: Mapping[str, Any]) -> None:
    """Checks each key and value; raises :class:`InvalidError` naming the first bad one."""
    for key, value in values.items():
        _validate_key(key)
        if value is not None:
            _check_storable(record_id, key, value)


def _decode(record_id: str, raw: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """Decodes one stored record; raises :class:`CorruptMetadataError` naming it.

    ``raw`` may be any buffer (a zero-copy LMDB view included): nothing of it is kept. Only
    the shape is checked here (this runs for every record at open); the type of each value is
    checked by the typed getters when it is read.
    """
    try:
        doc = _unpackb(raw)
    except (ValueError, msgpack.UnpackException) as exc:
        msg = f"metadata of record {record_id!r} is not valid msgpack: {exc}"
        raise CorruptMetadataError(msg, record_id=record_id) from exc
    if type(doc) is not dict:
        msg = f"metadata of record {record_id!r} is a {type(doc).__name__}, expected a map"
        raise CorruptMetadataError(msg, record_id=record_id)
    fields = doc.get("f", _MISSING)
    indexes = doc.get("i", _MISSING)
    if fields is _MISSING:
        fields = {}
    if indexes is _MISSING:
        indexes = {}
    if type(fields) is not dict or type(indexes) is not dict:
        msg = f"metadata of record {record_id!r} has a malformed field or index table"
        raise CorruptMetadataError(msg, record_id=record_id)
    for name, index in indexes.items():
        if type(index) is not str or type(name) is not str:
            msg = f"metadata of record {record_id!r} has a malformed index table {indexes!r}"
            raise CorruptMetadataError(msg, record_id=record_id)
    return fields, indexes


def _encode(
    fields: dict[str, Any], indexes: dict[str, str], pack: Callable[[Any], bytes] = msgpack.packb
) -> bytes:
    return pack({"f": fields, "i": indexes} if indexes else {"f": fields})


def _index_key(index: str, record_id: str) -> bytes:
    return index.encode() + _INDEX_SEP + record_id.encode()


def _external_key(record_id: str, key: str) -> bytes:
    return record_id.encode() + _EXTERNAL_SEP + key.encode()


def _merge(
    record_id: str,
    fields: dict[str, Any],
    indexes: dict[str, str],
    values: Mapping[str, Any],
    value_indexes: Mapping[str, str | None] | None,
    index_ops: dict[bytes, bool],
) -> None:
    """Applies queued ``values`` (``None`` deletes) to a stored record in place.

    ``value_indexes`` gives the index of each key that has one. Only the changed keys are
    touched (BuildKit's per-key bolt writes: two items of one record never undo each other's
    keys). Index entries that move are recorded in ``index_ops`` (``True`` put, ``False``
    delete); an old entry is deleted only when no key of the record still names that index.
    """
    dropped: list[str] = []
    for name, value in values.items():
        if value is None:
            fields.pop(name, None)
            index = None
        else:
            fields[name] = value
            index = value_indexes.get(name) if value_indexes else None
        old_index = indexes.get(name)
        if old_index == index:
            continue
        if old_index is not None:
            del indexes[name]
            dropped.append(old_index)
        if index is not None:
            indexes[name] = index
            index_ops[_index_key(index, record_id)] = True
    if dropped:
        claimed = set(indexes.values())
        for old_index in dropped:
            if old_index not in claimed:
                index_ops[_index_key(old_index, record_id)] = False


class _Batch:
    """The writes of one flush (one item, a ``commit_many`` or a ``write_many``).

    Record values are collected and written with one sorted ``put_many``; index entries are
    netted per key (the last write wins: a record flushed twice in one batch moves its index
    once), deleted first and then put in key order. Reads of records go through the batch so
    that a later item of a record sees what an earlier one wrote.
    """

    __slots__ = ("found", "index_ops", "pack", "records", "settle", "txn")

    def __init__(self, txn: WriteTxn, keys: list[bytes]) -> None:
        self.txn = txn
        if len(keys) == 1:
            raw = txn.get(DB_RECORDS, keys[0])
            self.found = {} if raw is None else {keys[0]: raw}
        else:
            self.found = txn.get_many(DB_RECORDS, keys)
        self.records: dict[bytes, bytes] = {}
        self.index_ops: dict[bytes, bool] = {}
        self.settle: list[StorageItem] = []  # items whose queues this batch wrote
        # A Packer per batch: msgpack.packb builds a new one per call.
        self.pack: Callable[[Any], bytes] = msgpack.Packer().pack

    def stored(self, key: bytes) -> bytes | None:
        """The current value of record ``key``: written in this batch, else in the txn."""
        raw = self.records.get(key)
        return self.found.get(key) if raw is None else raw

    def apply(self) -> None:
        """Writes everything collected into the transaction."""
        txn = self.txn
        if self.records:
            txn.put_many(DB_RECORDS, sorted(self.records.items()))
        if self.index_ops:
            born = []
            for ikey, put in self.index_ops.items():
                if put:
                    born.append(ikey)
                else:
                    txn.delete(DB_INDEX, ikey)
            born.sort()
            txn.put_many(DB_INDEX, [(ikey, b"") for ikey in born])
        if self.settle:
            # One callback for the whole batch, not a closure per item.
            txn.after_commit(self._settled)

    def _settled(self) -> None:
        for item in self.settle:
            item._settle()


class _GcPause:
    """Pauses CPython's cyclic garbage collector around a bulk load; re-entrant, thread-safe.

    Loading 100k records allocates ~400k long-lived containers (items, field maps, lists).
    Each time the survivors grow by 25% CPython runs a *full* collection over the whole heap,
    so a bulk load pays several whole-heap scans for objects that are all still alive
    (measured before: 6 full collections, ~0.5 s of a 1.1-1.4 s load of 100k records).
    Nothing decoded here can form a reference cycle, so pausing loses nothing.

    On leaving, everything allocated meanwhile is moved straight to the oldest generation
    (``gc.freeze()`` + ``gc.unfreeze()``: two O(1) list splices) instead of being traversed
    by a young collection that would find it all alive and promote it anyway (0.12-0.2 s
    per 100k records, paid by whatever allocates next). The records stay collectable: full
    collections see them as usual. Skipped when the application has frozen objects of its
    own (``gc.freeze`` before fork), which unfreezing would release. If collection was
    disabled by someone else, it stays disabled and untouched.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._was_enabled = False

    def __enter__(self) -> None:
        with self._lock:
            if self._depth == 0:
                self._was_enabled = gc.isenabled()
                gc.disable()
            self._depth += 1

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0 and self._was_enabled:
                if gc.get_freeze_count() == 0:
                    gc.freeze()
                    gc.unfreeze()
                gc.enable()


_gc_paused = _GcPause()
_unpackb = msgpack.unpackb
_new_item = object.__new__


class StorageItem:
    """The metadata of one record: typed reads, queued writes, indexes and external values.

    Values are msgpack types: ``str``, ``int``, ``bool``, ``bytes``, ``float``, ``None``,
    lists and maps of these. Setting a value to ``None`` deletes the key and its index entry.

    Owned by one thread at a time (see the module docstring); the store behind it is shared.
    """

    __slots__ = (
        "_fields",
        "_flush_fields",
        "_flush_indexes",
        "_flush_version",
        "_flushed_seq",
        "_indexes",
        "_qindex",
        "_qseq",
        "_queue",
        "_raw",
        "_store",
        "_version",
        "exists",
        "id",
    )

    def __init__(self, store: MetadataStore, record_id: str, raw: bytes | None) -> None:
        self._store = store
        self.id = record_id
        self.exists = raw is not None
        self._raw = raw
        self._fields: dict[str, Any] | None = None if raw is not None else {}
        self._indexes: dict[str, str] | None = None if raw is not None else {}
        self._reset_queue()

    def _reset_queue(self) -> None:
        # The queue is three flat maps rather than one map of (value, index) pairs: a batch
        # queues ~20 keys on each of thousands of items, and a pair per key is a container
        # the garbage collector has to track (it made full collections the largest cost).
        self._queue: dict[str, Any] = {}  # key -> value; None deletes
        self._qindex: dict[str, str | None] = {}  # key -> index for each queued key
        self._qseq: dict[str, int] = {}  # key -> version of the queue call that staged it
        self._version = 0  # bumped by every queue call; lets a commit clear the queue whole
        # While a flush waits for its transaction to commit: the queue versions it wrote
        # (frozen: queue calls copy _qseq first) and the state to adopt at the commit.
        self._flushed_seq: dict[str, int] | None = None
        self._flush_version = -1
        self._flush_fields: dict[str, Any] | None = None
        self._flush_indexes: dict[str, str] | None = None

    @classmethod
    def _decoded(
        cls,
        store: MetadataStore,
        record_id: str,
        fields: dict[str, Any],
        indexes: dict[str, str],
    ) -> StorageItem:
        """An item of a stored record that is already decoded (bulk loads)."""
        item: StorageItem = _new_item(cls)
        item._store = store
        item.id = record_id
        item.exists = True
        item._raw = None
        item._fields = fields
        item._indexes = indexes
        item._reset_queue()
        return item

    def __repr__(self) -> str:
        return f"StorageItem({self.id!r}, exists={self.exists})"

    # -- reading ----------------------------------------------------------------------------

    def _loaded(self) -> tuple[dict[str, Any], dict[str, str]]:
        if self._fields is None or self._indexes is None:
            self._fields, self._indexes = _decode(self.id, self._raw or b"")
            self._raw = None
        return self._fields, self._indexes

    def decode(self) -> None:
        """Decodes the stored value now.

        Raises:
            CorruptMetadataError: naming the record, when the stored value is unreadable.
        """
        self._loaded()

    def keys(self) -> list[str]:
        """Returns the keys that have a value, queued writes included, sorted."""
        fields, _ = self._loaded()
        queue = self._queue
        present = {k for k in fields if k not in queue}
        present.update(k for k, v in queue.items() if v is not None)
        return sorted(present)

    def get(self, key: str, default: Any = None) -> Any:
        """Returns the value of ``key`` (queued writes included), or ``default``."""
        _validate_key(key)
        queue = self._queue
        if key in queue:
            value = queue[key]
            return default if value is None else value
        fields, _ = self._loaded()
        return fields.get(key, default)

    def _typed(self, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            return default
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            expected = _TYPE_NAMES.get(kind, str(kind))
            msg = (
                f"metadata key {key!r} of record {self.id!r} holds a {type(value).__name__} "
                f"({value!r}), expected a {expected}"
            )
            raise CorruptMetadataError(msg, record_id=self.id, key=key)
        return value

    def get_str(self, key: str, default: str = "") -> str:
        """Returns the string under ``key`` (``default`` when missing).

        Raises:
            CorruptMetadataError: the stored value is not a string.
        """
        return str(self._typed(key, str, default))

    def get_int(self, key: str, default: int = 0) -> int:
        """Returns the integer under ``key`` (``default`` when missing).

        Raises:
            CorruptMetadataError: the stored value is not an integer.
        """
        return int(self._typed(key, int, default))

    def get_bool(self, key: str, default: bool = False) -> bool:
        """Returns the bool under ``key`` (``default`` when missing).

        Raises:
            CorruptMetadataError: the stored value is not a bool.
        """
        return bool(self._typed(key, bool, default))

    def get_str_list(self, key: str) -> list[str]:
        """Returns the list of strings under ``key`` (empty when missing).

        Raises:
            CorruptMetadataError: the stored value is not a list of strings.
        """
        value = self._typed(key, list, [])
        if not all(isinstance(v, str) for v in value):
            msg = f"metadata key {key!r} of record {self.id!r} holds a non-string list item"
            raise CorruptMetadataError(msg, record_id=self.id, key=key)
        return list(value)

    def index_of(self, key: str) -> str | None:
        """Returns the index string attached to ``key``, if any."""
        if key in self._queue:
            return self._qindex.get(key)
        _, indexes = self._loaded()
        return indexes.get(key)

    # -- writing ----------------------------------------------------------------------------

    def queue(self, key: str, value: Any, *, index: str | None = None) -> None:
        """Stages ``key = value`` (``None`` deletes) for the next :meth:`commit`.

        ``index`` adds the record to the secondary index ``index`` (see
        :meth:`MetadataStore.search`) for as long as the key has a value.

        Raises:
            InvalidError: bad key, bad index or a value msgpack cannot store; nothing staged.
        """
        if type(key) is not str or not key or "\x00" in key:
            _validate_key(key)
        if index is not None:
            _validate_index(index)
        if value is not None and type(value) not in _SCALARS:
            _check_storable(self.id, key, value)
        if self._qseq is self._flushed_seq:
            self._qseq = dict(self._qseq)  # the flushed versions stay as they were (_settle)
        self._version += 1
        self._queue[key] = value
        self._qindex[key] = None if value is None else index
        self._qseq[key] = self._version

    def queue_many(
        self, values: Mapping[str, Any], indexes: Mapping[str, str] | None = None
    ) -> None:
        """Stages several writes at once (:meth:`queue` for each key of ``values``).

        Args:
            values: Key to value (``None`` deletes).
            indexes: Key to index string, for keys that are indexed.

        Raises:
            InvalidError: any bad key, index or value; then nothing at all is staged.
        """
        _check_keys(values)
        scalars = _SCALARS
        for value in values.values():
            kind = type(value)
            if kind in scalars or value is None:
                continue
            if kind is int:
                if _INT_MIN <= value <= _INT_MAX:
                    continue
            elif kind is list and set(map(type, value)) <= scalars:
                continue  # the usual list of strings, checked in C
            _check_values(self.id, values)  # raises, naming the key
        staged_indexes: dict[str, str] = {}
        if indexes:
            for key, index in indexes.items():
                if index is not None and key in values:
                    _validate_index(index)
                    if values[key] is not None:
                        staged_indexes[key] = index
        if self._qseq is self._flushed_seq:
            self._qseq = dict(self._qseq)  # the flushed versions stay as they were (_settle)
        self._version += 1
        if self._queue:
            self._queue.update(values)
            self._qindex.update(dict.fromkeys(values))
            self._qseq.update(dict.fromkeys(values, self._version))
        else:  # the usual first batch of values of a new item
            self._queue = dict(values)
            self._qindex = dict.fromkeys(values)
            self._qseq = dict.fromkeys(values, self._version)
        if staged_indexes:
            self._qindex.update(staged_indexes)

    def set(self, key: str, value: Any, *, index: str | None = None) -> None:
        """Stores ``key = value`` now: :meth:`queue` then :meth:`commit`."""
        self.queue(key, value, index=index)
        self.commit()

    def append_strings(self, key: str, values: Iterable[str]) -> bool:
        """Queues ``values`` appended to the string list under ``key``, skipping duplicates.

        BuildKit's ``GetAndSetValue`` for append-only slices (image refs, layer URLs).
        Returns whether anything changed (nothing is queued when nothing did).
        """
        current = self.get_str_list(key)
        added = [v for v in dict.fromkeys(values) if v not in current]
        for v in added:
            if not isinstance(v, str):
                msg = f"cannot append {v!r} to {key!r} of record {self.id!r}: not a string"
                raise InvalidError(msg)
        if not added:
            return False
        self.queue(key, current + added)
        return True

    @property
    def dirty(self) -> bool:
        """Whether writes are queued."""
        return bool(self._queue)

    def commit(self, *, txn: WriteTxn | None = None) -> None:
        """Flushes queued writes in one write transaction; with nothing queued, does nothing.

        Args:
            txn: Write into this transaction instead of opening one (the caller commits).
        """
        if not self._queue:
            return
        if txn is None:
            with self._store.env.write_txn() as own:
                self._flush(own)
        else:
            self._flush(txn)

    def _flush(self, txn: WriteTxn) -> None:
        batch = _Batch(txn, [self.id.encode()])
        self._stage(batch)
        batch.apply()

    def _stage(self, batch: _Batch) -> None:
        """Adds the queued writes to ``batch``: re-reads the stored map, applies the queue."""
        rid = self.id
        key = rid.encode()
        queue = self._queue
        raw = batch.stored(key)
        if raw is None:
            # A new record (the common case when a batch creates records): no old indexes.
            if None in queue.values():
                fields = {n: v for n, v in queue.items() if v is not None}
            else:
                fields = dict(queue)
            indexes = {n: i for n, i in self._qindex.items() if i is not None}
            for index in indexes.values():
                batch.index_ops[index.encode() + _INDEX_SEP + key] = True
        else:
            fields, indexes = _decode(rid, raw)
            _merge(rid, fields, indexes, queue, self._qindex, batch.index_ops)
        batch.records[key] = _encode(fields, indexes, batch.pack)
        # The transaction may still roll back: until it commits, reads keep seeing the queued
        # values (as BuildKit's in-memory values do), and on a rollback they stay queued. The
        # flushed versions are frozen (queue calls copy them) so _settle can tell which
        # entries were written; no per-flush copy or closure is needed.
        self._flushed_seq = self._qseq
        self._flush_version = self._version
        self._flush_fields = fields
        self._flush_indexes = indexes
        batch.settle.append(self)

    def _settle(self) -> None:
        """Adopts the committed state: drops the queue entries that were written."""
        version = self._flush_version
        if version < 0:
            return  # flushed twice into one transaction: the first call settled both
        flushed = self._flushed_seq
        self._fields, self._indexes = self._flush_fields, self._flush_indexes
        self._flushed_seq = self._flush_fields = self._flush_indexes = None
        self._flush_version = -1
        self._raw = None
        self.exists = True
        if self._version == version or flushed is None:
            self._queue, self._qindex, self._qseq = {}, {}, {}
            return
        queue, qindex, qseq = self._queue, self._qindex, self._qseq
        for name, seq in flushed.items():
            if qseq.get(name) == seq:
                del queue[name], qindex[name], qseq[name]

    # -- external values --------------------------------------------------------------------

    def get_external(self, key: str) -> bytes:
        """Returns the external value ``key``.

        Raises:
            NotFoundError: naming the record and key, when there is none.
        """
        _validate_key(key)
        with self._store.env.read_txn() as txn:
            value = txn.get(DB_EXTERNAL, _external_key(self.id, key))
        if value is None:
            msg = f"no external value {key!r} for record {self.id!r}"
            raise NotFoundError(msg)
        return value

    def set_external(self, key: str, data: bytes | None, *, txn: WriteTxn | None = None) -> None:
        """Stores (``None``: deletes) the external value ``key`` now."""
        _validate_key(key)
        if data is not None and not isinstance(data, bytes | bytearray | memoryview):
            msg = f"external value {key!r} of record {self.id!r} must be bytes, not {type(data)}"
            raise InvalidError(msg)
        if txn is None:
            with self._store.env.write_txn() as own:
                self._put_external(own, key, data)
        else:
            self._put_external(txn, key, data)

    def _put_external(self, txn: WriteTxn, key: str, data: bytes | None) -> None:
        if data is None:
            txn.delete(DB_EXTERNAL, _external_key(self.id, key))
        else:
            txn.put(DB_EXTERNAL, _external_key(self.id, key), bytes(data))


# (record id, id bytes, values, indexes or None, its encoding as a new record)
_Staged = tuple[str, bytes, dict[str, Any], dict[str, str] | None, bytes]


def _stage_records(
    records: Mapping[str, Mapping[str, Any]],
    indexes: Mapping[str, Mapping[str, str]] | None,
) -> list[_Staged]:
    """Validates the input of :meth:`MetadataStore.write_many` whole, before any write.

    Also packs each record as it would be stored if new (the common case for a batch): packing
    is part of the check, since msgpack refuses integers beyond 64 bits.

    Raises:
        InvalidError: naming the record and key of the first bad id, key, value or index.
    """
    if not isinstance(records, Mapping):
        msg = f"records must map record ids to {{key: value}} maps, not {type(records).__name__}"
        raise InvalidError(msg)
    if indexes is not None and not isinstance(indexes, Mapping):
        msg = f"indexes must map record ids to {{key: index}} maps, not {type(indexes).__name__}"
        raise InvalidError(msg)
    staged: list[_Staged] = []
    pack = msgpack.Packer().pack
    plain_kinds = _PLAIN_KINDS
    scalars = _SCALARS
    for rid, given_values in records.items():
        validate_record_id(rid)
        if type(given_values) is dict:
            values: dict[str, Any] = given_values
        elif isinstance(given_values, Mapping):
            values = dict(given_values)
        else:
            msg = f"values of record {rid!r} must be a {{key: value}} map, not {given_values!r}"
            raise InvalidError(msg)
        _check_keys(values)
        deletes = False
        for key, value in values.items():
            kind = type(value)
            if kind in plain_kinds:
                continue
            if value is None:
                deletes = True
            elif kind is not list or not set(map(type, value)) <= scalars:
                _check_storable(rid, key, value)  # lists of scalars, the usual kind, pass above
        given = indexes.get(rid) if indexes else None
        idx: dict[str, str] | None = None
        if given:
            if type(given) is dict:
                idx = given
            elif isinstance(given, Mapping):
                idx = dict(given)
            else:
                msg = f"indexes of record {rid!r} must be a {{key: index}} map, not {given!r}"
                raise InvalidError(msg)
            for key, index in idx.items():
                if type(index) is not str or not index or "\x00" in index:
                    _validate_index(index)
                if values.get(key) is None:
                    msg = (
                        f"index {index!r} of record {rid!r} names key {key!r}, which this "
                        "write does not set to a value"
                    )
                    raise InvalidError(msg)
        if not values:
            continue
        fields = {k: v for k, v in values.items() if v is not None} if deletes else values
        try:
            packed = pack({"f": fields, "i": idx} if idx else {"f": fields})
        except Exception:
            _check_values(rid, fields)  # names the key of an integer beyond 64 bits
            raise
        staged.append((rid, rid.encode(), values, idx, packed))
    if indexes:
        stray = [rid for rid in indexes if rid not in records]
        if stray:
            msg = f"indexes given for records that are not written: {sorted(map(str, stray))}"
            raise InvalidError(msg)
    return staged


class MetadataStore:
    """Record metadata in the shared LMDB environment (BuildKit ``metadata.Store``).

    Args:
        env: The cache's metadata environment.
    """

    def __init__(self, env: MetaEnv) -> None:
        self.env = env

    def get(self, record_id: str) -> StorageItem:
        """Returns the item of ``record_id``; ``item.exists`` is False for a new one.

        Raises:
            InvalidError: ``record_id`` is not a valid id.
        """
        validate_record_id(record_id)
        with self.env.read_txn() as txn:
            raw = txn.get(DB_RECORDS, record_id.encode())
        return StorageItem(self, record_id, raw)

    def get_many(self, record_ids: Iterable[str]) -> list[StorageItem]:
        """Returns the items of ``record_ids`` (new ones included), read in one snapshot."""
        ids = [validate_record_id(r) for r in record_ids]
        keys = [r.encode() for r in ids]
        with self.env.read_txn() as txn:
            found = txn.get_many(DB_RECORDS, keys)
        return [StorageItem(self, r, found.get(k)) for r, k in zip(ids, keys, strict=True)]

    def exists(self, record_id: str) -> bool:
        """Returns whether ``record_id`` has stored metadata."""
        validate_record_id(record_id)
        with self.env.read_txn() as txn:
            return txn.get(DB_RECORDS, record_id.encode()) is not None

    def all(self) -> list[StorageItem]:
        """Returns every stored item in id order, read in one snapshot and decoded.

        Records are decoded straight from LMDB's map (no copy of the stored bytes) with the
        cyclic garbage collector paused (see :class:`_GcPause`). A corrupt record still loads:
        its item keeps a copy of the stored bytes and raises :class:`CorruptMetadataError`
        naming it when read, and it never stops the others from loading.
        """
        items: list[StorageItem] = []
        append = items.append
        decoded = StorageItem._decoded
        with _gc_paused, self.env.read_txn(buffers=True) as txn:
            for key, raw in txn.views(DB_RECORDS):
                rid = str(key, "utf-8")
                try:
                    fields, indexes = _decode(rid, raw)
                except CorruptMetadataError:
                    append(StorageItem(self, rid, bytes(raw)))
                    continue
                append(decoded(self, rid, fields, indexes))
        return items

    def scan_fields(self, visit: Callable[[str, dict[str, Any]], None]) -> list[str]:
        """Calls ``visit(id, fields)`` for every stored record, in id order, in one snapshot.

        The bulk load of open: no :class:`StorageItem` is made, and ``fields`` (the decoded
        key-value map, owned by the callee from then on) is read straight from LMDB's map
        with the cyclic garbage collector paused (see :class:`_GcPause`). Exceptions of
        ``visit`` propagate. Returns the ids of records that do not decode (:meth:`get`
        reads them, and its item raises :class:`CorruptMetadataError` naming what is wrong).
        """
        corrupt: list[str] = []
        with _gc_paused, self.env.read_txn(buffers=True) as txn:
            for key, raw in txn.views(DB_RECORDS):
                rid = str(key, "utf-8")
                try:
                    fields, _ = _decode(rid, raw)
                except CorruptMetadataError:
                    corrupt.append(rid)
                    continue
                visit(rid, fields)
        return corrupt

    def ids(self) -> list[str]:
        """Returns every stored record id in order."""
        with self.env.read_txn() as txn:
            return [key.decode() for key in txn.keys(DB_RECORDS)]

    def count(self) -> int:
        """Returns the number of stored records."""
        with self.env.read_txn() as txn:
            return txn.count(DB_RECORDS)

    def search(self, index: str, *, prefix: bool = False) -> list[StorageItem]:
        """Returns the items in secondary index ``index``, in index-key order.

        Args:
            index: The index string given to :meth:`StorageItem.queue`.
            prefix: Match every index that starts with ``index`` (BuildKit's ``SearchPrefix``)
                instead of exactly ``index``.
        """
        _validate_index(index)
        scan = index.encode() if prefix else index.encode() + _INDEX_SEP
        with self.env.read_txn() as txn:
            ids = []
            for key in txn.keys(DB_INDEX, scan):
                ids.append(key.rsplit(_INDEX_SEP, 1)[1].decode())
            return self._items(txn, dict.fromkeys(ids))

    def search_ids(self, indexes: Iterable[str]) -> dict[str, list[str]]:
        """Record ids per exact index, in one read transaction (no record is decoded).

        For callers that look up many indexes at once (a pull resolving thousands of
        blob-chain IDs); :meth:`search` is the one-index form that returns items.
        """
        out: dict[str, list[str]] = {}
        with self.env.read_txn() as txn:
            for index in indexes:
                _validate_index(index)
                out[index] = [
                    key.rsplit(_INDEX_SEP, 1)[1].decode()
                    for key in txn.keys(DB_INDEX, index.encode() + _INDEX_SEP)
                ]
        return out

    def _items(self, txn: ReadTxn, ids: Iterable[str]) -> list[StorageItem]:
        items = []
        for record_id in ids:
            raw = txn.get(DB_RECORDS, record_id.encode())
            if raw is not None:
                items.append(StorageItem(self, record_id, raw))
        return items

    def clear(self, record_id: str, *, txn: WriteTxn | None = None) -> bool:
        """Removes the record's metadata, its index entries and its external values.

        Works on a record whose value is corrupt (its index entries are then found by scan).
        Returns whether there was anything to remove.
        """
        validate_record_id(record_id)
        if txn is None:
            with self.env.write_txn() as own:
                return self._clear(own, record_id)
        return self._clear(txn, record_id)

    def _clear(self, txn: WriteTxn, record_id: str) -> bool:
        key = record_id.encode()
        raw = txn.get(DB_RECORDS, key)
        removed = False
        try:
            indexes = {} if raw is None else _decode(record_id, raw)[1]
            for index in indexes.values():
                removed |= txn.delete(DB_INDEX, _index_key(index, record_id))
        except CorruptMetadataError:
            suffix = _INDEX_SEP + key
            for ikey in [k for k in txn.keys(DB_INDEX) if k.endswith(suffix)]:
                removed |= txn.delete(DB_INDEX, ikey)
        removed |= txn.delete(DB_RECORDS, key) if raw is not None else False
        removed |= txn.delete_prefix(DB_EXTERNAL, key + _EXTERNAL_SEP) > 0
        return removed

    def commit_many(self, items: Sequence[StorageItem], *, txn: WriteTxn | None = None) -> None:
        """Flushes the queued writes of several items in one transaction (one fsync).

        Items of one record are applied in order, each on top of the previous one. With
        nothing queued, does nothing.

        Args:
            items: The items to flush (clean ones are skipped).
            txn: Write into this transaction instead of opening one (the caller commits).
        """
        dirty = [item for item in items if item._queue]
        if not dirty:
            return
        if txn is None:
            with self.env.write_txn() as own:
                self._commit_many(own, dirty)
        else:
            self._commit_many(txn, dirty)

    def _commit_many(self, txn: WriteTxn, dirty: list[StorageItem]) -> None:
        batch = _Batch(txn, [item.id.encode() for item in dirty])
        for item in dirty:
            item._stage(batch)
        batch.apply()

    def write_many(
        self,
        records: Mapping[str, Mapping[str, Any]],
        indexes: Mapping[str, Mapping[str, str]] | None = None,
        *,
        txn: WriteTxn | None = None,
    ) -> None:
        """Writes the fields of many records in one transaction, without items.

        For each record the same as ``item.queue_many(values, indexes[id])`` and a commit
        (the stored bytes are identical): only the given keys change (``None`` deletes a key
        and its index entry), stored keys not named are kept, and index entries move with
        their keys. The bulk path for batch writers (record creation, statistics
        write-behind): no :class:`StorageItem` is made, new records are packed straight from
        ``values``, and the writes go to LMDB sorted by key in two C-level loops. Items of
        these records read before keep their old view, as with any other writer. Stricter
        than ``queue_many`` about ``indexes``: an index for a key that is not set, or for a
        record that is not written, is an error rather than ignored.

        Args:
            records: Record id to ``{key: value}``. Records with no keys are skipped.
            indexes: Record id to ``{key: index}`` for the keys to index (see
                :meth:`search`); each must name a key that ``records`` sets to a value.
            txn: Write into this transaction instead of opening one (the caller commits).

        Raises:
            InvalidError: A bad id, key, value or index; nothing at all is written.
            CorruptMetadataError: A stored record to merge into is unreadable (naming it);
                nothing of this call is written.
        """
        staged = _stage_records(records, indexes)
        if not staged:
            return
        if txn is None:
            with self.env.write_txn() as own:
                self._write_many(own, staged)
        else:
            self._write_many(txn, staged)

    def _write_many(self, txn: WriteTxn, staged: list[_Staged]) -> None:
        batch = _Batch(txn, [rec[1] for rec in staged])
        records = batch.records
        index_ops = batch.index_ops
        stored = batch.found.get  # ids are distinct: no record of this batch is written yet
        for rid, key, values, idx, packed in staged:
            raw = stored(key)
            if raw is None:
                records[key] = packed
                if idx:
                    for index in idx.values():
                        index_ops[index.encode() + _INDEX_SEP + key] = True
                continue
            stored_fields, stored_indexes = _decode(rid, raw)
            _merge(rid, stored_fields, stored_indexes, values, idx, index_ops)
            records[key] = _encode(stored_fields, stored_indexes, batch.pack)
        batch.apply()

    def put_raw(self, record_id: str, raw: bytes, *, txn: WriteTxn | None = None) -> None:
        """Stores an already-encoded record value (repair tools and tests only)."""
        validate_record_id(record_id)
        if txn is None:
            with self.env.write_txn() as own:
                own.put(DB_RECORDS, record_id.encode(), raw)
        else:
            txn.put(DB_RECORDS, record_id.encode(), raw)

    def iter_ids(self) -> Iterator[str]:
        """Yields record ids in order (one read snapshot for the whole walk)."""
        yield from self.ids()
